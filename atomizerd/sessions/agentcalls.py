"""Control requests to a session's agent outside any turn: a question aside, a title, the
agent's MCP servers.

The CLI answers control requests at any time, also while a turn runs (measured:
docs/agent-protocol.md), and its answers are matched to ours by request id, so a request goes
straight to the live agent whatever it is doing: READY (the idle reader goes on reading it) or
LEASED to a turn (the turn goes on). When the session has no live agent and the call needs
one, the call is a job in the session's queue that leases the agent (started or resumed like a
turn's) and gives it back: it never races a turn for the agent.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

import structlog

from atomizerd.agents.pool import Agent, AgentPool, AgentState
from atomizerd.agents.vocabulary import AgentError, ControlError, ControlTimeout
from atomizerd.config import Config
from atomizerd.errors import FailedPrecondition, Unavailable
from atomizerd.sessions.queue import WorkQueue
from atomizerd.sessions.session import Change, Session

log = structlog.get_logger("atomizerd.sessions.agentcalls")

# Turns an agent's error answer into the domain error the caller should get.
ErrorOf = Callable[[ControlError], Exception]


def _refused(e: ControlError) -> Exception:
    return FailedPrecondition(f"the agent refused: {e}")


class AgentCalls:
    def __init__(self, config: Config, pool: AgentPool, queue: WorkQueue) -> None:
        self.config = config
        self.pool = pool
        self.queue = queue

    def live(self, s: Session) -> Agent | None:
        """The session's agent if it is up and can take a control request now."""
        agent = self.pool.agent(s.id)
        if agent is not None and agent.state in (AgentState.READY, AgentState.LEASED):
            return agent if agent.alive else None
        return None

    async def call(
        self,
        s: Session,
        subtype: str,
        *,
        timeout: float,
        start: bool,
        error_of: ErrorOf = _refused,
        **fields: Any,
    ) -> dict[str, Any]:
        """The agent's answer to one control request. With `start`, a session without a live
        agent gets one (a job in its queue); without, that is FAILED_PRECONDITION."""
        while True:
            agent = self.pool.agent(s.id)
            if agent is not None and agent.state is AgentState.SPAWNING:
                await agent.settled.wait()
                continue
            if agent is not None and agent.state is AgentState.STOPPING:
                await agent.gone.wait()
                continue
            live = self.live(s)
            if live is not None:
                return await self._ask(live, subtype, timeout, error_of, fields)
            if not start:
                raise FailedPrecondition(
                    f"session {s.id!r} has no live agent; it starts with the next message"
                )
            return await self._in_queue(s, subtype, timeout, error_of, fields)

    async def _ask(
        self,
        agent: Agent,
        subtype: str,
        timeout: float,
        error_of: ErrorOf,
        fields: dict[str, Any],
    ) -> dict[str, Any]:
        try:
            return await agent.transport_or_fail().request(subtype, timeout=timeout, **fields)
        except ControlError as e:
            raise error_of(e) from None
        except ControlTimeout:
            raise Unavailable(
                f"the agent did not answer {subtype!r} within {timeout:g} s"
            ) from None
        except AgentError as e:
            log.info("control request failed", subtype=subtype, error=str(e))
            raise Unavailable(f"the agent went away before it answered: {e}") from None

    async def _in_queue(
        self,
        s: Session,
        subtype: str,
        timeout: float,
        error_of: ErrorOf,
        fields: dict[str, Any],
    ) -> dict[str, Any]:
        answer: dict[str, Any] = {}

        async def apply() -> None:
            try:
                agent = await self.pool.lease(s.record)
            except AgentError as e:
                raise Unavailable(f"the session's agent could not be started: {e}") from None
            try:
                answer.update(await self._ask(agent, subtype, timeout, error_of, fields))
            finally:
                self.pool.release(agent, reusable=True)

        change = Change(apply)
        self.queue.submit(s, change)
        await asyncio.shield(change.done)
        return answer
