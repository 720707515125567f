"""Running a turn: user message in, agent events out, outcome stored (`TurnRunner`).

The turn and its lifecycle are in sessions/turn.py; what each agent message means for the
transcript in sessions/relay.py; which turn a message belongs to in sessions/following.py; late
outcomes (a full disk) in sessions/outcomes.py. The runner leases the agent, opens the turn
(the user message committed before the agent sees it), reads the agent under the watchdogs until
the turn's end, and stores the outcome before the terminal event.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import structlog

from atomizerd import ids
from atomizerd.agents.pool import Agent, AgentPool, DiedAtStart, ResumeFailed
from atomizerd.agents.vocabulary import (
    AgentError,
    AgentExited,
    AgentItem,
    AgentSpawnError,
    WriteTimeout,
)
from atomizerd.config import Config
from atomizerd.errors import AtomizerError
from atomizerd.model import Mode, SessionRecord
from atomizerd.sessions import events as ev
from atomizerd.sessions import filemarks, spend
from atomizerd.sessions.approvals import Approvals
from atomizerd.sessions.attachments import content_blocks, to_store
from atomizerd.sessions.context import AgentContext
from atomizerd.sessions.control import AgentControl, Replay
from atomizerd.sessions.following import Follower
from atomizerd.sessions.journal import TurnJournal
from atomizerd.sessions.notices import NULL as NULL_NOTICES
from atomizerd.sessions.notices import Notices
from atomizerd.sessions.outcomes import LateOutcomes
from atomizerd.sessions.planning import PlanKeeper, may_have_planned
from atomizerd.sessions.plans import leave_plan
from atomizerd.sessions.questions import NoticeWait
from atomizerd.sessions.relay import outcome as outcome_of
from atomizerd.sessions.relay import reported_outcome, require_structured
from atomizerd.sessions.turn import Emit, EmitFor, T, Transcript, Turn, TurnState
from atomizerd.store.db import Store
from atomizerd.telemetry import NULL, Telemetry

if TYPE_CHECKING:
    from atomizerd.sessions.session import Session

# The `origin.kind` of the result of a turn the CLI started to report a task's end.
TASK_NOTIFICATION = "task-notification"

__all__ = ["Emit", "EmitFor", "Transcript", "Turn", "TurnRunner", "TurnState"]

log = structlog.get_logger("atomizerd.sessions.turns")


class TurnRunner:
    def __init__(
        self,
        config: Config,
        store: Store,
        pool: AgentPool,
        context: AgentContext,
        emit_for: EmitFor,
        telemetry: Telemetry = NULL,
    ) -> None:
        self.config = config
        self.store = store
        self.telemetry = telemetry
        self.pool = pool
        self.emit_for = emit_for
        self.control = AgentControl(config)
        self.context = context
        # Outcomes the store could not take (a full disk), written once it can again.
        self.outcomes = LateOutcomes(store, config.agent.checkpoint_interval * 4)
        self.follower = Follower(config, store, pool, emit_for, self, self.control)
        # Who is told of a permission request when nobody is attached (the registry's relay).
        self.notices: Notices = NULL_NOTICES
        # Told of every client turn that completed (the registry titles sessions with it).
        self.after_turn: Callable[[Session, str], None] = lambda s, text: None

    # --- the whole turn ------------------------------------------------------------------

    async def run(self, s: Session, turn: Turn, emit: Emit) -> None:
        """Runs a dequeued turn to its end. Never raises for the turn's own failures."""
        turn.lifecycle.move(T.WAITING)
        if turn.resumed is not None:
            agent: Agent | None = turn.resumed[0]
            turn.lifecycle.move(T.RUNNING)  # its message is stored and with the agent already
        elif turn.follows_agent:
            agent = self.follower.open_agent_turn(s, turn, emit)
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
                self.context.reseed(s)
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
            if turn.state is T.WAITING and not await self._agent_turns_first(s, agent):
                continue
            if turn.state is T.WAITING and not self.open_turn(s, turn, emit, reseeded):
                self.pool.release(agent, reusable=True)
                return None
            try:
                transport = agent.transport_or_fail()
                if transport.durable:
                    turn.journal = TurnJournal.begin(transport, turn.opening)
                if turn.attachments:
                    blocks = content_blocks(self.context.text_for(s, turn), turn.attachments)
                    await transport.send_user_content(blocks, turn.line_uuid)
                else:
                    await transport.send_user_message(
                        self.context.text_for(s, turn), turn.line_uuid
                    )
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
                    Transcript(),
                    ev.TurnFailed(code, f"the message could not be written to the agent: {e}"),
                )
                return None

    async def _agent_turns_first(self, s: Session, agent: Agent) -> bool:
        """Turns the agent began on its own before this message reached it run first, so
        history keeps the order things happened in. False if the agent is no longer fit for
        the caller's turn (then it was released)."""
        while self.follower.spoke_first(s, agent):
            if not await self._agent_turn_first(s, agent):
                return False
        return True

    async def _agent_turn_first(self, s: Session, agent: Agent) -> bool:
        origin, prompt = s.causes.next()
        first = Turn(ids.new_turn_id(), prompt, "", s.next_seq - 1)
        first.origin, first.leased, first.follows_agent = origin, agent, True
        first.audience = lambda: first.listeners + s.watchers
        first.lifecycle.move(T.WAITING)

        def emit(kind: ev.EventKind) -> ev.SessionEvent:
            return self.emit_for(s, first, kind)

        if self.follower.open_agent_turn(s, first, emit) is None:
            return False  # released
        reusable = await self._run_on(agent, s, first, emit)
        if reusable and agent.alive:
            return True
        self.pool.release(agent, reusable=False)
        return False

    async def _lease_or_stop(self, s: Session, turn: Turn) -> Agent:
        """The pool's lease, unless the turn is stopped first (then the lease is given up).
        However this ends (also by cancelling the caller), the lease is never left behind:
        an agent it got is released and its error retrieved."""
        if turn.stop_requested.is_set():
            raise _Stopped
        lease = asyncio.ensure_future(self.pool.lease(s.record, turn.output_schema))
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
        if turn.state is T.WAITING and not self.open_turn(s, turn, emit, False):
            return False
        cfg = self.config.agent
        if attempts >= cfg.spawn_retries:
            self.finish(
                s,
                turn,
                emit,
                Transcript(),
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
        transcript = Transcript()
        plan = PlanKeeper(self.store, s, emit)
        turn.approvals = self.approvals_for(s, turn, plan.watching(emit))
        try:
            if not s.record.agent_started:
                # The CLI keeps a transcript from its first message on: every later process
                # of this conversation must --resume it (a second --session-id is refused).
                s.record = self._update(s, agent_started=True)
            terminal = await self._converse(agent, s, turn, emit, transcript)
            # Before the turn's end, which it is part of: a watcher sees the plan first.
            planned = may_have_planned(s, transcript)
            if isinstance(terminal, ev.TurnCompleted) and agent.alive and planned:
                await plan.refresh(agent.transport_or_fail(), self.config.agent.stop_grace)
        except Exception:
            log.exception("turn crashed", turn_id=turn.turn_id)
            terminal = ev.TurnFailed(ev.INTERNAL, "atomizerd failed while running the turn")
        reusable = isinstance(terminal, ev.TurnCompleted) and agent.alive
        if turn.left_plan == Mode.POWER:
            reusable = False  # started sandboxed, as a plan: power's own agent next time
        if s.record.turn_budget_usd > 0:
            reusable = False  # the CLI takes its cap at start-up: a fresh one per turn
        if turn.output_schema is not None:
            reusable = False  # started with the turn's schema: the next turn has none
            terminal = require_structured(terminal)
        self.finish(s, turn, emit, transcript, terminal)
        return reusable

    def approvals_for(self, s: Session, turn: Turn, emit: Emit) -> Approvals:
        return Approvals(
            self.store,
            s.id,
            turn.turn_id,
            self.config.approvals.timeout,
            emit,
            turn.audience,
            leave_plan=lambda mode: leave_plan(self.store, s, turn, mode),
            in_plan=lambda: s.record.mode == Mode.PLAN,
            telemetry=self.telemetry,
            notice=self._notice(s, "permission_request"),
            question_notice=self._notice(s, "question"),
        )

    def _notice(self, s: Session, event: str) -> NoticeWait:
        return NoticeWait(
            lambda: self.notices.notifies(s.record, event),
            self.notices.delivered,
            self.config.notify.delivery_wait,
        )

    # --- beginnings and ends -------------------------------------------------------------

    def open_turn(self, s: Session, turn: Turn, emit: Emit, reseeded: bool) -> bool:
        """WAITING → RUNNING: the user message is committed before the agent sees it, then
        announced. False (and the turn rejected) if the store refuses it."""
        try:
            # Outcomes a full disk refused go first: history stays in order, and the session's
            # cost base (agent_cost_usd) is current before the agent's next report.
            self.outcomes.store_pending(s)
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
            self.finish(s, turn, emit, Transcript(), ev.TurnFailed(ev.SPAWN_FAILED, str(error)))

    def _fail_before_send(
        self, s: Session, turn: Turn, emit: Emit, code: str, message: str
    ) -> None:
        if turn.state is T.WAITING and not self.open_turn(s, turn, emit, False):
            return
        self.finish(s, turn, emit, Transcript(), ev.TurnFailed(code, message))

    def end_early(self, s: Session, turn: Turn, emit: Emit) -> None:
        """Ends a turn that is stopped before its agent got the message (queued, waiting, or
        between restarts): recorded like any other turn, with no reply."""
        if turn.state is T.DONE:
            return  # rejected meanwhile (a restart): never stored, nothing to say
        if turn.state in (T.QUEUED, T.WAITING):
            if turn.state is T.QUEUED:
                turn.lifecycle.move(T.WAITING)
            if not self.open_turn(s, turn, emit, False):
                return
        if turn.stop_reason is not None:
            terminal: ev.TurnCompleted | ev.TurnFailed = ev.TurnFailed(*turn.stop_reason)
        else:
            terminal = ev.TurnCompleted(
                text="", interrupted=True, stop_reason="interrupted before the agent got it"
            )
        self.finish(s, turn, emit, Transcript(), terminal)

    def finish(
        self,
        s: Session,
        turn: Turn,
        emit: Emit,
        transcript: Transcript,
        terminal: ev.TurnCompleted | ev.TurnFailed,
    ) -> None:
        """RUNNING → ENDING → DONE. Pending permission requests are settled and the outcome
        committed before the terminal event, so a client that saw the end can read history;
        nothing of the turn is emitted after it."""
        turn.lifecycle.move(T.ENDING)
        if turn.approvals is not None:
            turn.approvals.close("the turn ended before an answer")
            denied = set()
            if isinstance(terminal, ev.TurnCompleted):
                denied = {d.tool_use_id for d in terminal.permission_denials}
            turn.approvals.audit_unasked(transcript.tool_calls.values(), denied)
        outcome = outcome_of(transcript, terminal)
        if transcript.origin_kind == TASK_NOTIFICATION and turn.origin is ev.TurnOrigin.AGENT:
            turn.origin = ev.TurnOrigin.TASK  # the CLI's word is final: stored as such
        outcome.origin = turn.origin.value
        outcome.agent_files = filemarks.after_turn(
            s.record.agent_files, transcript.tool_calls.values()
        )
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
            self.outcomes.later(s, turn.turn_id, outcome, transcript.agent_cost_usd)
        turn.terminal = emit(terminal)
        if turn.journal is not None:
            turn.journal.end()
            turn.journal = None
        turn.lifecycle.move(T.DONE)
        turn.done.set()
        if outcome.status == "complete" and turn.origin is ev.TurnOrigin.CLIENT:
            self.after_turn(s, turn.text)
        self.telemetry.turn_ended(turn, *reported_outcome(terminal))
        log.info(
            "turn ended",
            turn_id=turn.turn_id,
            outcome=type(terminal).__name__,
            interrupted=getattr(terminal, "interrupted", False),
        )

    def finish_failed(self, s: Session, turn: Turn, emit: Emit, failed: ev.TurnFailed) -> None:
        """Ends a RUNNING turn whose run broke (a bug) with nothing more said."""
        self.finish(s, turn, emit, Transcript(), failed)

    def _update(self, s: Session, **fields: Any) -> SessionRecord:
        record = self.store.update_session(s.id, **fields)
        if record is None:
            raise AtomizerError(f"session {s.id!r} vanished from the store")
        return record

    # --- the conversation ----------------------------------------------------------------

    async def _converse(
        self,
        agent: Agent,
        s: Session,
        turn: Turn,
        emit: Emit,
        transcript: Transcript,
    ) -> ev.TurnCompleted | ev.TurnFailed:
        cfg = self.config.agent
        process = agent.transport_or_fail()
        loop = asyncio.get_running_loop()
        started = last_activity = last_checkpoint = loop.time()
        self.telemetry.turn_running(turn, started)
        deadline = started + cfg.turn_timeout
        first = True
        interrupting_since: float | None = None
        # A turn adopted after a restart: its output so far is read again quietly (its events
        # are in the log already), the permission requests it held are taken up after that.
        replay = Replay(turn.resumed[1]) if turn.resumed is not None else None
        if replay is not None:
            first = False
            transcript.rewrite = True  # the stored checkpoint is rewritten whole
            if replay.resumed.interrupted:
                turn.interrupt()
            self.control.take_up_held(process, turn, replay)
        reading = self.follower.reading(s, turn, agent, emit, transcript)
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
                    self.control.interrupt(process)
                if item is None:
                    if interrupting_since is not None:
                        budget = interrupting_since + cfg.stop_grace - now
                        if budget <= 0:
                            return await self.control.kill(agent, turn, transcript)
                    else:
                        if turn.approvals is not None and turn.approvals.waiting:
                            last_activity = now  # waiting for a person is busy, not stalled
                        quiet_limit = cfg.first_event_timeout if first else cfg.stall_timeout
                        budget = min(last_activity + quiet_limit, deadline) - now
                        if budget <= 0:
                            return await self.control.watchdog(agent, turn, first, now >= deadline)
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
                    return await self.control.watchdog(agent, turn, first, True)
                if first:
                    self.telemetry.first_event(turn, loop.time())
                first = False
                last_activity = loop.time()
                if replay is not None and not replay.done:  # its events are in the log already
                    outcome = self.follower.replay(
                        reading, item, interrupting_since is not None, replay.held
                    )
                else:
                    outcome = self.follower.take(reading, item, interrupting_since is not None)
                if turn.journal is not None:
                    turn.journal.handled_upto(process.received)
                    turn.journal.flush()
                if replay is not None and not replay.done:
                    self.control.take_up_held(process, turn, replay)
                    self.follower.replayed(reading, replay)
                if outcome is not None:
                    return outcome
                if interrupting_since is None and transcript.usage is not None:
                    self._enforce_caps(s, turn, emit, transcript.usage)
        finally:
            stop_waiter.cancel()
            if receive is not None:
                receive.cancel()
            self.follower.close(reading)

    def _enforce_caps(self, s: Session, turn: Turn, emit: Emit, usage: ev.LiveUsage) -> None:
        """Stops the turn once its estimated cost crosses the turn's or the session's cap:
        the CLI's own --max-budget-usd only refuses the next turn (docs/agent-protocol.md)."""
        if turn.stop_requested.is_set():
            return
        why = spend.over_cap(s.record, usage.estimated_turn_cost_usd)
        if why is not None:
            emit(ev.Notice(ev.BUDGET_EXHAUSTED, why))
            turn.interrupt()

    def _checkpoint(self, s: Session, turn: Turn, transcript: Transcript) -> None:
        """Stores what the reply said since the last checkpoint (at most every
        checkpoint_interval or checkpoint_bytes); a full disk only costs the checkpoint."""
        text, replace = transcript.unsaved_text()
        try:
            self.store.checkpoint_reply(s.id, turn.turn_id, text, replace=replace)
        except AtomizerError as e:
            log.warning("reply checkpoint not stored", turn_id=turn.turn_id, error=str(e))


class _Stopped(Exception):
    """The turn was stopped while it waited for an agent."""
