"""Shared fixtures: a real daemon on a temporary socket, and stubs bound to it."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
from atomizer.v1 import daemon_pb2_grpc, session_pb2_grpc

from tests.support import processes
from tests.support.daemon import RunningDaemon
from tests.support.postgres import PostgresServer, find_bindir

# Agent processes (shims, agents) alive when the session began: not the suite's own.
_BEFORE = pytest.StashKey[set[int]]()
# How long the suite's last shims get to finish their own exit before they count as left.
_LEFT_GRACE = 15.0


def _worker(session: pytest.Session) -> bool:
    """A pytest-xdist worker (scripts/test runs the suite in two): only the controller, which
    starts before and ends after every worker, looks for what the suite left."""
    return hasattr(session.config, "workerinput")


def pytest_sessionstart(session: pytest.Session) -> None:
    if not _worker(session):
        session.config.stash[_BEFORE] = {p.pid for p in processes.suite_processes()}


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    """No agent or shim the suite started outlives it: those left are reported (pid, group,
    command line), killed, and fail the run."""
    if _worker(session):
        return
    before = session.config.stash.get(_BEFORE, set())
    started = [p for p in processes.suite_processes() if p.pid not in before]
    left = processes.wait_gone(started, _LEFT_GRACE)
    if not left:
        return
    reporter = session.config.pluginmanager.get_plugin("terminalreporter")
    lines = [f"{len(left)} agent process(es) of the test suite still alive at its end:"]
    lines += [f"  {p.describe()}" for p in left]
    if reporter is not None:
        reporter.write_line("")
        for line in lines:
            reporter.write_line(line, red=True)
    else:
        print("\n".join(lines))
    processes.end(left)
    session.exitstatus = pytest.ExitCode.TESTS_FAILED


@dataclass
class Stubs:
    sessions: session_pb2_grpc.SessionServiceStub
    daemon: daemon_pb2_grpc.DaemonServiceStub


def stubs_for(channel: grpc.Channel) -> Stubs:
    return Stubs(
        sessions=session_pb2_grpc.SessionServiceStub(channel),
        daemon=daemon_pb2_grpc.DaemonServiceStub(channel),
    )


@pytest.fixture
def short_tmp() -> Iterator[Path]:
    """A short temporary dir: Unix socket paths are limited to 107 bytes."""
    import tempfile

    with tempfile.TemporaryDirectory(prefix="azd-") as d:
        yield Path(d)


@pytest.fixture
def daemon(short_tmp: Path) -> Iterator[RunningDaemon]:
    with RunningDaemon(short_tmp) as d:
        yield d


@pytest.fixture
def stubs(daemon: RunningDaemon) -> Stubs:
    return stubs_for(daemon.channel())


@pytest.fixture(scope="module")
def shared_daemon() -> Iterator[RunningDaemon]:
    """One daemon for those tests of a module that each work in sessions of their own and look
    at nothing daemon-wide (listings of every session, counts, settings): started once for them,
    not once a test. A test that needs a daemon to itself takes `daemon`."""
    import tempfile

    with tempfile.TemporaryDirectory(prefix="azd-") as d, RunningDaemon(Path(d)) as running:
        yield running


@pytest.fixture
def shared_stubs(shared_daemon: RunningDaemon) -> Stubs:
    return stubs_for(shared_daemon.channel())


@pytest.fixture(scope="session")
def postgres() -> Iterator[PostgresServer]:
    """One private PostgreSQL server for the whole test session, stopped at its end."""
    bindir = find_bindir()
    if bindir is None:
        pytest.skip(
            "PostgreSQL's initdb, pg_ctl and postgres were not found (on PATH or in "
            "/usr/lib/postgresql/*/bin; scripts/test installs Debian's postgresql package)"
        )
    server = PostgresServer(bindir).start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def own_postgres() -> Iterator[PostgresServer]:
    """A PostgreSQL server of the test's own, which it may stop and start again mid-test
    (`pause`, `resume`) without disturbing the other tests' server."""
    bindir = find_bindir()
    if bindir is None:
        pytest.skip("PostgreSQL's initdb, pg_ctl and postgres were not found")
    server = PostgresServer(bindir, durable=True).start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def pg_url(postgres: PostgresServer) -> Iterator[str]:
    """The URL of a fresh database of its own on the session's PostgreSQL server."""
    url = postgres.new_database()
    yield url
    postgres.drop_database(url)


@pytest.fixture(params=["sqlite", "postgresql"])
def store_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """An empty database on each engine: an SQLite file, then a PostgreSQL database."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'state' / 'atomizerd.db'}"
    url: str = request.getfixturevalue("pg_url")
    return url
