"""A session's work queue: its turns and setting changes, one at a time, in order.

Each session has a worker task only while it has work (sessions/session.py). A turn is run by
the turn runner; a change of settings (`Change`) runs its own coroutine after the turn before
it, so a running turn finishes under the settings it started with. Queued work that will not
run (termination, shutdown) is ended here: a turn refused or recorded, a change refused.
"""

from __future__ import annotations

import asyncio

import structlog

from atomizerd import ids
from atomizerd.config import Config
from atomizerd.errors import AtomizerError, FailedPrecondition, ResourceExhausted, Unavailable
from atomizerd.sessions import events as ev
from atomizerd.sessions.session import Change, Job, Session
from atomizerd.sessions.streams import Streams
from atomizerd.sessions.turn import Emit, Turn, TurnState
from atomizerd.sessions.turns import TurnRunner

log = structlog.get_logger("atomizerd.sessions.queue")


class WorkQueue:
    def __init__(self, config: Config, runner: TurnRunner, streams: Streams) -> None:
        self.config = config
        self.runner = runner
        self.streams = streams

    def emitter(self, s: Session, turn: Turn) -> Emit:
        return lambda kind: self.streams.emit(s, turn, kind)

    def submit(self, s: Session, job: Job) -> None:
        s.inbox.append(job)
        if s.worker is None:
            s.worker = asyncio.ensure_future(self._work(s))

    def enqueue(self, s: Session, text: str, request_id: str) -> Turn:
        """A client's message as a turn of the session's queue."""
        limit = self.config.pool.max_queued_per_session
        waiting = s.queued_turns
        if s.current is not None and waiting >= limit:
            raise ResourceExhausted(
                f"session {s.id!r} already has {waiting} messages waiting "
                f"(pool.max_queued_per_session = {limit})"
            )
        turn = Turn(ids.new_turn_id(), text, request_id, s.next_seq - 1)
        turn.audience = lambda: turn.listeners + s.watchers
        if request_id:
            s.by_request[request_id] = turn
        self.submit(s, turn)
        return turn

    def take_queue(self, s: Session) -> list[Job]:
        queued = list(s.inbox)
        s.inbox.clear()
        return queued

    def cancel(self, s: Session, job: Job, refusal: AtomizerError | None) -> None:
        """Ends queued work without running it: a turn is refused (`refusal`) or recorded as
        ended by the termination; a change is refused."""
        if isinstance(job, Change):
            if not job.done.done():
                job.done.set_exception(
                    refusal or FailedPrecondition(f"session {s.id!r} was terminated")
                )
                job.done.exception()  # retrieved: its caller may have gone
            return
        if refusal is not None:
            job.reject(refusal)
        else:
            job.stop(ev.SESSION_TERMINATED, "the session was terminated before this message ran")
            self.runner.end_early(s, job, self.emitter(s, job))
        self._turn_done(s, job)
        s.log.poke()

    def refuse_all(self, s: Session, refusal: AtomizerError) -> None:
        for job in self.take_queue(s):
            self.cancel(s, job, refusal)

    async def _work(self, s: Session) -> None:
        """Runs the session's jobs one at a time, in order, then ends."""
        try:
            while s.inbox:
                job = s.inbox.popleft()
                s.current = job
                try:
                    await self._run(s, job)
                finally:
                    s.current = None
        finally:
            s.worker = None

    async def _run(self, s: Session, job: Job) -> None:
        if isinstance(job, Change):
            await _apply(s, job)
            return
        emit = self.emitter(s, job)
        try:
            await self.runner.run(s, job, emit)
        except Exception:
            log.exception("turn could not run", session_id=s.id, turn_id=job.turn_id)
            if job.state in (TurnState.QUEUED, TurnState.WAITING):
                job.reject(Unavailable("atomizerd failed to run the turn; see its log"))
            elif job.state is TurnState.RUNNING:  # a bug: still, every turn ends
                failed = ev.TurnFailed(ev.INTERNAL, "atomizerd failed while running the turn")
                self.runner.finish_failed(s, job, emit, failed)
        finally:
            self._turn_done(s, job)
            s.log.poke()

    @staticmethod
    def _turn_done(s: Session, turn: Turn) -> None:
        if s.by_request.get(turn.request_id) is turn:
            del s.by_request[turn.request_id]
        s.remember_decisions(turn)


async def _apply(s: Session, change: Change) -> None:
    try:
        await change.apply()
    except Exception as e:
        if not isinstance(e, AtomizerError):
            log.exception("changing the session's settings failed", session_id=s.id)
        if not change.done.done():
            change.done.set_exception(e)
            change.done.exception()
    else:
        if not change.done.done():
            change.done.set_result(None)
