"""The words the agent layer speaks: its errors, what identifies an agent's process, and the
items an agent delivers. Both the abstraction (`transport.py`) and its implementations
(`process.py`, `shim_client.py`, the scripted agent of the tests) use them; nothing here knows
about pipes, shims or signals.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TypeAlias

from atomizerd.agents.protocol import AgentMessage

__all__ = [
    "AgentError",
    "AgentExited",
    "AgentItem",
    "AgentSpawnError",
    "ControlError",
    "ControlTimeout",
    "LineTooLong",
    "ProcessIdentity",
    "WriteTimeout",
]


class AgentError(Exception):
    """Base class of agent process failures."""


class AgentSpawnError(AgentError):
    """The agent program could not be started (missing, not executable, bad cwd)."""


class AgentExited(AgentError):
    """The agent process has ended (or takes no more input).

    Raised by writes and control requests to such a process, and delivered as the last item of
    `receive()` (with the exit status and the stderr tail) when the process ends.
    """

    __match_args__ = ("returncode",)

    def __init__(self, message: str, returncode: int | None = None, stderr_tail: str = "") -> None:
        super().__init__(message)
        self.returncode = returncode  # negative for a signal (-9: SIGKILL); None: still running
        self.stderr_tail = stderr_tail


class ControlError(AgentError):
    """The agent answered a control request with an error."""


class ControlTimeout(AgentError, TimeoutError):
    """The agent did not answer a control request in time."""


class WriteTimeout(AgentError):
    """The agent did not take a line written to its stdin in time (it is not reading).

    Part of the line may be in the pipe already, so every later write to that process fails
    with this too: stop the process. Not a TimeoutError, so it is never mistaken for a
    caller's own `asyncio.timeout`.
    """


@dataclass(frozen=True, slots=True)
class LineTooLong:
    """A stdout line of `size` bytes was longer than `limit` and was dropped."""

    size: int
    limit: int


@dataclass(frozen=True, slots=True)
class ProcessIdentity:
    """What to record to find (and safely kill) this process's group later."""

    pid: int
    pgid: int
    start_time: int | None  # clock ticks since boot; None if it exited before it was read


AgentItem: TypeAlias = AgentMessage | LineTooLong | AgentExited
