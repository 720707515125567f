"""A database outage in fleet mode: the PostgreSQL server of the test's own is stopped while a
turn runs, and started again. The daemon stays up, says NOT_SERVING and UNAVAILABLE ("the
database is unreachable") meanwhile, ends the turn for its client, reconnects by itself and
then stores the turn's outcome as it streamed: nothing is lost."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import grpc
import pytest
from atomizer.v1 import session_pb2 as pb
from grpc_health.v1 import health_pb2, health_pb2_grpc

from tests.conftest import Stubs, stubs_for
from tests.integration.test_postgres_fleet import Turn, host
from tests.support.daemon import RunningDaemon
from tests.support.postgres import PostgresServer
from tests.support.turns import kinds, reply_text, send

T = TypeVar("T")
SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


def health(d: RunningDaemon) -> int:
    with grpc.insecure_channel(d.target) as ch:
        resp = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=5)
        return int(resp.status)


def until(
    what: str,
    check: Callable[[], T | None],
    timeout: float = 60.0,
    log: RunningDaemon | None = None,
) -> T:
    """Waits for a condition the daemon reaches by itself (no assumption on how soon, only a
    generous bound so that a failure does not hang the suite)."""
    deadline = time.monotonic() + timeout
    while True:
        got = check()
        if got is not None and got is not False:
            return got
        if time.monotonic() > deadline:
            tail = log.log()[-6000:] if log is not None else ""
            raise AssertionError(f"not reached within {timeout} s: {what}\n{tail}")
        time.sleep(0.05)


def unavailable(call: Callable[[], object]) -> str:
    with pytest.raises(grpc.RpcError) as err:
        call()
    assert err.value.code() == grpc.StatusCode.UNAVAILABLE, err.value.details()
    return str(err.value.details())


def history(stubs: Stubs, sid: str) -> list[pb.Message]:
    return list(stubs.sessions.GetHistory(pb.GetHistoryRequest(session_id=sid)).messages)


def no_failed_requests(d: RunningDaemon) -> None:
    failed = [r for r in d.log_records() if r.get("event") == "request failed"]
    assert not failed, failed[:3]


@pytest.mark.parametrize("mode", ["fast", "immediate"])
def test_a_turn_runs_through_a_database_restart_and_is_stored_once_it_is_back(
    own_postgres: PostgresServer, short_tmp: Path, mode: str
) -> None:
    url = own_postgres.new_database()
    d = host(short_tmp / "a", "host-a", url)
    gate = short_tmp / "gate"
    with d:
        stubs = stubs_for(d.channel())
        stubs.sessions.CreateSession(pb.CreateSessionRequest(session_id="s1"))
        stubs.sessions.CreateSession(pb.CreateSessionRequest(session_id="s2"))
        assert reply_text(send(stubs, "s1", "before")) == "echo: before"
        # A turn that holds after its first words until the gate opens.
        turn = Turn(stubs, "s1", f"[[gate:{gate}]] through the outage")
        turn.until("text_delta")

        own_postgres.pause(mode)
        # Whatever needs the database is refused, saying why; the daemon stays up.
        details = unavailable(lambda: history(stubs, "s1"))
        assert "database is unreachable" in details, details
        until("NOT_SERVING", lambda: health(d) == NOT_SERVING)
        details = unavailable(lambda: send(stubs, "s2", "while down"))
        assert "database is unreachable" in details, details
        details = unavailable(lambda: stubs.sessions.CreateSession(pb.CreateSessionRequest()))
        assert "database is unreachable" in details, details

        # The running turn ends for its client although its outcome cannot be stored yet.
        gate.touch()
        terminal = turn.until("turn_completed")
        assert not terminal.turn_completed.interrupted
        streamed = reply_text(turn.seen)
        assert streamed == "echo: through the outage"
        assert health(d) == NOT_SERVING

        own_postgres.resume()
        until("SERVING again", lambda: health(d) == SERVING)
        # Stored once the database is back, as it streamed.
        stored = until(
            "the turn's outcome stored",
            lambda: (h := history(stubs, "s1")) and len(h) == 4 and h,
            log=d,
        )
        assert [m.content for m in stored[:2]] == ["before", "echo: before"]
        assert stored[2].content == "[[gate:" + str(gate) + "]] through the outage"
        assert stored[3].content == streamed
        assert stored[3].status == pb.MESSAGE_STATUS_COMPLETE
        assert stored[2].status == pb.MESSAGE_STATUS_COMPLETE
        # And the daemon goes on as before: the same session, the refused one, a new one.
        assert reply_text(send(stubs, "s1", "after")) == "echo: after"
        assert reply_text(send(stubs, "s2", "now")) == "echo: now"
        stubs.sessions.CreateSession(pb.CreateSessionRequest(session_id="s3"))
        assert kinds(send(stubs, "s3", "fresh"))[-1] == "turn_completed"
        assert [m.content for m in history(stubs, "s2")] == ["now", "echo: now"]
        no_failed_requests(d)
        assert d.proc is not None and d.proc.poll() is None
    assert d.proc is not None and d.proc.returncode == 0, d.log()
    events = [r.get("event") for r in d.log_records()]
    assert "database unreachable; reconnecting" in events
    assert "database reconnected" in events
    assert "turn outcome stored after the store recovered" in events


def test_a_database_restarted_while_idle_is_reconnected_without_a_client(
    own_postgres: PostgresServer, short_tmp: Path
) -> None:
    url = own_postgres.new_database()
    with host(short_tmp / "a", "host-a", url) as d:
        stubs = stubs_for(d.channel())
        stubs.sessions.CreateSession(pb.CreateSessionRequest(session_id="s1"))
        assert reply_text(send(stubs, "s1", "before")) == "echo: before"
        own_postgres.pause("immediate")
        # Nobody calls: the daemon notices by itself that its connection is gone.
        until("NOT_SERVING", lambda: health(d) == NOT_SERVING)
        own_postgres.resume()
        until("SERVING again", lambda: health(d) == SERVING)
        # The first call after it works: the connection (and the host's lock) is new.
        assert reply_text(send(stubs, "s1", "after")) == "echo: after"
        # The host's lock was taken again: a second daemon of this host is still refused.
        twin = host(short_tmp / "a2", "host-a", url)
        twin.start(wait=False)
        assert twin.proc is not None and twin.proc.wait(30) != 0
        assert "another atomizerd with host_id 'host-a'" in twin.log()
        no_failed_requests(d)
