"""A running turn's record (sessions/journal.py): what a restarted daemon reads back must be
exactly what the previous one emitted, and account for exactly the messages it relayed."""

from __future__ import annotations

import asyncio
import json
import typing

import pytest

from atomizerd.agents import protocol
from atomizerd.model import PermissionDenial
from atomizerd.sessions import events as ev
from atomizerd.sessions.journal import Resumed, TurnJournal, decode_event, encode_event

# One of every event kind, nested parts included.
KINDS: list[ev.EventKind] = [
    ev.TurnStarted(
        "hi",
        "req-1",
        (ev.AttachmentInfo("a.png", "image/png", 3, "0" * 64),),
        ev.TurnOrigin.TASK,
    ),
    ev.TextDelta("héllo 🎉"),
    ev.ThinkingDelta("hmm"),
    ev.ToolUse("tu1", "Bash", '{"command":"ls"}'),
    ev.ToolResult("tu1", "out", False),
    ev.TurnCompleted(
        "done",
        "end_turn",
        cost_usd=0.25,
        usage={"input_tokens": 3},
        permission_denials=(PermissionDenial("Write", "tu2", "{}"),),
    ),
    ev.TurnFailed(ev.AGENT_EXITED, "gone", "tail"),
    ev.Notice(ev.API_RETRY, "retry", attempt=2, max_retries=3),
    ev.PermissionRequest(
        "r1",
        "Write",
        "{}",
        "write a file",
        "tu2",
        1234.5,
        (ev.PermissionSuggestion("addRules", (ev.PermissionRule("Write", "/x/**"),), "allow"),),
        plan="",
    ),
    ev.PermissionDecided("r1", "Write", True, "client", "ok"),
    ev.Question(
        "q1", (ev.QuestionItem("Which?", "h", (ev.QuestionOption("A", "first"),), True),), "t", 9.0
    ),
    ev.QuestionAnswered("q1", (("Which?", "A"),), True, "client"),
    ev.UserMessage("also this", "req-2"),
    ev.TaskStarted("b1", "tu3", ev.TaskKind.BASH, "solver run", True),
    ev.TaskOutput("b1", "iteration 1\n"),
    ev.TaskEnded("b1", ev.TaskStatus.COMPLETED, "exit code 0"),
    ev.LiveUsage(700, 30, 5, 6, 741, 1_000_000, 0.25, 0.3),
    ev.PlanUpdated("1. mesh\n2. solve"),
]


def test_every_event_kind_is_in_the_list_above() -> None:
    assert {type(k) for k in KINDS} == set(typing.get_args(ev.EventKind))


@pytest.mark.parametrize("kind", KINDS, ids=lambda k: type(k).__name__)
def test_an_event_read_back_equals_the_one_emitted(kind: ev.EventKind) -> None:
    event = ev.SessionEvent(7, "s1", "t1", 1700000000.5, kind)
    wire = json.loads(json.dumps(encode_event(event)))  # as it travels: JSON
    assert decode_event(wire, "s1") == event


class FakeAgent:
    """The recorder side of an agent transport: what was left with its shim."""

    def __init__(self, boundary: tuple[int, int] = (100, 4)) -> None:
        self.received = boundary[1]
        self.boundary = boundary
        self.records: list[dict[str, typing.Any]] = []
        self.forgotten: list[int] = []

    def record(self, payload: bytes) -> None:
        self.records.append(json.loads(payload))

    def forget_before(self, offset: int) -> None:
        self.forgotten.append(offset)


def event(seq: int, kind: ev.EventKind) -> ev.SessionEvent:
    return ev.SessionEvent(seq, "s1", "t1", 0.0, kind)


def test_a_turn_starts_its_record_where_the_agents_earlier_output_ends() -> None:
    agent = FakeAgent(boundary=(100, 4))
    TurnJournal.begin(agent, [event(10, ev.TurnStarted("hi"))])  # type: ignore[arg-type]
    assert agent.forgotten == [100]  # earlier turns' output is let go
    assert agent.records == [{"c": 0, "e": [encode_event(event(10, ev.TurnStarted("hi")))]}]


def test_a_record_counts_only_messages_already_relayed() -> None:
    async def scenario() -> list[int]:
        agent = FakeAgent(boundary=(100, 4))
        journal = TurnJournal.begin(agent, [])  # type: ignore[arg-type]
        journal.handled_upto(6)  # two messages of this turn relayed
        agent.received = 7  # a third taken from the agent, not relayed yet ...
        journal.note(event(11, ev.PermissionDecided("r1", "Bash", True, "client", "")))
        await asyncio.sleep(0)  # ... when a background event's record is flushed
        return [r["c"] for r in agent.records]

    assert asyncio.run(scenario()) == [2]


def test_a_records_events_reach_the_shim_before_the_loop_runs_anything_else() -> None:
    async def scenario() -> list[str]:
        agent = FakeAgent()
        journal = TurnJournal.begin(agent, [])  # type: ignore[arg-type]
        order: list[str] = []
        journal.note(event(11, ev.TextDelta("a")))
        # A follower woken by the same event is scheduled after the record's flush.
        asyncio.get_running_loop().call_soon(lambda: order.append(f"follower {len(agent.records)}"))
        await asyncio.sleep(0)
        return order

    assert asyncio.run(scenario()) == ["follower 1"]


def records(*recs: tuple[int, list[ev.SessionEvent]]) -> list[bytes]:
    return [json.dumps({"c": c, "e": [encode_event(e) for e in es]}).encode() for c, es in recs]


def test_a_running_turn_is_read_back_with_its_events_in_order_and_what_the_agent_was_told() -> None:
    asked = ev.PermissionRequest("r1", "Write", "{}", "", "tu1", 50.0)
    answered = ev.PermissionRequest("r2", "Bash", "{}", "", "tu2", 60.0)
    inputs = [
        protocol.user_message_line("hi"),
        protocol.control_response("r2", protocol.permission_allow({})),
        protocol.control_request_line("x1", "interrupt"),
    ]
    resumed = Resumed.from_replay(
        "s1",
        records(
            (0, [event(10, ev.TurnStarted("hi", "req"))]),
            (3, [event(12, asked), event(11, ev.TextDelta("a"))]),
            (
                5,
                [event(13, answered), event(14, ev.PermissionDecided("r2", "Bash", True, "c", ""))],
            ),
        ),
        inputs,
    )
    assert resumed is not None
    assert resumed.turn_id == "t1" and resumed.started.request_id == "req"
    assert [e.seq for e in resumed.events] == [10, 11, 12, 13, 14]
    assert resumed.consumed == 5
    assert resumed.answered == {"r2"} and resumed.interrupted
    assert resumed.asked() == {"r1": asked} and resumed.settled() == {"r2"}
    assert not resumed.terminal


def test_an_idle_agents_shim_holds_no_turn() -> None:
    assert Resumed.from_replay("s1", [], [b'{"type":"user"}\n']) is None
    # Records that do not start with a turn's start are no turn to go on with.
    assert Resumed.from_replay("s1", records((1, [event(11, ev.TextDelta("a"))])), []) is None
