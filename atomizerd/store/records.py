"""The store's domain records: what it reads and writes, as plain dataclasses every layer may
use."""

from __future__ import annotations

import dataclasses
import json
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from atomizerd.store.models import (
    AuditRow,
    MessageRow,
    SessionLabelRow,
    SessionRow,
)


@dataclass
class SessionRecord:
    session_id: str
    mode: str
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

    def label_map(self) -> dict[str, str]:
        return dict(json.loads(self.labels or "{}"))

    @classmethod
    def from_row(cls, row: SessionRow) -> SessionRecord:
        return cls(**{name: getattr(row, name) for name in _SESSION_FIELDS})

    @classmethod
    def from_tuple(cls, row: tuple[Any, ...]) -> SessionRecord:
        """From a plain-SQL row of `SESSION_COLUMNS` (SQLite gives booleans as 0/1)."""
        values = dict(zip(_SESSION_FIELDS, row, strict=True))
        for name in _SESSION_BOOLS:
            values[name] = bool(values[name])
        return cls(**values)


# The record's fields are the sessions table's columns: one list, derived, never copied.
_SESSION_FIELDS = tuple(f.name for f in dataclasses.fields(SessionRecord))
_SESSION_BOOLS = tuple(f.name for f in dataclasses.fields(SessionRecord) if f.type == "bool")
SESSION_COLUMNS = ", ".join(_SESSION_FIELDS)


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

    @classmethod
    def from_row(cls, row: MessageRow) -> MessageRecord:
        return cls(
            message_id=row.id,
            session_id=row.session_id,
            turn_id=row.turn_id,
            role=row.role,
            content=row.content,
            status=row.status,
            request_id=row.request_id,
            tool_calls=[ToolCallRecord(**tc) for tc in json.loads(row.tool_calls)],
            cost_usd=row.cost_usd,
            usage=json.loads(row.usage),
            detail=row.detail,
            created_at=row.created_at,
            attachments=[AttachmentRecord(**a) for a in json.loads(row.attachments)],
            agent_uuid=row.agent_uuid,
            origin=row.origin,
            structured_output=row.structured_output,
            rolled_back_at=row.rolled_back_at,
        )


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

    @classmethod
    def from_row(cls, row: AuditRow) -> AuditRecord:
        return cls(
            session_id=row.session_id,
            kind=row.kind,
            allow=row.allow,
            decider=row.decider,
            tool_name=row.tool_name,
            input_digest=row.input_digest,
            detail=row.detail,
            turn_id=row.turn_id,
            time=row.time,
            audit_id=row.id,
        )


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

    def conditions(self) -> list[Any]:
        c: list[Any] = []
        if self.archived is not None:
            c.append(SessionRow.archived == self.archived)
        if self.mode is not None:
            c.append(SessionRow.mode == self.mode)
        if self.created_after is not None:
            c.append(SessionRow.created_at >= self.created_after)
        if self.created_before is not None:
            c.append(SessionRow.created_at < self.created_before)
        if self.active_after is not None:
            c.append(SessionRow.last_active_at >= self.active_after)
        if self.active_before is not None:
            c.append(SessionRow.last_active_at < self.active_before)
        c.extend(SessionRow.session_id.in_(_labelled(k, v)) for k, v in self.labels.items())
        return c


def _labelled(key: str, value: str) -> Any:
    """The ids of the sessions carrying the label (served by the index session_labels_pair)."""
    return SessionLabelRow.select(SessionLabelRow.session).where(
        (SessionLabelRow.key == key) & (SessionLabelRow.value == value)
    )


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
