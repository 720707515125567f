"""The pool's slots: `pool.max_live`, held at every instant, and one FIFO queue of waiters.

A slot is taken when a spawn is decided and given back only when the process is gone (the
pool's docstring says why). A lease that finds no free slot joins the queue, served by one
synchronous function (`dispatch`): the head waiter gets a free slot, or an idle agent is
evicted for it (the pool picks the victim) and the slot passes to the waiter the moment that
agent is gone (`pass_on`). No decision spans an `await`.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import deque
from collections.abc import Callable

from atomizerd.agents.agent import Waiter
from atomizerd.config.agents import PoolConfig
from atomizerd.errors import ResourceExhausted, Unavailable

# Evicts an idle agent for the waiter (its slot passes to it when the agent is gone); False
# when there is no agent to evict.
Evict = Callable[[Waiter], bool]


class Slots:
    def __init__(self, config: PoolConfig, evict: Evict) -> None:
        self._config = config
        self._evict = evict
        self.used = 0
        # Highest number of slots ever held at once: tests and the soak check it against the cap.
        self.peak = 0
        self._waiters: deque[Waiter] = deque()

    @property
    def free(self) -> bool:
        """A slot is free and nobody waits for one."""
        return not self._waiters and self.used < self._config.max_live

    @property
    def queued(self) -> int:
        return sum(1 for w in self._waiters if not w.granted.done())

    def take_free(self) -> None:
        self.used += 1
        self.peak = max(self.peak, self.used)
        assert self.used <= self._config.max_live, "pool slot accounting is broken"

    def give_back(self) -> None:
        """A slot no agent will use (its agent is let go, or was never made)."""
        self.used -= 1
        self.dispatch()

    async def take(self, closed: Callable[[], bool], held_by: Callable[[], str]) -> None:
        """Returns once the caller holds a slot (it must then create an agent in it)."""
        if self.free:
            self.take_free()
            return
        cfg = self._config
        if self.queued >= cfg.max_queued:
            raise ResourceExhausted(
                f"all {cfg.max_live} agent processes are busy and {self.queued} turns are "
                "already waiting (pool.max_queued); retry later"
            )
        waiter = Waiter(asyncio.get_running_loop().create_future())
        self._waiters.append(waiter)
        self.dispatch()
        try:
            # (asyncio.timeout, not wait_for: a cancel that comes with the grant must win.)
            async with asyncio.timeout(cfg.queue_timeout):
                await asyncio.shield(waiter.granted)
        except TimeoutError:
            self._abandon(waiter)
            raise ResourceExhausted(
                f"no agent process became free within {cfg.queue_timeout:g} s "
                f"(pool.queue_timeout){held_by()}; retry later"
            ) from None
        except asyncio.CancelledError:
            self._abandon(waiter)
            if closed() and not caller_cancelled():
                raise Unavailable("atomizerd is shutting down; retry in a moment") from None
            raise

    def _abandon(self, waiter: Waiter) -> None:
        """A waiter gave up: a slot it was already granted goes back to the pool."""
        granted = waiter.granted.done() and not waiter.granted.cancelled()
        if not waiter.granted.done():
            waiter.granted.cancel()
        with contextlib.suppress(ValueError):
            self._waiters.remove(waiter)
        if granted:
            self.give_back()

    def dispatch(self) -> None:
        """Serves the queue in order: a free slot, or an idle agent evicted for the waiter."""
        while self._waiters:
            head = self._waiters[0]
            if head.granted.done():  # gave up (its slot, if any, was handled by _abandon)
                self._waiters.popleft()
                continue
            if self.used < self._config.max_live:
                self._waiters.popleft()
                self.take_free()
                head.granted.set_result(None)
                continue
            if not self._evict(head):
                return
            self._waiters.popleft()

    def pass_on(self, successor: Waiter | None) -> None:
        """An agent is gone: its slot passes to the waiter it was evicted for, or back."""
        if successor is not None and not successor.granted.done():
            successor.granted.set_result(None)  # the slot changes hands; `used` is unchanged
        else:
            self.used -= 1
        self.dispatch()

    def refuse_waiters(self) -> None:
        """The pool is closing: every waiter is told so."""
        for waiter in self._waiters:
            waiter.granted.cancel()


def caller_cancelled() -> bool:
    """Whether the running task itself is being cancelled (not just something it awaited)."""
    current = asyncio.current_task()
    return current is not None and current.cancelling() > 0
