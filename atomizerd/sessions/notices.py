"""Who else hears of a session's events: the hooks the session layer calls for every event it
emits, and asks when a permission request finds nobody attached.

The webhook notifier (atomizerd/notify/) implements them above this layer; the daemon points
the registry's `NoticeRelay` at it at start-up (daemon/server.py). The defaults here hear
nothing and notify nobody, so a registry built without a notifier (a test, a tool) keeps the
plain policy: nobody attached, the request is denied.
"""

from __future__ import annotations

import structlog

from atomizerd.model import SessionRecord
from atomizerd.sessions import events as ev

log = structlog.get_logger("atomizerd.sessions.notices")


class Notices:
    def session_event(self, record: SessionRecord, event: ev.SessionEvent) -> None:
        """An event of the session was emitted (numbered, in its log). Must not block: it
        runs inside the emit of every event."""

    def notifies(self, record: SessionRecord, event: str) -> bool:
        """Whether someone is told of `event` (e.g. permission_request) in this session."""
        return False

    async def delivered(self, request_id: str, bound: float) -> bool:
        """Waits (at most `bound` seconds) until the notification of the permission request
        `request_id` was delivered to someone; False if it was not."""
        return False


NULL = Notices()


class NoticeRelay(Notices):
    """Forwards to `target`, which the daemon sets once its notifier is built; a failing
    listener is logged and never stops an event."""

    def __init__(self) -> None:
        self.target: Notices = NULL

    def point_at(self, target: Notices | None) -> None:
        self.target = NULL if target is None else target

    def session_event(self, record: SessionRecord, event: ev.SessionEvent) -> None:
        try:
            self.target.session_event(record, event)
        except Exception:
            log.exception("a listener failed on an event", session_id=record.session_id)

    def notifies(self, record: SessionRecord, event: str) -> bool:
        return self.target.notifies(record, event)

    async def delivered(self, request_id: str, bound: float) -> bool:
        return await self.target.delivered(request_id, bound)
