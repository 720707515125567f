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

from atomizerd.agents.transport import LaunchSpec, PooledTransport
from atomizerd.agents.vocabulary import AgentError, AgentSpawnError
from atomizerd.errors import AtomizerError
from atomizerd.statemachine import Lifecycle
from atomizerd.store.db import SessionRecord


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
