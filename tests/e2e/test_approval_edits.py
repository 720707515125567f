"""Approvals with the real CLI, beyond allow/deny: an edited input, the CLI's suggestions, and
a rule remembered instead of the exact call (also across an agent restart)."""

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

pytestmark = pytest.mark.e2e


def write(path: Path, content: str = "") -> str:
    return f"[[tool:Write {json.dumps({'file_path': str(path), 'content': content})}]]"


def respond(
    stubs: Stubs, sid: str, req: pb.PermissionRequest, **kw: object
) -> pb.PermissionDecided:
    return stubs.sessions.RespondToPermission(
        pb.RespondToPermissionRequest(session_id=sid, request_id=req.request_id, **kw), timeout=10
    ).decision


def refused(call: Callable[[], object]) -> str:
    with pytest.raises(grpc.RpcError) as err:
        call()
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    return err.value.details() or ""


def test_an_allow_with_an_edited_input_runs_the_edited_call(e2e: E2E) -> None:
    stubs = e2e.start()
    stubs.sessions.CreateSession(pb.CreateSessionRequest(session_id="e"))
    asked, edited = e2e.workdir / "asked.txt", e2e.workdir / "edited.txt"
    messages: list[str] = []

    def answer(req: pb.PermissionRequest) -> None:
        messages.append(
            refused(lambda: respond(stubs, "e", req, allow=True, updated_input_json="{no"))
        )
        messages.append(
            refused(lambda: respond(stubs, "e", req, allow=True, updated_input_json="[1]"))
        )
        messages.append(
            refused(lambda: respond(stubs, "e", req, allow=False, updated_input_json="{}"))
        )
        new = {"file_path": str(edited), "content": "edited"}
        respond(stubs, "e", req, allow=True, updated_input_json=json.dumps(new))

    events = send_answering(stubs, "e", write(asked, "asked"), answer)
    assert "not valid JSON" in messages[0]
    assert "must be a JSON object" in messages[1]
    assert "only with allow" in messages[2]
    assert edited.read_text() == "edited" and not asked.exists()
    (decision,) = decided(events)
    assert decision.allow and "edited input" in decision.message
    # The model asked for asked.txt; the CLI ran (and reported) the edited call.
    (result,) = e2e.api.requests[-1].tool_results
    assert not result.get("is_error") and str(edited) in str(result["content"])
    (row,) = audit(stubs, "e")
    assert row.allow and row.decider == pb.DECIDER_CLIENT
    assert (
        "allowed with an edited input (sha256 " in row.detail and "edited" not in row.input_digest
    )


def test_permission_requests_carry_the_clis_suggestions(e2e: E2E) -> None:
    stubs = e2e.start()
    stubs.sessions.CreateSession(pb.CreateSessionRequest(session_id="s"))
    target = e2e.workdir / "d" / "x.txt"
    target.parent.mkdir()
    seen: list[pb.PermissionRequest] = []

    def answer(req: pb.PermissionRequest) -> None:
        seen.append(req)
        respond(stubs, "s", req, allow=False)

    send_answering(stubs, "s", write(target), answer)
    (req,) = seen
    by_type = {s.type: s for s in req.suggestions}
    assert by_type["setMode"].mode == "acceptEdits"
    assert list(by_type["addDirectories"].directories) == [str(target.parent)]
    assert all(s.destination for s in req.suggestions)


def test_a_remembered_rule_allows_matching_calls_also_after_a_restart(e2e: E2E) -> None:
    stubs = e2e.start()
    stubs.sessions.CreateSession(pb.CreateSessionRequest(session_id="r"))
    d = e2e.workdir / "d"
    d.mkdir()
    outside = e2e.workdir / "outside.txt"
    rule = pb.PermissionRule(tool_name="Edit", rule_content=f"/{d}/**")
    asked: list[str] = []
    errors: list[str] = []

    def answer(req: pb.PermissionRequest) -> None:
        asked.append(json.loads(req.input_json)["file_path"])
        if len(asked) == 1:
            errors.append(refused(lambda: respond(stubs, "r", req, allow=False, rule=rule)))
            bad = pb.PermissionRule(tool_name="Edit", rule_content="(x)")
            errors.append(refused(lambda: respond(stubs, "r", req, allow=True, rule=bad)))
            respond(stubs, "r", req, allow=True, rule=rule)
        else:
            respond(stubs, "r", req, allow=True)

    prompt = write(d / "r1.txt") + write(d / "r2.txt") + write(outside)
    events = send_answering(stubs, "r", prompt, answer)
    assert "only with allow" in errors[0] and "parentheses" in errors[1]
    # Only the first call in d and the one outside asked; the rule let the second one run.
    assert asked == [str(d / "r1.txt"), str(outside)]
    assert (d / "r1.txt").exists() and (d / "r2.txt").exists() and outside.exists()
    first = decided(events)[0]
    assert f"the rule Edit(/{d}/**) is allowed for the rest of the session" in first.message
    trail = audit(stubs, "r")
    assert [(a.allow, a.decider) for a in trail] == [
        (True, pb.DECIDER_CLIENT),
        (True, pb.DECIDER_CLIENT),
        (True, pb.DECIDER_MODE),  # r2.txt, under the remembered rule
    ]
    assert f"Edit(/{d}/**)" in trail[0].detail

    def must_not_ask(req: pb.PermissionRequest) -> None:
        raise AssertionError(f"asked again: {req.input_json}")

    e2e.stop()  # a new daemon, a new agent process (--resume): the rule is given at spawn
    stubs = e2e.start()
    send_answering(stubs, "r", write(d / "r3.txt"), must_not_ask)
    assert (d / "r3.txt").exists()
