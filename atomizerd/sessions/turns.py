"""Running one turn: user message in, agent events out, outcome stored.

The order of a turn (DESIGN.md "How a turn flows"): a live process is leased from the pool
(a bounded wait), the user message is committed, then written to the agent; its stdout becomes
session events until the `result` line; the assistant message is committed, then the terminal
event is emitted. A client going away changes none of this; `Interrupt`, the watchdogs,
termination and shutdown end a turn early, and what was said so far is still stored.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field
from typing import Any

import structlog

from atomizerd import ids
from atomizerd.agents import protocol as proto
from atomizerd.agents.pool import AgentPool, LiveAgent, ResumeFailed
from atomizerd.agents.process import (
    AgentError,
    AgentExited,
    AgentItem,
    AgentSpawnError,
    LineTooLong,
)
from atomizerd.atomizer.prompt import history_seed
from atomizerd.daemon.config import Config
from atomizerd.errors import AtomizerError
from atomizerd.sessions import events as ev
from atomizerd.sessions.approvals import MODE, POLICY, Approvals, input_digest
from atomizerd.store.db import SessionRecord, Store, ToolCallRecord, TurnOutcome

log = structlog.get_logger("atomizerd.sessions.turns")

Emit = Callable[[ev.EventKind], ev.SessionEvent]


class Turn:
    """One message's turn. Its own event log holds every event of the turn, so the sender's
    stream never loses any, however slow it reads."""

    def __init__(self, turn_id: str, text: str, request_id: str) -> None:
        self.turn_id = turn_id
        self.text = text
        self.request_id = request_id
        self.log = ev.EventLog()
        self.done = asyncio.Event()
        # Set when the turn was refused before it started (e.g. the pool queue is full):
        # the sender gets this as its status instead of events.
        self.rejected: AtomizerError | None = None
        self.interrupt_requested = asyncio.Event()
        self.stop_reason: tuple[str, str] | None = None
        # How many clients follow the turn (its sender, the session's watchers): a permission
        # request with nobody to answer it is denied at once.
        self.listeners = 0
        self.audience: Callable[[], int] = lambda: self.listeners
        self.approvals: Approvals | None = None

    def stop(self, code: str, message: str) -> None:
        """Ends the turn early (termination, shutdown): interrupted, then stored."""
        if self.stop_reason is None:
            self.stop_reason = (code, message)
        self.interrupt_requested.set()

    def reject(self, error: AtomizerError) -> None:
        self.rejected = error
        self.log.close()
        self.done.set()


@dataclass
class _Transcript:
    """What the turn said so far, to store however it ends."""

    text: list[str] = field(default_factory=list)
    # Messages whose text came as deltas; their whole assistant lines repeat it.
    streamed: set[str] = field(default_factory=set)
    tool_calls: dict[str, ToolCallRecord] = field(default_factory=dict)
    agent_cost_usd: float | None = None  # the CLI's cumulative cost at the turn's end

    def full_text(self) -> str:
        return "".join(self.text)


class TurnRunner:
    def __init__(self, config: Config, store: Store, pool: AgentPool) -> None:
        self.config = config
        self.store = store
        self.pool = pool
        self._pending: set[asyncio.Future[None]] = set()

    def _agent_text(self, record: SessionRecord, turn: Turn) -> str:
        """The CLI keeps a conversation's first system prompt on --resume, so a context
        changed since then reaches the model with the next user message."""
        if not (record.context_stale and record.agent_started):
            return turn.text
        record.context_stale = False
        self.store.update_session(record.session_id, context_stale=False)
        context = self.pool.launcher.context_text(record)
        return f"<atomizer-context>\n{context}\n</atomizer-context>\n\n{turn.text}"

    async def interrupt(self, turn: Turn) -> None:
        turn.interrupt_requested.set()

    async def run(self, record: SessionRecord, turn: Turn, emit: Emit) -> None:
        reseeded = False
        try:
            try:
                agent = await self.pool.acquire(record)
            except ResumeFailed:
                self._reseed(record)
                reseeded = True
                agent = await self.pool.acquire(record)
        except AtomizerError as e:
            turn.reject(e)
            return
        except AgentSpawnError as e:
            self._start(record, turn, emit)
            self._finish(record, turn, emit, _Transcript(), ev.TurnFailed(ev.SPAWN_FAILED, str(e)))
            return
        try:
            await self._run_on(agent, record, turn, emit, reseeded)
        finally:
            self.pool.release(agent)

    def _reseed(self, record: SessionRecord) -> None:
        """The agent's transcript is gone: a new conversation, seeded from our own store."""
        limit = self.config.agent.history_seed_messages
        recent = self.store.recent_messages(record.session_id, limit)
        record.agent_session_id = ids.new_agent_session_id()
        record.agent_started = False
        record.agent_cost_usd = 0.0
        self.store.update_session(
            record.session_id,
            agent_session_id=record.agent_session_id,
            agent_started=False,
            agent_cost_usd=0.0,
        )
        self.pool.seed_next_spawn(record.session_id, history_seed(recent))
        log.warning(
            "agent conversation lost; reseeded from stored history",
            session_id=record.session_id,
            messages=len(recent),
        )

    async def _run_on(
        self, agent: LiveAgent, record: SessionRecord, turn: Turn, emit: Emit, reseeded: bool
    ) -> None:
        self._start(record, turn, emit)
        if reseeded:
            emit(
                ev.Notice(
                    ev.CONTEXT_RESEEDED,
                    "the agent's earlier conversation could not be "
                    "resumed; it continues from the messages stored by atomizerd",
                )
            )
        transcript = _Transcript()
        turn.approvals = Approvals(
            self.store,
            record.session_id,
            turn.turn_id,
            self.config.approvals.timeout,
            emit,
            turn.audience,
        )
        try:
            terminal = await self._converse(agent, record, turn, emit, transcript)
        except Exception:
            log.exception("turn crashed", turn_id=turn.turn_id)
            agent.reusable = False
            terminal = ev.TurnFailed(ev.INTERNAL, "atomizerd failed while running the turn")
        finally:
            turn.approvals.cancel_all("the turn ended before an answer")
        if isinstance(terminal, ev.TurnFailed):
            agent.reusable = False
        if record.turn_budget_usd > 0:
            agent.reusable = False  # the CLI takes its cap at start-up: a fresh one per turn
        self._audit_unasked_tools(turn.approvals, transcript, terminal)
        self._finish(record, turn, emit, transcript, terminal)

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

    def _start(self, record: SessionRecord, turn: Turn, emit: Emit) -> None:
        """The user message is committed before the agent sees it, then announced."""
        message = self.store.add_user_message(
            record.session_id, turn.turn_id, turn.text, turn.request_id or None
        )
        record.message_count += 1
        record.last_active_at = message.created_at
        emit(ev.TurnStarted(turn.text, turn.request_id))

    def _finish(
        self,
        record: SessionRecord,
        turn: Turn,
        emit: Emit,
        transcript: _Transcript,
        terminal: ev.TurnCompleted | ev.TurnFailed,
    ) -> None:
        """Commit first, then tell the clients: a client that saw the end can read history."""
        reply = self.store.finish_turn(
            record.session_id,
            turn.turn_id,
            _outcome(transcript, terminal),
            agent_cost_usd=transcript.agent_cost_usd,
        )
        # The in-memory record follows what was just written (no re-read per turn).
        record.message_count += 1
        record.total_cost_usd += reply.cost_usd
        record.last_active_at = reply.created_at
        if transcript.agent_cost_usd is not None:
            record.agent_cost_usd = transcript.agent_cost_usd
        emit(terminal)
        turn.log.close()
        turn.done.set()
        log.info(
            "turn ended",
            turn_id=turn.turn_id,
            outcome=type(terminal).__name__,
            interrupted=getattr(terminal, "interrupted", False),
        )

    async def _converse(
        self,
        agent: LiveAgent,
        record: SessionRecord,
        turn: Turn,
        emit: Emit,
        transcript: _Transcript,
    ) -> ev.TurnCompleted | ev.TurnFailed:
        cfg = self.config.agent
        process = agent.process
        try:
            await process.send_user_message(self._agent_text(record, turn))
        except AgentExited as e:
            return ev.TurnFailed(
                ev.AGENT_EXITED, f"the agent exited before the turn: {e}", process.stderr_tail()
            )
        if not record.agent_started:
            # The CLI keeps a transcript from its first message on: every later process of
            # this conversation must --resume it (a second --session-id is refused).
            self.store.update_session(record.session_id, agent_started=True)
            record.agent_started = True
        started = last_activity = time.monotonic()
        deadline = started + cfg.turn_timeout
        first = True
        interrupting_since: float | None = None
        interrupt_waiter = asyncio.ensure_future(turn.interrupt_requested.wait())
        # One pending receive at a time, kept across timeouts: nothing read is ever dropped.
        receive: asyncio.Task[AgentItem] | None = None
        try:
            while True:
                # What has arrived already is relayed without waiting (no task, no timer per
                # line); only an empty mailbox means waiting, with the watchdogs armed.
                item = process.receive_nowait() if receive is None else None
                now = time.monotonic()
                if turn.interrupt_requested.is_set() and interrupting_since is None:
                    interrupting_since = now
                    await self._send_interrupt(agent)
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
                    if receive is None:
                        receive = asyncio.ensure_future(process.receive())
                    waiting: set[asyncio.Future[Any]] = {receive}
                    if not interrupt_waiter.done():
                        waiting.add(interrupt_waiter)
                    done, _ = await asyncio.wait(
                        waiting, timeout=budget, return_when=asyncio.FIRST_COMPLETED
                    )
                    if receive not in done:
                        continue
                    item = receive.result()
                    receive = None
                elif now >= deadline and interrupting_since is None:
                    return await self._watchdog(agent, turn, first, True)
                first = False
                last_activity = time.monotonic()
                outcome = self._relay(
                    agent,
                    item,
                    emit,
                    transcript,
                    interrupting_since is not None,
                    turn.approvals,
                    record.agent_cost_usd,
                )
                if outcome is not None:
                    return outcome
        finally:
            interrupt_waiter.cancel()
            if receive is not None:
                receive.cancel()

    def _background(self, coro: Coroutine[Any, Any, None]) -> None:
        task = asyncio.ensure_future(coro)
        self._pending.add(task)
        task.add_done_callback(self._pending.discard)

    async def _answer_permission(
        self, agent: LiveAgent, approvals: Approvals, request: proto.ControlRequest
    ) -> None:
        decision = await approvals.decide(request)
        raw_input = request.payload.get("input")
        answer = (
            proto.permission_allow(raw_input if isinstance(raw_input, dict) else {})
            if decision.allow
            else proto.permission_deny(decision.message or "denied")
        )
        try:
            await agent.process.respond_control(request.request_id, answer)
        except AgentError as e:
            log.info("could not answer the agent's permission request", error=str(e))

    async def _refuse_control(self, agent: LiveAgent, request: proto.ControlRequest) -> None:
        """A control request we do not serve gets an error answer instead of silence."""
        with contextlib.suppress(AgentError):
            await agent.process.respond_control_error(
                request.request_id, f"atomizerd does not handle {request.subtype!r}"
            )

    async def _send_interrupt(self, agent: LiveAgent) -> None:
        """Asks the agent to end the turn; its `result` line (or its exit) ends it. The
        acknowledgement is awaited aside: the turn must keep receiving meanwhile."""

        async def ask() -> None:
            try:
                await agent.process.interrupt(timeout=self.config.agent.stop_grace)
            except AgentError as e:
                log.info("interrupt not acknowledged", error=str(e))

        task = asyncio.ensure_future(ask())
        self._pending.add(task)
        task.add_done_callback(self._pending.discard)

    def _relay(
        self,
        agent: LiveAgent,
        item: object,
        emit: Emit,
        transcript: _Transcript,
        interrupted: bool,
        approvals: Approvals | None,
        cost_base: float,
    ) -> ev.TurnCompleted | ev.TurnFailed | None:
        """Maps one agent message to session events; the turn's end when it is one."""
        match item:
            case proto.TextDelta(text=text) if item.parent_tool_use_id is None:
                transcript.text.append(text)
                transcript.streamed.add(item.message_id)
                emit(ev.TextDelta(text))
            case proto.ThinkingDelta(text=text):
                emit(ev.ThinkingDelta(text))
            case proto.AssistantMessage():
                # A message whose deltas never came (e.g. retried without streaming after a
                # broken stream) is only in the whole assistant line: take its text from there.
                fresh = item.message_id not in transcript.streamed
                if item.text and fresh and item.parent_tool_use_id is None:
                    transcript.text.append(item.text)
                    emit(ev.TextDelta(item.text))
                for tu in item.tool_uses:
                    transcript.tool_calls[tu.id] = ToolCallRecord(tu.id, tu.name, tu.input_json)
                    emit(ev.ToolUse(tu.id, tu.name, tu.input_json))
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
            case proto.ControlRequest(subtype="can_use_tool") if approvals is not None:
                self._background(self._answer_permission(agent, approvals, item))
            case proto.ControlRequest():
                self._background(self._refuse_control(agent, item))
            case proto.ControlCancelRequest() if approvals is not None:
                approvals.cancel(item.request_id, "the agent withdrew the request")
            case proto.Result():
                return _completed(item, transcript, interrupted, cost_base)
            case LineTooLong():
                return ev.TurnFailed(
                    ev.LINE_TOO_LONG,
                    f"the agent wrote a line of more than {self.config.agent.max_line_bytes} "
                    "bytes (agent.max_line_bytes)",
                    agent.process.stderr_tail(),
                )
            case AgentExited():
                return ev.TurnFailed(
                    ev.AGENT_EXITED,
                    f"the agent exited mid-turn (exit status {item.returncode})",
                    item.stderr_tail,
                )
        return None

    async def _watchdog(
        self, agent: LiveAgent, turn: Turn, first: bool, overall: bool
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
        agent.reusable = False
        await self._send_interrupt(agent)
        await agent.process.stop(cfg.stop_grace)
        return ev.TurnFailed(
            code,
            why + "; the agent was stopped and resumes on the next message",
            agent.process.stderr_tail(),
        )

    async def _kill(
        self, agent: LiveAgent, turn: Turn, transcript: _Transcript
    ) -> ev.TurnCompleted | ev.TurnFailed:
        """The agent did not end the turn after an interrupt: stop it, keep what was said."""
        agent.reusable = False
        await agent.process.stop(self.config.agent.stop_grace)
        if turn.stop_reason is not None:
            code, message = turn.stop_reason
            return ev.TurnFailed(code, message, agent.process.stderr_tail())
        return ev.TurnCompleted(
            text=transcript.full_text(), interrupted=True, stop_reason="interrupted"
        )


def _completed(
    result: proto.Result, transcript: _Transcript, interrupted: bool, cost_base: float
) -> ev.TurnCompleted:
    transcript.agent_cost_usd = result.total_cost_usd
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
        )
    return TurnOutcome(
        status="interrupted" if terminal.interrupted else "complete",
        text=terminal.text,
        tool_calls=calls,
        cost_usd=terminal.cost_usd,
        usage=terminal.usage,
        detail=terminal.stop_reason,
    )


def _json_or_text(text: str) -> Any:
    try:
        return json.loads(text)
    except ValueError:
        return text
