"""Spare agents with the real CLI: a new session's first message goes to an agent started
before the session existed, and the model still gets that session's system prompt."""

from __future__ import annotations

import pytest
from atomizer.v1 import daemon_pb2
from atomizer.v1 import session_pb2 as pb

from tests.e2e.conftest import E2E
from tests.support.turns import reply_text, send
from tests.support.waiting import wait_for

pytestmark = pytest.mark.e2e


def started_agents(e2e: E2E) -> list[dict[str, object]]:
    assert e2e.daemon is not None
    return [r for r in e2e.daemon.log_records() if r.get("event") == "agent process started"]


def test_create_and_send_at_once_uses_a_spare_started_before_the_session(e2e: E2E) -> None:
    stubs = e2e.start({"pool": {"spares": 1}, "agent": {"prewarm": False}})
    # Counted as a spare from the moment its spawn is decided; started a moment later.
    wait_for(
        "a spare",
        lambda: (
            stubs.daemon.GetStatus(daemon_pb2.GetStatusRequest()).spare_agents == 1
            and len(started_agents(e2e)) == 1
        ),
    )
    [spare] = started_agents(e2e)

    sid = stubs.sessions.CreateSession(pb.CreateSessionRequest()).session.session_id
    events = send(stubs, sid, "hello")

    assert reply_text(events) == "echo: hello"
    assert spare["session_id"] == sid, "the session took the id the spare was started for"
    assert [r["pid"] for r in started_agents(e2e) if r["session_id"] == sid] == [spare["pid"]]
    [request] = e2e.api.requests
    assert "You are assisting a user of Atomizer" in request.system_text
    assert "Mode: user" in request.system_text
    # The spare was replaced in the background and is not a session.
    wait_for("a new spare", lambda: len(started_agents(e2e)) == 2)
    status = stubs.daemon.GetStatus(daemon_pb2.GetStatusRequest())
    assert status.spare_agents == 1
    assert status.sessions_known == 1


def test_a_session_with_a_study_does_not_take_a_spare(e2e: E2E) -> None:
    assert e2e.workdir is not None
    (e2e.workdir / "atomizer" / "studies" / "beam").mkdir(parents=True)
    stubs = e2e.start({"pool": {"spares": 1}, "agent": {"prewarm": False}})
    wait_for(
        "a spare", lambda: stubs.daemon.GetStatus(daemon_pb2.GetStatusRequest()).spare_agents == 1
    )
    sid = stubs.sessions.CreateSession(pb.CreateSessionRequest(study_id="beam")).session.session_id
    events = send(stubs, sid, "hello")
    assert reply_text(events) == "echo: hello"
    [request] = e2e.api.requests
    assert "beam" in request.system_text, "its own agent, with the study in its system prompt"
    assert stubs.daemon.GetStatus(daemon_pb2.GetStatusRequest()).spare_agents == 1
