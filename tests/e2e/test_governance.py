"""Governance with the real CLI: live tool approval, remembered rules, spending caps, and the
audit trail that records every outcome."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from pathlib import Path

import grpc
import pytest
from atomizer.v1 import daemon_pb2
from atomizer.v1 import session_pb2 as pb

from tests.conftest import Stubs
from tests.e2e.conftest import E2E
from tests.support.turns import kinds, reply_text, send

pytestmark = pytest.mark.e2e


def touch(path: Path) -> str:
    """A tool use outside the user-mode allowlist that asks: the Write tool (sandboxed Bash
    runs without asking, tests/e2e/test_sandbox.py)."""
    return f'[[tool:Write {{"file_path": "{path}", "content": ""}}]]'


def send_answering(
    stubs: Stubs, sid: str, text: str, answer: Callable[[pb.PermissionRequest], None]
) -> list[pb.SessionEvent]:
    """Sends a message and answers every permission request with `answer`."""
    events = []
    stream = stubs.sessions.SendMessage(
        pb.SendMessageRequest(session_id=sid, text=text), timeout=120
    )
    for r in stream:
        events.append(r.event)
        if r.event.WhichOneof("kind") == "permission_request":
            answer(r.event.permission_request)
    return events


def respond(stubs: Stubs, sid: str, allow: bool, *, remember: bool = False, message: str = ""):
    def answer(req: pb.PermissionRequest) -> None:
        stubs.sessions.RespondToPermission(
            pb.RespondToPermissionRequest(
                session_id=sid,
                request_id=req.request_id,
                allow=allow,
                remember=remember,
                message=message,
            ),
            timeout=10,
        )

    return answer


def decided(events: list[pb.SessionEvent]) -> list[pb.PermissionDecided]:
    return [e.permission_decided for e in events if e.WhichOneof("kind") == "permission_decided"]


def audit(stubs: Stubs, sid: str) -> list[pb.AuditEvent]:
    return list(stubs.sessions.ListAuditEvents(pb.ListAuditEventsRequest(session_id=sid)).events)


def test_approve_runs_the_tool_and_deny_does_not(e2e: E2E) -> None:
    stubs = e2e.start()
    stubs.sessions.CreateSession(pb.CreateSessionRequest(session_id="g"))
    allowed, refused = e2e.workdir / "allowed.txt", e2e.workdir / "refused.txt"

    events = send_answering(stubs, "g", touch(allowed), respond(stubs, "g", True))
    assert allowed.exists()
    request = next(
        e.permission_request for e in events if e.WhichOneof("kind") == "permission_request"
    )
    assert request.tool_name == "Write" and str(allowed) in request.input_json
    assert [(d.allow, d.decider) for d in decided(events)] == [(True, pb.DECIDER_CLIENT)]

    events = send_answering(
        stubs, "g", touch(refused), respond(stubs, "g", False, message="not in my study")
    )
    assert not refused.exists()
    assert "not in my study" in reply_text(events)  # what the model saw
    assert [(d.allow, d.decider) for d in decided(events)] == [(False, pb.DECIDER_CLIENT)]
    assert kinds(events)[-1] == "turn_completed"

    trail = audit(stubs, "g")
    assert [(a.tool_name, a.allow, a.decider) for a in trail] == [
        ("Write", True, pb.DECIDER_CLIENT),
        ("Write", False, pb.DECIDER_CLIENT),
    ]
    assert all(len(a.input_digest) == 64 and str(allowed) not in a.detail for a in trail)


def test_nobody_answering_is_a_denial_by_timeout(e2e: E2E) -> None:
    stubs = e2e.start({"approvals": {"timeout": 1.0}})
    stubs.sessions.CreateSession(pb.CreateSessionRequest(session_id="t"))
    target = e2e.workdir / "never.txt"
    events = send_answering(stubs, "t", touch(target), lambda req: None)
    assert not target.exists()
    assert [(d.allow, d.decider) for d in decided(events)] == [(False, pb.DECIDER_TIMEOUT)]
    assert "approvals.timeout" in reply_text(events)
    assert [a.decider for a in audit(stubs, "t")] == [pb.DECIDER_TIMEOUT]


def test_with_no_client_attached_the_request_is_denied_at_once(e2e: E2E) -> None:
    stubs = e2e.start()
    stubs.sessions.CreateSession(pb.CreateSessionRequest(session_id="n"))
    target = e2e.workdir / "orphan.txt"
    stream = stubs.sessions.SendMessage(
        pb.SendMessageRequest(session_id="n", text=touch(target)), timeout=60
    )
    next(stream)
    stream.cancel()  # the sender leaves and nobody watches: nobody could answer
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        history = stubs.sessions.GetHistory(pb.GetHistoryRequest(session_id="n")).messages
        if len(history) == 2:
            break
        time.sleep(0.1)
    assert len(history) == 2 and history[1].status == pb.MESSAGE_STATUS_COMPLETE
    assert not target.exists()
    assert [(a.allow, a.decider) for a in audit(stubs, "n")] == [(False, pb.DECIDER_POLICY)]


def test_a_remembered_answer_applies_again_also_after_a_restart(e2e: E2E) -> None:
    stubs = e2e.start()
    stubs.sessions.CreateSession(pb.CreateSessionRequest(session_id="r"))
    target = e2e.workdir / "again.txt"
    send_answering(stubs, "r", touch(target), respond(stubs, "r", True, remember=True))
    assert target.exists()
    target.unlink()

    def must_not_ask(req: pb.PermissionRequest) -> None:
        raise AssertionError(f"asked again: {req}")

    events = send_answering(stubs, "r", touch(target), must_not_ask)
    assert target.exists() and decided(events)[0].decider == pb.DECIDER_RULE
    target.unlink()
    e2e.stop()
    stubs = e2e.start()
    events = send_answering(stubs, "r", touch(target), must_not_ask)
    assert target.exists() and decided(events)[0].decider == pb.DECIDER_RULE
    assert [a.decider for a in audit(stubs, "r")] == [
        pb.DECIDER_CLIENT,
        pb.DECIDER_RULE,
        pb.DECIDER_RULE,
    ]


def test_two_clients_answering_at_once_make_exactly_one_decision(e2e: E2E) -> None:
    stubs = e2e.start()
    stubs.sessions.CreateSession(pb.CreateSessionRequest(session_id="two"))
    target = e2e.workdir / "race.txt"
    outcomes: list[str] = []

    def race(req: pb.PermissionRequest) -> None:
        def one(allow: bool) -> None:
            try:
                stubs.sessions.RespondToPermission(
                    pb.RespondToPermissionRequest(
                        session_id="two", request_id=req.request_id, allow=allow
                    ),
                    timeout=10,
                )
                outcomes.append("ok")
            except grpc.RpcError as e:
                outcomes.append(e.code().name)

        threads = [threading.Thread(target=one, args=(allow,)) for allow in (True, False)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()

    events = send_answering(stubs, "two", touch(target), race)
    assert sorted(outcomes) == ["FAILED_PRECONDITION", "ok"]
    assert len(decided(events)) == 1
    assert target.exists() == decided(events)[0].allow


def test_a_session_at_its_spending_cap_refuses_new_messages(e2e: E2E) -> None:
    stubs = e2e.start()
    session = stubs.sessions.CreateSession(
        pb.CreateSessionRequest(session_id="cap", budget_usd=0.0001)
    ).session
    assert session.budget_usd == pytest.approx(0.0001)
    send(stubs, "cap", "spend something")
    with pytest.raises(grpc.RpcError) as err:
        send(stubs, "cap", "and more")
    assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "has spent $" in (err.value.details() or "")
    spent = stubs.sessions.GetSession(pb.GetSessionRequest(session_id="cap")).session
    assert spent.total_cost_usd >= 0.0001
    status = stubs.daemon.GetStatus(daemon_pb2.GetStatusRequest())
    assert status.total_cost_usd >= spent.total_cost_usd


def test_a_per_session_cap_may_only_lower_the_daemons(e2e: E2E) -> None:
    stubs = e2e.start({"budget": {"session_usd": 1.0}})
    with pytest.raises(grpc.RpcError) as err:
        stubs.sessions.CreateSession(pb.CreateSessionRequest(budget_usd=5.0))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "may only be lowered" in (err.value.details() or "")
    default = stubs.sessions.CreateSession(pb.CreateSessionRequest()).session
    assert default.budget_usd == 1.0


def test_mode_switches_and_mode_rule_outcomes_are_in_the_audit_trail(e2e: E2E) -> None:
    stubs = e2e.start({"modes.power": {"enabled": True}, "agent": {"env": {"IS_SANDBOX": "1"}}})
    stubs.sessions.CreateSession(pb.CreateSessionRequest(session_id="m"))
    target = e2e.workdir / "power.txt"
    stubs.sessions.SwitchMode(pb.SwitchModeRequest(session_id="m", mode=pb.MODE_POWER))
    send(stubs, "m", touch(target))  # power mode: runs without asking
    assert target.exists()
    trail = audit(stubs, "m")
    assert [(a.kind, a.detail) for a in trail][:1] == [(pb.AUDIT_KIND_MODE_SWITCH, "user -> power")]
    assert [(a.kind, a.allow, a.decider) for a in trail[1:]] == [
        (pb.AUDIT_KIND_PERMISSION, True, pb.DECIDER_MODE)
    ]
