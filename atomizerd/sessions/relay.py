"""What the agent's messages mean for a turn: events, the transcript, the turn's end.

Pure functions of a message and the turn's transcript (no agent, no store, no clock), so every
mapping is specified by unit tests (tests/unit/test_relay.py). The turn runner hands each
message of a turn here; control requests (permission prompts) and the agent's `init` are its
own business, not the transcript's.
"""

from __future__ import annotations

import dataclasses
import json

from atomizerd.agents import protocol as proto
from atomizerd.agents.vocabulary import AgentExited, AgentItem, LineTooLong
from atomizerd.model import ToolCallRecord, TurnOutcome
from atomizerd.sessions import events as ev
from atomizerd.sessions import spend
from atomizerd.sessions.mcphealth import mcp_call_failure
from atomizerd.sessions.turn import Emit, Transcript

Terminal = ev.TurnCompleted | ev.TurnFailed


def relay(
    item: AgentItem,
    emit: Emit,
    transcript: Transcript,
    *,
    interrupted: bool,
    cost_base: float,
    max_line_bytes: int,
    stderr_tail: str,
) -> Terminal | None:
    """Maps one message of the turn's own agent to session events; the turn's end when it is
    one. `cost_base`: the conversation's cost before this turn (the CLI reports it whole)."""
    match item:
        case proto.TextDelta(text=text) if item.parent_tool_use_id is None:
            transcript.add(item.message_id, item.index, text)
            transcript.streamed.add(item.message_id)
            emit(ev.TextDelta(text))
        case proto.ThinkingDelta(text=text):
            emit(ev.ThinkingDelta(text))
        case proto.AbandonedBlocks():
            # The CLI dropped what it had streamed of these blocks (a broken stream it
            # retries without streaming): the stored reply drops them too.
            transcript.withdraw(item.message_id, item.from_block_index)
        case proto.AssistantMessage():
            # A message whose deltas never came (e.g. retried without streaming after a
            # broken stream) is only in the whole assistant line: take its text from there.
            fresh = item.message_id not in transcript.streamed
            if item.text and fresh and item.parent_tool_use_id is None:
                transcript.add(item.message_id, 0, item.text)
                emit(ev.TextDelta(item.text))
            for tu in item.tool_uses:
                transcript.tool_calls[tu.id] = ToolCallRecord(tu.id, tu.name, tu.input_json)
                emit(ev.ToolUse(tu.id, tu.name, tu.input_json))
            if item.uuid and item.parent_tool_use_id is None and not item.aborted:
                transcript.agent_uuid = item.uuid
            if item.model and item.parent_tool_use_id is None:
                transcript.model = item.model
            if item.input_tokens and item.parent_tool_use_id is None:
                transcript.context_input = item.input_tokens
                transcript.context_tokens = item.input_tokens
                if item.message_id != transcript.usage_message:  # once per model call
                    transcript.usage_message = item.message_id
                    report_usage(emit, transcript, call_usage(item, transcript))
        case proto.MessageDelta() if item.parent_tool_use_id is None:
            if transcript.context_input:  # the call's output is in the context too
                transcript.context_tokens = transcript.context_input + item.output_tokens
            if transcript.usage is not None:
                report_usage(
                    emit,
                    transcript,
                    dataclasses.replace(
                        transcript.usage,
                        output_tokens=item.output_tokens,
                        context_tokens=transcript.context_tokens,
                    ),
                )
        case proto.CompactBoundary():
            transcript.context_tokens = item.post_tokens
            emit(
                ev.Notice(
                    ev.CONTEXT_COMPACTED,
                    f"the conversation was compacted ({item.trigger or 'auto'}): "
                    f"{item.pre_tokens} tokens before, {item.post_tokens} after",
                    tokens_before=item.pre_tokens,
                    tokens_after=item.post_tokens,
                )
            )
        case proto.ToolResult():
            call = transcript.tool_calls.get(item.tool_use_id)
            if call is not None:
                call.result, call.is_error = item.content, item.is_error
            emit(ev.ToolResult(item.tool_use_id, item.content, item.is_error))
            if call is not None:
                failed = mcp_call_failure(call.name, item.content, item.is_error)
                if failed is not None:
                    emit(failed)
        case proto.ApiRetry():
            emit(
                ev.Notice(
                    ev.API_RETRY,
                    f"the model API failed ({item.error_status or item.error}); retry "
                    f"{item.attempt} of {item.max_retries} in {item.retry_delay_ms} ms",
                    attempt=item.attempt,
                    max_retries=item.max_retries,
                    retry_delay_ms=item.retry_delay_ms,
                    error_status=item.error_status or 0,
                )
            )
        case proto.Result():
            terminal = completed(item, transcript, interrupted, cost_base)
            # The turn's cost and the window come only now: one last usage event says so.
            report_usage(
                emit,
                transcript,
                dataclasses.replace(
                    transcript.usage or ev.LiveUsage(context_tokens=transcript.context_tokens),
                    context_window=transcript.context_window,
                    turn_cost_usd=terminal.cost_usd,
                ),
            )
            return terminal
        case LineTooLong():
            return ev.TurnFailed(
                ev.LINE_TOO_LONG,
                f"the agent wrote a line of more than {max_line_bytes} "
                "bytes (agent.max_line_bytes)",
                stderr_tail,
            )
        case AgentExited():
            return ev.TurnFailed(
                ev.AGENT_EXITED,
                f"the agent exited mid-turn (exit status {item.returncode})",
                item.stderr_tail,
            )
    return None


def call_usage(item: proto.AssistantMessage, transcript: Transcript) -> ev.LiveUsage:
    """A model call's usage as its first assistant line gives it (output comes later)."""
    cached = item.cache_creation_tokens + item.cache_read_tokens
    return ev.LiveUsage(
        input_tokens=item.input_tokens - cached,
        output_tokens=0,
        cache_creation_input_tokens=item.cache_creation_tokens,
        cache_read_input_tokens=item.cache_read_tokens,
        context_tokens=transcript.context_tokens,
        context_window=transcript.context_window,
    )


def report_usage(emit: Emit, transcript: Transcript, usage: ev.LiveUsage) -> None:
    # Each model call is priced as its usage stands now; the turn's estimate sums them all
    # (subagents' calls are not reported mid-turn, so they count only in the agent's figure).
    transcript.call_costs[transcript.usage_message] = spend.call_cost(usage, transcript.model)
    usage = dataclasses.replace(usage, estimated_turn_cost_usd=transcript.estimated_cost())
    transcript.usage = usage
    emit(usage)


def completed(
    result: proto.Result, transcript: Transcript, interrupted: bool, cost_base: float
) -> ev.TurnCompleted:
    transcript.agent_cost_usd = result.total_cost_usd
    transcript.origin_kind = result.origin_kind
    transcript.context_window = proto.context_window(result) or transcript.context_window
    # The CLI reports the conversation's cost so far (carried over --resume). A figure below
    # the last one means the count started again (a CLI that does not carry it over): then
    # the whole figure is this turn's.
    total = result.total_cost_usd
    turn_cost = total - cost_base if total >= cost_base else total
    text = transcript.full_text()
    if not text and result.is_error and result.result_text:
        text = result.result_text  # an API error: the CLI's explanation is the reply
    usage = {k: int(v) for k, v in result.usage.items() if isinstance(v, int | float)}
    return ev.TurnCompleted(
        text=text,
        stop_reason=result.stop_reason or ("interrupted" if interrupted else ""),
        is_error=result.is_error and not interrupted,
        cost_usd=turn_cost,
        usage=usage,
        duration_ms=result.duration_ms,
        num_turns=result.num_turns,
        interrupted=interrupted,
        permission_denials=result.permission_denials,
        result_subtype=result.subtype,
        structured_output=structured_output(result),
    )


def structured_output(result: proto.Result) -> str:
    """The answer of a turn run with an output schema (the `result` line's
    `structured_output`, set when the model called the CLI's StructuredOutput tool)."""
    value = result.raw.get("structured_output")
    if value is None:
        return ""
    return json.dumps(value, ensure_ascii=False)


def outcome(transcript: Transcript, terminal: ev.TurnCompleted | ev.TurnFailed) -> TurnOutcome:
    calls = list(transcript.tool_calls.values())
    if isinstance(terminal, ev.TurnFailed):
        return TurnOutcome(
            status="failed",
            text=transcript.full_text(),
            tool_calls=calls,
            detail=f"{terminal.code}: {terminal.message}",
            context_tokens=transcript.context_tokens or None,
            context_window=transcript.context_window or None,
        )
    return TurnOutcome(
        status="interrupted" if terminal.interrupted else "complete",
        text=terminal.text,
        tool_calls=calls,
        cost_usd=terminal.cost_usd,
        usage=terminal.usage,
        detail=terminal.stop_reason,
        context_tokens=transcript.context_tokens or None,
        context_window=transcript.context_window or None,
        last_usage=usage_json(transcript.usage),
        agent_uuid=transcript.agent_uuid if not terminal.interrupted else "",
        structured_output=terminal.structured_output,
    )


def usage_json(usage: ev.LiveUsage | None) -> str | None:
    return json.dumps(dataclasses.asdict(usage)) if usage is not None else None


def cut_short(transcript: Transcript, *, taken_over: bool = False) -> ev.TurnCompleted:
    """The end of an agent turn that had no result of its own: the CLI took a client's line
    into it (from there on the reply answers that line), or the job ended under it."""
    why = "the agent took the next message into this turn" if taken_over else "ended early"
    return ev.TurnCompleted(
        text=transcript.full_text(), stop_reason=why, interrupted=not taken_over
    )


def require_structured(
    terminal: ev.TurnCompleted | ev.TurnFailed,
) -> ev.TurnCompleted | ev.TurnFailed:
    """A structured turn that completed without an answer in its schema is an error."""
    if (
        isinstance(terminal, ev.TurnCompleted)
        and not terminal.structured_output
        and not terminal.interrupted
        and not terminal.is_error
    ):
        return dataclasses.replace(
            terminal,
            is_error=True,
            stop_reason="no structured output: the agent did not answer in the requested schema",
        )
    return terminal


def reported_outcome(terminal: ev.TurnCompleted | ev.TurnFailed) -> tuple[str, str, float]:
    """A turn's end as telemetry takes it: its outcome, its failure code, its cost."""
    if isinstance(terminal, ev.TurnFailed):
        return "failed", terminal.code, 0.0
    return ("interrupted" if terminal.interrupted else "completed"), "", terminal.cost_usd
