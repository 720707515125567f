"""The messages an agent writes, as typed values (parsed by agents/protocol.py).

Frozen dataclasses, one per kind of line the pinned CLI writes (docs/agent-protocol.md);
`Unknown` for any other, which is still activity.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, TypeAlias

from atomizerd.model import PermissionDenial


@dataclass(frozen=True, slots=True)
class Init:
    """`system`/`init`: sent at the start of every turn, names the conversation and setup."""

    session_id: str
    model: str
    tools: tuple[str, ...]
    mcp_servers: tuple[tuple[str, str], ...]  # (name, status)
    permission_mode: str
    raw: dict[str, Any] = field(repr=False, compare=False)


@dataclass(frozen=True, slots=True)
class TextDelta:
    text: str
    parent_tool_use_id: str | None = None  # set for a subagent's output
    message_id: str = ""  # the API message it belongs to (see AbandonedBlocks)
    index: int = 0  # its content block's index in that message


@dataclass(frozen=True, slots=True)
class ThinkingDelta:
    text: str
    parent_tool_use_id: str | None = None
    message_id: str = ""
    index: int = 0


@dataclass(frozen=True, slots=True)
class AbandonedBlocks:
    """The deltas already streamed for blocks `from_block_index`.. of API message `message_id`
    were dropped (an interrupt, or a broken stream the CLI retries without streaming: the
    retried answer then comes as whole `assistant` lines with no deltas)."""

    message_id: str
    from_block_index: int


@dataclass(frozen=True, slots=True)
class ToolUse:
    id: str
    name: str
    input_json: str  # the tool input re-serialised as JSON text


@dataclass(frozen=True, slots=True)
class AssistantMessage:
    """A whole assistant content block (the CLI sends one `assistant` line per block)."""

    text: str
    tool_uses: tuple[ToolUse, ...]
    thinking: str = ""
    message_id: str = ""
    model: str = ""
    parent_tool_use_id: str | None = None
    error: str | None = None  # e.g. "server_error" on a synthetic API-error message
    aborted: bool = False  # the partial block of an interrupted turn
    # The model call's input tokens, cache included (its output comes in MessageDelta), and
    # the cache's parts of it.
    input_tokens: int = 0
    cache_creation_tokens: int = 0
    cache_read_tokens: int = 0
    uuid: str = ""  # the line's own uuid in the CLI's transcript (--resume-session-at)


@dataclass(frozen=True, slots=True)
class MessageDelta:
    """A streamed message's end (`message_delta`): its final output token count."""

    output_tokens: int
    parent_tool_use_id: str | None = None


@dataclass(frozen=True, slots=True)
class CompactBoundary:
    """`system`/`compact_boundary`: the CLI compacted the conversation (`trigger` manual or
    auto) from `pre_tokens` to `post_tokens`."""

    trigger: str
    pre_tokens: int
    post_tokens: int


@dataclass(frozen=True, slots=True)
class ToolResult:
    tool_use_id: str
    content: str
    is_error: bool
    parent_tool_use_id: str | None = None


@dataclass(frozen=True, slots=True)
class ApiRetry:
    """`system`/`api_retry`: the CLI is retrying a failed API call after a delay."""

    attempt: int
    max_retries: int
    retry_delay_ms: int
    error_status: int | None
    error: str


@dataclass(frozen=True, slots=True)
class Result:
    """The `result` line: the end of a turn. `is_error` can be true with subtype `success`."""

    subtype: str
    is_error: bool
    result_text: str
    total_cost_usd: float
    usage: dict[str, Any]
    duration_ms: int
    num_turns: int
    session_id: str
    stop_reason: str | None
    permission_denials: tuple[PermissionDenial, ...]
    errors: tuple[str, ...] = ()
    terminal_reason: str | None = None
    raw: dict[str, Any] = field(default_factory=dict, repr=False, compare=False)

    @property
    def origin_kind(self) -> str:
        """Who started the turn this result ends, when the agent did (e.g.
        "task-notification"); "" for a turn a user line started."""
        origin = self.raw.get("origin")
        kind = origin.get("kind") if isinstance(origin, dict) else None
        return kind if isinstance(kind, str) else ""


@dataclass(frozen=True, slots=True)
class ControlRequest:
    """A request from the CLI to us, e.g. subtype `can_use_tool`; `payload` is its `request`."""

    request_id: str
    subtype: str
    payload: dict[str, Any]


@dataclass(frozen=True, slots=True)
class ControlResponse:
    """The CLI's answer to one of our control requests."""

    request_id: str
    subtype: str  # "success" or "error"
    response: dict[str, Any]
    error: str | None = None


@dataclass(frozen=True, slots=True)
class ControlCancelRequest:
    """The CLI withdrew a control request it sent us (don't answer it any more)."""

    request_id: str


@dataclass(frozen=True, slots=True)
class UserReplay:
    """A user line the CLI took into a turn, echoed with the uuid its writer gave it
    (`--replay-user-messages`): the one reliable mark of which turn answers which line."""

    uuid: str
    text: str


@dataclass(frozen=True, slots=True)
class TaskStarted:
    """`system/task_started`: a background or long-running Bash command, or a subagent."""

    task_id: str
    tool_use_id: str
    task_type: str  # local_bash | local_agent | ...
    description: str
    background: bool


@dataclass(frozen=True, slots=True)
class TaskProgress:
    """`system/task_progress`: a subagent's progress (its last tool, a summary)."""

    task_id: str
    description: str
    last_tool_name: str
    summary: str


@dataclass(frozen=True, slots=True)
class TaskNotification:
    """`system/task_notification`: a task ended (completed, failed, stopped, killed)."""

    task_id: str
    tool_use_id: str
    status: str
    summary: str
    output_file: str


@dataclass(frozen=True, slots=True)
class CommandLifecycle:
    """`command_lifecycle`: a queued input (a written line, or a scheduled wake-up, which names
    its `wakeup_source`) was queued, started or completed."""

    command_uuid: str
    state: str
    wakeup_source: str


@dataclass(frozen=True, slots=True)
class Unknown:
    """Any other line (status, partial events we don't relay, new kinds). Still activity."""

    type: str
    subtype: str | None
    raw: dict[str, Any] = field(repr=False, compare=False)


AgentMessage: TypeAlias = (
    Init
    | TextDelta
    | ThinkingDelta
    | AbandonedBlocks
    | AssistantMessage
    | ToolResult
    | ApiRetry
    | CompactBoundary
    | MessageDelta
    | Result
    | ControlRequest
    | ControlResponse
    | ControlCancelRequest
    | UserReplay
    | TaskStarted
    | TaskProgress
    | TaskNotification
    | CommandLifecycle
    | Unknown
)

# What the agent says outside a turn without starting one: task bookkeeping (a subagent's own
# messages, carrying `parent_tool_use_id`, are told apart by that field).
TASK_MESSAGES = (TaskStarted, TaskProgress, TaskNotification, CommandLifecycle)
