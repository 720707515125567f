"""Typed session events, converted from `atomizer.v1.SessionEvent`.

A turn is `TurnStarted`, then any number of deltas, tool calls and notices, then exactly one
terminal event: `TurnCompleted` (also when interrupted or when the agent reported an error) or
`TurnFailed` (the daemon could not run the turn to its end).

In user mode a tool outside the allowlist shows up as `PermissionRequest` (answer it with
`Client.respond_to_permission` before its `deadline`), and every outcome, also of requests that
were decided without asking (a remembered rule, the policy), as `PermissionDecided`.

The agent also starts turns on its own: `TurnStarted.origin` says who started a turn ("client"
for a client's message; "task", "scheduled" or "agent" for one the agent began by itself, e.g.
when a background task ended). Tasks (background or long commands, subagents) show up as
`TaskStarted`, `TaskOutput` and `TaskEnded`, also between turns; a client's text taken into a
running turn (`send_message(..., steer=True)`) as `UserMessage`.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, ClassVar

from atomizer.v1 import session_pb2


@dataclass(frozen=True, slots=True)
class Usage:
    input_tokens: int = 0
    output_tokens: int = 0
    cache_creation_input_tokens: int = 0
    cache_read_input_tokens: int = 0

    @classmethod
    def from_proto(cls, u: session_pb2.Usage) -> Usage:
        return cls(
            u.input_tokens,
            u.output_tokens,
            u.cache_creation_input_tokens,
            u.cache_read_input_tokens,
        )


@dataclass(frozen=True, slots=True)
class PermissionDenial:
    tool_name: str
    tool_use_id: str
    input_json: str


@dataclass(frozen=True, slots=True)
class Event:
    """Common to every event: its per-session sequence number and the turn it belongs to."""

    type: ClassVar[str] = "event"
    terminal: ClassVar[bool] = False

    seq: int
    turn_id: str
    session_id: str
    time: datetime | None

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict with a `type` key (what `atomizerctl --json` prints)."""
        out: dict[str, Any] = {"type": self.type}
        for f in dataclasses.fields(self):
            out[f.name] = _jsonable(getattr(self, f.name))
        return out


def _jsonable(value: Any) -> Any:
    if isinstance(value, datetime):
        return value.isoformat()
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: _jsonable(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, tuple | list):
        return [_jsonable(v) for v in value]
    return value


@dataclass(frozen=True, slots=True)
class AttachmentInfo:
    """A file sent with a message; its bytes: `Client.get_attachment(session_id, sha256)`."""

    name: str
    media_type: str
    size_bytes: int
    sha256: str


@dataclass(frozen=True, slots=True)
class TurnStarted(Event):
    type: ClassVar[str] = "turn_started"
    text: str = ""
    request_id: str = ""
    attachments: tuple[AttachmentInfo, ...] = ()
    origin: str = "client"
    """Who started the turn, lowercase: "client" (a client's message), or the agent on its own:
    "task" (a task it started has ended), "scheduled" (a prompt it scheduled came due),
    "agent" (anything else); "unspecified" from a daemon that does not say."""

    @property
    def by_agent(self) -> bool:
        """The agent started this turn on its own (no client sent a message)."""
        return self.origin not in ("client", "unspecified")


@dataclass(frozen=True, slots=True)
class UserMessage(Event):
    """A client's text taken into the running turn (a steer), when the agent took it."""

    type: ClassVar[str] = "user_message"
    text: str = ""
    request_id: str = ""


@dataclass(frozen=True, slots=True)
class TextDelta(Event):
    type: ClassVar[str] = "text_delta"
    text: str = ""


@dataclass(frozen=True, slots=True)
class ThinkingDelta(Event):
    type: ClassVar[str] = "thinking_delta"
    text: str = ""


@dataclass(frozen=True, slots=True)
class ToolUse(Event):
    type: ClassVar[str] = "tool_use"
    id: str = ""
    name: str = ""
    input_json: str = ""
    parent_tool_use_id: str = ""
    """A subagent's call: the id of the Task tool use running the subagent; "" for the main
    agent's own calls."""


@dataclass(frozen=True, slots=True)
class ToolResult(Event):
    type: ClassVar[str] = "tool_result"
    tool_use_id: str = ""
    content: str = ""
    is_error: bool = False
    parent_tool_use_id: str = ""


@dataclass(frozen=True, slots=True)
class TaskStarted(Event):
    """The agent started a task: a background or long command, a subagent."""

    type: ClassVar[str] = "task_started"
    task_id: str = ""
    tool_use_id: str = ""
    kind: str = ""
    """Lowercase: "bash", "subagent" or "other"."""
    description: str = ""
    background: bool = False
    """The turn may end before the task does; the agent may start a turn when it ends."""


@dataclass(frozen=True, slots=True)
class TaskOutput(Event):
    """More of a task's output (a background command's new output, a subagent's progress);
    all of it so far: `Client.get_task_output`."""

    type: ClassVar[str] = "task_output"
    task_id: str = ""
    text: str = ""


@dataclass(frozen=True, slots=True)
class TaskEnded(Event):
    type: ClassVar[str] = "task_ended"
    task_id: str = ""
    status: str = ""
    """Lowercase: "completed", "failed", "stopped" or "killed"."""
    summary: str = ""


@dataclass(frozen=True, slots=True)
class TurnCompleted(Event):
    type: ClassVar[str] = "turn_completed"
    terminal: ClassVar[bool] = True
    stop_reason: str = ""
    is_error: bool = False
    cost_usd: float = 0.0
    usage: Usage = field(default_factory=Usage)
    duration_ms: int = 0
    num_turns: int = 0
    interrupted: bool = False
    permission_denials: tuple[PermissionDenial, ...] = ()
    result_subtype: str = ""
    text: str = ""
    structured_output: str = ""
    """With an output schema: the answer as JSON text."""


@dataclass(frozen=True, slots=True)
class TurnFailed(Event):
    type: ClassVar[str] = "turn_failed"
    terminal: ClassVar[bool] = True
    code: str = ""
    """The FailureCode name without its prefix, e.g. "AGENT_EXITED"."""
    message: str = ""
    stderr_tail: str = ""


@dataclass(frozen=True, slots=True)
class Notice(Event):
    type: ClassVar[str] = "notice"
    kind: str = ""
    """The NoticeKind name without its prefix, e.g. "API_RETRY"."""
    message: str = ""
    attempt: int = 0
    max_retries: int = 0
    retry_delay_ms: int = 0
    error_status: int = 0
    missed_from_seq: int = 0
    """EVENTS_MISSED: the first and last seq this stream did not get (read GetHistory)."""
    missed_to_seq: int = 0
    tokens_before: int = 0
    """CONTEXT_COMPACTED: the conversation's tokens before and after the compaction."""
    tokens_after: int = 0


@dataclass(frozen=True, slots=True)
class PermissionRule:
    """A Claude Code permission rule: `tool_name` alone, or `tool_name(rule_content)`."""

    tool_name: str
    rule_content: str = ""


@dataclass(frozen=True, slots=True)
class PermissionSuggestion:
    """What the agent suggests remembering with an allow; pass one of its `rules` as
    `respond_to_permission(..., rule=...)` to allow matching calls for the session."""

    type: str
    """addRules, replaceRules, removeRules, setMode, addDirectories or removeDirectories."""
    rules: tuple[PermissionRule, ...] = ()
    behavior: str = ""
    mode: str = ""
    directories: tuple[str, ...] = ()
    destination: str = ""


@dataclass(frozen=True, slots=True)
class PermissionRequest(Event):
    """The agent asks to use a tool outside the mode's allowlist; the turn waits for an answer
    (`Client.respond_to_permission`) until `deadline`, when it is denied."""

    type: ClassVar[str] = "permission_request"
    request_id: str = ""
    tool_name: str = ""
    input_json: str = ""
    description: str = ""
    tool_use_id: str = ""
    deadline: datetime | None = None
    suggestions: tuple[PermissionSuggestion, ...] = ()
    plan: str = ""
    """tool_name ExitPlanMode: the plan a plan-mode agent asks to carry out (Markdown);
    allowing it switches the session to user (or power) mode."""


@dataclass(frozen=True, slots=True)
class PermissionDecided(Event):
    """How a permission request ended."""

    type: ClassVar[str] = "permission_decided"
    request_id: str = ""
    tool_name: str = ""
    allow: bool = False
    decider: str = ""
    """Who decided, lowercase: "client", "rule", "timeout", "policy" or "mode"."""
    message: str = ""


@dataclass(frozen=True, slots=True)
class QuestionOption:
    label: str
    description: str = ""


@dataclass(frozen=True, slots=True)
class QuestionItem:
    question: str
    """The question's text: the key of its answer in `Client.answer_question`."""
    header: str = ""
    options: tuple[QuestionOption, ...] = ()
    multi_select: bool = False
    """More than one option may be chosen: answer their labels joined by ", "."""


@dataclass(frozen=True, slots=True)
class Question(Event):
    """The agent asks the user (its AskUserQuestion tool); the turn waits for
    `Client.answer_question` until `deadline`, then goes on unanswered."""

    type: ClassVar[str] = "question"
    request_id: str = ""
    questions: tuple[QuestionItem, ...] = ()
    tool_use_id: str = ""
    deadline: datetime | None = None


@dataclass(frozen=True, slots=True)
class QuestionAnswered(Event):
    """How a question ended: `answered` (the answers, question text -> answer) or not
    (declined, timed out, nobody attached, the turn ended), with `message` saying why."""

    type: ClassVar[str] = "question_answered"
    request_id: str = ""
    answers: dict[str, str] = field(default_factory=dict)
    answered: bool = False
    decider: str = ""
    message: str = ""


@dataclass(frozen=True, slots=True)
class UsageUpdate(Event):
    """Usage as the agent reports it during a turn: the latest model call's tokens, how full
    the context is; `turn_cost_usd` only on the last one, sent just before the turn's end."""

    type: ClassVar[str] = "usage"
    input_tokens: int = 0
    output_tokens: int = 0
    cache_creation_input_tokens: int = 0
    cache_read_input_tokens: int = 0
    context_tokens: int = 0
    context_window: int = 0
    turn_cost_usd: float = 0.0
    # The turn's cost so far by the daemon's estimate (spending caps act on it).
    estimated_turn_cost_usd: float = 0.0


@dataclass(frozen=True, slots=True)
class PlanUpdated(Event):
    """The agent's plan changed (Session.plan is `plan` now)."""

    type: ClassVar[str] = "plan_updated"
    plan: str = ""


@dataclass(frozen=True, slots=True)
class UnknownEvent(Event):
    """An event kind this client does not know (a newer daemon); safe to skip."""

    type: ClassVar[str] = "unknown"


def _enum_name(enum: Any, value: int, prefix: str) -> str:
    try:
        name: str = enum.Name(value)
    except ValueError:  # a value from a newer contract
        return str(value)
    return name.removeprefix(prefix)


def decider_name(value: int) -> str:
    """A `session_pb2.Decider` value as the lowercase word events use: DECIDER_CLIENT -> client."""
    return _enum_name(session_pb2.Decider, value, "DECIDER_").lower()


def origin_name(value: int) -> str:
    """A `session_pb2.TurnOrigin` value as a lowercase word: TURN_ORIGIN_TASK -> task."""
    return _enum_name(session_pb2.TurnOrigin, value, "TURN_ORIGIN_").lower()


def _time(ts: Any) -> datetime | None:  # a Timestamp; unset (all zero) means none
    if not ts.seconds and not ts.nanos:
        return None
    value: datetime = ts.ToDatetime(tzinfo=UTC)
    return value


def from_proto(ev: session_pb2.SessionEvent) -> Event:
    """Converts one `SessionEvent` to its typed event."""
    base: dict[str, Any] = {
        "seq": ev.seq,
        "turn_id": ev.turn_id,
        "session_id": ev.session_id,
        "time": ev.time.ToDatetime(tzinfo=UTC) if ev.HasField("time") else None,
    }
    kind = ev.WhichOneof("kind")
    if kind == "turn_started":
        started = ev.turn_started
        files = tuple(
            AttachmentInfo(a.name, a.media_type, a.size_bytes, a.sha256)
            for a in started.attachments
        )
        return TurnStarted(
            **base,
            text=started.text,
            request_id=started.request_id,
            attachments=files,
            origin=origin_name(started.origin),
        )
    if kind == "user_message":
        return UserMessage(**base, text=ev.user_message.text, request_id=ev.user_message.request_id)
    if kind == "text_delta":
        return TextDelta(**base, text=ev.text_delta.text)
    if kind == "thinking_delta":
        return ThinkingDelta(**base, text=ev.thinking_delta.text)
    if kind == "tool_use":
        t = ev.tool_use
        return ToolUse(
            **base,
            id=t.id,
            name=t.name,
            input_json=t.input_json,
            parent_tool_use_id=t.parent_tool_use_id,
        )
    if kind == "tool_result":
        r = ev.tool_result
        return ToolResult(
            **base,
            tool_use_id=r.tool_use_id,
            content=r.content,
            is_error=r.is_error,
            parent_tool_use_id=r.parent_tool_use_id,
        )
    if kind in ("task_started", "task_output", "task_ended"):
        return _task_event(base, ev)
    if kind == "turn_completed":
        return _turn_completed(base, ev.turn_completed)
    if kind == "turn_failed":
        f = ev.turn_failed
        code = _enum_name(session_pb2.FailureCode, f.code, "FAILURE_CODE_")
        return TurnFailed(**base, code=code, message=f.message, stderr_tail=f.stderr_tail)
    if kind == "notice":
        return _notice(base, ev.notice)
    if kind == "permission_request":
        p = ev.permission_request
        return PermissionRequest(
            **base,
            request_id=p.request_id,
            tool_name=p.tool_name,
            input_json=p.input_json,
            description=p.description,
            tool_use_id=p.tool_use_id,
            deadline=_time(p.deadline) if p.HasField("deadline") else None,
            suggestions=tuple(
                PermissionSuggestion(
                    type=s.type,
                    rules=tuple(PermissionRule(r.tool_name, r.rule_content) for r in s.rules),
                    behavior=s.behavior,
                    mode=s.mode,
                    directories=tuple(s.directories),
                    destination=s.destination,
                )
                for s in p.suggestions
            ),
            plan=p.plan,
        )
    if kind == "permission_decided":
        d = ev.permission_decided
        return PermissionDecided(
            **base,
            request_id=d.request_id,
            tool_name=d.tool_name,
            allow=d.allow,
            decider=decider_name(d.decider),
            message=d.message,
        )
    if kind == "question":
        return question_from_proto(base, ev.question)
    if kind == "question_answered":
        return question_answered_from_proto(base, ev.question_answered)
    if kind == "usage":
        u = ev.usage
        return UsageUpdate(
            **base,
            input_tokens=u.input_tokens,
            output_tokens=u.output_tokens,
            cache_creation_input_tokens=u.cache_creation_input_tokens,
            cache_read_input_tokens=u.cache_read_input_tokens,
            context_tokens=u.context_tokens,
            context_window=u.context_window,
            turn_cost_usd=u.turn_cost_usd,
            estimated_turn_cost_usd=u.estimated_turn_cost_usd,
        )
    if kind == "plan_updated":
        return PlanUpdated(**base, plan=ev.plan_updated.plan)
    return UnknownEvent(**base)


def question_from_proto(base: dict[str, Any], q: session_pb2.Question) -> Question:
    return Question(
        **base,
        request_id=q.request_id,
        questions=tuple(
            QuestionItem(
                question=i.question,
                header=i.header,
                options=tuple(QuestionOption(o.label, o.description) for o in i.options),
                multi_select=i.multi_select,
            )
            for i in q.questions
        ),
        tool_use_id=q.tool_use_id,
        deadline=_time(q.deadline) if q.HasField("deadline") else None,
    )


def question_answered_from_proto(
    base: dict[str, Any], a: session_pb2.QuestionAnswered
) -> QuestionAnswered:
    return QuestionAnswered(
        **base,
        request_id=a.request_id,
        answers=dict(a.answers),
        answered=a.answered,
        decider=decider_name(a.decider),
        message=a.message,
    )


def _task_event(base: dict[str, Any], ev: session_pb2.SessionEvent) -> Event:
    if ev.HasField("task_started"):
        s = ev.task_started
        return TaskStarted(
            **base,
            task_id=s.task_id,
            tool_use_id=s.tool_use_id,
            kind=_enum_name(session_pb2.TaskKind, s.kind, "TASK_KIND_").lower(),
            description=s.description,
            background=s.background,
        )
    if ev.HasField("task_output"):
        return TaskOutput(**base, task_id=ev.task_output.task_id, text=ev.task_output.text)
    e = ev.task_ended
    return TaskEnded(
        **base,
        task_id=e.task_id,
        status=_enum_name(session_pb2.TaskStatus, e.status, "TASK_STATUS_").lower(),
        summary=e.summary,
    )


def _turn_completed(base: dict[str, Any], c: session_pb2.TurnCompleted) -> TurnCompleted:
    denials = tuple(
        PermissionDenial(d.tool_name, d.tool_use_id, d.input_json) for d in c.permission_denials
    )
    return TurnCompleted(
        **base,
        stop_reason=c.stop_reason,
        is_error=c.is_error,
        cost_usd=c.cost_usd,
        usage=Usage.from_proto(c.usage),
        duration_ms=c.duration_ms,
        num_turns=c.num_turns,
        interrupted=c.interrupted,
        permission_denials=denials,
        result_subtype=c.result_subtype,
        text=c.text,
        structured_output=c.structured_output,
    )


def _notice(base: dict[str, Any], n: session_pb2.Notice) -> Notice:
    return Notice(
        **base,
        kind=_enum_name(session_pb2.NoticeKind, n.kind, "NOTICE_KIND_"),
        message=n.message,
        attempt=n.attempt,
        max_retries=n.max_retries,
        retry_delay_ms=n.retry_delay_ms,
        error_status=n.error_status,
        missed_from_seq=n.missed_from_seq,
        missed_to_seq=n.missed_to_seq,
        tokens_before=n.tokens_before,
        tokens_after=n.tokens_after,
    )


__all__ = [
    "AttachmentInfo",
    "Event",
    "Notice",
    "PermissionDecided",
    "PermissionDenial",
    "PermissionRequest",
    "PermissionRule",
    "PermissionSuggestion",
    "PlanUpdated",
    "Question",
    "QuestionAnswered",
    "QuestionItem",
    "QuestionOption",
    "TaskEnded",
    "TaskOutput",
    "TaskStarted",
    "TextDelta",
    "ThinkingDelta",
    "ToolResult",
    "ToolUse",
    "TurnCompleted",
    "TurnFailed",
    "TurnStarted",
    "UnknownEvent",
    "Usage",
    "UserMessage",
    "decider_name",
    "from_proto",
    "origin_name",
]
