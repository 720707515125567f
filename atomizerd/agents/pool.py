"""The bounded pool of live agents.

`pool.max_live` is the memory bound (a live `claude` costs ~200 MiB): it holds at every instant.
A *slot* is held by every agent from the moment its spawn is decided until its process is gone,
so an agent being started or stopped counts as much as a working one. When the pool is full, a
lease waits in one FIFO queue (`pool.max_queued`, `pool.queue_timeout`); the queue is served by
one synchronous function (`Slots.dispatch`, agents/slots.py), which either grants a free slot
or evicts the least-recently-used *idle* agent and hands its slot to the waiter the moment the
process is gone. Only a READY agent can be evicted: never one that is spawning or leased to a
turn, nor one whose tasks (background commands, subagents) are still running.

The agent lifecycle (docs/architecture.md, "Agent"):

    SPAWNING ──▶ READY ◀──▶ LEASED
        │          │           │
        └──────────┴───────────┴──▶ STOPPING ──▶ GONE

A session has at most one agent that is not GONE; its next agent is spawned only after the
previous one is gone (two CLIs must never write one conversation's transcript).

Spares (`pool.spares` per mode in `pool.spare_modes`) are READY agents started ahead of need
for a session id reserved in advance, with exactly what a normal spawn of a new session of that
mode (no study, default model and budgets) would get; `adopt_spare` hands one to a new session,
which then takes the reserved ids. They hold slots like any agent, are evicted first, and are
started only from free slots no turn is waiting for; a spare that dies is replaced.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable, Mapping

import structlog

from atomizerd.agents.agent import (
    AGENT_TRANSITIONS,
    Agent,
    AgentState,
    DiedAtStart,
    LaunchSource,
    ResumeFailed,
    spawn_failure_reason,
)
from atomizerd.agents.pool_core import KILL_SETTLE, PoolCore
from atomizerd.agents.slots import caller_cancelled
from atomizerd.agents.transport import PooledTransport
from atomizerd.agents.vocabulary import AgentError
from atomizerd.errors import Unavailable
from atomizerd.model import Mode, SessionRecord

log = structlog.get_logger("atomizerd.agents.pool")

S = AgentState


__all__ = [
    "AGENT_TRANSITIONS",
    "Agent",
    "AgentPool",
    "AgentState",
    "DiedAtStart",
    "LaunchSource",
    "ResumeFailed",
    "spawn_failure_reason",
]


class AgentPool(PoolCore):
    # --- spares --------------------------------------------------------------------------

    def replenish_spares(self) -> None:
        """Starts spares up to `pool.spares` per mode, from free slots only."""
        cfg = self.config.pool
        if self._closed or self._spare_record is None or cfg.spares <= 0:
            return
        for mode in cfg.spare_modes:
            if mode == Mode.POWER and not self.config.modes.power.enabled:
                continue
            have = sum(1 for a in self._agents.values() if a.spare_for == mode)
            for _ in range(cfg.spares - have):
                if not self.slots.free:
                    return
                record = self._spare_record(mode)
                self.slots.take_free()
                agent = self._new_agent(record.session_id)
                agent.spare_for, agent.agent_session_id = mode, record.agent_session_id
                agent.lease_wanted = False
                self._launch(agent, record)

    def adopt_spare(self, mode: str) -> tuple[str, str] | None:
        """Hands a READY spare of `mode` to a new session: returns the (session id,
        conversation id) it was started for, which the session must take; None if none."""
        for agent in self._agents.values():
            # One still in its handshake is taken too: the first lease waits for the rest.
            ready = agent.state is S.READY and agent.alive
            if agent.spare_for == mode and (ready or agent.state is S.SPAWNING):
                agent.spare_for = None
                agent.idle_since = asyncio.get_running_loop().time()
                if agent.state is S.READY:
                    self._read_while_idle(agent)
                self.spares_adopted += 1
                log.info("spare agent adopted", session_id=agent.session_id, mode=mode)
                self._soon(self.replenish_spares)
                return agent.session_id, agent.agent_session_id
        return None

    # --- leasing -------------------------------------------------------------------------

    def seed_next_spawn(self, session_id: str, seed: str) -> None:
        """Earlier conversation to put in the next spawn's system prompt (a reseeded session)."""
        self._seeds[session_id] = seed

    async def prewarm(
        self, current: Callable[[], SessionRecord], wanted: Callable[[], bool]
    ) -> None:
        """Starts the session's agent if a slot is free right now; never evicts or waits for it.
        `wanted` and the record (`current`) are read at the last moment, so a session closed
        or changed meanwhile gets nothing, or an agent for what it is now."""
        if self._closed or not wanted():
            return
        record = current()
        sid = record.session_id
        if sid in self._agents:
            return
        if not self.slots.free:
            return
        self.slots.take_free()
        agent = self._new_agent(sid)
        agent.lease_wanted = False
        with contextlib.suppress(Exception):  # its failure is logged by _launch
            await asyncio.shield(self._launch(agent, record))

    async def lease(
        self, record: SessionRecord, json_schema: Mapping[str, object] | None = None
    ) -> Agent:
        """The session's agent, LEASED to the caller: reused, or spawned (resumed) in a slot,
        waiting for one if the pool is full. Cancelling the caller gives up cleanly: a spawn
        already under way finishes and leaves an idle agent. An idle agent is reused only if
        it was started with the same `json_schema` (the CLI takes it per process): otherwise
        it is stopped and one is started with it.

        Raises ResourceExhausted (queue full, or no slot in time), Unavailable (closing),
        AgentSpawnError, DiedAtStart, ResumeFailed, and what the launcher raises."""
        sid = record.session_id
        while True:
            self._check_open()
            agent = self._agents.get(sid)
            if agent is None:
                await self.slots.take(lambda: self._closed, self._held_by_tasks)
                if sid in self._agents:  # a prewarm got there first: use that one
                    self.slots.give_back()
                    continue
                fresh = self._new_agent(sid)
                fresh.json_schema = json_schema
                return await self._spawn_for_lease(fresh, record)
            if agent.state is S.READY:
                if agent.json_schema != json_schema:
                    self._begin_stop(agent, "a turn needs it started with another output schema")
                elif agent.alive:
                    self._stop_reading(agent)
                    agent.lifecycle.move(S.LEASED)
                    return agent
                self._begin_stop(agent, "its process had exited")
            elif agent.state is S.SPAWNING:
                await agent.settled.wait()
            elif agent.state is S.STOPPING:
                await agent.gone.wait()
            else:  # LEASED: the registry runs one turn per session at a time
                raise RuntimeError(f"session {sid}'s agent is already leased")

    def release(self, agent: Agent, *, reusable: bool) -> None:
        """The turn is done with the agent: it becomes idle, or is stopped if it is unfit."""
        if agent.state is not S.LEASED or self._handed_over:
            return
        if reusable and agent.alive and not self._closed:
            agent.lifecycle.move(S.READY)
            agent.idle_since = asyncio.get_running_loop().time()
            self._read_while_idle(agent)
            self.slots.dispatch()
        else:
            self._begin_stop(agent, "released unfit for reuse")

    async def stop_if_idle(self, session_id: str, why: str) -> bool:
        """Stops the session's agent if it is idle right now (the reaper's cull) and waits
        until it is gone; False (and nothing done) if it is not idle."""
        agent = self._agents.get(session_id)
        if agent is None or agent.state is not S.READY:
            return False
        self._begin_stop(agent, why)
        await agent.gone.wait()
        return True

    async def _spawn_for_lease(self, agent: Agent, record: SessionRecord) -> Agent:
        task = self._launch(agent, record)
        try:
            await asyncio.shield(task)
        except asyncio.CancelledError:
            agent.lease_wanted = False
            if task.done() and not task.cancelled() and task.exception() is None:
                self.release(agent, reusable=True)
            if task.cancelled() and not caller_cancelled():
                # The spawn was abandoned by a shutdown, not by this lease's caller.
                raise Unavailable("atomizerd is shutting down; retry in a moment") from None
            raise
        return agent

    async def retire(self, session_id: str) -> None:
        """Stops the session's agent (it resumes on its next message) and waits until it is
        gone. A spawn under way finishes first; a leased agent is stopped once released."""
        while (agent := self._agents.get(session_id)) is not None:
            if agent.state is S.SPAWNING:
                await agent.settled.wait()
            elif agent.state is S.LEASED:
                raise RuntimeError(f"session {session_id}'s agent is leased: end the turn first")
            else:
                if agent.state is S.READY:
                    self._begin_stop(agent, "retired")
                await agent.gone.wait()

    def lease_idle(self, session_id: str) -> Agent | None:
        """The session's agent LEASED to the caller if it is READY and alive right now; never
        spawns or waits (a turn the agent started itself needs the agent it runs in)."""
        agent = self._agents.get(session_id)
        if agent is None or agent.state is not S.READY or not agent.alive or self._closed:
            return None
        self._stop_reading(agent)
        agent.lifecycle.move(S.LEASED)
        return agent

    def adopt(self, session_id: str, transport: PooledTransport, *, leased: bool) -> Agent | None:
        """An agent a previous daemon left running (under its shim) joins the pool: LEASED to
        the turn it is running, or READY. None (the caller stops it) if the session has an
        agent already or no slot is free."""
        if session_id in self._agents or self.slots.used >= self.config.pool.max_live:
            return None
        self.slots.take_free()
        agent = self._new_agent(session_id)
        agent.transport = transport
        agent.resumed = True
        agent.lifecycle.move(S.LEASED if leased else S.READY)
        agent.idle_since = asyncio.get_running_loop().time()
        agent.settled.set()
        self._record_process(transport, session_id)
        self._watch_exit(agent)
        if not leased:
            self._read_while_idle(agent)
        log.info("agent adopted", session_id=session_id, pid=transport.pid, running=leased)
        return agent

    async def hand_over(self, timeout: float) -> None:
        """A planned restart: every agent that outlives the daemon is let go as it is, for the
        next daemon to adopt (its store rows stay, naming it), once what was written to its
        shim has left (at most `timeout`); the others are stopped by `close`. No lease is
        granted any more: waiting leases fail (Unavailable) and spawns under way are stopped
        (their turns never reached them)."""
        self._handed_over = True
        self._shut()
        let_go = []
        for agent in list(self._agents.values()):
            transport = agent.transport
            if transport is None or not transport.durable:
                continue
            if agent.state is not S.READY and agent.state is not S.LEASED:
                continue  # starting or stopping: `close` waits for it to be gone
            if agent.watcher is not None:
                agent.watcher.cancel()  # it never exits here any more
            self._stop_reading(agent)
            with contextlib.suppress(AgentError, OSError):
                transport.detach()
                let_go.append(transport)
            agent.lifecycle.move(S.STOPPING)
            agent.lifecycle.move(S.GONE)
            del self._agents[agent.session_id]
            agent.settled.set()
            agent.gone.set()
            self.slots.used -= 1  # let go, not given back: nobody gets it any more
        if let_go:
            await asyncio.wait(
                [asyncio.ensure_future(t.drained()) for t in let_go], timeout=timeout
            )
        log.info("agents handed over to the next daemon", agents=len(let_go))

    def kill_all(self) -> None:
        """SIGKILL every agent's process group now (shutdown past its grace period); spawns
        under way are abandoned."""
        self._abort_starts()
        for agent in self._agents.values():
            if agent.transport is not None:
                agent.transport.kill()

    async def close(self) -> None:
        """Refuses new leases, fails the waiting ones, stops every agent and waits for them.
        Always returns within `close_bound()`: agents not gone after their stop sequence are
        killed, and those not gone `KILL_SETTLE` later are given up on (logged)."""
        self._shut()
        for agent in list(self._agents.values()):
            if agent.state in (S.READY, S.LEASED):
                self._begin_stop(agent, "the daemon is stopping")
        if not await self._all_gone(self._stop_bound()):
            log.warning(
                "agents still running after their stop; killing them", agents=len(self._agents)
            )
            self.kill_all()
            if not await self._all_gone(KILL_SETTLE):
                log.error(
                    "agents not gone after SIGKILL; giving up on them",
                    sessions=sorted(self._agents),
                )
        tasks = [t for t in self._tasks if not t.done()]
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.wait(tasks, timeout=KILL_SETTLE)

    def close_bound(self) -> float:
        return self._stop_bound() + 2 * KILL_SETTLE

    def _shut(self) -> None:
        """No more leases or spawns: waiters fail, starts under way are stopped."""
        self._closed = True
        self.slots.refuse_waiters()
        for agent in self._agents.values():  # waiters already promised an evicted agent's slot
            if agent.successor is not None:
                agent.successor.granted.cancel()
        self._abort_starts()

    def _abort_starts(self) -> None:
        """Every SPAWNING agent's start is cancelled: it goes to STOPPING (its process, if it
        has one yet, stopped) and then GONE, whoever waits for it."""
        for agent in self._agents.values():
            if agent.state is S.SPAWNING and agent.starting is not None:
                agent.lease_wanted = False
                agent.starting.cancel()

    def _stop_bound(self) -> float:
        """How long stopping every agent may take: its stop sequence (stdin, SIGTERM, SIGKILL)
        with room to spare."""
        return 2 * self.config.agent.stop_grace + KILL_SETTLE

    async def _all_gone(self, timeout: float) -> bool:
        waits = [asyncio.ensure_future(a.gone.wait()) for a in self._agents.values()]
        if not waits:
            return True
        _, pending = await asyncio.wait(waits, timeout=timeout)
        for w in pending:
            w.cancel()
        return not self._agents
