"""Shared fixtures: a real daemon on a temporary socket, and stubs bound to it."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
from atomizer.v1 import daemon_pb2_grpc, session_pb2_grpc

from tests.support.daemon import RunningDaemon
from tests.support.postgres import PostgresServer, find_bindir


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
