"""Talking back to a running agent: answers to its permission requests, refusals of requests
atomizerd does not serve, interrupts, and stopping it when a watchdog fires.

Answers are written in background tasks of their own (the turn keeps reading meanwhile); a
planned restart lets the answers given a moment ago reach the agent, then leaves the rest for
the next daemon (`hand_over`). A turn adopted after a restart takes up the permission requests
it held once its output has been read again (`take_up_held`).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Coroutine
from dataclasses import dataclass, field
from typing import Any

import structlog

from atomizerd.agents import protocol as proto
from atomizerd.agents.pool import Agent
from atomizerd.agents.transport import AgentTransport, PooledTransport
from atomizerd.agents.vocabulary import AgentError, AgentItem
from atomizerd.config import Config
from atomizerd.sessions import events as ev
from atomizerd.sessions.approvals import POLICY, Approvals, Decision
from atomizerd.sessions.journal import Resumed, TurnJournal
from atomizerd.sessions.mcphealth import mcp_failures
from atomizerd.sessions.relay import Terminal, relay
from atomizerd.sessions.turn import Emit, Transcript, Turn

log = structlog.get_logger("atomizerd.sessions.control")

# Loop turns a planned restart lets pass before it leaves the permission requests as they are.
_HAND_OVER_STEPS = 8


class AgentControl:
    def __init__(self, config: Config) -> None:
        self.config = config
        self._pending: set[asyncio.Task[None]] = set()

    async def hand_over(self) -> None:
        """A planned restart: answers clients gave a moment ago are written to the agents
        (an answer resumes its waiting request within a few turns of the loop, and is written
        in the same step as its decision is recorded); requests still waiting for one are
        left as they are (the next daemon offers them again); nothing more is written."""
        for _ in range(_HAND_OVER_STEPS):
            await asyncio.sleep(0)
        for task in list(self._pending):
            task.cancel()

    def background(self, coro: Coroutine[Any, Any, None]) -> None:
        task = asyncio.ensure_future(coro)
        self._pending.add(task)
        task.add_done_callback(self._pending.discard)

    async def answer_permission(
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

    async def refuse(self, process: AgentTransport, request: proto.ControlRequest) -> None:
        """A control request we do not serve gets an error answer instead of silence."""
        with contextlib.suppress(AgentError):
            await process.respond_control_error(
                request.request_id, f"atomizerd does not handle {request.subtype!r}"
            )

    def interrupt(self, process: AgentTransport) -> None:
        """Asks the agent to end the turn; its `result` line (or its exit) ends it. The
        acknowledgement is awaited aside: the turn must keep receiving meanwhile."""

        async def ask() -> None:
            try:
                await process.interrupt(timeout=self.config.agent.stop_grace)
            except AgentError as e:
                log.info("interrupt not acknowledged", error=str(e))

        self.background(ask())

    async def watchdog(self, agent: Agent, turn: Turn, first: bool, overall: bool) -> ev.TurnFailed:
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
        self.interrupt(process)
        await process.stop(cfg.stop_grace)
        return ev.TurnFailed(
            code,
            why + "; the agent was stopped and resumes on the next message",
            process.stderr_tail(),
        )

    async def kill(
        self, agent: Agent, turn: Turn, transcript: Transcript
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

    def relay_item(
        self,
        agent: Agent,
        item: AgentItem,
        emit: Emit,
        transcript: Transcript,
        interrupted: bool,
        cost_base: float,
        approvals: Approvals | None,
        journal: TurnJournal | None,
        held: list[proto.ControlRequest] | None = None,
    ) -> Terminal | None:
        """One message of a turn: control requests (answered in the background) and the
        agent's init are handled here; the rest maps onto the transcript and events
        (sessions/relay.py). `held`: the message
        is read again after a restart: permission requests are kept there (taken up by
        `_end_replay`) instead of being decided."""
        process = agent.transport_or_fail()
        match item:
            case proto.Init():
                for kind in mcp_failures(agent.mcp_servers, item.mcp_servers):
                    emit(kind)
                agent.mcp_servers = list(item.mcp_servers)
            case proto.ControlRequest() if held is not None:
                held.append(item)
            case proto.ControlRequest(subtype="can_use_tool") if approvals is not None:
                self.background(self.answer_permission(process, approvals, item, journal))
            case proto.ControlRequest():
                self.background(self.refuse(process, item))
            case proto.ControlCancelRequest() if held is not None:
                held[:] = [r for r in held if r.request_id != item.request_id]
            case proto.ControlCancelRequest() if approvals is not None:
                approvals.cancel(item.request_id, "the agent withdrew the request")
            case _:
                return relay(
                    item,
                    emit,
                    transcript,
                    interrupted=interrupted,
                    cost_base=cost_base,
                    max_line_bytes=self.config.agent.max_line_bytes,
                    stderr_tail=process.stderr_tail(),
                )
        return None

    def take_up_held(self, process: PooledTransport, turn: Turn, replay: Replay) -> None:
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
                self.background(self.refuse(process, request))
                continue
            approvals.asked_tool_uses.add(str(request.payload.get("tool_use_id", "")))
            if rid in settled:  # decided, but the daemon went before the answer was written
                log.warning("a decided permission request is asked again", request_id=rid)
            restored = asked.get(rid)
            self.background(
                self.answer_permission(
                    process,
                    approvals,
                    request,
                    turn.journal,
                    restored.deadline if restored is not None else None,
                )
            )


@dataclass
class Replay:
    """Reading an adopted turn's output again (see `AgentControl.take_up_held`)."""

    resumed: Resumed
    done: bool = False
    held: list[proto.ControlRequest] = field(default_factory=list)


def quiet(kind: ev.EventKind) -> ev.SessionEvent:
    """The emit of a message read again: its events are in the session's log already."""
    return ev.SessionEvent(0, "", "", 0.0, kind)
