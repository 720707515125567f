"""What a webhook is told: which session events are notifications, the JSON body of each, and
its signature.

Bodies carry who (the session: id, title, labels, study), what (the event's name and a short
summary) and the few fields a receiver acts on (a permission request's id and tool, a turn's
cost, a failure's code), never message bodies unless the endpoint has `include_text`.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import uuid
from dataclasses import dataclass
from typing import Any

from atomizerd.model import SessionRecord
from atomizerd.sessions import events as ev

SIGNATURE_HEADER = "X-Atomizer-Signature"
TIMESTAMP_HEADER = "X-Atomizer-Timestamp"
DELIVERY_HEADER = "X-Atomizer-Delivery"
EVENT_HEADER = "X-Atomizer-Event"
SIGNATURE_VERSION = "v1"
# A turn failure that means the session's agent cannot run at all (`session_failed`), as
# opposed to one turn going wrong (`turn_failed`).
_SESSION_FAILURES = frozenset({ev.SPAWN_FAILED, ev.RESUME_FAILED})
SUMMARY_CHARS = 200
_TRUNCATED = "…"


@dataclass(frozen=True)
class Notification:
    """One event worth telling, before it is addressed to an endpoint."""

    event: str  # one of config.notify.EVENTS
    summary: str
    data: dict[str, Any]
    text: str  # what `include_text` adds ("" when nothing)
    ref: str = ""  # a permission request's or question's id: its delivery starts its timeout


def classify(event: ev.SessionEvent) -> Notification | None:
    """The notification an event makes, or None (most events make none)."""
    k = event.kind
    if isinstance(k, ev.PermissionRequest):
        return Notification(
            "permission_request",
            _short(f"{k.tool_name} asks for permission: {k.description}".rstrip(": ")),
            {"request_id": k.request_id, "tool_name": k.tool_name, "plan": bool(k.plan)},
            k.plan or k.input_json,
            ref=k.request_id,
        )
    if isinstance(k, ev.Question):
        first = k.questions[0].question if k.questions else ""
        return Notification(
            "question",
            _short(f"the agent asks: {first}"),
            {"request_id": k.request_id, "questions": len(k.questions)},
            "\n".join(q.question for q in k.questions),
            ref=k.request_id,
        )
    if isinstance(k, ev.TurnCompleted):
        return Notification(
            "turn_completed",
            "the turn was interrupted" if k.interrupted else "the turn completed",
            {"cost_usd": k.cost_usd, "interrupted": k.interrupted, "stop_reason": k.stop_reason},
            k.text,
        )
    if isinstance(k, ev.TurnFailed):
        name = "session_failed" if k.code in _SESSION_FAILURES else "turn_failed"
        return Notification(name, _short(f"{k.code}: {k.message}"), {"code": k.code}, "")
    if isinstance(k, ev.TaskEnded):
        return Notification(
            "task_ended",
            _short(f"task {k.task_id} {k.status.value}"),
            {"task_id": k.task_id, "status": k.status.value},
            k.summary,
        )
    if isinstance(k, ev.Notice) and k.kind == ev.BUDGET_EXHAUSTED:
        return Notification("budget_exhausted", _short(k.message), {}, "")
    return None


def body(
    note: Notification,
    event: ev.SessionEvent,
    record: SessionRecord,
    *,
    include_text: bool,
    max_bytes: int,
) -> bytes:
    """The JSON body for one endpoint; with `include_text` the text is cut to fit
    `max_bytes`."""
    labels = record.label_map()
    doc: dict[str, Any] = {
        "delivery_id": uuid.uuid4().hex,
        "event": note.event,
        "time": event.time,
        "session": {
            "id": record.session_id,
            "title": labels.get("title", ""),
            "labels": labels,
            "study": record.study_id or "",
            "mode": record.mode,
        },
        "turn_id": event.turn_id,
        "seq": event.seq,
        "summary": note.summary,
        "data": note.data,
    }
    plain = _dumps(doc)
    if not include_text or not note.text:
        return plain
    room = max_bytes - len(plain) - len(b',"text":""')
    text = _fit(note.text, room)
    return _dumps({**doc, "text": text}) if text else plain


def signature(secret: str, timestamp: str, payload: bytes) -> str:
    """`X-Atomizer-Signature`: HMAC-SHA256 with the endpoint's secret over the timestamp, a
    dot and the body, as `v1=<hex>` (the version lets the scheme change without ambiguity)."""
    mac = hmac.new(secret.encode(), timestamp.encode() + b"." + payload, hashlib.sha256)
    return f"{SIGNATURE_VERSION}={mac.hexdigest()}"


def _dumps(doc: dict[str, Any]) -> bytes:
    return json.dumps(doc, ensure_ascii=False, separators=(",", ":")).encode()


def _short(text: str) -> str:
    text = " ".join(text.split())
    return text if len(text) <= SUMMARY_CHARS else text[: SUMMARY_CHARS - 1] + _TRUNCATED


def _fit(text: str, room: int) -> str:
    """`text`, or its longest beginning with a mark that it was cut, whose JSON string takes
    at most `room` bytes ("" when not even the mark fits)."""

    def size(t: str) -> int:
        return len(json.dumps(t, ensure_ascii=False).encode()) - 2

    if size(text) <= room:
        return text
    lo, hi = 0, len(text)  # a binary search: about 20 encodings for a large text
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if size(text[:mid] + _TRUNCATED) <= room:
            lo = mid
        else:
            hi = mid - 1
    cut = text[:lo] + _TRUNCATED
    return cut if size(cut) <= room else ""
