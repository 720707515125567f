"""The bounded pool of live agent processes.

At most `pool.max_live` processes (each costs ~200 MiB). A session keeps its process between
turns; when the pool is full the least-recently-used idle process is evicted and its session
resumes later with `--resume`. When every process is busy, a turn waits in a bounded queue
(`pool.max_queued`, `pool.queue_timeout`) and beyond that fails with RESOURCE_EXHAUSTED.
"""

from __future__ import annotations

import asyncio
import time
from collections import OrderedDict, deque
from dataclasses import dataclass, field

import structlog

from atomizerd.agents.process import AgentError, AgentProcess, AgentSpawnError
from atomizerd.atomizer.launcher import Launcher
from atomizerd.daemon.config import Config
from atomizerd.errors import ResourceExhausted, Unavailable
from atomizerd.store.db import AgentProcessRecord, SessionRecord, Store

log = structlog.get_logger("atomizerd.agents.pool")

# What the CLI says when --resume names a conversation whose transcript is gone.
_NO_CONVERSATION = "No conversation found"


class ResumeFailed(Exception):
    """The agent could not resume the session's conversation (its transcript is gone)."""


@dataclass(eq=False)
class LiveAgent:
    session_id: str
    process: AgentProcess
    resumed: bool
    busy: bool = False
    idle_since: float = field(default_factory=time.monotonic)
    mcp_servers: list[tuple[str, str]] = field(default_factory=list)
    # Cleared when a turn found the process unhealthy: it is stopped instead of reused.
    reusable: bool = True


class AgentPool:
    def __init__(self, config: Config, store: Store, launcher: Launcher) -> None:
        self.config = config
        self.store = store
        self.launcher = launcher
        self._agents: OrderedDict[str, LiveAgent] = OrderedDict()  # LRU order, oldest first
        self._spawning: dict[str, asyncio.Future[LiveAgent]] = {}
        self._waiters: deque[asyncio.Future[None]] = deque()
        self._closed = False
        self._retiring: set[asyncio.Future[None]] = set()
        self._seeds: dict[str, str] = {}
        self._stopping: set[LiveAgent] = set()

    # --- introspection -------------------------------------------------------------------

    @property
    def live_count(self) -> int:
        # Processes being stopped still hold their memory: they count until they are gone.
        starting = sum(1 for sid in self._spawning if sid not in self._agents)
        return len(self._agents) + starting + len(self._stopping)

    @property
    def queued(self) -> int:
        return len(self._waiters)

    def state(self, session_id: str) -> str:
        if session_id in self._spawning:
            return "starting"
        agent = self._agents.get(session_id)
        if agent is None or not agent.process.alive:
            return "idle"
        return "busy" if agent.busy else "ready"

    def mcp_servers(self, session_id: str) -> list[tuple[str, str]]:
        agent = self._agents.get(session_id)
        return list(agent.mcp_servers) if agent else []

    def candidates(self) -> list[tuple[str, float, bool]]:
        """(session_id, idle since (monotonic), alive) for every idle process, for the reaper."""
        return [
            (a.session_id, a.idle_since, a.process.alive)
            for a in self._agents.values()
            if not a.busy
        ]

    # --- leasing -------------------------------------------------------------------------

    def seed_next_spawn(self, session_id: str, seed: str) -> None:
        """Earlier conversation to put in the next spawn's system prompt (a reseeded session)."""
        self._seeds[session_id] = seed

    async def prewarm(self, record: SessionRecord) -> None:
        """Starts the session's process if a slot is free; never evicts anyone for it."""
        if self._closed or record.session_id in self._agents or record.session_id in self._spawning:
            return
        if self.live_count >= self.config.pool.max_live:
            return
        try:
            await self._spawn(record)
        except (AgentSpawnError, ResumeFailed) as e:
            log.warning("prewarm failed", session_id=record.session_id, error=str(e))

    async def acquire(self, record: SessionRecord) -> LiveAgent:
        """The session's live process, marked busy; spawned (or resumed) when needed."""
        sid = record.session_id
        while True:
            if self._closed:
                raise Unavailable("atomizerd is shutting down; retry in a moment")
            if sid in self._spawning:
                await asyncio.shield(self._spawning[sid])
                continue
            agent = self._agents.get(sid)
            if agent is not None:
                if agent.process.alive and agent.reusable:
                    agent.busy = True
                    self._agents.move_to_end(sid)
                    return agent
                await self.retire(sid)
                continue
            if self.live_count < self.config.pool.max_live or await self._evict_one():
                agent = await self._spawn(record)
                agent.busy = True
                return agent
            await self._wait_for_slot()

    def release(self, agent: LiveAgent) -> None:
        agent.busy = False
        agent.idle_since = time.monotonic()
        if not (agent.process.alive and agent.reusable):
            task = asyncio.ensure_future(self.retire(agent.session_id))
            self._retiring.add(task)
            task.add_done_callback(self._retiring.discard)
        self._wake_one()

    async def retire(self, session_id: str) -> None:
        """Stops the session's process (if any); the session resumes on its next message."""
        spawning = self._spawning.get(session_id)
        if spawning is not None:
            await asyncio.gather(asyncio.shield(spawning), return_exceptions=True)
        agent = self._agents.pop(session_id, None)
        if agent is None:
            return
        self._stopping.add(agent)
        try:
            await agent.process.stop(self.config.agent.stop_grace)
        finally:
            self._stopping.discard(agent)
            self._discard(agent)
            log.info(
                "agent process stopped",
                session_id=session_id,
                pid=agent.process.pid,
                returncode=agent.process.returncode,
            )
            self._wake_one()

    def _discard(self, agent: LiveAgent) -> None:
        """Forgets an agent that has already been stopped."""
        sid = agent.session_id
        # While it was being stopped, its session may have started a new agent: keep that one.
        if self._agents.get(sid) is agent:
            del self._agents[sid]
        if agent.process.start_time is not None:
            self.store.forget_agent_process(agent.process.pgid)
        if sid not in self._agents and sid not in self._spawning:
            self.launcher.cleanup(sid)

    def kill_all(self) -> None:
        """SIGKILL every agent's process group now (shutdown past its grace period)."""
        for agent in [*self._agents.values(), *self._stopping]:
            agent.process.kill()

    async def close(self) -> None:
        self._closed = True
        for waiter in self._waiters:
            if not waiter.done():
                waiter.cancel()
        await asyncio.gather(
            *(self.retire(sid) for sid in list(self._agents)), return_exceptions=True
        )

    # --- internals -----------------------------------------------------------------------

    async def _spawn(self, record: SessionRecord) -> LiveAgent:
        sid = record.session_id
        future: asyncio.Future[LiveAgent] = asyncio.get_running_loop().create_future()
        self._spawning[sid] = future
        try:
            resume = record.agent_started
            seed = "" if resume else self._seeds.pop(sid, "")
            spec = self.launcher.spec_for(record, resume=resume, seed=seed)
            process = await AgentProcess.spawn(
                spec.argv,
                env=spec.env,
                cwd=spec.cwd,
                max_line_bytes=self.config.agent.max_line_bytes,
                stderr_tail_bytes=self.config.agent.stderr_tail_bytes,
            )
            if process.start_time is not None:
                self.store.record_agent_process(
                    AgentProcessRecord(
                        pgid=process.pgid, session_id=sid, start_time=process.start_time
                    )
                )
            agent = LiveAgent(session_id=sid, process=process, resumed=resume)
            self._agents[sid] = agent
            log.info("agent process started", session_id=sid, pid=process.pid, resume=resume)
            if not await self._initialize(agent) and resume and await self._resume_failed(agent):
                self._discard(agent)
                raise ResumeFailed(
                    f"the agent could not resume conversation {record.agent_session_id}"
                )
            future.set_result(agent)
            return agent
        except BaseException as e:
            future.set_exception(e)
            future.exception()  # retrieved: waiters re-check state, nobody else must see it
            raise
        finally:
            del self._spawning[sid]
            self._wake_one()

    async def _initialize(self, agent: LiveAgent) -> bool:
        """The CLI's `initialize` handshake at spawn makes the first turn faster (DESIGN.md).
        An agent that does not answer still gets its turns."""
        try:
            await agent.process.initialize(timeout=self.config.agent.first_event_timeout)
            return True
        except AgentError as e:
            log.warning(
                "agent did not complete initialize",
                session_id=agent.session_id,
                error=str(e),
                stderr_tail=agent.process.stderr_tail()[-500:],
            )
            return False

    async def _resume_failed(self, agent: LiveAgent) -> bool:
        """After a failed handshake: did the CLI refuse to resume? (It says so and exits.)"""
        await agent.process.stop(self.config.agent.stop_grace)
        return _NO_CONVERSATION in agent.process.stderr_tail()

    async def _evict_one(self) -> bool:
        for sid, agent in self._agents.items():  # oldest first
            if not agent.busy:
                log.info("evicting least-recently-used agent process", session_id=sid)
                await self.retire(sid)
                return True
        return False

    async def _wait_for_slot(self) -> None:
        if len(self._waiters) >= self.config.pool.max_queued:
            raise ResourceExhausted(
                f"all {self.config.pool.max_live} agent processes are busy and "
                f"{len(self._waiters)} turns are already waiting (pool.max_queued); retry later"
            )
        waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiters.append(waiter)
        try:
            await asyncio.wait_for(waiter, self.config.pool.queue_timeout)
        except TimeoutError:
            raise ResourceExhausted(
                f"no agent process became free within {self.config.pool.queue_timeout:g} s "
                "(pool.queue_timeout); retry later"
            ) from None
        finally:
            if waiter in self._waiters:
                self._waiters.remove(waiter)

    def _wake_one(self) -> None:
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)
                return
