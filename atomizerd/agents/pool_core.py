"""The pool's mechanics: its agents by session, their slots, starting and stopping them.

`PoolCore` holds what the pool's operations (agents/pool.py: leasing, spares, hand-over and
shutdown) work on: the one table of agents (the pool is each `Agent`'s only owner), the slots
(agents/slots.py), an agent's start (spawn, the CLI's handshake) and its stop, and the reader
of an idle agent. Every state change of an agent happens here or in the pool's operations.
"""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import Awaitable, Callable

import structlog

from atomizerd.agents.agent import (
    AGENT_TRANSITIONS,
    Agent,
    AgentState,
    LaunchSource,
    Waiter,
    handshake,
    process_groups,
    spawn_failure_reason,
)
from atomizerd.agents.slots import Slots
from atomizerd.agents.transport import PooledTransport, Spawner
from atomizerd.config import Config
from atomizerd.errors import Unavailable
from atomizerd.model import AgentProcessRecord, SessionRecord
from atomizerd.statemachine import Lifecycle
from atomizerd.store.db import Store
from atomizerd.telemetry import NULL, Telemetry

log = structlog.get_logger("atomizerd.agents.pool")

S = AgentState

# After SIGKILL: how long an agent gets to be reaped before the pool gives up on it.
KILL_SETTLE = 5.0


class PoolCore:
    def __init__(
        self,
        config: Config,
        store: Store,
        launcher: LaunchSource,
        spawner: Spawner,
        spare_record: Callable[[str], SessionRecord] | None = None,
        telemetry: Telemetry = NULL,
    ) -> None:
        self.config = config
        self.store = store
        self.telemetry = telemetry
        self.launcher = launcher
        self._spawner = spawner
        self._agents: dict[str, Agent] = {}  # session id -> its agent that is not GONE
        self.slots = Slots(config.pool, self._evict_for)
        self._tasks: set[asyncio.Task[None]] = set()
        self._seeds: dict[str, str] = {}
        self._closed = False
        # Builds the record a spare of a mode is spawned for (reserved ids); None: no spares.
        self._spare_record = spare_record
        self.spares_adopted = 0
        # Set by a planned restart: the agents are handed to the next daemon, not stopped.
        self._handed_over = False
        # Reads a session's idle agent (set by the daemon's wiring; sessions/idle.py).
        self.idle_reader: Callable[[Agent], Awaitable[None]] | None = None
        # Told when a session's agent is gone (its tasks went with it).
        self.agent_gone: Callable[[str], None] = lambda _session_id: None

    # --- introspection -------------------------------------------------------------------

    @property
    def live_count(self) -> int:
        """Agents that may have a process right now (every state but GONE)."""
        return len(self._agents)

    @property
    def slots_used(self) -> int:
        return self.slots.used

    @property
    def peak_used(self) -> int:
        """Highest number of slots ever held at once (tests and the soak check the cap)."""
        return self.slots.peak

    @property
    def spare_count(self) -> int:
        return sum(1 for a in self._agents.values() if a.spare_for is not None)

    @property
    def queued(self) -> int:
        return self.slots.queued

    def agent(self, session_id: str) -> Agent | None:
        return self._agents.get(session_id)

    def state(self, session_id: str) -> str:
        """The session's agent as the API shows it: idle (none), starting, ready or busy."""
        agent = self._agents.get(session_id)
        if agent is None or agent.state is S.STOPPING:
            return "idle"
        if agent.state is S.SPAWNING:
            return "starting"
        if agent.state is S.LEASED:
            return "busy"
        return "ready" if agent.alive else "idle"

    @property
    def failing_mcp_servers(self) -> int:
        """MCP servers the live agents last reported as failed (GetStatus)."""
        return sum(
            1
            for a in self._agents.values()
            if a.alive
            for _, status in a.mcp_servers
            if status == "failed"
        )

    def mcp_servers(self, session_id: str) -> list[tuple[str, str]]:
        agent = self._agents.get(session_id)
        return list(agent.mcp_servers) if agent else []

    def candidates(self) -> list[tuple[str, float, bool]]:
        """(session_id, idle since (loop time), alive) of every idle agent with no running
        task, for the reaper."""
        return [
            (a.session_id, a.idle_since, a.alive)
            for a in self._agents.values()
            if a.state is S.READY and a.spare_for is None and not a.running_tasks
        ]

    def set_running_tasks(self, session_id: str, count: int) -> None:
        """How many tasks the session's agent runs now: one with tasks is never evicted."""
        agent = self._agents.get(session_id)
        if agent is not None:
            agent.running_tasks = count
            if not count:
                self.slots.dispatch()

    def busy_with_tasks(self) -> list[str]:
        """Sessions whose agents hold a slot only for their running tasks."""
        return [a.session_id for a in self._agents.values() if a.running_tasks]

    # --- slots ---------------------------------------------------------------------------

    def _check_open(self) -> None:
        if self._closed:
            raise Unavailable("atomizerd is shutting down; retry in a moment")

    def _held_by_tasks(self) -> str:
        busy = self.busy_with_tasks()
        if not busy:
            return ""
        return f"; sessions running background tasks hold the pool: {', '.join(sorted(busy))}"

    def _evict_for(self, waiter: Waiter) -> bool:
        """Stops the idle agent the pool can best spare, for `waiter` (its slot passes to it
        once the agent is gone); False when no agent can be evicted."""
        victim = self._eviction_victim()
        if victim is None:
            return False
        victim.successor = waiter
        log.info("evicting least-recently-used agent", session_id=victim.session_id)
        self.telemetry.agent_evicted()
        self._begin_stop(victim, "evicted for another session")
        return True

    def _eviction_victim(self) -> Agent | None:
        """A spare first (no session loses its warm agent for it), else the idle agent used
        least recently."""
        idle = [
            a
            for a in self._agents.values()
            if a.state is S.READY and a.successor is None and not a.running_tasks
        ]
        return min(idle, key=lambda a: (a.spare_for is None, a.idle_since), default=None)

    # --- spawning and stopping -----------------------------------------------------------

    def _new_agent(self, session_id: str) -> Agent:
        agent = Agent(
            session_id, Lifecycle(f"agent of {session_id}", S.SPAWNING, AGENT_TRANSITIONS)
        )
        self._agents[session_id] = agent
        return agent

    def _launch(self, agent: Agent, record: SessionRecord) -> asyncio.Task[None]:
        """Starts the agent in a task of its own (a shutdown cancels it: `_abort_starts`)."""
        task = asyncio.ensure_future(self._start(agent, record))
        agent.starting = task
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        task.add_done_callback(agent.start_done)
        return task

    async def _start(self, agent: Agent, record: SessionRecord) -> None:
        """SPAWNING → READY or LEASED (or STOPPING and an exception)."""
        sid = agent.session_id
        try:
            resume = record.agent_started
            seed = "" if resume else self._seeds.pop(sid, "")
            spec = self.launcher.spec_for(record, resume=resume, seed=seed)
            if agent.json_schema is not None:
                spec = dataclasses.replace(
                    spec, initialize={**spec.initialize, "jsonSchema": dict(agent.json_schema)}
                )
            label = {"session_id": sid, "agent_session_id": record.agent_session_id}
            agent.transport = await self._spawner(dataclasses.replace(spec, label=label))
            agent.resumed = resume
            self._record_process(agent.transport, sid)
            self._watch_exit(agent)
            log.info(
                "agent process started", session_id=sid, pid=agent.transport.pid, resume=resume
            )
            await handshake(agent, spec, record, self.config.agent)
            self._check_open()  # the daemon began stopping during the spawn
        except BaseException as e:
            reason = spawn_failure_reason(e)
            if reason is not None:
                self.telemetry.spawn_failed(reason)
            if isinstance(e, asyncio.CancelledError) and agent.transport is not None:
                agent.transport.kill()  # abandoned before it served anyone: no grace needed
            self._begin_stop(agent, "its start failed")
            agent.settled.set()
            raise
        agent.lifecycle.move(S.LEASED if agent.lease_wanted else S.READY)
        agent.idle_since = asyncio.get_running_loop().time()
        agent.settled.set()
        if agent.state is S.READY:
            if agent.spare_for is None:
                self._read_while_idle(agent)
            self.slots.dispatch()

    def _watch_exit(self, agent: Agent) -> None:
        """An agent whose process exits while idle (a spare, or a session's warm agent) is
        forgotten at once: its slot frees and a spare is replaced."""

        async def watch() -> None:
            await agent.transport_or_fail().wait_exit()
            if agent.state is S.READY:
                self._begin_stop(agent, "its process exited while idle")

        task = asyncio.ensure_future(watch())
        agent.watcher = task
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _read_while_idle(self, agent: Agent) -> None:
        """A session's READY agent is read all the same: what it does on its own (task
        ends, turns it starts) is followed as it happens (sessions/idle.py)."""
        if self.idle_reader is None or agent.spare_for is not None or agent.reader is not None:
            return
        task = asyncio.ensure_future(self.idle_reader(agent))
        agent.reader = task
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        task.add_done_callback(agent.reader_done)

    def _stop_reading(self, agent: Agent) -> None:
        reader, agent.reader = agent.reader, None
        if reader is not None and not reader.done():
            reader.cancel()

    def _record_process(self, transport: PooledTransport, session_id: str) -> None:
        # The agent's group, and its shim's when it has one: a later daemon that does not
        # adopt them kills them by these (pid + start time: never a reused pid).
        for pgid, start_time in process_groups(transport):
            self.store.record_agent_process(
                AgentProcessRecord(pgid=pgid, session_id=session_id, start_time=start_time)
            )

    def _begin_stop(self, agent: Agent, why: str) -> None:
        """→ STOPPING now (so nobody leases or evicts it), the process stopped in the
        background, → GONE when it has exited."""
        if agent.state is S.STOPPING or agent.state is S.GONE:
            return
        self._stop_reading(agent)
        agent.lifecycle.move(S.STOPPING)
        task = asyncio.ensure_future(self._stop(agent, why))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _stop(self, agent: Agent, why: str) -> None:
        transport = agent.transport
        try:
            if transport is not None:
                await transport.stop(self.config.agent.stop_grace)
        except Exception:
            log.exception("stopping an agent failed", session_id=agent.session_id)
        finally:
            self._gone(agent)
            log.info(
                "agent process stopped",
                session_id=agent.session_id,
                reason=why,
                pid=transport.pid if transport else None,
                returncode=transport.returncode if transport else None,
            )

    def _gone(self, agent: Agent) -> None:
        agent.lifecycle.move(S.GONE)
        sid = agent.session_id
        if self._agents.get(sid) is agent:
            del self._agents[sid]
        transport = agent.transport
        if transport is not None:
            for pgid, _ in process_groups(transport):
                self.store.forget_agent_process(pgid)
        self.launcher.cleanup(sid)
        if agent.spare_for is None:
            self.agent_gone(sid)
        agent.settled.set()
        agent.gone.set()
        successor, agent.successor = agent.successor, None
        self.slots.pass_on(successor)
        if agent.spare_for is not None:
            log.info("spare agent gone; replacing it", mode=agent.spare_for)
        self._soon(self.replenish_spares)

    def replenish_spares(self) -> None:
        """Starts spare agents where slots are free (agents/pool.py); a bare core has none."""

    def _soon(self, callback: Callable[[], None]) -> None:
        if not self._closed:
            asyncio.get_running_loop().call_soon(callback)
