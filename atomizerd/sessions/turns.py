"""Running one turn: user message in, agent events out, outcome stored.

The turn lifecycle (docs/architecture.md, "Turn"):

    QUEUED ──▶ WAITING ──▶ RUNNING ──▶ ENDING ──▶ DONE
       │          │                      ▲          ▲
       │          └──────────────────────┤          │
       └─────────────────────────────────┴──────────┘ (rejected: nothing stored)

QUEUED: behind the session's earlier work. WAITING: leasing an agent from the pool (a spawn,
or a bounded wait for a slot); an interrupt, termination or shutdown ends it here at once.
RUNNING: the user message is committed (before the agent sees it) and announced; the agent's
output becomes session events until its `result` line. ENDING: pending permission requests
are settled, the outcome is stored. DONE: the terminal event is out; nothing of this turn is
emitted after it. A client going away changes none of this.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import json
import re
import uuid as uuidlib
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import structlog

from atomizerd import ids
from atomizerd.agents import protocol as proto
from atomizerd.agents.pool import Agent, AgentPool, DiedAtStart, ResumeFailed
from atomizerd.agents.process import (
    AgentError,
    AgentExited,
    AgentItem,
    AgentSpawnError,
    LineTooLong,
    WriteTimeout,
)
from atomizerd.agents.transport import AgentTransport
from atomizerd.atomizer.prompt import history_seed
from atomizerd.daemon import metrics
from atomizerd.daemon.config import Config
from atomizerd.errors import AtomizerError, StoreDown, Unavailable
from atomizerd.sessions import events as ev
from atomizerd.sessions.approvals import MODE, POLICY, Approvals, Decision, input_digest
from atomizerd.sessions.attachments import Attachment, content_blocks, to_store
from atomizerd.sessions.conversation import Open, Router, Step, subagent_events
from atomizerd.sessions.journal import Resumed, TurnJournal
from atomizerd.sessions.plans import PLAN, leave_plan
from atomizerd.statemachine import Lifecycle
from atomizerd.store.db import SessionRecord, Store, ToolCallRecord, TurnOutcome

if TYPE_CHECKING:
    from atomizerd.sessions.session import Session

log = structlog.get_logger("atomizerd.sessions.turns")

Emit = Callable[[ev.EventKind], ev.SessionEvent]
# The registry's numbering of an event of a session, for a turn or (None) for none.
EmitFor = Callable[["Session", "Turn | None", ev.EventKind], ev.SessionEvent]

# The uuids of the lines the daemon writes are derived from their turn's id, so a daemon that
# adopts a running turn after a restart knows which replay answers it.
_LINE_NAMESPACE = uuidlib.UUID("6f1d3c1e-6a0b-4d2b-9a57-3b0f0d9e2c11")
# Where a background Bash's tool result says its output goes.
_OUTPUT_FILE = re.compile(r"Output is being written to: (\S+\.output)")


# Events a turn emits before its message reaches the agent: its start and a few notices.
_OPENING_MAX = 16
# Loop turns a planned restart lets pass before it leaves the permission requests as they are.
_HAND_OVER_STEPS = 8


class TurnState(enum.Enum):
    QUEUED = "queued"
    WAITING = "waiting"
    RUNNING = "running"
    ENDING = "ending"
    DONE = "done"


T = TurnState
TURN_TRANSITIONS: dict[TurnState, frozenset[TurnState]] = {
    T.QUEUED: frozenset({T.WAITING, T.ENDING, T.DONE}),
    T.WAITING: frozenset({T.RUNNING, T.ENDING, T.DONE}),
    T.RUNNING: frozenset({T.ENDING}),
    T.ENDING: frozenset({T.DONE}),
    T.DONE: frozenset(),
}


class Turn:
    """One message's turn. Its events are in the session's log; the sender follows them from
    `start_cursor` (the session's last seq when the turn was accepted)."""

    def __init__(self, turn_id: str, text: str, request_id: str, start_cursor: int) -> None:
        self.turn_id = turn_id
        self.text = text
        self.request_id = request_id
        self.start_cursor = start_cursor
        self.lifecycle: Lifecycle[TurnState] = Lifecycle(
            f"turn {turn_id}", T.QUEUED, TURN_TRANSITIONS
        )
        self.done = asyncio.Event()
        # Set when the turn was refused before its message was stored (the pool is full, the
        # disk is full, the daemon is stopping): the sender gets it as its status.
        self.rejected: AtomizerError | None = None
        self.stop_requested = asyncio.Event()
        # Why the turn is being ended early, when it is not a user's interrupt (termination,
        # shutdown): its terminal event is then TurnFailed with this code.
        self.stop_reason: tuple[str, str] | None = None
        self.terminal: ev.SessionEvent | None = None
        # How many clients follow the turn (its sender, the session's watchers): a permission
        # request with nobody to answer it is denied at once.
        self.listeners = 0
        self.audience: Callable[[], int] = lambda: self.listeners
        self.approvals: Approvals | None = None
        # Files sent with the message (checked: sessions/attachments.py).
        self.attachments: tuple[Attachment, ...] = ()
        # The mode an allowed ExitPlanMode switched the session to during this turn.
        self.left_plan: str | None = None
        # Its events left with the agent's shim, when the agent outlives the daemon; before the
        # message reaches such an agent, the events so far wait in `opening`.
        self.journal: TurnJournal | None = None
        self.opening: list[ev.SessionEvent] = []
        # A turn a previous daemon left running, adopted with its agent at start-up.
        self.resumed: tuple[Agent, Resumed] | None = None
        # Who started it; a turn the agent started runs on the agent it started in, leased
        # the moment its output was seen (`leased`).
        self.origin = ev.TurnOrigin.CLIENT
        self.leased: Agent | None = None
        # True for a job that follows a turn the agent started (it writes no line).
        self.follows_agent = False

    @property
    def line_uuid(self) -> str:
        """The uuid of the user line this turn writes (replayed when the agent takes it)."""
        return str(uuidlib.uuid5(_LINE_NAMESPACE, self.turn_id))

    def noted(self, event: ev.SessionEvent) -> None:
        """Every event of the turn passes here before any client can see it."""
        if self.journal is not None:
            self.journal.note(event)
        elif self.state is T.RUNNING and len(self.opening) < _OPENING_MAX:
            self.opening.append(event)

    @property
    def state(self) -> TurnState:
        return self.lifecycle.state

    def interrupt(self) -> None:
        """A user's interrupt: the turn ends as interrupted, with what was said so far."""
        self.stop_requested.set()

    def stop(self, code: str, message: str) -> None:
        """Ends the turn early for the daemon's reasons (termination, shutdown)."""
        if self.stop_reason is None:
            self.stop_reason = (code, message)
        self.stop_requested.set()

    def reject(self, error: AtomizerError) -> None:
        """Refuses a turn whose message was never stored."""
        self.rejected = error
        self.lifecycle.move(T.DONE)
        self.done.set()
        self.stop_requested.set()  # whatever still works for it (a lease, a retry) gives up


@dataclass
class _Transcript:
    """What the turn said so far, to store however it ends."""

    # (API message id, content block index, text): a block the CLI withdraws is dropped.
    parts: list[tuple[str, int, str]] = field(default_factory=list)
    # Messages whose text came as deltas; their whole assistant lines repeat it.
    streamed: set[str] = field(default_factory=set)
    tool_calls: dict[str, ToolCallRecord] = field(default_factory=dict)
    agent_cost_usd: float | None = None  # the CLI's cumulative cost at the turn's end
    # How full the context is (the last model call, or a compaction) and its window; 0: unknown.
    context_tokens: int = 0
    context_window: int = 0
    context_input: int = 0  # the last model call's input tokens
    agent_uuid: str = ""  # the CLI's uuid of the reply's last assistant line
    unsaved: int = 0  # text bytes since the last checkpoint
    saved_parts: int = 0  # parts already in the stored checkpoint
    rewrite: bool = False  # text was withdrawn: the next checkpoint stores the whole reply

    def add(self, message_id: str, index: int, text: str) -> None:
        self.parts.append((message_id, index, text))
        self.unsaved += len(text)

    def withdraw(self, message_id: str, from_index: int) -> None:
        self.parts = [p for p in self.parts if p[0] != message_id or p[1] < from_index]
        self.rewrite = True
        self.unsaved += 1  # the stored checkpoint must follow

    def unsaved_text(self) -> tuple[str, bool]:
        """What the next checkpoint stores, and whether it replaces the earlier ones."""
        start = 0 if self.rewrite else self.saved_parts
        text = "".join(p[2] for p in self.parts[start:])
        replace, self.rewrite = self.rewrite, False
        self.saved_parts, self.unsaved = len(self.parts), 0
        return text, replace

    def full_text(self) -> str:
        return "".join(p[2] for p in self.parts)


class TurnRunner:
    def __init__(
        self,
        config: Config,
        store: Store,
        pool: AgentPool,
        context_text: Callable[[SessionRecord], str],
        emit_for: EmitFor,
    ) -> None:
        self.config = config
        self.store = store
        self.pool = pool
        self.context_text = context_text
        self.emit_for = emit_for
        self._pending: set[asyncio.Task[None]] = set()
        # Outcomes the store could not take (a full disk), written once it can again.
        self._unsettled: list[tuple[Session, str, TurnOutcome, float | None]] = []
        self._settler: asyncio.Task[None] | None = None

    # --- the whole turn ------------------------------------------------------------------

    async def run(self, s: Session, turn: Turn, emit: Emit) -> None:
        """Runs a dequeued turn to its end. Never raises for the turn's own failures."""
        turn.lifecycle.move(T.WAITING)
        if turn.resumed is not None:
            agent: Agent | None = turn.resumed[0]
            turn.lifecycle.move(T.RUNNING)  # its message is stored and with the agent already
        elif turn.follows_agent:
            agent = self._open_agent_turn(s, turn, emit)
        else:
            agent = await self._first_agent(s, turn, emit)
        if agent is None:
            return
        reusable = False
        try:
            reusable = await self._run_on(agent, s, turn, emit)
        finally:
            if turn.journal is not None:  # handed over mid-turn: the record goes out whole
                turn.journal.flush()
            self.pool.release(agent, reusable=reusable)

    async def _first_agent(self, s: Session, turn: Turn, emit: Emit) -> Agent | None:
        """Leases an agent and delivers the user message to it. Agents that die before they
        received it are started again (bounded, with backoff, announced); returns None when
        the turn ended meanwhile (stopped, rejected or failed)."""
        attempts = 0
        reseeded = False
        while True:
            try:
                agent = await self._lease_or_stop(s, turn)
            except _Stopped:
                self.end_early(s, turn, emit)
                return None
            except ResumeFailed:
                if reseeded:
                    self._fail_before_send(
                        s,
                        turn,
                        emit,
                        ev.RESUME_FAILED,
                        "the conversation could not be resumed or reseeded",
                    )
                    return None
                self._reseed(s)
                reseeded = True
                continue
            except AgentSpawnError as e:
                self._fail_before_send(s, turn, emit, ev.SPAWN_FAILED, str(e))
                return None
            except DiedAtStart as e:
                if not await self._retry_spawn(
                    s, turn, emit, attempts, e.returncode, e.stderr_tail
                ):
                    return None
                attempts += 1
                continue
            except AtomizerError as e:
                self._refuse(s, turn, emit, e)
                return None
            if turn.state is T.WAITING and not self._open(s, turn, emit, reseeded):
                self.pool.release(agent, reusable=True)
                return None
            try:
                transport = agent.transport_or_fail()
                if transport.durable:
                    turn.journal = TurnJournal.begin(transport, turn.opening)
                if turn.attachments:
                    blocks = content_blocks(self._agent_text(s, turn), turn.attachments)
                    await transport.send_user_content(blocks, turn.line_uuid)
                else:
                    await transport.send_user_message(self._agent_text(s, turn), turn.line_uuid)
                return agent
            except AgentExited as e:  # it took nothing: safe to start it again
                turn.journal = None  # the next agent gets the turn's opening events again
                self.pool.release(agent, reusable=False)
                if not await self._retry_spawn(
                    s, turn, emit, attempts, e.returncode, e.stderr_tail
                ):
                    return None
                attempts += 1
            except AgentError as e:  # e.g. WriteTimeout: part of it may have been taken
                self.pool.release(agent, reusable=False)
                code = ev.STALL_TIMEOUT if isinstance(e, WriteTimeout) else ev.AGENT_EXITED
                self.finish(
                    s,
                    turn,
                    emit,
                    _Transcript(),
                    ev.TurnFailed(code, f"the message could not be written to the agent: {e}"),
                )
                return None

    async def _lease_or_stop(self, s: Session, turn: Turn) -> Agent:
        """The pool's lease, unless the turn is stopped first (then the lease is given up).
        However this ends (also by cancelling the caller), the lease is never left behind:
        an agent it got is released and its error retrieved."""
        if turn.stop_requested.is_set():
            raise _Stopped
        lease = asyncio.ensure_future(self.pool.lease(s.record))
        stop = asyncio.ensure_future(turn.stop_requested.wait())
        try:
            await asyncio.wait({lease, stop}, return_when=asyncio.FIRST_COMPLETED)
        except BaseException:
            self._give_up(lease)
            raise
        finally:
            stop.cancel()
        if turn.stop_requested.is_set():
            self._give_up(lease)
            await asyncio.wait({lease})
            raise _Stopped
        return lease.result()  # raises the lease's own error

    def _give_up(self, lease: asyncio.Future[Agent]) -> None:
        lease.cancel()
        lease.add_done_callback(self._unclaimed)

    def _unclaimed(self, lease: asyncio.Future[Agent]) -> None:
        """A lease nobody takes: an agent it still got is released, its error retrieved."""
        if lease.cancelled() or lease.exception() is not None:
            return
        self.pool.release(lease.result(), reusable=True)

    async def _retry_spawn(
        self,
        s: Session,
        turn: Turn,
        emit: Emit,
        attempts: int,
        returncode: int | None,
        stderr_tail: str,
    ) -> bool:
        """After an agent died before it received the message: True to try again (after a
        backoff), False when the turn has ended (retries used up, or stopped meanwhile)."""
        if turn.state is T.WAITING and not self._open(s, turn, emit, False):
            return False
        cfg = self.config.agent
        if attempts >= cfg.spawn_retries:
            self.finish(
                s,
                turn,
                emit,
                _Transcript(),
                ev.TurnFailed(
                    ev.AGENT_EXITED,
                    f"the agent exited before it received the message, {attempts + 1} times "
                    f"(last exit status {returncode}; agent.spawn_retries = {cfg.spawn_retries})",
                    stderr_tail,
                ),
            )
            return False
        delay = cfg.spawn_retry_backoff * 2**attempts
        emit(
            ev.Notice(
                ev.AGENT_RESTARTED,
                f"the agent exited before it received the message (exit status {returncode}); "
                f"starting it again in {delay:g} s "
                f"(attempt {attempts + 2} of {cfg.spawn_retries + 1})",
                attempt=attempts + 2,
                max_retries=cfg.spawn_retries + 1,
                retry_delay_ms=int(delay * 1000),
            )
        )
        log.warning(
            "agent died before the message; restarting",
            session_id=s.id,
            returncode=returncode,
            stderr_tail=stderr_tail[-300:],
        )
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(turn.stop_requested.wait(), delay)
        if turn.stop_requested.is_set():
            self.end_early(s, turn, emit)
            return False
        return True

    async def _run_on(self, agent: Agent, s: Session, turn: Turn, emit: Emit) -> bool:
        """The message is with the agent: relay its output to the turn's end. Returns whether
        the agent may serve another turn."""
        transcript = _Transcript()
        turn.approvals = self._approvals(s, turn, emit)
        try:
            if not s.record.agent_started:
                # The CLI keeps a transcript from its first message on: every later process
                # of this conversation must --resume it (a second --session-id is refused).
                s.record = self._update(s, agent_started=True)
            terminal = await self._converse(agent, s, turn, emit, transcript)
        except Exception:
            log.exception("turn crashed", turn_id=turn.turn_id)
            terminal = ev.TurnFailed(ev.INTERNAL, "atomizerd failed while running the turn")
        reusable = isinstance(terminal, ev.TurnCompleted) and agent.alive
        if turn.left_plan == "power":
            reusable = False  # started sandboxed, as a plan: power's own agent next time
        if s.record.turn_budget_usd > 0:
            reusable = False  # the CLI takes its cap at start-up: a fresh one per turn
        self.finish(s, turn, emit, transcript, terminal)
        return reusable

    def _approvals(self, s: Session, turn: Turn, emit: Emit) -> Approvals:
        return Approvals(
            self.store,
            s.id,
            turn.turn_id,
            self.config.approvals.timeout,
            emit,
            turn.audience,
            leave_plan=lambda mode: leave_plan(self.store, s, turn, mode),
            in_plan=lambda: s.record.mode == PLAN,
        )

    # --- beginnings and ends -------------------------------------------------------------

    def _open(self, s: Session, turn: Turn, emit: Emit, reseeded: bool) -> bool:
        """WAITING → RUNNING: the user message is committed before the agent sees it, then
        announced. False (and the turn rejected) if the store refuses it."""
        try:
            # Outcomes a full disk refused go first: history stays in order, and the session's
            # cost base (agent_cost_usd) is current before the agent's next report.
            self._settle_pending(s)
            _, s.record = self.store.add_user_message(
                s.id,
                turn.turn_id,
                turn.text,
                turn.request_id or None,
                [to_store(a) for a in turn.attachments],
                origin=turn.origin.value,
            )
        except AtomizerError as e:
            turn.reject(e)
            return False
        turn.lifecycle.move(T.RUNNING)
        files = tuple(a.info() for a in turn.attachments)
        emit(ev.TurnStarted(turn.text, turn.request_id, files, turn.origin))
        if reseeded:
            emit(
                ev.Notice(
                    ev.CONTEXT_RESEEDED,
                    "the agent's earlier conversation could not be resumed; it continues from "
                    "the messages stored by atomizerd",
                )
            )
        return True

    def _refuse(self, s: Session, turn: Turn, emit: Emit, error: AtomizerError) -> None:
        """A lease refused for a reason the client should see as its status (pool full,
        shutting down, a precondition of the session's mode)."""
        if turn.state is T.WAITING:
            turn.reject(error)
        else:
            self.finish(s, turn, emit, _Transcript(), ev.TurnFailed(ev.SPAWN_FAILED, str(error)))

    def _fail_before_send(
        self, s: Session, turn: Turn, emit: Emit, code: str, message: str
    ) -> None:
        if turn.state is T.WAITING and not self._open(s, turn, emit, False):
            return
        self.finish(s, turn, emit, _Transcript(), ev.TurnFailed(code, message))

    def end_early(self, s: Session, turn: Turn, emit: Emit) -> None:
        """Ends a turn that is stopped before its agent got the message (queued, waiting, or
        between restarts): recorded like any other turn, with no reply."""
        if turn.state is T.DONE:
            return  # rejected meanwhile (a restart): never stored, nothing to say
        if turn.state in (T.QUEUED, T.WAITING):
            if turn.state is T.QUEUED:
                turn.lifecycle.move(T.WAITING)
            if not self._open(s, turn, emit, False):
                return
        if turn.stop_reason is not None:
            terminal: ev.TurnCompleted | ev.TurnFailed = ev.TurnFailed(*turn.stop_reason)
        else:
            terminal = ev.TurnCompleted(
                text="", interrupted=True, stop_reason="interrupted before the agent got it"
            )
        self.finish(s, turn, emit, _Transcript(), terminal)

    def finish(
        self,
        s: Session,
        turn: Turn,
        emit: Emit,
        transcript: _Transcript,
        terminal: ev.TurnCompleted | ev.TurnFailed,
    ) -> None:
        """RUNNING → ENDING → DONE. Pending permission requests are settled and the outcome
        committed before the terminal event, so a client that saw the end can read history;
        nothing of the turn is emitted after it."""
        turn.lifecycle.move(T.ENDING)
        if turn.approvals is not None:
            turn.approvals.close("the turn ended before an answer")
            self._audit_unasked_tools(turn.approvals, transcript, terminal)
        outcome = _outcome(transcript, terminal)
        outcome.origin = turn.origin.value
        try:
            _, s.record = self.store.finish_turn(
                s.id, turn.turn_id, outcome, agent_cost_usd=transcript.agent_cost_usd
            )
        except AtomizerError as e:
            log.error(
                "turn outcome not stored; retrying in the background",
                turn_id=turn.turn_id,
                error=str(e),
            )
            self._settle_later(s, turn.turn_id, outcome, transcript.agent_cost_usd)
        turn.terminal = emit(terminal)
        if turn.journal is not None:
            turn.journal.end()
            turn.journal = None
        turn.lifecycle.move(T.DONE)
        turn.done.set()
        metrics.of(self.store).turn_ended(turn, terminal)
        log.info(
            "turn ended",
            turn_id=turn.turn_id,
            outcome=type(terminal).__name__,
            interrupted=getattr(terminal, "interrupted", False),
        )

    def finish_failed(self, s: Session, turn: Turn, emit: Emit, failed: ev.TurnFailed) -> None:
        """Ends a RUNNING turn whose run broke (a bug) with nothing more said."""
        self.finish(s, turn, emit, _Transcript(), failed)

    def _settle_later(
        self, s: Session, turn_id: str, outcome: TurnOutcome, agent_cost: float | None
    ) -> None:
        self._unsettled.append((s, turn_id, outcome, agent_cost))
        if self._settler is None or self._settler.done():
            self._settler = asyncio.ensure_future(self._settle_loop())

    async def _settle_loop(self) -> None:
        """Stores the outcomes the store refused (a full disk, the database unreachable),
        oldest first, once writes work again."""
        while self._unsettled:
            await asyncio.sleep(self.config.agent.checkpoint_interval * 4)
            with contextlib.suppress(StoreDown):
                self._settle_entries(list(self._unsettled))

    def _settle_pending(self, s: Session) -> None:
        """Stores the session's refused outcomes now (raises StoreDown if it still can't)."""
        self._settle_entries([e for e in self._unsettled if e[0] is s])

    def _settle_entries(
        self, entries: list[tuple[Session, str, TurnOutcome, float | None]]
    ) -> None:
        for entry in entries:
            s, turn_id, outcome, agent_cost = entry
            try:
                _, s.record = self.store.finish_turn(
                    s.id, turn_id, outcome, agent_cost_usd=agent_cost
                )
            except StoreDown:
                raise
            except Exception:  # e.g. the session was purged meanwhile: nothing to store
                log.exception("turn outcome dropped", turn_id=turn_id)
            else:
                log.info("turn outcome stored after the store recovered", turn_id=turn_id)
            self._unsettled.remove(entry)

    def forget_session(self, s: Session) -> None:
        """The session is being purged: outcomes waiting for the disk are no longer wanted."""
        self._unsettled = [e for e in self._unsettled if e[0] is not s]

    def _update(self, s: Session, **fields: Any) -> SessionRecord:
        record = self.store.update_session(s.id, **fields)
        if record is None:
            raise AtomizerError(f"session {s.id!r} vanished from the store")
        return record

    def _reseed(self, s: Session) -> None:
        """The agent's transcript is gone: a new conversation, seeded from our own store."""
        limit = self.config.agent.history_seed_messages
        recent = self.store.recent_messages(s.id, limit)
        s.record = self._update(
            s, agent_session_id=ids.new_agent_session_id(), agent_started=False, agent_cost_usd=0.0
        )
        self.pool.seed_next_spawn(s.id, history_seed(recent))
        log.warning(
            "agent conversation lost; reseeded from stored history",
            session_id=s.id,
            messages=len(recent),
        )

    def _agent_text(self, s: Session, turn: Turn) -> str:
        """The text written to the agent. The CLI keeps a resumed conversation's first system
        prompt, so a study or mode that changed since then reaches the model with the next
        user message."""
        record = s.record
        if not (record.context_stale and record.agent_started):
            return turn.text
        try:
            context = self.context_text(record)
            s.record = self._update(s, context_stale=False)
        except AtomizerError as e:  # e.g. the study folder is gone: the next message retries
            log.warning("changed context not sent", session_id=s.id, error=str(e))
            return turn.text
        return f"<atomizer-context>\n{context}\n</atomizer-context>\n\n{turn.text}"

    def _audit_unasked_tools(
        self,
        approvals: Approvals,
        transcript: _Transcript,
        terminal: ev.TurnCompleted | ev.TurnFailed,
    ) -> None:
        """Tool uses nobody was asked about: allowed by the mode's rules, or denied by the CLI's
        own policy (listed in the turn's permission denials)."""
        denied = set()
        if isinstance(terminal, ev.TurnCompleted):
            denied = {d.tool_use_id for d in terminal.permission_denials}
        for call in transcript.tool_calls.values():
            if call.id in approvals.asked_tool_uses:
                continue
            digest = input_digest(_json_or_text(call.input_json))
            if call.id in denied:
                approvals.audit(call.name, digest, False, POLICY, "denied by the mode's rules")
            else:
                approvals.audit(call.name, digest, True, MODE, "allowed by the mode's rules")

    # --- the conversation ----------------------------------------------------------------

    async def _converse(
        self,
        agent: Agent,
        s: Session,
        turn: Turn,
        emit: Emit,
        transcript: _Transcript,
    ) -> ev.TurnCompleted | ev.TurnFailed:
        cfg = self.config.agent
        process = agent.transport_or_fail()
        loop = asyncio.get_running_loop()
        started = last_activity = last_checkpoint = loop.time()
        metrics.of(self.store).turn_running(turn, started)
        deadline = started + cfg.turn_timeout
        first = True
        interrupting_since: float | None = None
        # A turn adopted after a restart: its output so far is read again quietly (its events
        # are in the log already), the permission requests it held are taken up after that.
        replay = _Replay(turn.resumed[1]) if turn.resumed is not None else None
        if replay is not None:
            first = False
            transcript.rewrite = True  # the stored checkpoint is rewritten whole
            if replay.resumed.interrupted:
                turn.interrupt()
            self._end_replay(process, turn, replay)
        reading = _Reading(
            s,
            turn,
            agent,
            emit,
            transcript,
            Router(
                "" if turn.follows_agent else turn.line_uuid,
                s.untaken,
                # A turn adopted after a restart was matched to its line already.
                Open.OWN if turn.follows_agent or replay else Open.NONE,
            ),
        )
        stop_waiter = asyncio.ensure_future(turn.stop_requested.wait())
        # One pending receive at a time, kept across timeouts: nothing read is ever dropped.
        receive: asyncio.Task[AgentItem] | None = None
        try:
            while True:
                # What has arrived already is relayed without waiting (no task, no timer per
                # line); only an empty mailbox means waiting, with the watchdogs armed.
                item = process.receive_nowait() if receive is None else None
                now = loop.time()
                if transcript.unsaved and (
                    now - last_checkpoint >= cfg.checkpoint_interval
                    or transcript.unsaved >= cfg.checkpoint_bytes
                ):
                    self._checkpoint(s, turn, transcript)
                    last_checkpoint = now
                if turn.stop_requested.is_set() and interrupting_since is None:
                    interrupting_since = now
                    self._send_interrupt(process)
                if item is None:
                    if interrupting_since is not None:
                        budget = interrupting_since + cfg.stop_grace - now
                        if budget <= 0:
                            return await self._kill(agent, turn, transcript)
                    else:
                        if turn.approvals is not None and turn.approvals.waiting:
                            last_activity = now  # waiting for a person is busy, not stalled
                        quiet_limit = cfg.first_event_timeout if first else cfg.stall_timeout
                        budget = min(last_activity + quiet_limit, deadline) - now
                        if budget <= 0:
                            return await self._watchdog(agent, turn, first, now >= deadline)
                    if transcript.unsaved:
                        budget = min(
                            budget, max(last_checkpoint + cfg.checkpoint_interval - now, 0.0)
                        )
                    if receive is None:
                        receive = asyncio.ensure_future(process.receive())
                    waiting: set[asyncio.Future[Any]] = {receive}
                    if not stop_waiter.done():
                        waiting.add(stop_waiter)
                    done, _ = await asyncio.wait(
                        waiting, timeout=budget, return_when=asyncio.FIRST_COMPLETED
                    )
                    if receive not in done:
                        continue
                    item = receive.result()
                    receive = None
                elif now >= deadline and interrupting_since is None:
                    return await self._watchdog(agent, turn, first, True)
                if first:
                    metrics.of(self.store).first_event(turn, loop.time())
                first = False
                last_activity = loop.time()
                quiet = replay is not None and not replay.done
                if quiet and replay is not None:
                    outcome = self._relay(
                        agent,
                        item,
                        _quiet,
                        transcript,
                        interrupting_since is not None,
                        turn.approvals,
                        s.record.agent_cost_usd,
                        replay.held,
                        turn.journal,
                    )
                else:
                    outcome = self._take(reading, item, interrupting_since is not None)
                if turn.journal is not None:
                    turn.journal.handled_upto(process.received)
                    turn.journal.flush()
                if replay is not None and not replay.done:
                    self._end_replay(process, turn, replay)
                if outcome is not None:
                    return outcome
        finally:
            stop_waiter.cancel()
            if receive is not None:
                receive.cancel()
            if reading.side is not None:  # the job's turn ended inside an agent turn
                self._end_side(reading, _cut_short(reading.side.transcript))

    # --- following the agent: which turn an item belongs to (sessions/conversation.py) ------

    def _take(
        self, r: _Reading, item: AgentItem, interrupted: bool
    ) -> ev.TurnCompleted | ev.TurnFailed | None:
        """One item of the agent's output, routed to the turn it belongs to. Returns the job
        turn's end when this item is it."""
        step = r.router.step(item)
        if step is Step.OWN_TAKEN:
            if r.side is not None:  # the CLI took our line into the turn it had started
                self._end_side(r, _cut_short(r.side.transcript, taken_over=True))
            return None
        if step in (Step.LINE_TAKEN, Step.LATE_LINE):
            assert isinstance(item, proto.UserReplay)
            self._line_taken(r, item.uuid, late=step is Step.LATE_LINE)
            return None
        if step is Step.TASK:
            self.task_item(r.s, item, self._current_emit(r))
            return None
        if step is Step.SUBAGENT:
            for kind in subagent_events(item):
                self._current_emit(r)(kind)
            return None
        if step is Step.QUIET:
            if isinstance(item, proto.Init):
                r.agent.mcp_servers = list(item.mcp_servers)
            return None
        if step is Step.OPEN_AGENT:
            self._open_side(r, r.s.next_origin, "")
        if isinstance(item, proto.ToolResult):
            self._note_output_file(r.s, item)
        elif isinstance(item, proto.AssistantMessage):
            _note_scheduling(r.s, item)
        own = r.router.open is Open.OWN
        side = r.side
        target_emit, transcript = (r.emit, r.transcript) if own or side is None else side.pair
        outcome = self._relay(
            r.agent,
            item,
            target_emit,
            transcript,
            interrupted and own,
            r.turn.approvals if own or side is None else side.turn.approvals,
            r.s.record.agent_cost_usd,
            None,
            r.turn.journal if own else None,
        )
        if outcome is None:
            return None
        if r.router.ended() is Open.AGENT:
            self._end_side(r, outcome)
            if not isinstance(item, proto.Result):  # the agent is gone: the job's turn too
                return outcome
            return None
        return outcome

    def _current_emit(self, r: _Reading) -> Emit:
        """Events that belong to whichever turn is open (the session's, if none is)."""
        if r.router.open is Open.OWN:
            return r.emit
        if r.side is not None:
            return r.side.emit
        return lambda kind: self.emit_for(r.s, None, kind)

    def _open_side(self, r: _Reading, origin: ev.TurnOrigin, text: str) -> None:
        """The agent started a turn while this job's own line waits: it becomes a turn of
        the session like any other, beside the job's turn."""
        r.s.next_origin = ev.TurnOrigin.AGENT
        turn = Turn(ids.new_turn_id(), text, "", r.s.next_seq - 1)
        turn.origin = origin
        turn.audience = lambda: r.s.watchers
        turn.lifecycle.move(T.WAITING)
        emit: Emit = lambda kind: self.emit_for(r.s, turn, kind)  # noqa: E731
        if not self._open(r.s, turn, emit, False):
            log.error("an agent turn could not be stored", session_id=r.s.id)
        turn.approvals = self._approvals(r.s, turn, emit)
        r.side = _Side(turn, emit, _Transcript())
        log.info(
            "the agent started a turn", session_id=r.s.id, turn_id=turn.turn_id, origin=origin.value
        )

    def _end_side(self, r: _Reading, terminal: ev.TurnCompleted | ev.TurnFailed) -> None:
        side, r.side = r.side, None
        if side is not None and side.turn.state is T.RUNNING:
            self.finish(r.s, side.turn, side.emit, side.transcript, terminal)

    def _line_taken(self, r: _Reading, line_uuid: str, *, late: bool) -> None:
        """A client's line written into a running turn (a steer) was taken by the agent: a
        user message of the turn open now, stored at this point; or, taken only after that
        turn ended, a turn of its own as if just sent."""
        taken = r.s.untaken.take(line_uuid)
        if taken is None:
            return
        text, request_id = taken
        if late:
            self._open_side(r, ev.TurnOrigin.CLIENT, text)
            return
        turn = r.turn if r.router.open is Open.OWN or r.side is None else r.side.turn
        try:
            _, r.s.record = self.store.add_user_message(
                r.s.id, turn.turn_id, text, request_id or None, detail="steer"
            )
        except AtomizerError as e:
            log.error("a steered message was not stored", session_id=r.s.id, error=str(e))
        self._current_emit(r)(ev.UserMessage(text, request_id))

    def _note_output_file(self, s: Session, item: proto.ToolResult) -> None:
        """A background command's tool result names the file its output goes to."""
        match = _OUTPUT_FILE.search(item.content)
        if match is None:
            return
        for task in s.tasks.running():
            if task.tool_use_id == item.tool_use_id:
                s.tasks.output_file_named(task.task_id, match.group(1))

    def task_item(self, s: Session, item: AgentItem, emit: Emit) -> None:
        """The CLI's task bookkeeping, kept in the session's task table and shown."""
        match item:
            case proto.TaskStarted():
                deadline = asyncio.get_running_loop().time() + self.config.agent.task_timeout
                emit(s.tasks.started(item, deadline))
            case proto.TaskProgress():
                text = item.summary or " ".join(
                    p for p in (item.description, item.last_tool_name) if p
                )
                if s.tasks.get(item.task_id) is not None and text:
                    emit(ev.TaskOutput(item.task_id, text))
            case proto.TaskNotification():
                ended = s.tasks.ended(item)
                if ended is not None:
                    emit(ended)
                # The CLI starts a turn of its own to tell the model: that turn's origin.
                s.next_origin = ev.TurnOrigin.TASK
            case proto.CommandLifecycle(state="started") if item.wakeup_source:
                # A scheduled prompt fires: the turn that follows is the agent's own.
                s.tasks.schedule(-1)
                s.next_origin = ev.TurnOrigin.SCHEDULED

    def _open_agent_turn(self, s: Session, turn: Turn, emit: Emit) -> Agent | None:
        """A job for a turn the agent started while idle: it runs on the agent it started in
        (leased when its output was seen), stored and announced before its first event."""
        agent, turn.leased = turn.leased, None
        if agent is None:
            turn.lifecycle.move(T.DONE)
            turn.done.set()
            return None
        head = agent.transport_or_fail().peek()
        if isinstance(head, proto.UserReplay) and head.uuid in s.untaken:
            agent.transport_or_fail().receive_nowait()  # a steer taken late: its own turn
            taken = s.untaken.take(head.uuid)
            turn.text, turn.request_id = taken if taken is not None else ("", "")
            turn.origin = ev.TurnOrigin.CLIENT
        if not self._open(s, turn, emit, False):
            self.pool.release(agent, reusable=True)
            return None
        s.next_origin = ev.TurnOrigin.AGENT
        if s.record.budget_usd and s.record.total_cost_usd >= s.record.budget_usd:
            emit(
                ev.Notice(
                    ev.BUDGET_EXHAUSTED,
                    f"the session's budget of {s.record.budget_usd:g} USD is spent: the turn "
                    "the agent started is interrupted",
                )
            )
            turn.interrupt()
        return agent

    async def steer(self, s: Session, turn: Turn, text: str, request_id: str) -> bool:
        """Writes `text` into the running turn now; False if no turn is running on an agent
        (the caller sends it as an ordinary message). It is stored when the agent takes it."""
        agent = self.pool.agent(s.id)
        if turn.state is not T.RUNNING or agent is None or agent.transport is None:
            return False
        line_uuid = str(uuidlib.uuid4())
        s.untaken.add(line_uuid, text, request_id)
        try:
            await agent.transport.send_user_message(text, line_uuid)
        except AgentError as e:
            s.untaken.take(line_uuid)
            raise Unavailable(f"the message could not be written to the agent: {e}") from None
        return True

    def _end_replay(self, process: AgentTransport, turn: Turn, replay: _Replay) -> None:
        """Once the messages the previous daemon accounted for are read again, the permission
        requests they held are taken up: answered already (nothing to do), asked (waited for
        again, until their own deadline), or never asked (decided now)."""
        if process.received < replay.resumed.consumed:
            return
        replay.done = True
        approvals = turn.approvals
        if approvals is None:
            return
        asked, settled = replay.resumed.asked(), replay.resumed.settled()
        for request in replay.held:
            rid = request.request_id
            if rid in replay.resumed.answered:
                continue
            if request.subtype != "can_use_tool":  # refused, as the first time (turns._relay)
                self._background(self._refuse_control(process, request))
                continue
            approvals.asked_tool_uses.add(str(request.payload.get("tool_use_id", "")))
            if rid in settled:  # decided, but the daemon went before the answer was written
                log.warning("a decided permission request is asked again", request_id=rid)
            restored = asked.get(rid)
            self._background(
                self._answer_permission(
                    process,
                    approvals,
                    request,
                    turn.journal,
                    restored.deadline if restored is not None else None,
                )
            )

    def _checkpoint(self, s: Session, turn: Turn, transcript: _Transcript) -> None:
        """Stores what the reply said since the last checkpoint (at most every
        checkpoint_interval or checkpoint_bytes); a full disk only costs the checkpoint."""
        text, replace = transcript.unsaved_text()
        try:
            self.store.checkpoint_reply(s.id, turn.turn_id, text, replace=replace)
        except AtomizerError as e:
            log.warning("reply checkpoint not stored", turn_id=turn.turn_id, error=str(e))

    async def hand_over(self) -> None:
        """A planned restart: answers clients gave a moment ago are written to the agents
        (an answer resumes its waiting request within a few turns of the loop, and is written
        in the same step as its decision is recorded); requests still waiting for one are
        left as they are (the next daemon offers them again); nothing more is written."""
        for _ in range(_HAND_OVER_STEPS):
            await asyncio.sleep(0)
        for task in list(self._pending):
            task.cancel()

    def _background(self, coro: Coroutine[Any, Any, None]) -> None:
        task = asyncio.ensure_future(coro)
        self._pending.add(task)
        task.add_done_callback(self._pending.discard)

    async def _answer_permission(
        self,
        process: AgentTransport,
        approvals: Approvals,
        request: proto.ControlRequest,
        journal: TurnJournal | None,
        restored: float | None = None,
    ) -> None:
        try:
            decision = await approvals.decide(request, restored)
        except Exception:  # the agent must get an answer whatever happened here
            log.exception("permission request could not be decided; denied")
            decision = Decision(False, POLICY, "atomizerd could not decide this request")
        raw_input = request.payload.get("input")
        if decision.updated_input is not None:
            raw_input = decision.updated_input
        answer = (
            proto.permission_allow(
                raw_input if isinstance(raw_input, dict) else {}, decision.permission_updates()
            )
            if decision.allow
            else proto.permission_deny(decision.message or "denied")
        )
        if journal is not None:
            journal.flush()  # the decision's event is recorded before the agent has the answer
        try:
            await process.respond_control(request.request_id, answer)
        except AgentError as e:
            log.info("could not answer the agent's permission request", error=str(e))

    async def _refuse_control(self, process: AgentTransport, request: proto.ControlRequest) -> None:
        """A control request we do not serve gets an error answer instead of silence."""
        with contextlib.suppress(AgentError):
            await process.respond_control_error(
                request.request_id, f"atomizerd does not handle {request.subtype!r}"
            )

    def _send_interrupt(self, process: AgentTransport) -> None:
        """Asks the agent to end the turn; its `result` line (or its exit) ends it. The
        acknowledgement is awaited aside: the turn must keep receiving meanwhile."""

        async def ask() -> None:
            try:
                await process.interrupt(timeout=self.config.agent.stop_grace)
            except AgentError as e:
                log.info("interrupt not acknowledged", error=str(e))

        self._background(ask())

    def _relay(
        self,
        agent: Agent,
        item: object,
        emit: Emit,
        transcript: _Transcript,
        interrupted: bool,
        approvals: Approvals | None,
        cost_base: float,
        held: list[proto.ControlRequest] | None = None,
        journal: TurnJournal | None = None,
    ) -> ev.TurnCompleted | ev.TurnFailed | None:
        """Maps one agent message to session events; the turn's end when it is one.
        `held`: the message is read again after a restart: permission requests are kept
        there (taken up by `_end_replay`) instead of being decided."""
        process = agent.transport_or_fail()
        match item:
            case proto.TextDelta(text=text) if item.parent_tool_use_id is None:
                transcript.add(item.message_id, item.index, text)
                transcript.streamed.add(item.message_id)
                emit(ev.TextDelta(text))
            case proto.ThinkingDelta(text=text):
                emit(ev.ThinkingDelta(text))
            case proto.AbandonedBlocks():
                # The CLI dropped what it had streamed of these blocks (a broken stream it
                # retries without streaming): the stored reply drops them too.
                transcript.withdraw(item.message_id, item.from_block_index)
            case proto.AssistantMessage():
                # A message whose deltas never came (e.g. retried without streaming after a
                # broken stream) is only in the whole assistant line: take its text from there.
                fresh = item.message_id not in transcript.streamed
                if item.text and fresh and item.parent_tool_use_id is None:
                    transcript.add(item.message_id, 0, item.text)
                    emit(ev.TextDelta(item.text))
                for tu in item.tool_uses:
                    transcript.tool_calls[tu.id] = ToolCallRecord(tu.id, tu.name, tu.input_json)
                    emit(ev.ToolUse(tu.id, tu.name, tu.input_json))
                if item.uuid and item.parent_tool_use_id is None and not item.aborted:
                    transcript.agent_uuid = item.uuid
                if item.input_tokens and item.parent_tool_use_id is None:
                    transcript.context_input = item.input_tokens
                    transcript.context_tokens = item.input_tokens
            case proto.MessageDelta() if item.parent_tool_use_id is None:
                if transcript.context_input:  # the call's output is in the context too
                    transcript.context_tokens = transcript.context_input + item.output_tokens
            case proto.CompactBoundary():
                transcript.context_tokens = item.post_tokens
                emit(
                    ev.Notice(
                        ev.CONTEXT_COMPACTED,
                        f"the conversation was compacted ({item.trigger or 'auto'}): "
                        f"{item.pre_tokens} tokens before, {item.post_tokens} after",
                        tokens_before=item.pre_tokens,
                        tokens_after=item.post_tokens,
                    )
                )
            case proto.ToolResult():
                call = transcript.tool_calls.get(item.tool_use_id)
                if call is not None:
                    call.result, call.is_error = item.content, item.is_error
                emit(ev.ToolResult(item.tool_use_id, item.content, item.is_error))
            case proto.ApiRetry():
                emit(
                    ev.Notice(
                        ev.API_RETRY,
                        f"the model API failed ({item.error_status or item.error}); retry "
                        f"{item.attempt} of {item.max_retries} in {item.retry_delay_ms} ms",
                        attempt=item.attempt,
                        max_retries=item.max_retries,
                        retry_delay_ms=item.retry_delay_ms,
                        error_status=item.error_status or 0,
                    )
                )
            case proto.Init():
                agent.mcp_servers = list(item.mcp_servers)
            case proto.ControlRequest() if held is not None:
                held.append(item)
            case proto.ControlRequest(subtype="can_use_tool") if approvals is not None:
                self._background(self._answer_permission(process, approvals, item, journal))
            case proto.ControlRequest() if held is None:
                self._background(self._refuse_control(process, item))
            case proto.ControlCancelRequest() if held is not None:
                held[:] = [r for r in held if r.request_id != item.request_id]
            case proto.ControlCancelRequest() if approvals is not None:
                approvals.cancel(item.request_id, "the agent withdrew the request")
            case proto.Result():
                return _completed(item, transcript, interrupted, cost_base)
            case LineTooLong():
                return ev.TurnFailed(
                    ev.LINE_TOO_LONG,
                    f"the agent wrote a line of more than {self.config.agent.max_line_bytes} "
                    "bytes (agent.max_line_bytes)",
                    process.stderr_tail(),
                )
            case AgentExited():
                return ev.TurnFailed(
                    ev.AGENT_EXITED,
                    f"the agent exited mid-turn (exit status {item.returncode})",
                    item.stderr_tail,
                )
        return None

    async def _watchdog(
        self, agent: Agent, turn: Turn, first: bool, overall: bool
    ) -> ev.TurnFailed:
        cfg = self.config.agent
        if overall:
            code, why = (
                ev.TURN_TIMEOUT,
                f"the turn ran longer than {cfg.turn_timeout:g} s (agent.turn_timeout)",
            )
        elif first:
            code, why = (
                ev.FIRST_EVENT_TIMEOUT,
                (
                    f"the agent sent nothing for {cfg.first_event_timeout:g} s "
                    "(agent.first_event_timeout)"
                ),
            )
        else:
            code, why = (
                ev.STALL_TIMEOUT,
                (f"the agent went silent for {cfg.stall_timeout:g} s (agent.stall_timeout)"),
            )
        log.warning("turn watchdog fired", turn_id=turn.turn_id, code=code)
        process = agent.transport_or_fail()
        self._send_interrupt(process)
        await process.stop(cfg.stop_grace)
        return ev.TurnFailed(
            code,
            why + "; the agent was stopped and resumes on the next message",
            process.stderr_tail(),
        )

    async def _kill(
        self, agent: Agent, turn: Turn, transcript: _Transcript
    ) -> ev.TurnCompleted | ev.TurnFailed:
        """The agent did not end the turn after an interrupt: stop it, keep what was said."""
        process = agent.transport_or_fail()
        await process.stop(self.config.agent.stop_grace)
        if turn.stop_reason is not None:
            code, message = turn.stop_reason
            return ev.TurnFailed(code, message, process.stderr_tail())
        return ev.TurnCompleted(
            text=transcript.full_text(), interrupted=True, stop_reason="interrupted"
        )


class _Stopped(Exception):
    """The turn was stopped while it waited for an agent."""


@dataclass
class _Side:
    """A turn the agent started while a job waited for its own line's turn."""

    turn: Turn
    emit: Emit
    transcript: _Transcript

    @property
    def pair(self) -> tuple[Emit, _Transcript]:
        return self.emit, self.transcript


@dataclass
class _Reading:
    """One job's reading of its agent: its own turn, and an agent turn met on the way."""

    s: Session
    turn: Turn
    agent: Agent
    emit: Emit
    transcript: _Transcript
    router: Router
    side: _Side | None = None


def _cut_short(transcript: _Transcript, *, taken_over: bool = False) -> ev.TurnCompleted:
    """The end of an agent turn that had no result of its own: the CLI took a client's line
    into it (from there on the reply answers that line), or the job ended under it."""
    why = "the agent took the next message into this turn" if taken_over else "ended early"
    return ev.TurnCompleted(
        text=transcript.full_text(), stop_reason=why, interrupted=not taken_over
    )


# The CLI's tools that run a prompt later in the same process (docs/agent-protocol.md).
_SCHEDULING = {"ScheduleWakeup": 1, "CronCreate": 1, "CronDelete": -1}


def _note_scheduling(s: Session, item: proto.AssistantMessage) -> None:
    for tu in item.tool_uses:
        change = _SCHEDULING.get(tu.name, 0)
        args = _json_or_text(tu.input_json)
        if tu.name == "ScheduleWakeup" and isinstance(args, dict) and args.get("stop") is True:
            change = -1  # ends the loop: cancels the pending wake-up
        if change:
            s.tasks.schedule(change)


@dataclass
class _Replay:
    """Reading an adopted turn's output again (see `TurnRunner._end_replay`)."""

    resumed: Resumed
    done: bool = False
    held: list[proto.ControlRequest] = field(default_factory=list)


def _quiet(kind: ev.EventKind) -> ev.SessionEvent:
    """The emit of a message read again: its events are in the session's log already."""
    return ev.SessionEvent(0, "", "", 0.0, kind)


def _completed(
    result: proto.Result, transcript: _Transcript, interrupted: bool, cost_base: float
) -> ev.TurnCompleted:
    transcript.agent_cost_usd = result.total_cost_usd
    transcript.context_window = proto.context_window(result) or transcript.context_window
    # The CLI reports the conversation's cost so far (carried over --resume). A figure below
    # the last one means the count started again (a CLI that does not carry it over): then
    # the whole figure is this turn's.
    total = result.total_cost_usd
    turn_cost = total - cost_base if total >= cost_base else total
    text = transcript.full_text()
    if not text and result.is_error and result.result_text:
        text = result.result_text  # an API error: the CLI's explanation is the reply
    usage = {k: int(v) for k, v in result.usage.items() if isinstance(v, int | float)}
    return ev.TurnCompleted(
        text=text,
        stop_reason=result.stop_reason or ("interrupted" if interrupted else ""),
        is_error=result.is_error and not interrupted,
        cost_usd=turn_cost,
        usage=usage,
        duration_ms=result.duration_ms,
        num_turns=result.num_turns,
        interrupted=interrupted,
        permission_denials=tuple(
            ev.PermissionDenial(d.tool_name, d.tool_use_id, d.input_json)
            for d in result.permission_denials
        ),
        result_subtype=result.subtype,
    )


def _outcome(transcript: _Transcript, terminal: ev.TurnCompleted | ev.TurnFailed) -> TurnOutcome:
    calls = list(transcript.tool_calls.values())
    if isinstance(terminal, ev.TurnFailed):
        return TurnOutcome(
            status="failed",
            text=transcript.full_text(),
            tool_calls=calls,
            detail=f"{terminal.code}: {terminal.message}",
            context_tokens=transcript.context_tokens or None,
            context_window=transcript.context_window or None,
        )
    return TurnOutcome(
        status="interrupted" if terminal.interrupted else "complete",
        text=terminal.text,
        tool_calls=calls,
        cost_usd=terminal.cost_usd,
        usage=terminal.usage,
        detail=terminal.stop_reason,
        context_tokens=transcript.context_tokens or None,
        context_window=transcript.context_window or None,
        agent_uuid=transcript.agent_uuid if not terminal.interrupted else "",
    )


def _json_or_text(text: str) -> Any:
    try:
        return json.loads(text)
    except ValueError:
        return text
