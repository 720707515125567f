"""Starting, stopping and restarting the daemon process."""

from __future__ import annotations

import os
import signal
import subprocess
import sys

import grpc
import pytest
from atomizer.v1 import session_pb2 as pb
from grpc_health.v1 import health_pb2, health_pb2_grpc

from tests.conftest import stubs_for
from tests.support.daemon import RunningDaemon
from tests.support.waiting import alive, wait_for


def test_sigterm_exits_cleanly_and_removes_the_socket(short_tmp) -> None:
    d = RunningDaemon(short_tmp).start()
    assert d.socket.exists()
    assert oct(d.socket.stat().st_mode & 0o777) == oct(0o600)
    assert oct(d.runtime_dir.stat().st_mode & 0o777) == oct(0o700)
    assert d.stop() == 0
    assert not d.socket.exists()
    assert "atomizerd stopped" in d.log()


def test_restart_lists_the_same_sessions(short_tmp) -> None:
    with RunningDaemon(short_tmp) as d:
        stubs = stubs_for(d.channel())
        made = {
            stubs.sessions.CreateSession(pb.CreateSessionRequest()).session.session_id
            for _ in range(3)
        }
    with RunningDaemon(short_tmp) as d:
        listed = stubs_for(d.channel()).sessions.ListSessions(pb.ListSessionsRequest())
        assert {s.session_id for s in listed.sessions} == made


def test_a_second_daemon_on_the_same_socket_refuses_to_start(short_tmp) -> None:
    with RunningDaemon(short_tmp) as first:
        second = RunningDaemon(short_tmp)
        second.log_path = short_tmp / "second.log"
        second.start(wait=False)
        assert second.proc is not None
        assert second.proc.wait(timeout=30) == 1
        assert "already running" in second.log()
        # The first one still serves.
        stubs_for(first.channel()).sessions.ListSessions(pb.ListSessionsRequest(), timeout=5)


def test_a_second_daemon_on_the_same_database_refuses_to_start(short_tmp) -> None:
    # Two runtime dirs (two sockets, two runtime locks), one database: the second daemon's
    # crash recovery would kill the first one's agents and settle its running turn.
    db = short_tmp / "shared" / "atomizerd.db"
    config = {"daemon": {"database": f"sqlite:///{db}"}}
    with RunningDaemon(short_tmp / "first", config) as first:
        stubs = stubs_for(first.channel())
        stubs.sessions.CreateSession(pb.CreateSessionRequest(session_id="busy"))
        stream = stubs.sessions.SendMessage(
            pb.SendMessageRequest(session_id="busy", text="[[slow:100]] [[deltas:30]]"),
            timeout=60,
        )
        assert next(stream).event.WhichOneof("kind") == "turn_started"
        records = first.log_records()
        agents = [r["pid"] for r in records if r.get("event") == "agent process started"]
        assert agents

        second = RunningDaemon(short_tmp / "second", config)
        second.start(wait=False)
        proc = second.proc
        assert proc is not None
        try:
            wait_for(
                "the second daemon to exit or to serve",
                lambda: proc.poll() is not None or "atomizerd ready" in second.log(),
                timeout=30,
            )
            assert proc.poll() == 1, second.log()
        finally:
            second.stop()
        message = second.log()
        assert f"already using the database {db}" in message
        assert first.proc is not None and f"pid {first.proc.pid}" in message
        assert oct(db.with_name("atomizerd.db.lock").stat().st_mode & 0o777) == oct(0o600)

        # The first daemon's agent was left alone: its turn goes on to the end.
        assert all(alive(pid) for pid in agents)
        events = [r.event for r in stream]
        assert events[-1].WhichOneof("kind") == "turn_completed"
        assert "".join(e.text_delta.text for e in events if e.HasField("text_delta")) == "x" * 30
        stubs.sessions.ListSessions(pb.ListSessionsRequest(), timeout=5)


def test_a_stale_socket_left_by_a_killed_daemon_is_replaced(short_tmp) -> None:
    d = RunningDaemon(short_tmp).start()
    d.kill()
    assert d.socket.exists()  # SIGKILL leaves it behind
    with RunningDaemon(short_tmp) as again:
        stubs_for(again.channel()).sessions.ListSessions(pb.ListSessionsRequest(), timeout=5)


def test_health_is_serving_once_ready(daemon: RunningDaemon) -> None:
    health = health_pb2_grpc.HealthStub(daemon.channel())
    for service in ("", "atomizer.v1.SessionService", "atomizer.v1.DaemonService"):
        resp = health.Check(health_pb2.HealthCheckRequest(service=service), timeout=5)
        assert resp.status == health_pb2.HealthCheckResponse.SERVING


def test_a_draining_daemon_stores_the_running_turn_as_interrupted(short_tmp) -> None:
    # A slow reply keeps a turn running while the daemon drains.
    d = RunningDaemon(short_tmp, {"daemon": {"grace_period": 3.0}}).start()
    stubs = stubs_for(d.channel())
    stubs.sessions.CreateSession(pb.CreateSessionRequest(session_id="busy"))
    stream = stubs.sessions.SendMessage(
        pb.SendMessageRequest(session_id="busy", text="[[slow:200]] [[deltas:100]]"), timeout=60
    )
    next(stream)  # the turn has started
    d.signal(signal.SIGTERM)
    kinds = [r.event.WhichOneof("kind") for r in stream]
    assert kinds[-1] in ("turn_completed", "turn_failed")
    assert d.proc is not None and d.proc.wait(timeout=30) == 0
    history_daemon = RunningDaemon(short_tmp).start()
    try:
        msgs = (
            stubs_for(history_daemon.channel())
            .sessions.GetHistory(pb.GetHistoryRequest(session_id="busy"))
            .messages
        )
        assert [m.role for m in msgs] == [pb.ROLE_USER, pb.ROLE_ASSISTANT]
        assert msgs[1].status == pb.MESSAGE_STATUS_INTERRUPTED
    finally:
        history_daemon.stop()


def test_while_draining_health_is_not_serving_and_new_work_is_unavailable(short_tmp) -> None:
    # An agent that ignores the interrupt (and SIGTERM) holds the drain open for a while.
    d = RunningDaemon(short_tmp, {"agent": {"stop_grace": 3.0}}).start()
    stubs = stubs_for(d.channel())
    health = health_pb2_grpc.HealthStub(d.channel())
    stubs.sessions.CreateSession(pb.CreateSessionRequest(session_id="stuck"))
    stream = stubs.sessions.SendMessage(
        pb.SendMessageRequest(session_id="stuck", text="[[hang]]"), timeout=60
    )
    next(stream)
    d.signal(signal.SIGTERM)
    wait_for(
        "health NOT_SERVING",
        lambda: (
            health.Check(health_pb2.HealthCheckRequest(), timeout=5).status
            == health_pb2.HealthCheckResponse.NOT_SERVING
        ),
    )
    with pytest.raises(grpc.RpcError) as err:
        stubs.sessions.CreateSession(pb.CreateSessionRequest(), timeout=5)
    assert err.value.code() == grpc.StatusCode.UNAVAILABLE
    assert "shutting down" in (err.value.details() or "")
    list(stream)
    assert d.proc is not None and d.proc.wait(timeout=30) == 0


def run_cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "atomizerd", *args],
        capture_output=True,
        text=True,
        timeout=30,
        env={**os.environ, **(env or {})},
    )


def test_check_config_prints_the_effective_configuration(short_tmp) -> None:
    cfg = short_tmp / "c.toml"
    cfg.write_text("[pool]\nmax_live = 3\n")
    out = run_cli("--config", str(cfg), "--check-config", env={"ATOMIZERD_REAPER_INTERVAL": "60"})
    assert out.returncode == 0, out.stderr
    assert "max_live = 3" in out.stdout
    assert "interval = 60.0" in out.stdout


@pytest.mark.parametrize(
    ("toml", "words"),
    [
        ("[pool]\nmax_lives = 3\n", "unknown configuration key 'pool.max_lives'"),
        ('[pool]\nmax_live = "many"\n', "pool.max_live: expected an integer"),
        ("[pool]\nmax_live = 0\n", "pool.max_live: must be greater than 0"),
        ('[daemon]\nsocket_mode = "0666"\n', "must not grant access to others"),
        ("not toml [", "not valid TOML"),
        ('[mcp.servers]\nx = "{oops"\n', "mcp.servers.x: not valid JSON"),
        ('[mcp.servers]\natomizer = "{}"\n', "reserved"),
    ],
)
def test_bad_configuration_is_a_clear_startup_error(short_tmp, toml: str, words: str) -> None:
    cfg = short_tmp / "c.toml"
    cfg.write_text(toml)
    out = run_cli("--config", str(cfg), "--check-config")
    assert out.returncode == 2
    assert words in out.stderr


def test_refuses_to_run_as_root_without_allow_root(short_tmp) -> None:
    if os.geteuid() != 0:
        pytest.skip("only meaningful as root")
    out = run_cli("--runtime-dir", str(short_tmp / "r"), "--state-dir", str(short_tmp / "s"))
    assert out.returncode == 2
    assert "refusing to run as root" in out.stderr
    assert not (short_tmp / "r").exists()


def test_reflection_lists_both_services(daemon: RunningDaemon) -> None:
    from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

    stub = reflection_pb2_grpc.ServerReflectionStub(daemon.channel())
    responses = stub.ServerReflectionInfo(
        iter([reflection_pb2.ServerReflectionRequest(list_services="")]), timeout=5
    )
    names = {s.name for r in responses for s in r.list_services_response.service}
    assert {
        "atomizer.v1.SessionService",
        "atomizer.v1.DaemonService",
        "grpc.health.v1.Health",
    } <= names


def test_unknown_environment_variable_is_an_error() -> None:
    out = run_cli("--check-config", env={"ATOMIZERD_POOL_MAXLIVE": "3"})
    assert out.returncode == 2
    assert "ATOMIZERD_POOL_MAXLIVE" in out.stderr


def test_a_second_signal_skips_the_grace_period(short_tmp) -> None:
    # Long grace periods and an agent that ignores interrupts and SIGTERM: only the second
    # signal makes the daemon stop without waiting them out.
    d = RunningDaemon(
        short_tmp, {"daemon": {"grace_period": 60.0}, "agent": {"stop_grace": 60.0}}
    ).start()
    stubs = stubs_for(d.channel())
    stubs.sessions.CreateSession(pb.CreateSessionRequest(session_id="stuck"))
    stream = stubs.sessions.SendMessage(
        pb.SendMessageRequest(session_id="stuck", text="[[hang]]"), timeout=120
    )
    next(stream)
    d.signal(signal.SIGTERM)
    wait_for("the shutdown to begin", lambda: "atomizerd stopping" in d.log())
    d.signal(signal.SIGTERM)
    assert d.proc is not None and d.proc.wait(timeout=20) == 0
    assert "second signal" in d.log()
    assert not d.socket.exists()
