"""Structured answers end to end: the real daemon, the real pinned CLI against the fake Messages
API. A message sent with an output schema gets its answer as JSON in turn_completed; the agent
is started with the schema for that turn only (the CLI takes it per process), resuming the same
conversation, and the next turn runs without it. Checked in the stream, in what the fake API
was asked and in the CLI's transcript on disk.
"""

from __future__ import annotations

import json
from pathlib import Path

import grpc
import pytest
from atomizer.v1 import session_pb2 as pb

from tests.conftest import Stubs
from tests.e2e.conftest import E2E
from tests.integration.test_ctl import ctl
from tests.support.fake_messages_api import RecordedRequest
from tests.support.turns import send

pytestmark = pytest.mark.e2e

POWER = {"modes.power": {"enabled": True}, "agent": {"env": {"IS_SANDBOX": "1"}}}
SCHEMA = {
    "type": "object",
    "properties": {"load_kn": {"type": "number"}, "material": {"type": "string"}},
    "required": ["load_kn", "material"],
}


def completed(events: list[pb.SessionEvent]) -> pb.TurnCompleted:
    assert events[-1].WhichOneof("kind") == "turn_completed", events[-1]
    return events[-1].turn_completed


def tool_names(request: RecordedRequest) -> list[str]:
    return [str(t.get("name")) for t in request.data.get("tools", [])]


def said(request: RecordedRequest) -> str:
    return json.dumps(request.data.get("messages", []))


def history(stubs: Stubs, sid: str) -> list[pb.Message]:
    return list(
        stubs.sessions.GetHistory(pb.GetHistoryRequest(session_id=sid, page_size=100)).messages
    )


def transcript_lines(workdir: Path, agent_session_id: str) -> list[dict[str, object]]:
    found = list((workdir / "home" / ".claude" / "projects").glob(f"*/{agent_session_id}.jsonl"))
    assert len(found) == 1, found
    return [json.loads(line) for line in found[0].read_text().splitlines() if line.strip()]


def test_a_structured_turn_answers_in_its_schema_and_the_conversation_goes_on(
    e2e: E2E,
) -> None:
    stubs = e2e.start(POWER)
    stubs.sessions.CreateSession(pb.CreateSessionRequest(session_id="st", mode=pb.MODE_POWER))
    first = completed(send(stubs, "st", "remember the word banana"))
    assert not first.structured_output and not first.is_error

    answer = {"load_kn": 12.5, "material": "steel"}
    events = send(
        stubs,
        "st",
        f"what load? [[tool:StructuredOutput {json.dumps(answer)}]]",
        output_schema=json.dumps(SCHEMA),
    )
    done = completed(events)
    assert not done.is_error, done
    assert json.loads(done.structured_output) == answer

    third = completed(send(stubs, "st", "and now in words"))
    assert not third.structured_output and not third.is_error
    assert third.text == "echo: and now in words"

    calls = e2e.api.requests
    by_prompt = {c.prompt_text: c for c in calls}
    structured = by_prompt[f"what load? [[tool:StructuredOutput {json.dumps(answer)}]]"]
    # The schema reached the agent as its StructuredOutput tool, for that turn only; every
    # turn carried the conversation before it (the agent was resumed, not started afresh).
    assert "StructuredOutput" in tool_names(structured)
    assert "banana" in said(structured)
    later = by_prompt["and now in words"]
    assert "StructuredOutput" not in tool_names(later)
    assert "banana" in said(later) and "load_kn" in said(later)
    assert "StructuredOutput" not in tool_names(by_prompt["remember the word banana"])

    session = stubs.sessions.GetSession(pb.GetSessionRequest(session_id="st")).session
    lines = transcript_lines(e2e.workdir, session.agent_session_id)
    uses = [
        block
        for line in lines
        if line.get("type") == "assistant"
        for block in line["message"]["content"]  # type: ignore[index]
        if block.get("type") == "tool_use"
    ]
    assert [(u["name"], u["input"]) for u in uses] == [("StructuredOutput", answer)]
    rows = history(stubs, "st")
    assert [m.role for m in rows] == [pb.ROLE_USER, pb.ROLE_ASSISTANT] * 3
    # History keeps the structured answer with its reply, and only there.
    assert [json.loads(m.structured_output) for m in rows if m.structured_output] == [answer]
    assert rows[3].structured_output


def test_a_turn_without_the_structured_answer_is_an_error(e2e: E2E) -> None:
    stubs = e2e.start(POWER)
    stubs.sessions.CreateSession(pb.CreateSessionRequest(session_id="nos", mode=pb.MODE_POWER))
    done = completed(send(stubs, "nos", "just prose", output_schema=json.dumps(SCHEMA)))
    assert done.is_error
    assert "no structured output" in done.stop_reason
    assert not done.structured_output
    # The CLI asked the model again for the tool before giving up.
    assert any("StructuredOutput" in c.prompt_text for c in e2e.api.requests)


BAD_SCHEMAS = [
    "{not json",
    "[1, 2]",
    '"a string"',
    json.dumps({"type": "thing"}),
    json.dumps({"type": "object", "required": "load"}),
    json.dumps({"type": "object", "properties": {"x": 3}}),
    json.dumps({"type": "object", "description": "x" * 70_000}),
]


def test_a_schema_that_is_not_one_is_refused_and_nothing_is_lost(e2e: E2E) -> None:
    stubs = e2e.start(POWER)
    stubs.sessions.CreateSession(pb.CreateSessionRequest(session_id="bad", mode=pb.MODE_POWER))
    completed(send(stubs, "bad", "first"))
    for schema in BAD_SCHEMAS:
        with pytest.raises(grpc.RpcError) as caught:
            send(stubs, "bad", "second", output_schema=schema)
        assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT, schema
        assert "output_schema" in (caught.value.details() or ""), schema
    with pytest.raises(grpc.RpcError) as caught:
        send(stubs, "nobody", "second", output_schema=json.dumps(SCHEMA))
    assert caught.value.code() == grpc.StatusCode.NOT_FOUND
    assert [m.content for m in history(stubs, "bad")] == ["first", "echo: first"]
    third = completed(send(stubs, "bad", "third"))
    assert third.text == "echo: third"


def test_atomizerctl_send_schema_prints_the_answer_as_json(e2e: E2E) -> None:
    stubs = e2e.start(POWER)
    stubs.sessions.CreateSession(pb.CreateSessionRequest(session_id="cs", mode=pb.MODE_POWER))
    schema_file = e2e.workdir / "answer.schema.json"
    schema_file.write_text(json.dumps(SCHEMA))
    assert e2e.daemon is not None
    answer = {"load_kn": 3, "material": "aluminium"}
    prompt = f"size it [[tool:StructuredOutput {json.dumps(answer)}]]"
    done = ctl(e2e.daemon, "send", "cs", prompt, "--schema", f"@{schema_file}")
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout.strip().splitlines()[-1]) == answer
    bad = ctl(e2e.daemon, "send", "cs", "again", "--schema", "{nope")
    assert bad.returncode != 0 and "output_schema is not valid JSON" in bad.stderr
    assert len(history(stubs, "cs")) == 2
