"""Questions the agent asks (its AskUserQuestion tool) with the real CLI: a `question` event,
AnswerQuestion, and what the model is told in each outcome, read from what the fake API got."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import grpc
import pytest
from atomizer.v1 import session_pb2 as pb

from tests.conftest import Stubs
from tests.e2e.conftest import E2E
from tests.support.turns import kinds

pytestmark = pytest.mark.e2e

MATERIAL = {
    "question": "Which material?",
    "header": "Material",
    "options": [
        {"label": "Steel", "description": "strong and heavy"},
        {"label": "Aluminium", "description": "light"},
    ],
    "multiSelect": False,
}
LOADS = {
    "question": "Which load cases?",
    "header": "Loads",
    "options": [
        {"label": "Gravity", "description": "self weight"},
        {"label": "Wind", "description": "lateral"},
        {"label": "Snow", "description": "roof"},
    ],
    "multiSelect": True,
}


def ask(*questions: dict[str, Any]) -> str:
    return f"[[tool:AskUserQuestion {json.dumps({'questions': list(questions)})}]]"


def send_handling(
    stubs: Stubs, sid: str, text: str, on_question: Callable[[pb.Question], None]
) -> list[pb.SessionEvent]:
    events = []
    stream = stubs.sessions.SendMessage(
        pb.SendMessageRequest(session_id=sid, text=text), timeout=120
    )
    for r in stream:
        events.append(r.event)
        if r.event.WhichOneof("kind") == "question":
            on_question(r.event.question)
    return events


def answer(stubs: Stubs, sid: str, request_id: str, answers: dict[str, str]) -> pb.QuestionAnswered:
    return stubs.sessions.AnswerQuestion(
        pb.AnswerQuestionRequest(session_id=sid, request_id=request_id, answers=answers),
        timeout=10,
    ).answer


def of_kind(events: list[pb.SessionEvent], kind: str) -> list[Any]:
    return [getattr(e, kind) for e in events if e.WhichOneof("kind") == kind]


def audit(stubs: Stubs, sid: str) -> list[pb.AuditEvent]:
    return list(stubs.sessions.ListAuditEvents(pb.ListAuditEventsRequest(session_id=sid)).events)


def code_of(call: Callable[[], object]) -> grpc.StatusCode:
    with pytest.raises(grpc.RpcError) as err:
        call()
    return err.value.code()


def test_an_answered_question_reaches_the_model(e2e: E2E) -> None:
    stubs = e2e.start()
    stubs.sessions.CreateSession(pb.CreateSessionRequest(session_id="q"))
    refusals: list[grpc.StatusCode] = []
    outcomes: list[pb.QuestionAnswered] = []

    def on_question(q: pb.Question) -> None:
        refusals.append(code_of(lambda: answer(stubs, "q", q.request_id, {"Which colour?": "x"})))
        refusals.append(code_of(lambda: answer(stubs, "q", "no-such-request", {})))
        outcomes.append(answer(stubs, "q", q.request_id, {"Which material?": "Steel"}))
        refusals.append(code_of(lambda: answer(stubs, "q", q.request_id, {})))

    events = send_handling(stubs, "q", f"pick one {ask(MATERIAL)}", on_question)
    assert refusals == [
        grpc.StatusCode.INVALID_ARGUMENT,
        grpc.StatusCode.NOT_FOUND,
        grpc.StatusCode.FAILED_PRECONDITION,
    ]
    (question,) = of_kind(events, "question")
    (item,) = question.questions
    assert (item.question, item.header, item.multi_select) == ("Which material?", "Material", False)
    assert [(o.label, o.description) for o in item.options] == [
        ("Steel", "strong and heavy"),
        ("Aluminium", "light"),
    ]
    assert question.tool_use_id.startswith("toolu_fake_") and question.deadline.seconds > 0
    (settled,) = of_kind(events, "question_answered")
    assert settled.request_id == question.request_id
    assert (settled.answered, settled.decider, dict(settled.answers)) == (
        True,
        pb.DECIDER_CLIENT,
        {"Which material?": "Steel"},
    )
    assert outcomes[0].answered and dict(outcomes[0].answers) == {"Which material?": "Steel"}
    assert "permission_request" not in kinds(events)  # a question, not a tool approval
    assert kinds(events)[-1] == "turn_completed"
    # What the model got back for its tool call.
    (result,) = e2e.api.requests[-1].tool_results
    assert not result.get("is_error")
    assert "Your questions have been answered" in str(result["content"])
    assert '"Which material?"="Steel"' in str(result["content"])
    (row,) = audit(stubs, "q")
    assert (row.kind, row.tool_name, row.allow, row.decider) == (
        pb.AUDIT_KIND_QUESTION,
        "AskUserQuestion",
        True,
        pb.DECIDER_CLIENT,
    )
    assert len(row.input_digest) == 64 and "Steel" not in row.detail


def test_several_questions_and_a_multi_select_answer(e2e: E2E) -> None:
    stubs = e2e.start()
    stubs.sessions.CreateSession(pb.CreateSessionRequest(session_id="m"))

    def on_question(q: pb.Question) -> None:
        assert [i.multi_select for i in q.questions] == [False, True]
        answer(
            stubs,
            "m",
            q.request_id,
            {"Which load cases?": "Gravity, Wind", "Which material?": "Aluminium"},
        )

    send_handling(stubs, "m", ask(MATERIAL, LOADS), on_question)
    content = str(e2e.api.requests[-1].tool_results[0]["content"])
    assert '"Which material?"="Aluminium"' in content
    assert '"Which load cases?"="Gravity, Wind"' in content


def test_a_declined_question_tells_the_model_so(e2e: E2E) -> None:
    stubs = e2e.start()
    stubs.sessions.CreateSession(pb.CreateSessionRequest(session_id="d"))
    events = send_handling(
        stubs, "d", ask(MATERIAL), lambda q: answer(stubs, "d", q.request_id, {})
    )
    (settled,) = of_kind(events, "question_answered")
    assert (settled.answered, settled.decider) == (False, pb.DECIDER_CLIENT)
    (result,) = e2e.api.requests[-1].tool_results
    assert result["is_error"] and "chose not to answer" in str(result["content"])
    assert [(a.allow, a.decider) for a in audit(stubs, "d")] == [(False, pb.DECIDER_CLIENT)]


def test_an_unanswered_question_ends_at_the_timeout(e2e: E2E) -> None:
    stubs = e2e.start({"approvals": {"timeout": 1.0}})
    stubs.sessions.CreateSession(pb.CreateSessionRequest(session_id="t"))
    events = send_handling(stubs, "t", ask(MATERIAL), lambda q: None)
    (settled,) = of_kind(events, "question_answered")
    assert (settled.answered, settled.decider) == (False, pb.DECIDER_TIMEOUT)
    assert "approvals.timeout" in settled.message
    (result,) = e2e.api.requests[-1].tool_results
    assert result["is_error"] and "approvals.timeout" in str(result["content"])
    assert kinds(events)[-1] == "turn_completed"
    (row,) = audit(stubs, "t")
    assert (row.kind, row.allow, row.decider) == (pb.AUDIT_KIND_QUESTION, False, pb.DECIDER_TIMEOUT)


def test_power_mode_agents_can_ask_too(e2e: E2E) -> None:
    stubs = e2e.start({"modes.power": {"enabled": True}, "agent": {"env": {"IS_SANDBOX": "1"}}})
    stubs.sessions.CreateSession(pb.CreateSessionRequest(session_id="p", mode=pb.MODE_POWER))
    events = send_handling(
        stubs,
        "p",
        ask(MATERIAL),
        lambda q: answer(stubs, "p", q.request_id, {"Which material?": "Steel"}),
    )
    assert of_kind(events, "question_answered")[0].answered
    assert '"Which material?"="Steel"' in str(e2e.api.requests[-1].tool_results[0]["content"])
