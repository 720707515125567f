"""What the pool and the turn runner need of one live agent, and how agents are started.

`AgentTransport` is one running agent; `DurableAgent` is what a restart needs of an agent that
may outlive the daemon (the turn journal, the hand-over, adoption); the pool holds both
(`PooledTransport`). The errors and items they speak are in `vocabulary.py`. `AgentProcess`
(the real `claude` CLI over its pipes or a shim, `process.py`, `shim_client.py`) is the
implementation; the in-process tests of the core drive a scripted one
(`tests/support/scripted_agent.py`). Nothing above this line knows about pipes, pids or signals
beyond what is declared here.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

from atomizerd.agents.vocabulary import AgentItem, ProcessIdentity

if TYPE_CHECKING:
    from atomizerd.agents.shim_client import ShimSettings


@dataclass(frozen=True)
class LaunchSpec:
    """Everything fixed when an agent process starts."""

    argv: list[str]
    env: dict[str, str]
    cwd: str
    # Extra fields of the CLI's `initialize` control request sent right after the spawn
    # (what must not be visible in argv, such as the system prompt).
    initialize: dict[str, Any] = field(default_factory=dict)
    umask: int | None = None
    # Whose agent this is, for a daemon that adopts it after a restart (agents under a shim).
    label: dict[str, Any] = field(default_factory=dict)


class AgentTransport(Protocol):
    """One running agent: its identity, its output, its input and its end."""

    pid: int
    pgid: int
    start_time: int | None

    @property
    def alive(self) -> bool: ...

    @property
    def returncode(self) -> int | None: ...

    def stderr_tail(self) -> str: ...

    async def wait_exit(self) -> None: ...

    async def receive(self) -> AgentItem: ...

    def receive_nowait(self) -> AgentItem | None: ...

    def peek(self) -> AgentItem | None:
        """The next item without taking it; None if nothing has arrived."""
        ...

    async def wait_output(self) -> None:
        """Returns once an item (or the agent's end) is there to take."""
        ...

    async def send_user_message(self, text: str, uuid: str = "") -> None:
        """A user line; the CLI replays `uuid` when it takes the line into a turn."""
        ...

    async def send_user_content(self, content: list[dict[str, Any]], uuid: str = "") -> None:
        """A user message of content blocks (text, images, documents)."""
        ...

    async def respond_control(self, request_id: str, response: Mapping[str, Any]) -> None: ...

    async def respond_control_error(self, request_id: str, error: str) -> None: ...

    async def initialize(self, *, timeout: float, **fields: Any) -> dict[str, Any]: ...

    async def interrupt(self, *, timeout: float) -> dict[str, Any]: ...

    async def request(self, subtype: str, *, timeout: float, **fields: Any) -> dict[str, Any]:
        """Any other control request (e.g. `set_model`); raises on an error answer."""
        ...

    async def stop(self, grace: float) -> int | None: ...

    def kill(self) -> None: ...


class DurableAgent(Protocol):
    """What a restart needs of an agent that may outlive the daemon (`agent.survive_restart`):
    the turn journal (sessions/journal.py) leaves records with it, a planned restart lets it go
    (`detach`), and adoption (daemon/adoption.py) reads on from where the previous daemon was.
    An agent on the daemon's own pipes is not `durable`: it is never detached, and what it is
    asked to record is dropped."""

    received: int  # messages taken from this agent's output so far
    helper: ProcessIdentity | None  # the shim that holds the agent's pipes, if any

    @property
    def durable(self) -> bool: ...

    @property
    def boundary(self) -> tuple[int, int]:
        """The stream position after the last whole line taken, and the count of messages
        taken up to it: where a turn starting now begins."""
        ...

    def record(self, payload: bytes) -> None: ...

    def forget_before(self, offset: int) -> None: ...

    def detach(self) -> None: ...

    async def drained(self) -> None: ...


class PooledTransport(AgentTransport, DurableAgent, Protocol):
    """What the pool holds and the turn runner drives: a transport that also answers for its
    durability."""


Spawner = Callable[[LaunchSpec], Awaitable[PooledTransport]]


def process_spawner(
    *, max_line_bytes: int, stderr_tail_bytes: int, write_timeout: float
) -> Spawner:
    """Starts real agent processes."""
    from atomizerd.agents.process import AgentProcess

    async def spawn(spec: LaunchSpec) -> PooledTransport:
        return await AgentProcess.spawn(
            spec.argv,
            env=spec.env,
            cwd=spec.cwd,
            max_line_bytes=max_line_bytes,
            stderr_tail_bytes=stderr_tail_bytes,
            write_timeout=write_timeout,
            umask=spec.umask,
        )

    return spawn


def shim_spawner(settings: ShimSettings) -> Spawner:
    """Starts agents under shims of their own, so they outlive the daemon (shim_client.py)."""
    from atomizerd.agents import shim_client

    async def spawn(spec: LaunchSpec) -> PooledTransport:
        process = await shim_client.spawn(
            settings, spec.argv, env=spec.env, cwd=spec.cwd, umask=spec.umask
        )
        link = process.link
        assert isinstance(link, shim_client.ShimLink)
        link.set_label(spec.label)
        return process

    return spawn
