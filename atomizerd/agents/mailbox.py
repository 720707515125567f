"""The bounded mailbox of an agent's output, and the tail of its stderr.

The reader of an agent's stdout puts each parsed item here; a turn (or the idle reader) takes
them. Bounded: a full mailbox stops the reading (backpressure on the agent's pipe), never
memory.
"""

from __future__ import annotations

import asyncio
from collections import deque
from typing import TypeAlias

from atomizerd.agents.vocabulary import AgentExited, AgentItem


class StderrTail:
    """The newest `limit` bytes written to stderr."""

    def __init__(self, limit: int) -> None:
        self._limit = max(limit, 0)
        self._buf = bytearray()

    def add(self, chunk: bytes) -> None:
        self._buf += chunk
        excess = len(self._buf) - self._limit
        if excess > 0:
            del self._buf[:excess]

    def text(self) -> str:
        return self._buf.decode("utf-8", "replace")


# An item with its place in the agent's output: its index among the messages parsed (counted
# from the reader's start) and, for the last message of a line, the stream position after the
# line's newline (-1 otherwise).
Entry: TypeAlias = tuple[AgentItem, int, int]


class Mailbox:
    """A bounded FIFO of items that ends with a sticky final item.

    `put` waits while full (backpressure on the agent's stdout); after `close`, puts are
    dropped and `get` returns the queued items, then the final item forever. Waiting sides
    park on a future made only when they actually wait: nothing is allocated per item.
    """

    def __init__(self, maxsize: int) -> None:
        self._items: deque[Entry] = deque()
        self._maxsize = max(maxsize, 1)
        self._final: AgentExited | None = None
        self._getters: list[asyncio.Future[None]] = []
        self._putters: list[asyncio.Future[None]] = []

    @property
    def closed(self) -> bool:
        return self._final is not None

    @property
    def empty(self) -> bool:
        return not self._items

    async def put(self, entry: Entry) -> None:
        while len(self._items) >= self._maxsize and self._final is None:
            await self._park(self._putters)
        if self._final is None:
            self._items.append(entry)
            wake(self._getters)

    def close(self, final: AgentExited) -> None:
        if self._final is None:
            self._final = final
            wake(self._getters)
            wake(self._putters)

    def peek(self) -> Entry | None:
        """The next entry without taking it (or the final one), else None."""
        if self._items:
            return self._items[0]
        return None if self._final is None else (self._final, -1, -1)

    async def wait_nonempty(self) -> None:
        """Returns once an entry (or the end) is there to take."""
        while not self._items and self._final is None:
            await self._park(self._getters)

    def get_nowait(self) -> Entry | None:
        """The next entry if one is there (or the final one), else None."""
        if self._items:
            entry = self._items.popleft()
            if self._putters:
                wake(self._putters)
            return entry
        return None if self._final is None else (self._final, -1, -1)

    async def get(self) -> Entry:
        while True:
            entry = self.get_nowait()
            if entry is not None:
                return entry
            await self._park(self._getters)

    @staticmethod
    async def _park(waiters: list[asyncio.Future[None]]) -> None:
        future = asyncio.get_running_loop().create_future()
        waiters.append(future)
        try:
            await future
        finally:
            if future in waiters:
                waiters.remove(future)


def wake(waiters: list[asyncio.Future[None]]) -> None:
    for future in waiters:
        if not future.done():
            future.set_result(None)
    waiters.clear()
