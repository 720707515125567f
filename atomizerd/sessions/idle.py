"""Reading a session's agent between turns.

An agent is read whenever it is live, not only inside a client's turn (docs/architecture.md,
"Following the agent"). While its agent is READY in the pool, a session's `IdleReader` takes
what the agent says on its own: task bookkeeping (a background command or subagent started,
progressed or ended) becomes session events at once; the first line of a turn the agent starts
by itself (after a task ends, when a scheduled prompt fires) leases the agent on the spot, so
nothing can evict it, and hands it to a job in the session's queue that runs that turn like any
other (`TurnRunner._open_agent_turn`). A client's job that is queued already reads the turn
itself (sessions/conversation.py). The pool starts the reader when the agent becomes READY and
cancels it when it is leased or stopped: at most one reader of an agent at any time.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable

import structlog

from atomizerd.agents import protocol as proto
from atomizerd.agents.pool import Agent, AgentPool
from atomizerd.agents.vocabulary import AgentError, AgentExited, AgentItem
from atomizerd.sessions import events as ev
from atomizerd.sessions.conversation import (
    is_subagent,
    is_turn_content,
    subagent_events,
    taken_line,
)
from atomizerd.sessions.session import Session

log = structlog.get_logger("atomizerd.sessions.idle")

# Loads the session of an agent (None once it is gone or not this host's).
SessionOf = Callable[[str], Session | None]
# Runs a turn the agent started, on the agent already leased for it.
StartAgentTurn = Callable[[Session, Agent], None]
# The session's events outside any turn.
EmitSession = Callable[[Session, ev.EventKind], ev.SessionEvent]
# The task bookkeeping of the turn runner (TurnRunner.task_item).
TaskItem = Callable[[Session, AgentItem, Callable[[ev.EventKind], ev.SessionEvent]], None]


class IdleReader:
    def __init__(
        self,
        pool: AgentPool,
        session_of: SessionOf,
        start_agent_turn: StartAgentTurn,
        emit_session: EmitSession,
        task_item: TaskItem,
    ) -> None:
        self._pool = pool
        self._session_of = session_of
        self._start_agent_turn = start_agent_turn
        self._emit_session = emit_session
        self._task_item = task_item

    async def follow(self, agent: Agent) -> None:
        """Reads the READY agent until it starts a turn, exits, or is leased (cancelled)."""
        transport = agent.transport
        s = self._session_of(agent.session_id)
        if transport is None or s is None:
            return
        while True:
            await transport.wait_output()
            head = transport.peek()
            if head is None:
                continue
            if isinstance(head, AgentExited):
                return  # the pool's exit watcher frees the slot
            if self._starts_turn(s, head):
                worker = s.worker
                if worker is not None and not worker.done():
                    # The session's jobs come first (one that leases the agent reads this
                    # turn itself, and cancels this reader); then it is looked at again.
                    await asyncio.wait({worker})
                    continue
                self._hand_over(s, agent)
                return
            transport.receive_nowait()
            self._note(s, agent, head)
            if transport.durable:
                # Taken: a daemon that adopts the agent after a restart must not read it again.
                with contextlib.suppress(AgentError, OSError):
                    transport.forget_before(transport.boundary[0])

    @staticmethod
    def _starts_turn(s: Session, item: AgentItem) -> bool:
        line = taken_line(item)
        if line is not None:
            return line in s.untaken  # a steered line taken only now
        return is_turn_content(item)

    def _hand_over(self, s: Session, agent: Agent) -> None:
        leased = self._pool.lease_idle(s.id)
        if leased is None:
            return
        log.info("the agent started a turn while idle", session_id=s.id)
        self._start_agent_turn(s, leased)

    def _note(self, s: Session, agent: Agent, item: AgentItem) -> None:
        def emit(kind: ev.EventKind) -> ev.SessionEvent:
            return self._emit_session(s, kind)

        if isinstance(item, proto.TASK_MESSAGES):
            self._task_item(s, item, emit)
        elif is_subagent(item):
            for kind in subagent_events(item):
                emit(kind)
        elif isinstance(item, proto.Init):
            agent.mcp_servers = list(item.mcp_servers)
