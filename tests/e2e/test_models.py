"""A session's model with the real CLI: chosen at creation, changed on the live agent (after
the running turn), kept across a restart, limited to agent.models; read from the model the fake
Messages API was asked for."""

from __future__ import annotations

import threading

import grpc
import pytest
from atomizer.v1 import session_pb2 as pb

from tests.e2e.conftest import E2E
from tests.support.turns import kinds, send
from tests.support.waiting import wait_for

pytestmark = pytest.mark.e2e

SONNET, HAIKU = "claude-sonnet-4-5", "claude-haiku-4-5"


def spawns(e2e: E2E, session_id: str) -> int:
    assert e2e.daemon is not None
    return sum(
        1
        for r in e2e.daemon.log_records()
        if r.get("event") == "agent process started" and r.get("session_id") == session_id
    )


def test_the_model_is_chosen_changed_live_and_kept(e2e: E2E) -> None:
    stubs = e2e.start()
    session = stubs.sessions.CreateSession(
        pb.CreateSessionRequest(session_id="m", model=SONNET)
    ).session
    assert session.model == SONNET
    send(stubs, "m", "first")
    assert e2e.api.requests[-1].model == SONNET

    # SetModel during a turn: the turn finishes under the model it started with.
    events: list[pb.SessionEvent] = []

    def slow_turn() -> None:
        events.extend(send(stubs, "m", "slow [[chunks:20]] [[slow:50]]"))

    sender = threading.Thread(target=slow_turn)
    sender.start()
    wait_for("the slow turn's request", lambda: len(e2e.api.requests) == 2)
    changed = stubs.sessions.SetModel(pb.SetModelRequest(session_id="m", model=HAIKU)).session
    sender.join(60)
    assert kinds(events)[-1] == "turn_completed"
    assert changed.model == HAIKU and changed.state != pb.SESSION_STATE_BUSY
    assert e2e.api.requests[1].model == SONNET

    started = spawns(e2e, "m")
    send(stubs, "m", "after the change")
    assert e2e.api.requests[-1].model == HAIKU
    assert spawns(e2e, "m") == started  # the live agent switched (set_model), no new process

    e2e.stop()  # a new daemon: the session's next agent resumes with --model
    stubs = e2e.start()
    assert stubs.sessions.GetSession(pb.GetSessionRequest(session_id="m")).session.model == HAIKU
    send(stubs, "m", "after a restart")
    last = e2e.api.requests[-1]
    assert last.model == HAIKU
    assert "after the change" in " ".join(last.texts("user"))  # the same conversation


def test_only_the_daemons_models_may_be_chosen(e2e: E2E) -> None:
    stubs = e2e.start({"agent": {"models": [SONNET, HAIKU]}})
    with pytest.raises(grpc.RpcError) as err:
        stubs.sessions.CreateSession(pb.CreateSessionRequest(model="claude-opus-9"))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "agent.models" in (err.value.details() or "") and SONNET in (err.value.details() or "")
    stubs.sessions.CreateSession(pb.CreateSessionRequest(session_id="ok", model=HAIKU))
    with pytest.raises(grpc.RpcError) as err:
        stubs.sessions.SetModel(pb.SetModelRequest(session_id="ok", model="claude-opus-9"))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    with pytest.raises(grpc.RpcError) as err:
        stubs.sessions.SetModel(pb.SetModelRequest(session_id="ok", model="bad name"))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    send(stubs, "ok", "hello")
    assert e2e.api.requests[-1].model == HAIKU
    # Reopening with another model changes it like SetModel.
    reopened = stubs.sessions.CreateSession(
        pb.CreateSessionRequest(session_id="ok", model=SONNET)
    ).session
    assert reopened.model == SONNET
    send(stubs, "ok", "again")
    assert e2e.api.requests[-1].model == SONNET
