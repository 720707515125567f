"""A turn's events on the terminal as they stream (TurnRenderer), and how a turn's end maps to
atomizerctl's exit code."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from atomizer_client import ctl_tasks
from atomizer_client.ctl_output import (
    EXIT_FAILED,
    EXIT_INTERRUPTED,
    EXIT_OK,
    Output,
    clock,
    one_line,
    tokens,
)
from atomizer_client.events import (
    Event,
    Notice,
    PermissionDecided,
    PermissionRequest,
    PlanUpdated,
    TextDelta,
    ThinkingDelta,
    ToolResult,
    ToolUse,
    TurnCompleted,
    TurnFailed,
    TurnStarted,
    UserMessage,
)

# --- rendering a turn ----------------------------------------------------------------------


class TurnRenderer:
    """Shows one turn's events as they arrive and remembers how it ended."""

    def __init__(self, out: Output, *, show_prompt: bool, answer_hint: bool = False) -> None:
        self.out = out
        self.show_prompt = show_prompt
        # Tell how to answer a permission request from elsewhere (nobody is asked here).
        self.answer_hint = answer_hint
        self.streamed_text = False

    def show(self, ev: Event) -> None:
        if self.out.json:
            self.out.record(ev.to_dict())
            return
        handler = self._handlers().get(type(ev))
        if handler is not None:
            handler(ev)

    def _handlers(self) -> dict[type[Event], Callable[[Any], None]]:
        return {
            TurnStarted: self._turn_started,
            TextDelta: self._text,
            ThinkingDelta: self._thinking,
            ToolUse: self._tool_use,
            ToolResult: self._tool_result,
            Notice: self._notice,
            PermissionRequest: self._permission_request,
            PermissionDecided: self._permission_decided,
            TurnCompleted: self._completed,
            TurnFailed: self._failed,
            UserMessage: self._user_message,
            PlanUpdated: self._plan_updated,
            **ctl_tasks.task_handlers(self.out),
        }

    def _turn_started(self, ev: TurnStarted) -> None:
        self.streamed_text = False
        if ev.by_agent:  # no client's message: say who began it, and show what it was told
            self.out.end_line()
            self.out.note(ctl_tasks.origin_note(ev))
            if self.show_prompt and ev.text:
                self.out.note("  " + one_line(ev.text))
        elif self.show_prompt:
            self.out.end_line()
            self.out.line("> " + ev.text.replace("\n", "\n> "))

    def _user_message(self, ev: UserMessage) -> None:
        self.out.end_line()
        self.out.line(">> " + ev.text.replace("\n", "\n>> "))

    def _text(self, ev: TextDelta) -> None:
        self.streamed_text = True
        self.out.text(ev.text)

    def _thinking(self, ev: ThinkingDelta) -> None:
        # Thinking goes to stderr so a redirected reply holds only the answer.
        self.out.dim_text(ev.text)

    def _tool_use(self, ev: ToolUse) -> None:
        if ev.parent_tool_use_id:  # a subagent's call, indented under the Task that runs it
            self.out.note("  " + one_line(f"⏺ [subagent] {ev.name} {ev.input_json}"))
        else:
            self.out.note(one_line(f"⏺ {ev.name} {ev.input_json}"))

    def _tool_result(self, ev: ToolResult) -> None:
        if ev.is_error:
            self.out.note(one_line(f"  ⎿ error: {ev.content}"))

    def _notice(self, ev: Notice) -> None:
        if ev.message:
            self.out.note(ev.message)
        elif ev.kind == "API_RETRY":
            self.out.note(f"model API retry {ev.attempt} of {ev.max_retries} ({ev.error_status})")

    def _plan_updated(self, ev: PlanUpdated) -> None:
        self.out.note("the agent's plan is now:")
        for line in ev.plan.splitlines():
            self.out.note("  " + line)

    def _permission_request(self, ev: PermissionRequest) -> None:
        self.out.note(one_line(f"? permission for {ev.tool_name}: {ev.input_json}"))
        if ev.description:
            self.out.note(one_line("  " + ev.description))
        if self.answer_hint:
            self.out.note(
                f"  answer with: atomizerctl approve {ev.session_id} {ev.request_id}"
                f"  (or deny); denied at {clock(ev.deadline)} without one"
            )

    def _permission_decided(self, ev: PermissionDecided) -> None:
        verdict = "✓ allowed" if ev.allow else "✗ denied"
        detail = f": {ev.message}" if ev.message else ""
        self.out.note(one_line(f"{verdict} {ev.tool_name} by {ev.decider}{detail}"))

    def _completed(self, ev: TurnCompleted) -> None:
        if ev.is_error and not self.streamed_text and ev.text:
            self.out.error(f"agent error: {ev.text}")
        self.out.end_line()
        if ev.structured_output:
            self.out.line(ev.structured_output)
        for d in ev.permission_denials:
            self.out.note(one_line(f"denied: {d.tool_name} {d.input_json}"))
        self.out.note(self._summary(ev))

    @staticmethod
    def _summary(ev: TurnCompleted) -> str:
        parts = ["interrupted"] if ev.interrupted else []
        if ev.is_error:
            detail = "" if ev.result_subtype in ("", "success") else f" ({ev.result_subtype})"
            parts.append("agent error" + detail)
        parts.append(f"${ev.cost_usd:.4f}")
        parts.append(
            f"{tokens(ev.usage.input_tokens)} in / {tokens(ev.usage.output_tokens)} out tokens"
        )
        parts.append(f"{ev.duration_ms / 1000:.1f} s")
        return "— " + " · ".join(parts)

    def _failed(self, ev: TurnFailed) -> None:
        self.out.end_line()
        self.out.error(f"turn failed ({ev.code}): {ev.message}")
        for line in ev.stderr_tail.strip().splitlines()[-10:]:
            self.out.note("  " + line)


def turn_exit_code(ev: Event | None) -> int:
    """How a turn's terminal event maps to the exit code."""
    if isinstance(ev, TurnCompleted):
        if ev.interrupted:
            return EXIT_INTERRUPTED
        return EXIT_FAILED if ev.is_error else EXIT_OK
    return EXIT_FAILED
