"""Plan mode with the real CLI: the agent writes its plan and calls ExitPlanMode; clients get
it as a permission_request with the plan; allowing it switches the session to user (or power)
mode and the agent goes on in the same turn."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import grpc
import pytest
from atomizer.v1 import session_pb2 as pb

from tests.conftest import Stubs
from tests.e2e.conftest import E2E
from tests.e2e.test_governance import audit, decided, send_answering
from tests.support.turns import kinds, send

pytestmark = pytest.mark.e2e

PLAN = "1. Write notes.txt with the beam's length."


def execute(target: Path) -> str:
    """The model plans, asks to carry out the plan, then writes the file."""
    call = json.dumps({"file_path": str(target), "content": "3 m"})
    return f"[[plan:{PLAN}]] [[tool:Write {call}]]"


def answering(
    stubs: Stubs, sid: str, seen: list[pb.PermissionRequest], **exit_answer: object
) -> Callable[[pb.PermissionRequest], None]:
    def answer(req: pb.PermissionRequest) -> None:
        seen.append(req)
        fields = exit_answer if req.tool_name == "ExitPlanMode" else {"allow": True}
        stubs.sessions.RespondToPermission(
            pb.RespondToPermissionRequest(session_id=sid, request_id=req.request_id, **fields),
            timeout=10,
        )

    return answer


def mode_of(stubs: Stubs, sid: str) -> int:
    return stubs.sessions.GetSession(pb.GetSessionRequest(session_id=sid)).session.mode


def test_an_approved_plan_switches_to_user_mode_and_the_agent_goes_on(e2e: E2E) -> None:
    stubs = e2e.start()
    created = stubs.sessions.CreateSession(
        pb.CreateSessionRequest(session_id="p", mode=pb.MODE_PLAN)
    ).session
    assert created.mode == pb.MODE_PLAN
    target = e2e.workdir / "notes.txt"
    seen: list[pb.PermissionRequest] = []
    events = send_answering(stubs, "p", execute(target), answering(stubs, "p", seen, allow=True))
    exit_plan, write = seen
    assert exit_plan.tool_name == "ExitPlanMode" and exit_plan.plan == PLAN
    assert write.tool_name == "Write"  # user mode now: outside the allowlist, so it asked
    assert target.read_text() == "3 m"
    assert mode_of(stubs, "p") == pb.MODE_USER
    assert kinds(events)[-1] == "turn_completed"
    # The model was told its plan was approved, then its Write ran.
    first, second = (r["content"] for r in e2e.api.requests[-1].tool_results[1:])
    assert "User has approved your plan" in str(first) and PLAN in str(first)
    assert not str(second).startswith("Error")
    trail = [(a.kind, a.tool_name, a.allow, a.detail) for a in audit(stubs, "p")]
    assert (pb.AUDIT_KIND_MODE_SWITCH, "", True, "plan -> user (plan approved)") in trail
    assert (pb.AUDIT_KIND_PERMISSION, "ExitPlanMode", True, "") in trail
    # The next message carries user mode's context (the CLI keeps its first prompt).
    send(stubs, "p", "and now?")
    assert "Mode: user" in " ".join(e2e.api.requests[-1].texts("user"))


def test_a_denied_plan_stays_in_plan_mode(e2e: E2E) -> None:
    stubs = e2e.start()
    stubs.sessions.CreateSession(pb.CreateSessionRequest(session_id="d", mode=pb.MODE_PLAN))
    target = e2e.workdir / "never.txt"
    seen: list[pb.PermissionRequest] = []
    answer = answering(stubs, "d", seen, allow=False, message="plan more carefully")
    events = send_answering(stubs, "d", execute(target), answer)
    # Still planning: the Write the model tries next is refused by the mode, unasked.
    assert [r.tool_name for r in seen] == ["ExitPlanMode"]
    assert not target.exists()
    assert mode_of(stubs, "d") == pb.MODE_PLAN
    assert [(d.tool_name, d.allow, d.decider) for d in decided(events)] == [
        ("ExitPlanMode", False, pb.DECIDER_CLIENT),
        ("Write", False, pb.DECIDER_MODE),
    ]
    exit_result, write_result = e2e.api.requests[-1].tool_results[1:]
    assert "plan more carefully" in str(exit_result["content"])
    assert write_result["is_error"] and "plan mode" in str(write_result["content"])


def test_an_approved_plan_may_go_on_in_power_mode_where_allowed(e2e: E2E) -> None:
    stubs = e2e.start({"modes.power": {"enabled": True}, "agent": {"env": {"IS_SANDBOX": "1"}}})
    stubs.sessions.CreateSession(pb.CreateSessionRequest(session_id="w", mode=pb.MODE_PLAN))
    target = e2e.workdir / "powered.txt"
    seen: list[pb.PermissionRequest] = []
    answer = answering(stubs, "w", seen, allow=True, mode=pb.MODE_POWER)
    send_answering(stubs, "w", execute(target), answer)
    assert [r.tool_name for r in seen] == ["ExitPlanMode"]  # the Write ran without asking
    assert target.read_text() == "3 m"
    assert mode_of(stubs, "w") == pb.MODE_POWER
    details = [a.detail for a in audit(stubs, "w") if a.kind == pb.AUDIT_KIND_MODE_SWITCH]
    assert details == ["plan -> power (plan approved)"]


def test_power_after_a_plan_needs_the_policy(e2e: E2E) -> None:
    stubs = e2e.start()
    stubs.sessions.CreateSession(pb.CreateSessionRequest(session_id="n", mode=pb.MODE_PLAN))
    codes: list[grpc.StatusCode] = []

    def answer(req: pb.PermissionRequest) -> None:
        for fields in (
            {"allow": True, "mode": pb.MODE_POWER},
            {"allow": False, "mode": pb.MODE_USER},
        ):
            with pytest.raises(grpc.RpcError) as err:
                stubs.sessions.RespondToPermission(
                    pb.RespondToPermissionRequest(
                        session_id="n", request_id=req.request_id, **fields
                    ),
                    timeout=10,
                )
            codes.append(err.value.code())
        stubs.sessions.RespondToPermission(
            pb.RespondToPermissionRequest(session_id="n", request_id=req.request_id, allow=False),
            timeout=10,
        )

    send_answering(stubs, "n", f"[[plan:{PLAN}]]", answer)
    assert codes == [grpc.StatusCode.PERMISSION_DENIED, grpc.StatusCode.INVALID_ARGUMENT]
    assert mode_of(stubs, "n") == pb.MODE_PLAN
