"""What the daemon exposes, and to whom: socket and file permissions, a runtime dir it can
trust, and an agent environment built from an allowlist rather than inherited."""

from __future__ import annotations

import os
import stat
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from atomizer.v1 import session_pb2 as pb

from tests.conftest import Stubs, stubs_for
from tests.support.daemon import RunningDaemon


def mode_of(path: Path) -> int:
    return stat.S_IMODE(path.lstat().st_mode)


def reply(stubs: Stubs, sid: str, text: str) -> str:
    stream = stubs.sessions.SendMessage(
        pb.SendMessageRequest(session_id=sid, text=text), timeout=30
    )
    last = [r.event for r in stream][-1]
    assert last.HasField("turn_completed"), last
    return last.turn_completed.text


@pytest.mark.parametrize(("configured", "expected"), [(None, 0o600), ("0660", 0o660)])
def test_the_socket_gets_the_configured_mode(
    short_tmp: Path, configured: str | None, expected: int
) -> None:
    config = {"daemon": {"socket_mode": configured}} if configured else {}
    with RunningDaemon(short_tmp, config) as d:
        assert stat.S_ISSOCK(d.socket.lstat().st_mode)
        assert oct(mode_of(d.socket)) == oct(expected)


def test_runtime_and_state_files_are_private(short_tmp: Path) -> None:
    with RunningDaemon(short_tmp) as d:
        stubs = stubs_for(d.channel())
        stubs.sessions.CreateSession(pb.CreateSessionRequest(session_id="private"))
        reply(stubs, "private", "hello")  # the agent runs: its MCP config exists
        mcp = d.runtime_dir / "sessions" / "private.mcp.json"
        assert mcp.is_file()
        for directory in (d.runtime_dir, d.runtime_dir / "sessions", d.state_dir):
            assert oct(mode_of(directory)) == oct(0o700), directory
        files = [
            p
            for root in (d.runtime_dir, d.state_dir)
            for p in root.rglob("*")
            if not p.is_dir() and p != d.socket
        ]
        assert mcp in files and d.state_dir / "atomizerd.db" in files
        assert {p: oct(mode_of(p)) for p in files} == {p: oct(0o600) for p in files}


def _start_and_fail(d: RunningDaemon) -> str:
    d.start(wait=False)
    assert d.proc is not None
    assert d.proc.wait(timeout=30) == 1
    return d.log()


def test_a_world_writable_runtime_dir_is_refused(short_tmp: Path) -> None:
    d = RunningDaemon(short_tmp)
    d.runtime_dir.mkdir()
    d.runtime_dir.chmod(0o777)
    out = _start_and_fail(d)
    assert f"runtime dir {d.runtime_dir} is writable by other users" in out
    assert "chmod 0700" in out
    assert "Traceback" not in out
    assert not d.socket.exists()
    assert not (d.state_dir / "atomizerd.db").exists()  # refused before touching state


def test_a_runtime_dir_of_another_user_is_refused(short_tmp: Path) -> None:
    if os.geteuid() != 0:
        pytest.skip("needs root to give the directory to another user")
    d = RunningDaemon(short_tmp)
    d.runtime_dir.mkdir(mode=0o700)
    os.chown(d.runtime_dir, 65534, 65534)  # nobody
    out = _start_and_fail(d)
    assert "belongs to another user" in out
    assert not d.socket.exists()


SECRETS = {
    "AWS_SECRET_ACCESS_KEY": "aws-secret-from-the-daemon-env",
    "GITHUB_TOKEN": "ghp_from-the-daemon-env",
    "DATABASE_URL": "postgres://user:pw@db/prod",
    "CLAUDECODE": "1",
}


@pytest.fixture(scope="module")
def env_daemon() -> Iterator[RunningDaemon]:
    with tempfile.TemporaryDirectory(prefix="azd-") as tmp:
        workdir = Path(tmp)
        config = {
            "agent": {
                "prewarm": False,
                "env": {
                    "HOME": str(workdir / "home"),
                    "ATOMIZER_FROM_CONFIG": "set-in-agent.env",
                    # Even the configuration cannot make the agent think it is nested.
                    "CLAUDECODE": "1",
                },
            }
        }
        env = {**SECRETS, "ANTHROPIC_BASE_URL": "http://127.0.0.1:9", "LANG": "C.UTF-8"}
        with RunningDaemon(workdir, config, env=env) as d:
            stubs_for(d.channel()).sessions.CreateSession(pb.CreateSessionRequest(session_id="env"))
            yield d


@pytest.mark.parametrize("name", sorted(SECRETS))
def test_the_agent_does_not_inherit_the_daemons_secrets(
    env_daemon: RunningDaemon, name: str
) -> None:
    stubs = stubs_for(env_daemon.channel())
    assert f"env {name} unset" in reply(stubs, "env", f"[[env:{name}]]")


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("ATOMIZER_FROM_CONFIG", "set-in-agent.env"),  # agent.env
        ("ANTHROPIC_BASE_URL", "http://127.0.0.1:9"),  # the CLI's own configuration
        ("LANG", "C.UTF-8"),  # the basics a CLI needs
        ("PATH", os.environ["PATH"]),
    ],
)
def test_the_agent_sees_its_configured_and_allowlisted_variables(
    env_daemon: RunningDaemon, name: str, value: str
) -> None:
    stubs = stubs_for(env_daemon.channel())
    assert f"env {name}={value}" in reply(stubs, "env", f"[[env:{name}]]")


def test_the_daemon_itself_has_the_secrets(env_daemon: RunningDaemon) -> None:
    """The premise of the tests above: the variables are in the daemon's own environment."""
    assert env_daemon.proc is not None
    raw = Path(f"/proc/{env_daemon.proc.pid}/environ").read_bytes()
    environ = dict(item.split("=", 1) for item in raw.decode().split("\0") if "=" in item)
    assert {k: environ.get(k) for k in SECRETS} == SECRETS
