"""The domain model: the records every layer passes around (what the store reads and writes, as
plain dataclasses) and the enums of its vocabulary. It imports nothing of atomizerd: every
layer may use it, and it sits below them all (docs/architecture.md)."""

from __future__ import annotations

import dataclasses
import enum
import json
import time
from collections.abc import Mapping
from dataclasses import dataclass, field

# MessageRecord.origin of an AskAside question and its answer: kept apart from the conversation.
ASIDE = "aside"


class Mode(enum.StrEnum):
    """A session's mode (docs/security.md): what its agent may do without asking.

    The values are what the store keeps and the configuration names."""

    USER = "user"  # sandboxed; tools outside the allow-list ask a person
    POWER = "power"  # every tool, no sandbox (modes.power.enabled)
    PLAN = "plan"  # read-only planning; the plan's approval picks the next mode


@dataclass
class SessionRecord:
    session_id: str
    mode: Mode  # the store's text, read as the enum (__post_init__)
    study_id: str | None
    agent_session_id: str
    agent_started: bool
    closed: bool
    created_at: float
    last_active_at: float
    message_count: int
    total_cost_usd: float
    agent_cost_usd: float
    seq_reserved: int
    budget_usd: float = 0.0
    turn_budget_usd: float = 0.0
    context_stale: bool = False
    host_id: str = ""
    model: str = ""
    context_tokens: int = 0
    context_window: int = 0
    forked_from: str = ""
    fork_of: str = ""
    fork_at: str = ""
    labels: str = "{}"  # JSON object: label_map() has it as a dict
    archived: bool = False
    title: str = ""
    last_usage: str = "{}"  # JSON object: the last LiveUsage the agent reported
    agent_files: str = "{}"  # JSON object: path -> sha256 as the agent left it ("" removed)
    rollback_state: str = ""  # JSON object: the last RollbackSession, while it can be undone
    plan: str = ""  # the plan the agent works to (its plan file's text), "" until it made one

    def __post_init__(self) -> None:
        self.mode = Mode(self.mode)

    def label_map(self) -> dict[str, str]:
        return dict(json.loads(self.labels or "{}"))


# The record's fields are the sessions table's columns: one list, derived, never copied.
SESSION_FIELDS = tuple(f.name for f in dataclasses.fields(SessionRecord))


@dataclass(frozen=True, slots=True)
class PermissionDenial:
    """A tool use the CLI's permission layer denied in a turn: the agent reports it with the
    turn's result, the session passes it on with the turn's end."""

    tool_name: str
    tool_use_id: str
    input_json: str


@dataclass
class ToolCallRecord:
    id: str
    name: str
    input_json: str
    result: str = ""
    is_error: bool = False


@dataclass
class MessageRecord:
    message_id: int
    session_id: str
    turn_id: str
    role: str  # "user" | "assistant"
    content: str
    status: str  # "pending" | "complete" | "interrupted" | "failed"
    request_id: str | None
    tool_calls: list[ToolCallRecord]
    cost_usd: float
    usage: dict[str, int]
    detail: str
    created_at: float
    attachments: list[AttachmentRecord] = field(default_factory=list)
    agent_uuid: str = ""
    origin: str = "client"  # "aside": AskAside's question or answer, outside the conversation
    structured_output: str = ""
    rolled_back_at: int = 0  # the message a rollback went back to (0: in the conversation)


@dataclass
class AttachmentRecord:
    """A file sent with a user message, as the history keeps it."""

    name: str
    media_type: str
    size: int
    sha256: str


@dataclass
class StoredAttachment:
    """A file to store with a user message: its record and its bytes."""

    record: AttachmentRecord
    data: bytes


@dataclass
class TurnOutcome:
    """Everything written when a turn ends, in one transaction."""

    status: str  # "complete" | "interrupted" | "failed"
    text: str
    tool_calls: list[ToolCallRecord] = field(default_factory=list)
    cost_usd: float = 0.0
    usage: dict[str, int] = field(default_factory=dict)
    detail: str = ""
    # How full the conversation's context is now, and its window (None: not reported).
    context_tokens: int | None = None
    context_window: int | None = None
    agent_uuid: str = ""  # the CLI's uuid of the reply's last line
    origin: str = "client"  # who started the turn (events.TurnOrigin's value)
    structured_output: str = ""  # a structured turn's answer (JSON text)
    last_usage: str | None = None  # the last usage reported (JSON object); None: unchanged
    agent_files: str | None = None  # Session.agent_files after the turn; None: unchanged


@dataclass
class AuditRecord:
    session_id: str
    kind: str
    allow: bool
    decider: str
    tool_name: str = ""
    input_digest: str = ""
    detail: str = ""
    turn_id: str = ""
    time: float = field(default_factory=time.time)
    audit_id: int = 0


@dataclass
class AgentProcessRecord:
    pgid: int
    session_id: str
    start_time: int


@dataclass
class SessionFilter:
    """ListSessions' filters beyond study, state and host; every one set must hold."""

    labels: Mapping[str, str] = field(default_factory=dict)
    mode: str | None = None
    archived: bool | None = False  # None: archived or not
    created_after: float | None = None
    created_before: float | None = None
    active_after: float | None = None
    active_before: float | None = None


@dataclass
class SearchHit:
    """A message that matches a search."""

    message_id: int
    session_id: str
    turn_id: str
    role: str
    created_at: float
    snippet: str
    score: float  # higher is better


@dataclass(frozen=True)
class WebhookStatus:
    """One webhook endpoint's deliveries (GetStatus `webhooks`; atomizerd/notify/)."""

    name: str
    url: str
    queued: int
    delivered: int
    failed: int
    dropped: int
    failing: bool
    last_error: str
    failing_since: float  # wall clock; 0 when not failing
