"""Rows ⇄ records: the store's tables (models.py) read as the domain's records
(atomizerd/model.py), and ListSessions' filters as conditions on them."""

from __future__ import annotations

import json
from typing import Any

from atomizerd.model import (
    SESSION_FIELDS,
    AttachmentRecord,
    AuditRecord,
    MessageRecord,
    SessionFilter,
    SessionRecord,
    ToolCallRecord,
)
from atomizerd.store.models import (
    AuditRow,
    MessageRow,
    SessionLabelRow,
    SessionRow,
)

SESSION_COLUMNS = ", ".join(SESSION_FIELDS)
_SESSION_BOOLS = tuple(f for f in SESSION_FIELDS if SessionRecord.__annotations__[f] == "bool")


def session_record(row: SessionRow) -> SessionRecord:
    return SessionRecord(**{name: getattr(row, name) for name in SESSION_FIELDS})


def session_from_tuple(row: tuple[Any, ...]) -> SessionRecord:
    """From a plain-SQL row of `SESSION_COLUMNS` (SQLite gives booleans as 0/1)."""
    values = dict(zip(SESSION_FIELDS, row, strict=True))
    for name in _SESSION_BOOLS:
        values[name] = bool(values[name])
    return SessionRecord(**values)


def message_record(row: MessageRow) -> MessageRecord:
    return MessageRecord(
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


def audit_record(row: AuditRow) -> AuditRecord:
    return AuditRecord(
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


def filter_conditions(f: SessionFilter) -> list[Any]:
    """The filter as peewee conditions on the sessions table (each served by an index)."""
    c: list[Any] = []
    if f.archived is not None:
        c.append(SessionRow.archived == f.archived)
    if f.mode is not None:
        c.append(SessionRow.mode == f.mode)
    if f.created_after is not None:
        c.append(SessionRow.created_at >= f.created_after)
    if f.created_before is not None:
        c.append(SessionRow.created_at < f.created_before)
    if f.active_after is not None:
        c.append(SessionRow.last_active_at >= f.active_after)
    if f.active_before is not None:
        c.append(SessionRow.last_active_at < f.active_before)
    c.extend(SessionRow.session_id.in_(_labelled(k, v)) for k, v in f.labels.items())
    return c


def _labelled(key: str, value: str) -> Any:
    """The ids of the sessions carrying the label (served by the index session_labels_pair)."""
    return SessionLabelRow.select(SessionLabelRow.session).where(
        (SessionLabelRow.key == key) & (SessionLabelRow.value == value)
    )
