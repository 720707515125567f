"""What each agent message means for a turn (sessions/relay.py): events, transcript, end."""

from __future__ import annotations

from atomizerd.agents import protocol as proto
from atomizerd.agents.vocabulary import AgentExited, LineTooLong
from atomizerd.sessions import events as ev
from atomizerd.sessions.relay import Terminal, outcome, relay
from atomizerd.sessions.turn import Transcript


def run(
    *items: object, cost_base: float = 0.0
) -> tuple[list[ev.EventKind], Transcript, Terminal | None]:
    emitted: list[ev.EventKind] = []

    def emit(kind: ev.EventKind) -> ev.SessionEvent:
        emitted.append(kind)
        return ev.SessionEvent(len(emitted), "s", "t", 0.0, kind)

    transcript = Transcript()
    end: Terminal | None = None
    for item in items:
        end = relay(
            item,  # type: ignore[arg-type]
            emit,
            transcript,
            interrupted=False,
            cost_base=cost_base,
            max_line_bytes=100,
            stderr_tail="tail",
        )
    return emitted, transcript, end


def result(cost: float) -> proto.Result:
    return proto.Result("success", False, "", cost, {"input_tokens": 3}, 5, 1, "c", None, ())


def test_text_deltas_are_the_reply_and_the_whole_message_does_not_repeat_them() -> None:
    emitted, _transcript, end = run(
        proto.TextDelta("hel", None, "m1", 0),
        proto.TextDelta("lo", None, "m1", 0),
        proto.AssistantMessage(text="hello", tool_uses=(), message_id="m1"),
        result(0.5),
    )
    assert [k for k in emitted if isinstance(k, ev.TextDelta)] == [
        ev.TextDelta("hel"),
        ev.TextDelta("lo"),
    ]
    assert isinstance(end, ev.TurnCompleted) and end.text == "hello"


def test_a_message_that_came_only_whole_is_taken_from_the_assistant_line() -> None:
    _, _transcript, end = run(
        proto.AssistantMessage(text="whole", tool_uses=(), message_id="m2"), result(0.1)
    )
    assert isinstance(end, ev.TurnCompleted) and end.text == "whole"


def test_withdrawn_blocks_leave_the_stored_reply() -> None:
    _, _transcript, end = run(
        proto.TextDelta("broken", None, "m1", 0),
        proto.AbandonedBlocks(message_id="m1", from_block_index=0),
        proto.AssistantMessage(text="retried", tool_uses=(), message_id="m9"),
        result(0.1),
    )
    assert isinstance(end, ev.TurnCompleted) and end.text == "retried"


def test_tool_calls_and_their_results_are_recorded_for_the_outcome() -> None:
    call = proto.ToolUse("tu1", "Bash", '{"command":"ls"}')
    _, transcript, end = run(
        proto.AssistantMessage(text="", tool_uses=(call,), message_id="m1"),
        proto.ToolResult("tu1", "a b", False),
        result(0.2),
    )
    assert end is not None
    stored = outcome(transcript, end)
    assert [(c.name, c.result) for c in stored.tool_calls] == [("Bash", "a b")]


def test_the_turn_costs_what_the_conversation_cost_more_than_before() -> None:
    _, _, end = run(result(1.25), cost_base=1.0)
    assert isinstance(end, ev.TurnCompleted) and end.cost_usd == 0.25
    _, _, restarted = run(result(0.3), cost_base=1.0)  # a count that started again
    assert isinstance(restarted, ev.TurnCompleted) and restarted.cost_usd == 0.3


def test_a_line_too_long_and_an_exit_fail_the_turn_with_the_reason() -> None:
    _, _, long = run(LineTooLong(size=500, limit=100))
    assert isinstance(long, ev.TurnFailed) and long.code == ev.LINE_TOO_LONG
    assert "100 bytes" in long.message
    _, _, gone = run(AgentExited("exited", 3, "oops"))
    assert isinstance(gone, ev.TurnFailed) and gone.code == ev.AGENT_EXITED
    assert gone.stderr_tail == "oops"


def test_a_compaction_is_a_notice_and_sets_the_context_size() -> None:
    emitted, transcript, _ = run(proto.CompactBoundary("auto", 1000, 200))
    assert [type(k) for k in emitted] == [ev.Notice]
    assert transcript.context_tokens == 200
