"""The session registry: the domain API the servicers call.

It owns the sessions (their records in the store and their live state in memory), orders
turns per session, and hands turns to the runner. Sessions are loaded lazily: the daemon
starts in constant time however many sessions are stored, and per-request work never scans
all of them.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import json
import math
import time
from collections import deque
from collections.abc import AsyncIterator, Coroutine
from dataclasses import dataclass, field
from typing import Any

import structlog

from atomizerd import ids
from atomizerd.agents.pool import AgentPool
from atomizerd.atomizer.studies import Studies
from atomizerd.daemon.config import Config
from atomizerd.errors import (
    FailedPrecondition,
    Internal,
    InvalidArgument,
    NotFound,
    PermissionDenied,
    ResourceExhausted,
    Unavailable,
)
from atomizerd.sessions import events as ev
from atomizerd.sessions.approvals import CLIENT, Approvals, Decision
from atomizerd.sessions.turns import Turn, TurnRunner
from atomizerd.store.db import SEQ_BLOCK, AuditRecord, MessageRecord, SessionRecord, Store

log = structlog.get_logger("atomizerd.sessions.registry")

MODES = ("user", "power")
STATES = ("idle", "starting", "ready", "busy", "closed")
MAX_PAGE = 1000
DEFAULT_PAGE = 100
# Finished turns remembered per session for request_id retries (older ones come from the store).
RECENT_TURNS = 32
# After killing the agents at shutdown: how long their turns get to be stored.
KILL_SETTLE = 5.0


@dataclass
class SessionView:
    """A snapshot of one session for the API."""

    record: SessionRecord
    state: str
    last_seq: int
    queued_turns: int = 0
    mcp_servers: list[tuple[str, str]] = field(default_factory=list)


@dataclass
class Session:
    """A session loaded in memory: its record plus everything live about it."""

    record: SessionRecord
    log: ev.EventLog
    next_seq: int
    turn_lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    waiting: int = 0
    current: Turn | None = None
    recent: dict[str, Turn] = field(default_factory=dict)  # request_id -> turn
    watchers: int = 0
    # Turns that ended lately, so a late answer to their permission requests is told it
    # came too late (FAILED_PRECONDITION) instead of "unknown request".
    finished: deque[Turn] = field(default_factory=lambda: deque(maxlen=RECENT_TURNS))

    def approvals(self) -> list[Approvals]:
        turns = [self.current, *reversed(self.finished)]
        return [t.approvals for t in turns if t is not None and t.approvals is not None]

    @property
    def id(self) -> str:
        return self.record.session_id


class Registry:
    def __init__(self, config: Config, store: Store, pool: AgentPool, studies: Studies) -> None:
        self.config = config
        self.store = store
        self.pool = pool
        self.studies = studies
        self.runner = TurnRunner(config, store, pool)
        self._sessions: dict[str, Session] = {}
        self._background: set[asyncio.Task[None]] = set()
        self.draining = False

    # --- lifecycle ---------------------------------------------------------------------------

    def reconcile(self) -> None:
        """At start-up: settle turns a previous daemon left running."""
        for session_id, turn_id in self.store.settle_unfinished_turns():
            log.warning(
                "turn left running by a previous daemon marked interrupted",
                session_id=session_id,
                turn_id=turn_id,
            )

    async def drain(self, grace: float) -> None:
        """Stops accepting work, interrupts running turns and waits for them to be stored;
        agents still running after `grace` are killed so their turns end (and are stored)."""
        self.draining = True
        running = [s.current for s in self._sessions.values() if s.current is not None]
        for turn in running:
            turn.stop(ev.DAEMON_STOPPING, "the daemon is shutting down")
        if not await _all_done(running, grace):
            log.warning(
                "turns still running after the grace period; killing their agents",
                turns=sum(1 for t in running if not t.done.is_set()),
            )
            self.pool.kill_all()
            await _all_done(running, KILL_SETTLE)
        for s in self._sessions.values():
            s.log.close()
        for task in list(self._background):
            task.cancel()

    # --- lookups -----------------------------------------------------------------------------

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
        s = Session(
            record=record,
            log=ev.EventLog(self.config.daemon.event_buffer),
            next_seq=record.seq_reserved + 1,
        )
        self._sessions[session_id] = s
        return s

    def state_of(self, s: Session) -> str:
        if s.record.closed:
            return "closed"
        if s.current is not None:
            return "busy"
        return self.pool.state(s.id)

    def view(self, s: Session) -> SessionView:
        return SessionView(
            record=s.record,
            state=self.state_of(s),
            last_seq=s.next_seq - 1,
            queued_turns=s.waiting,
            mcp_servers=self.pool.mcp_servers(s.id),
        )

    def _view_record(self, record: SessionRecord) -> SessionView:
        s = self._sessions.get(record.session_id)
        if s is not None:  # loaded: its in-memory record is the one turns keep current
            return self.view(s)
        state = "closed" if record.closed else "idle"
        return SessionView(record=record, state=state, last_seq=record.seq_reserved)

    # --- sessions ----------------------------------------------------------------------------

    async def create_session(
        self,
        mode: str | None,
        study_id: str | None,
        session_id: str | None,
        budget_usd: float = 0.0,
        turn_budget_usd: float = 0.0,
    ) -> SessionView:
        self._check_open()
        mode = self._check_mode(mode) if mode else None
        if study_id:
            self.studies.resolve(study_id)
        record: SessionRecord | None = None
        if session_id:
            ids.check_session_id(session_id)
            record = self.store.get_session(session_id)
            if record is not None and not record.closed:
                return await self._reopen(record, mode, study_id)
        else:
            session_id = ids.new_session_id()
            # Every later log line of this request (and of the prewarm it starts) names it.
            structlog.contextvars.bind_contextvars(session_id=session_id)
        if self.store.count_open_sessions() >= self.config.daemon.max_sessions:
            raise ResourceExhausted(
                f"the daemon already holds {self.config.daemon.max_sessions} open sessions "
                "(daemon.max_sessions); terminate some first"
            )
        if record is not None:  # a closed session: reopening it counts against the limit
            return await self._reopen(record, mode, study_id)
        budget = _cap("budget_usd", budget_usd, self.config.budget.session_usd)
        turn_budget = _cap("turn_budget_usd", turn_budget_usd, self.config.budget.turn_usd)
        record = self.store.create_session(
            session_id,
            mode or "user",
            study_id or None,
            ids.new_agent_session_id(),
            budget_usd=budget,
            turn_budget_usd=turn_budget,
        )
        log.info("session created", session_id=session_id, mode=record.mode, study_id=study_id)
        s = self._load(session_id)
        self._prewarm(s)
        return self.view(s)

    async def _reopen(
        self, record: SessionRecord, mode: str | None, study_id: str | None
    ) -> SessionView:
        s = self._load(record.session_id)
        if s.log.closed:
            s.log = ev.EventLog(self.config.daemon.event_buffer)
        changes: dict[str, object] = {"closed": False, "last_active_at": time.time()}
        if mode and mode != s.record.mode:
            changes["mode"] = mode
        if study_id and study_id != s.record.study_id:
            changes["study_id"] = study_id
        if "mode" in changes or "study_id" in changes:
            changes["context_stale"] = s.record.agent_started
        self.store.update_session(s.id, **changes)
        self._refresh(s)
        if "mode" in changes or "study_id" in changes:
            await self.pool.retire(s.id)
        log.info("session reopened", session_id=s.id)
        self._prewarm(s)
        return self.view(s)

    def _refresh(self, s: Session) -> None:
        record = self.store.get_session(s.id)
        if record is None:  # purged meanwhile
            raise NotFound(f"session {s.id!r} does not exist")
        s.record = record

    def _prewarm(self, s: Session) -> None:
        if self.config.agent.prewarm and not s.record.closed:
            self._spawn_background(self.pool.prewarm(s.record))

    def _spawn_background(self, coro: Coroutine[Any, Any, None]) -> None:
        task: asyncio.Task[None] = asyncio.ensure_future(coro)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    def get_session(self, session_id: str) -> SessionView:
        return self.view(self._load(session_id))

    def list_sessions(
        self, page_size: int, page_token: str, study_id: str | None, state: str | None
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
        )
        page = records[:limit]
        token = ""
        if len(records) > limit:
            last = page[-1]
            token = _encode_token(last.created_at, last.session_id)
        return [self._view_record(r) for r in page], token

    async def terminate_session(self, session_id: str, purge: bool) -> SessionView | None:
        s = self._load(session_id)
        turn = s.current
        if turn is not None:
            turn.stop(ev.SESSION_TERMINATED, "the session was terminated")
            await turn.done.wait()
        await self.pool.retire(s.id)
        self.studies.remove_session_files(s.id)
        if purge:
            self.store.delete_session(s.id)
            s.log.close()
            self._sessions.pop(s.id, None)
            log.info("session purged", session_id=s.id)
            return None
        self.store.update_session(s.id, closed=True)
        self._refresh(s)
        s.log.close()  # watchers of a closed session are done
        log.info("session terminated", session_id=s.id)
        return self.view(s)

    async def switch_mode(self, session_id: str, mode: str) -> SessionView:
        self._check_open()
        mode = self._check_mode(mode)
        s = self._load(session_id)
        self._require_open(s)
        if mode != s.record.mode:
            # Waiting for the session's turn lock lets a running turn finish under its old mode.
            async with s.turn_lock:
                previous = s.record.mode
                with self.store.atomic():
                    self.store.update_session(s.id, mode=mode, context_stale=s.record.agent_started)
                    self.store.add_audit(
                        AuditRecord(
                            session_id=s.id,
                            kind="mode_switch",
                            allow=True,
                            decider=CLIENT,
                            detail=f"{previous} -> {mode}",
                        )
                    )
                self._refresh(s)
                await self.pool.retire(s.id)
            log.info("mode switched", session_id=s.id, mode=mode)
            self._prewarm(s)
        return self.view(s)

    async def set_study(self, session_id: str, study_id: str) -> SessionView:
        self._check_open()
        if study_id:
            self.studies.resolve(study_id)
        s = self._load(session_id)
        self._require_open(s)
        if (study_id or None) != s.record.study_id:
            async with s.turn_lock:
                self.store.update_session(
                    s.id, study_id=study_id or None, context_stale=s.record.agent_started
                )
                self._refresh(s)
                await self.pool.retire(s.id)
            log.info("study context set", session_id=s.id, study_id=study_id)
            self._prewarm(s)
        return self.view(s)

    def history(
        self, session_id: str, page_size: int, page_token: str
    ) -> tuple[list[MessageRecord], str]:
        s = self._load(session_id)
        limit = _page_size(page_size)
        rows = self.store.history(s.id, after_id=_decode_id_token(page_token), limit=limit + 1)
        page = rows[:limit]
        token = _encode_id_token(page[-1].message_id) if len(rows) > limit else ""
        return page, token

    # --- turns -------------------------------------------------------------------------------

    async def send_message(
        self, session_id: str, text: str, request_id: str
    ) -> AsyncIterator[ev.SessionEvent]:
        """Starts (or re-attaches to) a turn and yields its events up to the terminal one."""
        self._check_open()
        ids.check_request_id(request_id)
        self._check_text(text)
        s = self._load(session_id)
        self._require_open(s)
        turn = self._find_turn(s, request_id) if request_id else None
        if turn is None:
            stored = self.store.find_turn_by_request(s.id, request_id) if request_id else []
            if stored:
                for event in self._replay_stored(s, stored):
                    yield event
                return
            self._check_budget(s)
            turn = self._enqueue(s, text, request_id)
        turn.listeners += 1
        try:
            async for event in turn.log.follow(0, until=lambda e: e.terminal):
                yield event
        finally:
            turn.listeners -= 1
        if turn.rejected is not None:
            raise turn.rejected

    def _find_turn(self, s: Session, request_id: str) -> Turn | None:
        return s.recent.get(request_id)

    def _enqueue(self, s: Session, text: str, request_id: str) -> Turn:
        limit = self.config.pool.max_queued_per_session
        if s.current is not None and s.waiting >= limit:
            raise ResourceExhausted(
                f"session {s.id!r} already has {s.waiting} messages waiting "
                f"(pool.max_queued_per_session = {limit})"
            )
        turn = Turn(ids.new_turn_id(), text, request_id)
        turn.audience = lambda: turn.listeners + s.watchers
        if request_id:
            s.recent[request_id] = turn
            while len(s.recent) > RECENT_TURNS:
                s.recent.pop(next(iter(s.recent)))
        self._spawn_background(self._run_when_ready(s, turn))
        return turn

    async def _run_when_ready(self, s: Session, turn: Turn) -> None:
        """Runs the turn after the session's earlier turns, even if the client went away."""
        s.waiting += 1
        try:
            async with s.turn_lock:
                s.waiting -= 1
                s.current = turn
                try:
                    await self.runner.run(s.record, turn, lambda k: self._emit(s, turn, k))
                finally:
                    s.current = None
                    s.finished.append(turn)
        except asyncio.CancelledError:
            if not turn.done.is_set():
                turn.reject(Unavailable("atomizerd is shutting down; the message was not sent"))
            raise
        except Exception:
            log.exception("turn could not run", session_id=s.id, turn_id=turn.turn_id)
            if not turn.done.is_set():
                turn.reject(Internal("atomizerd failed to run the turn; see its log"))

    def _emit(self, s: Session, turn: Turn, kind: ev.EventKind) -> ev.SessionEvent:
        seq = s.next_seq
        s.next_seq += 1
        if seq > s.record.seq_reserved:
            s.record.seq_reserved = seq + SEQ_BLOCK
            self.store.reserve_seq(s.id, s.record.seq_reserved)
        event = ev.SessionEvent(seq, s.id, turn.turn_id, time.time(), kind)
        s.log.append(event)
        turn.log.append(event)
        return event

    def _replay_stored(self, s: Session, stored: list[MessageRecord]) -> list[ev.SessionEvent]:
        """A retried request whose turn is no longer in memory: its stored outcome."""
        user = stored[0]
        out = [
            ev.SessionEvent(
                0,
                s.id,
                user.turn_id,
                user.created_at,
                ev.TurnStarted(user.content, user.request_id or ""),
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
        if after_seq < 0:
            raise InvalidArgument("after_seq must not be negative")
        if after_seq >= s.next_seq:
            raise InvalidArgument(
                f"after_seq {after_seq} is in the future: session {s.id!r} is at seq "
                f"{s.next_seq - 1}"
            )
        if s.record.closed:  # nothing more will happen: what is buffered, then the end
            for event in s.log.after(after_seq):
                yield event
            return
        s.watchers += 1
        try:
            async for event in s.log.follow(after_seq):
                yield event
        finally:
            s.watchers -= 1

    async def interrupt(self, session_id: str) -> str:
        s = self._load(session_id)
        turn = s.current
        if turn is None:
            raise FailedPrecondition(f"session {s.id!r} has no turn running")
        await self.runner.interrupt(turn)
        return turn.turn_id

    def respond_to_permission(
        self, session_id: str, request_id: str, allow: bool, message: str, remember: bool
    ) -> Decision:
        s = self._load(session_id)
        if not request_id:
            raise InvalidArgument("request_id is required")
        message = message or ("" if allow else "the user denied this tool use")
        for approvals in s.approvals():
            if request_id in approvals.pending or request_id in approvals.decided:
                return approvals.answer(request_id, Decision(allow, CLIENT, message, remember))
        raise NotFound(f"session {s.id!r} has no permission request {request_id!r}")

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

    # --- checks ------------------------------------------------------------------------------

    def _check_mode(self, mode: str) -> str:
        if mode not in MODES:
            raise InvalidArgument(f"unknown mode {mode!r}: use MODE_USER or MODE_POWER")
        if mode == "power" and not self.config.modes.power.enabled:
            raise PermissionDenied(
                "power mode is disabled on this daemon (modes.power.enabled = false)"
            )
        return mode

    def _check_text(self, text: str) -> None:
        if not text.strip():
            raise InvalidArgument("the message text is empty")
        size = len(text.encode("utf-8", "surrogatepass"))
        limit = self.config.daemon.max_message_bytes
        if size > limit:
            raise InvalidArgument(
                f"the message is {size} bytes; the limit is {limit} (daemon.max_message_bytes)"
            )

    def _require_open(self, s: Session) -> None:
        if s.record.closed:
            raise FailedPrecondition(
                f"session {s.id!r} is closed; CreateSession with session_id={s.id!r} reopens it"
            )

    # --- status ------------------------------------------------------------------------------

    def counts(self) -> dict[str, int]:
        busy = sum(1 for s in self._sessions.values() if s.current is not None)
        queued = sum(s.waiting for s in self._sessions.values())
        return {"busy": busy, "queued": queued + self.pool.queued}

    def loaded_session(self, session_id: str) -> Session | None:
        return self._sessions.get(session_id)

    def unload_idle(self, older_than: float) -> int:
        """Forgets the in-memory state of sessions nobody uses (no turn, no watcher, no live
        process, inactive since `older_than`): memory stays bounded however many sessions a
        long-running daemon has served. They load again from the store on demand."""
        idle = [
            s
            for s in self._sessions.values()
            if s.current is None
            and not s.waiting
            and not s.watchers
            and self.pool.state(s.id) == "idle"
            and s.record.last_active_at < older_than
        ]
        for s in idle:
            self.unload(s.id)
        return len(idle)

    def unload(self, session_id: str) -> None:
        """Forgets a purged session's in-memory state."""
        s = self._sessions.pop(session_id, None)
        if s is not None:
            s.log.close()


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


async def _all_done(turns: list[Turn], timeout: float) -> bool:
    if not turns:
        return True
    waits = [asyncio.ensure_future(t.done.wait()) for t in turns]
    _, pending = await asyncio.wait(waits, timeout=timeout)
    for w in pending:
        w.cancel()
    return not pending
