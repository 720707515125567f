"""Sending a message and reading a turn's events, for tests."""

from __future__ import annotations

from typing import Any

from atomizer.v1 import session_pb2 as pb

from tests.conftest import Stubs


def send(stubs: Stubs, session_id: str, text: str, **kw: Any) -> list[pb.SessionEvent]:
    """The whole turn's events (SendMessage to its terminal event)."""
    stream = stubs.sessions.SendMessage(
        pb.SendMessageRequest(session_id=session_id, text=text, **kw), timeout=120
    )
    return [r.event for r in stream]


def kinds(events: list[pb.SessionEvent]) -> list[str]:
    return [str(e.WhichOneof("kind")) for e in events]


def reply_text(events: list[pb.SessionEvent]) -> str:
    return "".join(e.text_delta.text for e in events if e.WhichOneof("kind") == "text_delta")
