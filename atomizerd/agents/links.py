"""What an `AgentProcess` talks to: the agent's own pipes (`PipeLink`), or its shim's socket
(agents/shim_client.py) — both an `AgentLink`.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
from typing import Protocol

from atomizerd.agents.vocabulary import AgentError

# Bytes asked of a pipe per read: lines can be many MiB (base64 images in tool results).
READ_CHUNK = 256 * 1024


class PipeProtocol(asyncio.subprocess.SubprocessStreamProtocol):
    """asyncio's stream protocol plus an event set the moment the process exits."""

    def __init__(self, limit: int, loop: asyncio.AbstractEventLoop) -> None:
        super().__init__(limit=limit, loop=loop)
        self.exited = asyncio.Event()

    def process_exited(self) -> None:
        super().process_exited()
        self.exited.set()


class AgentLink(Protocol):
    """How one agent's byte streams and exit reach us: its own pipes (`PipeLink`), or the
    socket of the shim that holds them (`agents/shim_client.py`)."""

    pid: int
    exited: asyncio.Event  # set once the agent process has ended

    @property
    def returncode(self) -> int | None: ...

    async def read_stdout(self) -> bytes:
        """The next bytes of stdout; b"" at its end."""
        ...

    async def read_stderr(self) -> bytes: ...

    def write(self, data: bytes) -> None:
        """Queues bytes for stdin (BrokenPipeError / ConnectionResetError once it is closed)."""
        ...

    async def drain(self) -> None: ...

    def input_closing(self) -> bool: ...

    def close_input(self) -> None: ...

    def signal_leader(self, sig: signal.Signals) -> None:
        """Signals the agent itself (used only while its start time is unknown)."""
        ...

    def close(self) -> None: ...

    # A link to an agent that outlives the daemon keeps what a restart needs (shim_client.py).
    durable: bool

    def record(self, payload: bytes) -> None: ...

    def forget_before(self, offset: int) -> None: ...

    def detach(self) -> None: ...

    async def drained(self) -> None: ...


class PipeLink:
    """An agent started by this daemon with pipes of its own: it ends with the daemon."""

    def __init__(self, transport: asyncio.SubprocessTransport, proto: PipeProtocol) -> None:
        self._transport = transport
        self._proto = proto
        self.pid: int = transport.get_pid()
        self.exited = proto.exited

    @property
    def returncode(self) -> int | None:
        return self._transport.get_returncode()

    async def read_stdout(self) -> bytes:
        assert self._proto.stdout is not None
        return await self._proto.stdout.read(READ_CHUNK)

    async def read_stderr(self) -> bytes:
        assert self._proto.stderr is not None
        return await self._proto.stderr.read(65536)

    def write(self, data: bytes) -> None:
        assert self._proto.stdin is not None
        self._proto.stdin.write(data)

    async def drain(self) -> None:
        assert self._proto.stdin is not None
        await self._proto.stdin.drain()

    def input_closing(self) -> bool:
        stdin = self._proto.stdin
        return stdin is None or stdin.is_closing()

    def close_input(self) -> None:
        stdin = self._proto.stdin
        if stdin is not None and not stdin.is_closing():
            stdin.close()

    def signal_leader(self, sig: signal.Signals) -> None:
        with contextlib.suppress(ProcessLookupError):
            self._transport.send_signal(sig)

    def close(self) -> None:
        self._transport.close()

    durable = False  # the agent dies with this daemon: nothing to keep for the next one

    def record(self, payload: bytes) -> None:
        pass

    def forget_before(self, offset: int) -> None:
        pass

    def detach(self) -> None:
        raise AgentError("an agent on the daemon's own pipes cannot be handed over")

    async def drained(self) -> None:
        pass
