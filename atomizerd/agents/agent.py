"""One agent of one session, as the pool holds it: its lifecycle and what is known of it.

The agent lifecycle (docs/architecture.md, "Agent"):

    SPAWNING ──▶ READY ◀──▶ LEASED
        │          │           │
        └──────────┴───────────┴──▶ STOPPING ──▶ GONE

The transitions are in one place (`AGENT_TRANSITIONS`); the pool (agents/pool.py) is the only
owner of an `Agent` and the only one that moves its state.
"""

from __future__ import annotations

import asyncio
import enum
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Protocol

import structlog

from atomizerd.agents.transport import LaunchSpec, PooledTransport
from atomizerd.agents.vocabulary import AgentError, AgentSpawnError
from atomizerd.config.agents import AgentConfig
from atomizerd.errors import AtomizerError
from atomizerd.model import SessionRecord
from atomizerd.statemachine import Lifecycle

log = structlog.get_logger("atomizerd.agents.pool")

# What the CLI says when --resume names a conversation whose transcript is gone.
_NO_CONVERSATION = "No conversation found"


class ResumeFailed(Exception):
    """The agent could not resume the session's conversation (its transcript is gone)."""


class DiedAtStart(AgentError):
    """The agent exited during its start-up handshake: it never saw a message, so starting it
    again is safe."""

    def __init__(self, message: str, returncode: int | None, stderr_tail: str) -> None:
        super().__init__(message)
        self.returncode = returncode
        self.stderr_tail = stderr_tail


def spawn_failure_reason(exc: BaseException) -> str | None:
    """Why an agent's start failed, as telemetry names it (`telemetry.SPAWN_REASONS`); None for
    a cancelled start (the daemon stopping), which is not a failure."""
    if not isinstance(exc, Exception):
        return None
    if isinstance(exc, DiedAtStart):
        return "died_at_start"
    if isinstance(exc, ResumeFailed):
        return "resume_failed"
    if isinstance(exc, AgentSpawnError):
        return "spawn_error"
    if isinstance(exc, AtomizerError):
        return "refused"
    return "error"


class AgentState(enum.Enum):
    SPAWNING = "spawning"
    READY = "ready"
    LEASED = "leased"
    STOPPING = "stopping"
    GONE = "gone"


S = AgentState
AGENT_TRANSITIONS: dict[AgentState, frozenset[AgentState]] = {
    S.SPAWNING: frozenset({S.READY, S.LEASED, S.STOPPING}),
    S.READY: frozenset({S.LEASED, S.STOPPING}),
    S.LEASED: frozenset({S.READY, S.STOPPING}),
    S.STOPPING: frozenset({S.GONE}),
    S.GONE: frozenset(),
}


class LaunchSource(Protocol):
    """Where the pool gets a session's command line (the Atomizer layer's launcher)."""

    def spec_for(self, record: SessionRecord, *, resume: bool, seed: str = "") -> LaunchSpec: ...

    def cleanup(self, session_id: str) -> None: ...


@dataclass(eq=False)
class Waiter:
    """A lease waiting for a slot; `granted` resolves when the slot is its own."""

    granted: asyncio.Future[None]


@dataclass(eq=False)
class Agent:
    """One agent of one session. The pool is its only owner: nothing else moves its state."""

    session_id: str
    lifecycle: Lifecycle[AgentState]
    transport: PooledTransport | None = None
    resumed: bool = False
    idle_since: float = 0.0
    mcp_servers: list[tuple[str, str]] = field(default_factory=list)
    # The waiter this agent's slot passes to once it is gone (it was evicted for that waiter).
    successor: Waiter | None = None
    # False once the lease that asked for this spawn gave up: the agent then becomes READY.
    lease_wanted: bool = True
    settled: asyncio.Event = field(default_factory=asyncio.Event)  # left SPAWNING
    gone: asyncio.Event = field(default_factory=asyncio.Event)
    # The mode this agent is a spare for (no session has adopted it yet); None otherwise.
    spare_for: str | None = None
    # A spare's reserved conversation id (the adopting session takes it).
    agent_session_id: str = ""
    watcher: asyncio.Task[None] | None = None  # notices its exit while idle
    # Reads the agent's output while it is READY (the agent acts on its own between turns).
    reader: asyncio.Task[None] | None = None
    # Tasks of the agent still running (told by whoever reads its output): it is busy.
    running_tasks: int = 0
    starting: asyncio.Task[None] | None = None  # its start (SPAWNING), cancelled by a shutdown
    # The JSON Schema its answers must satisfy (a structured turn's own agent: the CLI takes
    # it once, in `initialize`); None for an ordinary agent.
    json_schema: Mapping[str, object] | None = None

    @property
    def state(self) -> AgentState:
        return self.lifecycle.state

    @property
    def alive(self) -> bool:
        return self.transport is not None and self.transport.alive

    def transport_or_fail(self) -> PooledTransport:
        """The running agent's transport (a leased agent always has one)."""
        if self.transport is None:
            raise RuntimeError(f"the agent of {self.session_id} has no process")
        return self.transport

    def reader_done(self, task: asyncio.Task[None]) -> None:
        """The idle reader ended (cancelled when leased or stopped; an error is logged)."""
        if self.reader is task:
            self.reader = None
        if not task.cancelled() and task.exception() is not None:
            log.error(
                "reading an idle agent failed",
                session_id=self.session_id,
                error=repr(task.exception()),
            )

    def start_done(self, task: asyncio.Task[None]) -> None:
        """Every start's outcome is retrieved here (also of one nobody waits for any more)."""
        self.starting = None
        if task.cancelled():
            log.info("agent start abandoned", session_id=self.session_id)
        elif (error := task.exception()) is not None:
            log.warning("agent failed to start", session_id=self.session_id, error=str(error))
        elif self.spare_for is not None:
            log.info("spare agent ready", mode=self.spare_for, spare=self.session_id)


def process_groups(transport: PooledTransport) -> list[tuple[int, int]]:
    """(pgid, start time) of the agent's process group and its shim's, where known."""
    groups = []
    if transport.start_time is not None:
        groups.append((transport.pgid, transport.start_time))
    helper = transport.helper
    if helper is not None and helper.start_time is not None:
        groups.append((helper.pgid, helper.start_time))
    return groups


async def handshake(
    agent: Agent, spec: LaunchSpec, record: SessionRecord, cfg: AgentConfig
) -> None:
    """The CLI's `initialize` at spawn readies it for the first turn and carries what must not
    be in argv (the system prompt): an agent that does not complete it is stopped and never
    serves. It could not resume its conversation (ResumeFailed), or it failed before any
    message was sent (safe to start again: DiedAtStart)."""
    transport = agent.transport
    assert transport is not None
    try:
        await transport.initialize(timeout=cfg.first_event_timeout, **spec.initialize)
        return
    except AgentError as e:
        log.warning("agent did not complete initialize", session_id=agent.session_id, error=str(e))
    await transport.stop(cfg.stop_grace)
    tail = transport.stderr_tail()
    if agent.resumed and _NO_CONVERSATION in tail:
        raise ResumeFailed(f"the agent could not resume conversation {record.agent_session_id}")
    raise DiedAtStart(
        f"the agent did not complete its start-up handshake (exit status {transport.returncode})",
        transport.returncode,
        tail,
    )
