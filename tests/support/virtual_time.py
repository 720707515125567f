"""An asyncio event loop on a virtual clock, for deterministic tests of the daemon's core.

When every task is waiting and the next thing due is a timer, the clock jumps to it instead of
sleeping: `await asyncio.sleep(300)` returns at once with `loop.time()` 300 s later, and
watchdogs, queue timeouts and backoffs fire in a fixed order whatever the machine's load. The
core reads time only through `loop.time()`, so it cannot tell. Only in-process work may run on
it (no sockets or subprocesses: real I/O would be starved by the jumps).
"""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine
from typing import Any, TypeVar

T = TypeVar("T")


class VirtualTimeLoop(asyncio.SelectorEventLoop):
    def __init__(self) -> None:
        super().__init__()
        self._now = 0.0

    def time(self) -> float:
        return self._now

    def _run_once(self) -> None:
        # Nothing ready to run: jump to the earliest timer, so the selector does not block.
        ready = self._ready  # type: ignore[attr-defined]
        scheduled = self._scheduled  # type: ignore[attr-defined]
        if not ready and scheduled:
            self._now = max(self._now, scheduled[0].when())
        super()._run_once()  # type: ignore[misc]

    def advance(self, seconds: float) -> None:
        """Moves the clock forward (timers due by then fire on the next iterations)."""
        self._now += seconds


def run(coro: Coroutine[Any, Any, T]) -> T:
    """Runs `coro` to completion on a fresh virtual-time loop."""
    loop = VirtualTimeLoop()
    try:
        return loop.run_until_complete(coro)
    finally:
        loop.run_until_complete(loop.shutdown_asyncgens())
        loop.close()
