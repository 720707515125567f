"""A session's events: numbered, appended to its log, followed by its clients.

Every event gets the session's next sequence number (reserved in the store in blocks, so numbers
increase across restarts) and goes to the session's log; the sender of a turn and every
WatchSession follower read that one log with their own cursor (docs/architecture.md,
"Replay"). A retried request whose turn is no longer in memory is answered from the store.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator

import structlog

from atomizerd.errors import InvalidArgument, NotFound, StoreDown, Unavailable
from atomizerd.model import MessageRecord
from atomizerd.sessions import checks
from atomizerd.sessions import events as ev
from atomizerd.sessions.notices import NoticeRelay
from atomizerd.sessions.session import Session, SessionState
from atomizerd.sessions.table import SessionTable
from atomizerd.sessions.turn import Turn, TurnState
from atomizerd.store.db import SEQ_BLOCK, Store

log = structlog.get_logger("atomizerd.sessions.streams")


class Streams:
    def __init__(self, table: SessionTable, store: Store) -> None:
        self.table = table
        self.store = store
        # Who else hears of every event (the webhooks, once the daemon points it at them).
        self.notices = NoticeRelay()

    def emit(self, s: Session, turn: Turn | None, kind: ev.EventKind) -> ev.SessionEvent:
        """Numbers an event of the session: of a turn, or (None) of no turn (what the agent
        does between turns: its tasks)."""
        seq = s.next_seq
        event = ev.SessionEvent(seq, s.id, turn.turn_id if turn else "", time.time(), kind)
        if turn is not None and turn.state is TurnState.DONE:
            # A bug: nothing of a turn comes after its end.
            log.error(
                "event after the turn's end dropped", turn_id=turn.turn_id, kind=type(kind).__name__
            )
            return event
        s.next_seq += 1
        if seq > s.record.seq_reserved:
            self._reserve_seq(s, seq + SEQ_BLOCK)
        if turn is not None:
            turn.noted(event)
        job = s.turn
        if job is not None and job is not turn and job.journal is not None:
            # A restart during the job puts these back too (seqs are never given twice).
            job.journal.note(event)
        if isinstance(kind, ev.LiveUsage):
            s.usage = kind  # GetSession shows it at once; the turn's end stores it
        s.log.append(event)
        self.notices.session_event(s.record, event)
        return event

    def _reserve_seq(self, s: Session, upto: int) -> None:
        try:
            record = self.store.reserve_seq(s.id, upto)
            if record is None:  # purged meanwhile
                raise NotFound(f"session {s.id!r} does not exist")
            s.record = record
        except StoreDown as e:
            # Numbering goes on in memory; only a crash before the disk recovers could reuse
            # these numbers.
            log.error("sequence numbers not reserved", session_id=s.id, error=str(e))
            s.record.seq_reserved = upto

    async def follow_turn(self, s: Session, turn: Turn) -> AsyncIterator[ev.SessionEvent]:
        """The turn's events from the session's log, up to its terminal one; a gap (events
        dropped before this stream read them) is reported, never skipped silently."""
        log_ = s.log
        token = log_.attach(turn.start_cursor)
        try:
            async for event in self._turn_events(log_, token, turn):
                yield event
        finally:
            log_.detach(token)

    async def _turn_events(
        self, log_: ev.EventLog, token: object, turn: Turn
    ) -> AsyncIterator[ev.SessionEvent]:
        cursor = turn.start_cursor
        while True:
            gap = log_.missed_after(cursor)
            if gap is not None:
                yield ev.missed_notice(log_, gap)
                cursor = gap[1]
            for event in log_.after(cursor):
                cursor = event.seq
                if event.turn_id == turn.turn_id:
                    yield event
                    log_.advance(token, cursor)
                    if event.terminal:
                        return
            log_.advance(token, cursor)
            if turn.rejected is not None:
                raise turn.rejected
            if turn.terminal is not None and cursor >= turn.terminal.seq:
                yield turn.terminal  # it was dropped from the buffer before this stream read it
                return
            if log_.closed:
                if turn.done.is_set() and turn.terminal is not None:
                    yield turn.terminal
                    return
                raise Unavailable("atomizerd is shutting down; the turn's end is in GetHistory")
            await log_.wait_past(cursor)

    async def watch(self, session_id: str, after_seq: int) -> AsyncIterator[ev.SessionEvent]:
        s = self.table.serving(session_id)  # its events exist only in its host's daemon
        if after_seq < 0:
            raise InvalidArgument("after_seq must not be negative")
        if after_seq >= s.next_seq:
            raise InvalidArgument(
                f"after_seq {after_seq} is in the future: session {s.id!r} is at seq "
                f"{s.next_seq - 1}"
            )
        if s.state is SessionState.CLOSED:  # nothing more will happen: what is kept, then the end
            for event in s.log.after(after_seq):
                yield event
            return
        s.watchers += 1
        try:
            async for event in s.log.follow(after_seq):
                yield event
        finally:
            s.watchers -= 1

    def history(
        self,
        session_id: str,
        page_size: int,
        page_token: str,
        *,
        asides: bool = True,
        rolled_back: bool = True,
    ) -> tuple[list[MessageRecord], str]:
        s = self.table.load(session_id)
        return checks.id_page(
            page_size,
            page_token,
            lambda after, limit: self.store.history(
                s.id, after_id=after, limit=limit, asides=asides, rolled_back=rolled_back
            ),
            lambda row: row.message_id,
        )


def replay_stored(s: Session, stored: list[MessageRecord]) -> list[ev.SessionEvent]:
    """A retried request whose turn is no longer in memory: its stored outcome."""
    user = stored[0]
    files = tuple(
        ev.AttachmentInfo(a.name, a.media_type, a.size, a.sha256) for a in user.attachments
    )
    started = ev.TurnStarted(user.content, user.request_id or "", files)
    out = [ev.SessionEvent(0, s.id, user.turn_id, user.created_at, started)]
    reply = next((m for m in stored if m.role == "assistant"), None)
    if reply is None:
        kind: ev.EventKind = ev.TurnFailed(ev.INTERNAL, "the turn never finished")
    elif reply.status == "failed":
        kind = ev.TurnFailed(ev.INTERNAL, reply.detail)
    else:
        kind = ev.TurnCompleted(
            text=reply.content,
            cost_usd=reply.cost_usd,
            usage=reply.usage,
            interrupted=reply.status == "interrupted",
            stop_reason=reply.detail,
        )
    out.append(ev.SessionEvent(0, s.id, user.turn_id, reply.created_at if reply else 0, kind))
    return out
