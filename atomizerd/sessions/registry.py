"""The session registry: the domain API the servicers call.

It owns the sessions (their records in the store and their live state in memory) and every
transition of their lifecycles (sessions/session.py): creating, reopening, changing mode or
study, closing and purging, unloading. Work for one session runs in order on a worker task
that exists only while there is work; `TurnRunner` runs each turn. Sessions are loaded
lazily: the daemon starts in constant time however many sessions are stored, and per-request
work never scans all of them.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import json
import math
import re
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Collection, Mapping, Sequence
from dataclasses import dataclass, field

import structlog

from atomizerd import ids
from atomizerd.agents.pool import Agent, AgentPool, AgentState
from atomizerd.agents.process import AgentError
from atomizerd.atomizer.planfiles import remove_plans
from atomizerd.atomizer.studies import Studies
from atomizerd.daemon.config import Config
from atomizerd.errors import (
    AtomizerError,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    PermissionDenied,
    ResourceExhausted,
    StoreDown,
    Unavailable,
)
from atomizerd.sessions import events as ev
from atomizerd.sessions.approvals import CLIENT, Decision, client_decision
from atomizerd.sessions.attachments import check as check_attachments
from atomizerd.sessions.attachments import check_sha256
from atomizerd.sessions.idle import IdleReader
from atomizerd.sessions.journal import Resumed, TurnJournal
from atomizerd.sessions.session import SESSION_TRANSITIONS, Change, Session, SessionState
from atomizerd.sessions.tasks import (
    TaskInfo,
    TaskTable,
    from_row,
    read_output,
    tail_output,
    to_row,
)
from atomizerd.sessions.turns import Turn, TurnRunner, TurnState
from atomizerd.statemachine import Lifecycle
from atomizerd.store.db import (
    SEQ_BLOCK,
    AttachmentRecord,
    AuditRecord,
    MessageRecord,
    SessionRecord,
    Store,
)

log = structlog.get_logger("atomizerd.sessions.registry")

MODES = ("user", "power", "plan")
# A model as the CLI takes it: an alias (sonnet, opus[1m]) or a model id.
_MODEL_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:@/\[\]-]{0,127}")
STATES = ("idle", "starting", "ready", "busy", "closed")
MAX_PAGE = 1000
DEFAULT_PAGE = 100
# After killing the agents at shutdown: how long their turns get to be stored.
KILL_SETTLE = 5.0
# A planned restart: how long what was written to the agents' shims gets to leave before they
# are let go.
HAND_OVER_SETTLE = 2.0
# A page of a task's output (GetTaskOutput) holds at most this many bytes.
MAX_TASK_PAGE = 1 << 20
# Background commands whose output is streamed at once, per session.
MAX_TAILS = 16


@dataclass
class SessionView:
    """A snapshot of one session for the API."""

    record: SessionRecord
    state: str
    last_seq: int
    queued_turns: int = 0
    mcp_servers: list[tuple[str, str]] = field(default_factory=list)
    tasks: list[TaskInfo] = field(default_factory=list)


@dataclass(frozen=True)
class TaskOutputPage:
    """A page of a task's output file (GetTaskOutput)."""

    data: bytes
    next_offset: int
    size: int
    running: bool


class Registry:
    def __init__(
        self,
        config: Config,
        store: Store,
        pool: AgentPool,
        studies: Studies,
        context_text: Callable[[SessionRecord], str],
    ) -> None:
        self.config = config
        self.store = store
        self.pool = pool
        self.studies = studies
        self.runner = TurnRunner(config, store, pool, context_text, self._emit)
        pool.idle_reader = IdleReader(
            pool,
            self._session_of,
            self._start_agent_turn,
            lambda s, kind: self._emit(s, None, kind),
            self.runner.task_item,
        ).follow
        pool.agent_gone = self._agent_gone
        self.replay = ev.ReplayBudget(config.daemon.replay_bytes_total)
        self._sessions: dict[str, Session] = {}
        self._background: set[asyncio.Task[None]] = set()
        self.draining = False

    # --- daemon lifecycle ----------------------------------------------------------------

    def reconcile(
        self,
        keep: Collection[str] = (),
        replies: Mapping[str, str] | None = None,
        sessions: Collection[str] = (),
    ) -> None:
        """At start-up: settle turns a previous daemon left running, but those in `keep`
        (adopted with their agents: they go on); `replies`: what streamed of a turn, from
        the record its shim left (else its last checkpoint is stored). The tasks of agents
        not adopted (`sessions` were) are forgotten: their agents were killed, so were they."""
        for session_id, task_id in self.store.forget_tasks_except(sessions):
            log.warning(
                "task of an agent not adopted ended (killed)",
                session_id=session_id,
                task_id=task_id,
            )
        for session_id, turn_id in self.store.settle_unfinished_turns(keep, replies or {}):
            log.warning(
                "turn left running by a previous daemon marked interrupted",
                session_id=session_id,
                turn_id=turn_id,
            )

    def resume_turn(self, agent: Agent, resumed: Resumed) -> None:
        """A turn the previous daemon left running on `agent` (adopted at start-up) goes on
        here: its events so far are back in the session's log with their own numbers, and
        the runner reads the agent's output on from where they end (sessions/journal.py)."""
        s = self._load(agent.session_id)
        first = resumed.events[0].seq
        turn = Turn(resumed.turn_id, resumed.started.text, resumed.started.request_id, first - 1)
        turn.audience = lambda: turn.listeners + s.watchers
        turn.resumed = (agent, resumed)
        turn.journal = TurnJournal(agent.transport_or_fail(), 0)
        turn.journal.handled_upto(resumed.consumed)
        for event in resumed.events:
            s.log.append(event)
        s.next_seq = resumed.events[-1].seq + 1
        if turn.request_id:
            s.by_request[turn.request_id] = turn
        self._submit(s, turn)
        log.info(
            "turn resumed after a restart",
            session_id=s.id,
            turn_id=turn.turn_id,
            events=len(resumed.events),
            last_seq=s.next_seq - 1,
        )

    async def hand_over(self) -> None:
        """A planned restart: no new work is taken; queued turns are refused (never sent, safe
        to retry); running turns are left to their agents, which the next daemon adopts with
        them. Streams end with UNAVAILABLE; clients re-attach from their last seq."""
        self.draining = True
        not_sent = Unavailable("atomizerd is restarting; the message was not sent")
        # Answers clients gave a moment ago are written to the agents first.
        await self.runner.hand_over()
        workers = []
        for s in self._sessions.values():
            for job in self._take_queue(s):
                self._cancel_job(s, job, not_sent)
            turn = s.turn
            if turn is not None and turn.state in (TurnState.QUEUED, TurnState.WAITING):
                turn.reject(not_sent)  # it never reached an agent: nothing is stored
            if s.worker is not None:
                workers.append(s.worker)
            if turn is not None and turn.journal is not None:
                turn.journal.flush()  # everything emitted is with the shim before it is let go
        await self.pool.hand_over(HAND_OVER_SETTLE)
        for worker in workers:
            worker.cancel()
        await asyncio.gather(*workers, return_exceptions=True)
        for s in self._sessions.values():
            s.log.close()
        for task in list(self._background):
            task.cancel()

    async def drain(self, grace: float) -> None:
        """Stops accepting work: queued turns are refused (never sent, safe to retry), running
        ones interrupted and stored; agents still running after `grace` are killed so their
        turns end (and are stored)."""
        self.draining = True
        workers = []
        for s in self._sessions.values():
            for job in self._take_queue(s):
                self._cancel_job(
                    s, job, Unavailable("atomizerd is shutting down; the message was not sent")
                )
            if s.turn is not None:
                s.turn.stop(ev.DAEMON_STOPPING, "the daemon is shutting down")
            if s.worker is not None:
                workers.append(s.worker)
        if not await _all_done(workers, grace):
            log.warning(
                "turns still running after the grace period; killing their agents",
                turns=sum(1 for w in workers if not w.done()),
            )
            self.pool.kill_all()
            await _all_done(workers, KILL_SETTLE)
        for s in self._sessions.values():
            s.log.close()
        for task in list(self._background):
            task.cancel()

    # --- lookups -------------------------------------------------------------------------

    def _check_open(self) -> None:
        if self.draining:
            raise Unavailable("atomizerd is shutting down; retry in a moment")

    def _load(self, session_id: str) -> Session:
        ids.check_session_id(session_id)
        s = self._sessions.get(session_id)
        if s is not None:
            return s
        record = self.store.get_session(session_id)
        if record is None:
            raise NotFound(f"session {session_id!r} does not exist")
        initial = SessionState.CLOSED if record.closed else SessionState.OPEN
        s = Session(
            record=record,
            log=self._new_log(session_id),
            next_seq=record.seq_reserved + 1,
            lifecycle=Lifecycle(f"session {session_id}", initial, SESSION_TRANSITIONS),
        )
        loaded = s
        s.tasks = TaskTable(
            lambda n: self.pool.set_running_tasks(session_id, n),
            lambda task_id, path: self._tail(loaded, task_id, path),
            lambda task_id, info: self._record_task(session_id, task_id, info),
        )
        if not self._owns(record):
            # Another host's session: read as stored, never kept (its own daemon changes it).
            return s
        self._sessions[session_id] = s
        return s

    def _owns(self, record: SessionRecord) -> bool:
        """Whether this daemon serves the session (its host's; a store without a host: all)."""
        return self.store.host_id is None or record.host_id == self.store.host_id

    def _require_own(self, s: Session) -> None:
        """Work that needs the session's agent or its live events runs on its own host only."""
        if self._owns(s.record):
            return
        owner = s.record.host_id
        raise FailedPrecondition(
            f"session {s.id!r} belongs to host {owner!r}, not to this daemon's host "
            f"{self.store.host_id!r}: use the atomizerd on {owner!r} (its socket there), or move "
            "the session (docs/operations.md)"
        )

    def _new_log(self, session_id: str) -> ev.EventLog:
        d = self.config.daemon
        return ev.EventLog(
            session_id,
            d.replay_bytes,
            self.replay,
            lag_bytes=d.follower_lag_bytes,
            max_events=d.event_buffer,
        )

    def state_of(self, s: Session) -> str:
        if s.state is not SessionState.OPEN:
            return "closed"
        if s.turn is not None:
            return "busy"
        return self.pool.state(s.id)

    def view(self, s: Session) -> SessionView:
        return SessionView(
            record=s.record,
            state=self.state_of(s),
            last_seq=s.next_seq - 1,
            queued_turns=s.queued_turns,
            mcp_servers=self.pool.mcp_servers(s.id),
            tasks=s.tasks.running(),
        )

    def _view_record(self, record: SessionRecord) -> SessionView:
        s = self._sessions.get(record.session_id)
        if s is not None:  # loaded: its in-memory record is the current one
            return self.view(s)
        state = "closed" if record.closed else "idle"
        return SessionView(record=record, state=state, last_seq=record.seq_reserved)

    def _require_open(self, s: Session) -> None:
        if s.state is SessionState.CLOSING:
            raise FailedPrecondition(f"session {s.id!r} is being terminated")
        if s.state is SessionState.CLOSED:
            raise FailedPrecondition(
                f"session {s.id!r} is closed; CreateSession with session_id={s.id!r} reopens it"
            )

    # --- sessions ------------------------------------------------------------------------

    async def create_session(
        self,
        mode: str | None,
        study_id: str | None,
        session_id: str | None,
        budget_usd: float = 0.0,
        turn_budget_usd: float = 0.0,
        model: str = "",
    ) -> SessionView:
        self._check_open()
        mode = self._check_mode(mode) if mode else None
        model = self._check_model(model) if model else ""
        if study_id:
            self.studies.resolve(study_id)
        if session_id:
            ids.check_session_id(session_id)
            record = self.store.get_session(session_id)
            if record is not None:
                cached = self._sessions.get(session_id)
                if cached is not None and cached.idle and not self._owns(record):
                    self._forget(cached)  # moved to another host after it was closed here
                s = self._load(session_id)
                self._require_own(s)
                view = await self._reopen(s, mode, study_id)
                if model and model != s.record.model:
                    await self._change_model(s, model)
                    view = self.view(s)
                return view
        self._check_session_limit()
        budget = _cap("budget_usd", budget_usd, self.config.budget.session_usd)
        turn_budget = _cap("turn_budget_usd", turn_budget_usd, self.config.budget.turn_usd)
        mode = mode or "user"
        agent_session_id = ids.new_agent_session_id()
        if not session_id:
            spare = None
            if not budget_usd and not turn_budget_usd and not study_id and not model:
                spare = self.pool.adopt_spare(mode)
            # A spare was started for a session id reserved in advance: the session takes it.
            session_id, agent_session_id = spare or (ids.new_session_id(), agent_session_id)
            # Every later log line of this request (and of the prewarm it starts) names it.
            structlog.contextvars.bind_contextvars(session_id=session_id)
        self.store.create_session(
            session_id,
            mode,
            study_id or None,
            agent_session_id,
            budget_usd=budget,
            turn_budget_usd=turn_budget,
            model=model,
        )
        s = self._load(session_id)
        log.info("session created", session_id=session_id, mode=s.record.mode, study_id=study_id)
        self._prewarm(s)
        return self.view(s)

    def _check_session_limit(self) -> None:
        if self.store.count_open_sessions() >= self.config.daemon.max_sessions:
            raise ResourceExhausted(
                f"the daemon already holds {self.config.daemon.max_sessions} open sessions "
                "(daemon.max_sessions); terminate some first"
            )

    async def _reopen(self, s: Session, mode: str | None, study_id: str | None) -> SessionView:
        """CreateSession with the id of an existing session: reopens a closed one; a changed
        mode or study is applied like SwitchMode/SetStudyContext, after the running turn."""
        if s.state is SessionState.CLOSING:
            raise FailedPrecondition(
                f"session {s.id!r} is being terminated; retry when it is closed"
            )
        if s.state is SessionState.CLOSED:
            self._check_session_limit()
            s.record = self._write(s, closed=False, last_active_at=time.time())
            s.lifecycle.move(SessionState.OPEN)
            if s.log.closed:
                s.log = self._new_log(s.id)
            log.info("session reopened", session_id=s.id)
        await self._reconfigure(s, mode, study_id, audit=False)
        self._prewarm(s)
        return self.view(s)

    async def switch_mode(self, session_id: str, mode: str) -> SessionView:
        self._check_open()
        mode = self._check_mode(mode)
        s = self._load(session_id)
        self._require_own(s)
        self._require_open(s)
        await self._reconfigure(s, mode, None, audit=True)
        return self.view(s)

    async def fork_session(
        self, session_id: str, new_session_id: str, at_message_id: int
    ) -> SessionView:
        """A new session continuing `session_id`'s conversation up to a stored reply (the
        last one when `at_message_id` is 0). Its first agent forks the CLI's conversation
        (--resume --fork-session, --resume-session-at that reply); the original is untouched."""
        self._check_open()
        s = self._load(session_id)
        self._require_own(s)
        if at_message_id < 0:
            raise InvalidArgument("at_message_id must not be negative")
        if at_message_id:
            reply = self.store.message(s.id, at_message_id)
            if reply is None:
                raise NotFound(f"session {s.id!r} has no message {at_message_id}")
            if reply.role != "assistant":
                raise InvalidArgument(
                    f"message {at_message_id} is the user's: at_message_id names a reply "
                    "(an assistant message), after which the fork goes on"
                )
            if not reply.agent_uuid:
                raise FailedPrecondition(
                    f"reply {at_message_id} cannot be forked at: it was interrupted or failed"
                )
        else:
            reply = self.store.last_reply(s.id)
            if reply is None:
                raise FailedPrecondition(f"session {s.id!r} has no finished reply to fork")
        if new_session_id:
            ids.check_session_id(new_session_id)
            if self.store.get_session(new_session_id) is not None:
                raise FailedPrecondition(f"session {new_session_id!r} already exists")
        else:
            new_session_id = ids.new_session_id()
        self._check_session_limit()
        self.store.fork_session(
            s.record, new_session_id, ids.new_agent_session_id(), reply.message_id
        )
        fork = self._load(new_session_id)
        log.info(
            "session forked", session_id=fork.id, forked_from=s.id, at_message=reply.message_id
        )
        self._prewarm(fork)
        return self.view(fork)

    async def set_model(self, session_id: str, model: str) -> SessionView:
        """The session's model ("": the daemon's default), after the work queued before it."""
        self._check_open()
        model = self._check_model(model) if model else ""
        s = self._load(session_id)
        self._require_own(s)
        self._require_open(s)
        await self._change_model(s, model)
        return self.view(s)

    async def _change_model(self, s: Session, model: str) -> None:
        """A job in the session's queue: the record first (every later spawn or resume runs
        `--model`), then the live agent, which switches with the CLI's `set_model`; an agent
        that cannot (starting, or refusing) is restarted instead."""

        async def apply() -> None:
            if model == s.record.model:
                return
            s.record = self._write(s, model=model)
            agent = self.pool.agent(s.id)
            if agent is not None and agent.state is AgentState.READY and agent.alive:
                try:
                    await agent.transport_or_fail().request(
                        "set_model",
                        timeout=self.config.agent.stop_grace,
                        model=model or self.config.agent.model or "default",
                    )
                    log.info("model changed on the live agent", session_id=s.id, model=model)
                    return
                except AgentError as e:
                    log.warning("the agent refused set_model; restarting it", error=str(e))
            await self.pool.retire(s.id)
            log.info("model changed", session_id=s.id, model=model)
            self._prewarm(s)

        change = Change(apply)
        self._submit(s, change)
        await asyncio.shield(change.done)

    async def set_study(self, session_id: str, study_id: str) -> SessionView:
        self._check_open()
        if study_id:
            self.studies.resolve(study_id)
        s = self._load(session_id)
        self._require_own(s)
        self._require_open(s)
        await self._reconfigure(s, None, study_id if study_id else "", audit=False)
        return self.view(s)

    async def _reconfigure(
        self, s: Session, mode: str | None, study_id: str | None, *, audit: bool
    ) -> None:
        """Changes the session's mode and/or study (None: unchanged; "" clears the study)
        after the work queued before it; the agent is restarted with the new settings."""

        def wanted() -> dict[str, object]:
            changes: dict[str, object] = {}
            if mode and mode != s.record.mode:
                changes["mode"] = mode
            if study_id is not None and (study_id or None) != s.record.study_id:
                changes["study_id"] = study_id or None
            return changes

        if not wanted() and s.idle:
            return

        async def apply() -> None:
            changes = wanted()
            if not changes:
                return
            previous = s.record.mode
            with self.store.atomic():
                s.record = self._write(s, **changes, context_stale=s.record.agent_started)
                if audit and "mode" in changes:
                    self.store.add_audit(
                        AuditRecord(
                            session_id=s.id,
                            kind="mode_switch",
                            allow=True,
                            decider=CLIENT,
                            detail=f"{previous} -> {changes['mode']}",
                        )
                    )
            await self.pool.retire(s.id)
            log.info(
                "session settings changed",
                session_id=s.id,
                **{k: str(v) for k, v in changes.items()},
            )
            self._prewarm(s)

        change = Change(apply)
        self._submit(s, change)
        await asyncio.shield(change.done)

    def _write(self, s: Session, **fields: object) -> SessionRecord:
        record = self.store.update_session(s.id, **fields)
        if record is None:  # purged meanwhile
            raise NotFound(f"session {s.id!r} does not exist")
        return record

    def _prewarm(self, s: Session) -> None:
        if not self.config.agent.prewarm or s.state is not SessionState.OPEN:
            return
        self._spawn_background(
            self.pool.prewarm(lambda: s.record, lambda: s.state is SessionState.OPEN and s.idle)
        )

    def _spawn_background(self, coro: Awaitable[None]) -> None:
        task: asyncio.Task[None] = asyncio.ensure_future(coro)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    def get_attachment(self, session_id: str, sha256: str) -> tuple[AttachmentRecord, bytes]:
        """A file sent in the session, by its sha256."""
        s = self._load(session_id)
        found = self.store.attachment(s.id, check_sha256(sha256))
        if found is None:
            raise NotFound(f"session {s.id!r} has no attachment {sha256}")
        return found

    def get_session(self, session_id: str) -> SessionView:
        return self.view(self._load(session_id))

    def list_sessions(
        self,
        page_size: int,
        page_token: str,
        study_id: str | None,
        state: str | None,
        host_id: str | None = None,
    ) -> tuple[list[SessionView], str]:
        limit = _page_size(page_size)
        after = _decode_token(page_token)
        if study_id:
            ids.check_study_id(study_id)
        only: set[str] | None = None
        exclude: set[str] | None = None
        closed: bool | None = None
        if state == "closed":
            closed = True
        elif state == "idle":
            closed = False
            exclude = {sid for sid, s in self._sessions.items() if self.state_of(s) != "idle"}
        elif state is not None:
            closed = False
            only = {sid for sid, s in self._sessions.items() if self.state_of(s) == state}
        records = self.store.list_sessions(
            limit=limit + 1,
            after=after,
            study_id=study_id or None,
            closed=closed,
            only_ids=only,
            exclude_ids=exclude,
            host_id=host_id,
        )
        page = records[:limit]
        token = ""
        if len(records) > limit:
            last = page[-1]
            token = _encode_token(last.created_at, last.session_id)
        return [self._view_record(r) for r in page], token

    async def terminate_session(self, session_id: str, purge: bool) -> SessionView | None:
        """OPEN → CLOSING → CLOSED (or purged). Runs to its end whatever happens to the caller
        (its deadline, a disconnect): a termination is never left half done."""
        s = self._load(session_id)
        self._require_own(s)
        if s.closing is None:
            if s.state is SessionState.CLOSED and not purge:
                return self.view(s)
            s.lifecycle.move(SessionState.CLOSING)
            s.closing = asyncio.ensure_future(self._close(s, purge))
        await asyncio.shield(s.closing)
        if purge or s.id not in self._sessions:
            return None
        return self.view(s)

    async def _close(self, s: Session, purge: bool) -> None:
        try:
            queued = self._take_queue(s)
            if s.turn is not None:
                s.turn.stop(ev.SESSION_TERMINATED, "the session was terminated")
            if s.worker is not None:
                await asyncio.shield(s.worker)
            for job in queued:  # in order, after the turn that ran: history stays in order
                self._cancel_job(s, job, None)
            await self.pool.retire(s.id)
            self.studies.remove_session_files(s.id)
            if purge:
                remove_plans(self.config, s.id)
                self.runner.forget_session(s)
                self.store.delete_session(s.id)
                self._forget(s)
                log.info("session purged", session_id=s.id)
            else:
                s.record = self._write(s, closed=True)
                log.info("session terminated", session_id=s.id)
            s.log.close()  # watchers of a closed session are done
        finally:
            s.closing = None
            if s.state is SessionState.CLOSING:
                s.lifecycle.move(SessionState.CLOSED)

    def _take_queue(self, s: Session) -> list[Turn | Change]:
        queued = list(s.inbox)
        s.inbox.clear()
        return queued

    def _cancel_job(self, s: Session, job: Turn | Change, refusal: AtomizerError | None) -> None:
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
            self.runner.end_early(s, job, lambda k: self._emit(s, job, k))
        self._turn_done(s, job)
        s.log.poke()

    def history(
        self, session_id: str, page_size: int, page_token: str
    ) -> tuple[list[MessageRecord], str]:
        s = self._load(session_id)
        limit = _page_size(page_size)
        rows = self.store.history(s.id, after_id=_decode_id_token(page_token), limit=limit + 1)
        page = rows[:limit]
        token = _encode_id_token(page[-1].message_id) if len(rows) > limit else ""
        return page, token

    # --- work queue ----------------------------------------------------------------------

    def _submit(self, s: Session, job: Turn | Change) -> None:
        s.inbox.append(job)
        if s.worker is None:
            s.worker = asyncio.ensure_future(self._work(s))

    async def _work(self, s: Session) -> None:
        """Runs the session's jobs one at a time, in order, then ends."""
        try:
            while s.inbox:
                job = s.inbox.popleft()
                s.current = job
                try:
                    await self._run_job(s, job)
                finally:
                    s.current = None
        finally:
            s.worker = None

    async def _run_job(self, s: Session, job: Turn | Change) -> None:
        if isinstance(job, Change):
            try:
                await job.apply()
            except Exception as e:
                if not isinstance(e, AtomizerError):
                    log.exception("changing the session's settings failed", session_id=s.id)
                if not job.done.done():
                    job.done.set_exception(e)
                    job.done.exception()
            else:
                if not job.done.done():
                    job.done.set_result(None)
            return
        try:
            await self.runner.run(s, job, lambda k: self._emit(s, job, k))
        except Exception:
            log.exception("turn could not run", session_id=s.id, turn_id=job.turn_id)
            if job.state in (TurnState.QUEUED, TurnState.WAITING):
                job.reject(Unavailable("atomizerd failed to run the turn; see its log"))
            elif job.state is TurnState.RUNNING:  # a bug: still, every turn ends
                failed = ev.TurnFailed(ev.INTERNAL, "atomizerd failed while running the turn")
                self.runner.finish_failed(s, job, lambda k: self._emit(s, job, k), failed)
        finally:
            self._turn_done(s, job)
            s.log.poke()

    def _turn_done(self, s: Session, turn: Turn) -> None:
        if s.by_request.get(turn.request_id) is turn:
            del s.by_request[turn.request_id]
        s.remember_decisions(turn)

    # --- turns ---------------------------------------------------------------------------

    async def send_message(
        self,
        session_id: str,
        text: str,
        request_id: str,
        attachments: Sequence[tuple[str, str, bytes]] = (),
        *,
        steer: bool = False,
    ) -> AsyncIterator[ev.SessionEvent]:
        """Starts (or re-attaches to) a turn and yields its events up to the terminal one.
        With `steer`, while a turn runs the text goes into it now and the running turn is
        streamed to its end; with no turn running it is an ordinary message."""
        self._check_open()
        ids.check_request_id(request_id)
        files = check_attachments(attachments, self.config.attachments)
        self._check_text(text, empty_ok=bool(files))
        s = self._load(session_id)
        self._require_own(s)
        self._require_open(s)
        turn = s.by_request.get(request_id) if request_id else None
        if turn is None:
            stored = self.store.find_turn_by_request(s.id, request_id) if request_id else []
            if stored:
                for event in self._replay_stored(s, stored):
                    yield event
                return
            self._check_budget(s)
            running = s.turn
            if steer and not files and running is not None and not s.inbox:
                if await self.runner.steer(s, running, text, request_id):
                    turn = running
                else:
                    turn = self._enqueue(s, text, request_id)
            else:
                turn = self._enqueue(s, text, request_id)
                turn.attachments = files
        turn.listeners += 1
        try:
            async for event in self._follow_turn(s, turn):
                yield event
        finally:
            turn.listeners -= 1

    def _enqueue(self, s: Session, text: str, request_id: str) -> Turn:
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
        self._submit(s, turn)
        return turn

    async def _follow_turn(self, s: Session, turn: Turn) -> AsyncIterator[ev.SessionEvent]:
        """The turn's events from the session's log, up to its terminal one; a gap (events
        dropped before this stream read them) is reported, never skipped silently."""
        log_ = s.log
        cursor = turn.start_cursor
        token = log_.attach(cursor)
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

    def _emit(self, s: Session, turn: Turn | None, kind: ev.EventKind) -> ev.SessionEvent:
        """Numbers an event of the session: of a turn, or (None) of no turn (what the agent
        does between turns: its tasks)."""
        seq = s.next_seq
        event = ev.SessionEvent(seq, s.id, turn.turn_id if turn else "", time.time(), kind)
        if turn is None:
            s.next_seq += 1
            if seq > s.record.seq_reserved:
                self._reserve_seq(s, seq + SEQ_BLOCK)
            s.log.append(event)
            return event
        if turn.state is TurnState.DONE:  # a bug: nothing of a turn comes after its end
            log.error(
                "event after the turn's end dropped", turn_id=turn.turn_id, kind=type(kind).__name__
            )
            return event
        s.next_seq += 1
        if seq > s.record.seq_reserved:
            self._reserve_seq(s, seq + SEQ_BLOCK)
        turn.noted(event)
        s.log.append(event)
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

    def _replay_stored(self, s: Session, stored: list[MessageRecord]) -> list[ev.SessionEvent]:
        """A retried request whose turn is no longer in memory: its stored outcome."""
        user = stored[0]
        out = [
            ev.SessionEvent(
                0,
                s.id,
                user.turn_id,
                user.created_at,
                ev.TurnStarted(
                    user.content,
                    user.request_id or "",
                    tuple(
                        ev.AttachmentInfo(a.name, a.media_type, a.size, a.sha256)
                        for a in user.attachments
                    ),
                ),
            )
        ]
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

    async def watch(self, session_id: str, after_seq: int) -> AsyncIterator[ev.SessionEvent]:
        s = self._load(session_id)
        self._require_own(s)  # its events exist only in its host's daemon
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

    # --- what the agent does on its own ---------------------------------------------------

    def _session_of(self, session_id: str) -> Session | None:
        try:
            s = self._load(session_id)
        except AtomizerError:
            return None
        return s if s.state is SessionState.OPEN and self._owns(s.record) else None

    def _record_task(self, session_id: str, task_id: str, info: TaskInfo | None) -> None:
        try:
            if info is None:
                self.store.forget_task(session_id, task_id)
            else:
                self.store.record_task(session_id, to_row(info))
        except AtomizerError as e:  # a full disk: only a restart would miss the task
            log.warning("task not recorded", session_id=session_id, error=str(e))

    def restore_tasks(self, session_id: str) -> None:
        """An adopted agent's tasks, as the previous daemon recorded them: it is busy."""
        s = self._session_of(session_id)
        if s is None:
            return
        timeout = self.config.agent.task_timeout
        tasks = [from_row(row, timeout) for row in self.store.tasks_of(session_id)]
        if tasks:
            s.tasks.restore(tasks, asyncio.get_running_loop().time())
            log.info("tasks of an adopted agent restored", session_id=session_id, tasks=len(tasks))

    def _start_agent_turn(self, s: Session, agent: Agent) -> None:
        """The agent started a turn while idle: a job of the session runs it (stored,
        announced, governed like any turn); a client's message queues behind it."""
        turn = Turn(ids.new_turn_id(), "", "", s.next_seq - 1)
        turn.origin = s.next_origin
        turn.leased = agent
        turn.follows_agent = True
        turn.audience = lambda: turn.listeners + s.watchers
        self._submit(s, turn)

    def _agent_gone(self, session_id: str) -> None:
        """The session's agent is gone (stopped, evicted, died): its tasks went with it."""
        s = self._sessions.get(session_id)
        if s is None:
            return
        s.untaken.clear()
        for tail in s.tails.values():
            tail.cancel()
        s.tails.clear()
        for ended in s.tasks.forget_all(ev.TaskStatus.KILLED, "the agent was stopped"):
            self._emit(s, None, ended)

    def _tail(self, s: Session, task_id: str, path: str) -> None:
        """Streams a background command's new output as task_output while it runs."""
        if task_id in s.tails or len(s.tails) >= MAX_TAILS:
            return
        per_s = self.config.agent.task_output_bytes
        task = asyncio.ensure_future(
            tail_output(
                path,
                per_s,
                running=lambda: s.tasks.get(task_id) is not None,
                emit=lambda text: self._task_output(s, task_id, text),
            )
        )
        s.tails[task_id] = task
        task.add_done_callback(lambda _t: s.tails.pop(task_id, None))

    def _task_output(self, s: Session, task_id: str, text: str) -> None:
        info = s.tasks.get(task_id)
        if info is not None:
            info.output_bytes += len(text.encode())
        self._emit(s, None, ev.TaskOutput(task_id, text))

    async def stop_overdue_tasks(self) -> None:
        """Stops every task that has run longer than agent.task_timeout, with a notice: an
        agent with a running task keeps its pool slot, a forgotten one must not keep it."""
        now = asyncio.get_running_loop().time()
        limit = self.config.agent.task_timeout
        for s in list(self._sessions.values()):
            for task in s.tasks.running():
                if not task.deadline or now < task.deadline:
                    continue
                task.deadline = 0.0  # asked once; its end comes as task_ended
                self._emit(
                    s,
                    None,
                    ev.Notice(
                        ev.TASK_TIMEOUT,
                        f"task {task.task_id} ({task.description}) ran longer than "
                        f"{limit:g} s (agent.task_timeout): stopping it",
                    ),
                )
                try:
                    await self.stop_task(s.id, task.task_id)
                except AtomizerError as e:
                    log.warning(
                        "an overdue task was not stopped", task_id=task.task_id, error=str(e)
                    )

    async def stop_task(self, session_id: str, task_id: str) -> None:
        """Stops one of the agent's running tasks (the CLI's stop_task)."""
        s = self._load(session_id)
        self._require_own(s)
        ids.check_task_id(task_id)
        if s.tasks.get(task_id) is None:
            raise NotFound(f"session {s.id!r} has no running task {task_id!r}")
        agent = self.pool.agent(s.id)
        if agent is None or agent.transport is None:
            raise FailedPrecondition(f"session {s.id!r} has no live agent")
        try:
            await agent.transport.request(
                "stop_task", timeout=self.config.agent.stop_grace, task_id=task_id
            )
        except AgentError as e:
            raise FailedPrecondition(f"the agent did not stop task {task_id!r}: {e}") from None

    def task_output(self, session_id: str, task_id: str, offset: int, limit: int) -> TaskOutputPage:
        """A page of a task's output file, never read whole."""
        s = self._load(session_id)
        self._require_own(s)
        ids.check_task_id(task_id)
        if offset < 0 or limit < 0:
            raise InvalidArgument("offset and limit must not be negative")
        path = s.tasks.output_file(task_id)
        if not path:
            raise NotFound(f"session {s.id!r} has no output of task {task_id!r}")
        limit = min(limit or MAX_TASK_PAGE, MAX_TASK_PAGE)
        try:
            data, size = read_output(path, offset, limit)
        except OSError as e:
            raise NotFound(f"the output of task {task_id!r} is gone: {e.strerror}") from None
        return TaskOutputPage(data, offset + len(data), size, s.tasks.get(task_id) is not None)

    async def interrupt(self, session_id: str) -> str:
        s = self._load(session_id)
        self._require_own(s)
        turn = s.turn
        if turn is None:
            raise FailedPrecondition(f"session {s.id!r} has no turn running")
        turn.interrupt()
        return turn.turn_id

    def respond_to_permission(
        self,
        session_id: str,
        request_id: str,
        allow: bool,
        message: str,
        remember: bool,
        updated_input_json: str = "",
        rule: tuple[str, str] | None = None,
        next_mode: str | None = None,
    ) -> Decision:
        s = self._load(session_id)
        self._require_own(s)
        if not request_id:
            raise InvalidArgument("request_id is required")
        message = message or ("" if allow else "the user denied this tool use")
        decision = client_decision(allow, message, remember, updated_input_json, rule)
        if next_mode is not None:
            if next_mode not in ("user", "power") or not allow:
                raise InvalidArgument(
                    "mode goes with an allow of ExitPlanMode: MODE_USER or MODE_POWER"
                )
            decision.next_mode = self._check_mode(next_mode)
        turn = s.turn
        if turn is not None and turn.approvals is not None:
            approvals = turn.approvals
            if request_id in approvals.pending or request_id in approvals.decided:
                return approvals.answer(request_id, decision)
        earlier = s.decisions.get(request_id)
        if earlier is not None:
            raise FailedPrecondition(
                f"permission request {request_id!r} was already decided "
                f"({'allowed' if earlier.allow else 'denied'} by {earlier.decider})"
            )
        raise NotFound(f"session {s.id!r} has no permission request {request_id!r}")

    def answer_question(
        self, session_id: str, request_id: str, answers: dict[str, str]
    ) -> ev.QuestionAnswered:
        """A client's answer to a question of the running turn (empty answers decline it)."""
        s = self._load(session_id)
        self._require_own(s)
        if not request_id:
            raise InvalidArgument("request_id is required")
        turn = s.turn
        if turn is not None and turn.approvals is not None:
            questions = turn.approvals.questions
            if request_id in questions.pending:
                return questions.answer(request_id, answers)
            if request_id in questions.settled:
                raise FailedPrecondition(f"question {request_id!r} has already ended")
        if request_id in s.decisions:
            raise FailedPrecondition(f"question {request_id!r} has already ended")
        raise NotFound(f"session {s.id!r} has no pending question {request_id!r}")

    def audit_events(
        self, session_id: str, page_size: int, page_token: str
    ) -> tuple[list[AuditRecord], str]:
        s = self._load(session_id)
        limit = _page_size(page_size)
        after_id = _decode_id_token(page_token)
        rows = self.store.audit_events(s.id, after_id=after_id, limit=limit + 1)
        page = rows[:limit]
        token = _encode_id_token(page[-1].audit_id) if len(rows) > limit else ""
        return page, token

    def _check_budget(self, s: Session) -> None:
        cap = s.record.budget_usd
        if cap > 0 and s.record.total_cost_usd >= cap:
            raise ResourceExhausted(
                f"session {s.id!r} has spent ${s.record.total_cost_usd:.4f} of its "
                f"${cap:.4f} cap; it accepts no more messages"
            )

    # --- checks --------------------------------------------------------------------------

    def _check_model(self, model: str) -> str:
        allowed = self.config.agent.models
        if allowed and model not in allowed:
            raise InvalidArgument(
                f"model {model[:130]!r} is not one this daemon offers (agent.models): "
                + ", ".join(allowed)
            )
        if not _MODEL_NAME.fullmatch(model):
            raise InvalidArgument(
                f"model {model[:130]!r} is not a model name (letters, digits and . _ - : @ / [ ])"
            )
        return model

    def _check_mode(self, mode: str) -> str:
        if mode not in MODES:
            raise InvalidArgument(f"unknown mode {mode!r}: use MODE_USER or MODE_POWER")
        if mode == "power" and not self.config.modes.power.enabled:
            raise PermissionDenied(
                "power mode is disabled on this daemon (modes.power.enabled = false)"
            )
        return mode

    def _check_text(self, text: str, *, empty_ok: bool = False) -> None:
        if not text.strip() and not empty_ok:
            raise InvalidArgument("the message text is empty")
        size = len(text.encode("utf-8", "surrogatepass"))
        limit = self.config.daemon.max_message_bytes
        if size > limit:
            raise InvalidArgument(
                f"the message is {size} bytes; the limit is {limit} (daemon.max_message_bytes)"
            )

    # --- status and memory ---------------------------------------------------------------

    def counts(self) -> dict[str, int]:
        busy = sum(1 for s in self._sessions.values() if s.turn is not None)
        queued = sum(s.queued_turns for s in self._sessions.values())
        return {"busy": busy, "queued": queued + self.pool.queued}

    def loaded_session(self, session_id: str) -> Session | None:
        return self._sessions.get(session_id)

    def unload_idle(self, older_than: float) -> int:
        """Forgets the in-memory state of sessions nobody uses (no work, no watcher, no live
        agent, inactive since `older_than`): memory stays bounded however many sessions a
        long-running daemon has served. They load again from the store on demand."""
        idle = [
            s
            for s in self._sessions.values()
            if s.idle
            and not s.watchers
            and self.pool.agent(s.id) is None
            and s.record.last_active_at < older_than
        ]
        for s in idle:
            self._forget(s)
        return len(idle)

    def _forget(self, s: Session) -> None:
        if self._sessions.get(s.id) is s:
            del self._sessions[s.id]
        s.log.close()


def spare_record(config: Config, mode: str) -> SessionRecord:
    """The record a spare agent of `mode` is started for: what a new session of that mode
    with no study, the default model and the default budgets will be, under ids reserved now."""
    now = time.time()
    return SessionRecord(
        session_id=ids.new_session_id(),
        mode=mode,
        study_id=None,
        agent_session_id=ids.new_agent_session_id(),
        agent_started=False,
        closed=False,
        created_at=now,
        last_active_at=now,
        message_count=0,
        total_cost_usd=0.0,
        agent_cost_usd=0.0,
        seq_reserved=0,
        budget_usd=config.budget.session_usd,
        turn_budget_usd=config.budget.turn_usd,
    )


def _page_size(value: int) -> int:
    if value < 0:
        raise InvalidArgument("page_size must not be negative")
    return min(value or DEFAULT_PAGE, MAX_PAGE)


def _encode_token(created_at: float, session_id: str) -> str:
    return base64.urlsafe_b64encode(json.dumps([created_at, session_id]).encode()).decode()


def _decode_token(token: str) -> tuple[float, str] | None:
    if not token:
        return None
    try:
        created, sid = json.loads(base64.urlsafe_b64decode(token.encode()))
        return float(created), ids.check_session_id(str(sid))
    except (ValueError, TypeError, binascii.Error, InvalidArgument):
        raise InvalidArgument("page_token is not one this daemon issued") from None


def _encode_id_token(last_id: int) -> str:
    return base64.urlsafe_b64encode(str(last_id).encode()).decode()


def _decode_id_token(token: str) -> int:
    if not token:
        return 0
    try:
        value = int(base64.urlsafe_b64decode(token.encode()).decode())
        if not 0 <= value < 2**63:  # beyond SQLite's INTEGER: not a row id we handed out
            raise ValueError(value)
        return value
    except (ValueError, binascii.Error):
        raise InvalidArgument("page_token is not one this daemon issued") from None


def _cap(name: str, requested: float, daemon_cap: float) -> float:
    """A per-session cap may only lower the daemon's (0 means "the daemon's")."""
    if not math.isfinite(requested):  # NaN would slip past every comparison below
        raise InvalidArgument(f"{name} must be a finite number (got {requested})")
    if requested < 0:
        raise InvalidArgument(f"{name} must not be negative")
    if requested == 0:
        return daemon_cap
    if daemon_cap > 0 and requested > daemon_cap:
        raise InvalidArgument(
            f"{name} ${requested:g} is above the daemon's cap ${daemon_cap:g}; "
            "it may only be lowered"
        )
    return requested


async def _all_done(tasks: list[asyncio.Task[None]], timeout: float) -> bool:
    if not tasks:
        return True
    _, pending = await asyncio.wait(tasks, timeout=timeout)
    return not pending
