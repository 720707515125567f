"""The daemon's side of a database outage (atomizerd/store/outage.py): the health status
follows the database, and the store is reconnected with a bounded backoff.

- The store reports the database down (a call failed for want of it) on whatever thread saw
  it; the watch takes it to the loop: the standard gRPC health status goes NOT_SERVING.
- Then, until it works: a probe on a thread of its own (a new connection: the loop never
  waits for a dead server), and when that succeeds the store's own connection is made again
  on the loop (with the host's lock). Waits between tries double from `FIRST_RETRY` up to
  `MAX_RETRY`: a server back after 30 s is found within `MAX_RETRY` seconds.
- Back up: SERVING again (unless the daemon is stopping); what waited to be stored is stored
  by its owners' own retries (`TurnRunner._settle_later`).
- While up, PostgreSQL's connection is looked at every `CHECK_INTERVAL` seconds (`SELECT 1`),
  so that a server restarted while nothing was written is noticed before a client is.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Awaitable, Callable

import structlog

from atomizerd.store.outage import ReportsOutage

log = structlog.get_logger("atomizerd.daemon.dbwatch")

FIRST_RETRY = 0.1
MAX_RETRY = 2.0
CHECK_INTERVAL = 5.0


class DatabaseWatch:
    def __init__(
        self,
        db: ReportsOutage,
        set_serving: Callable[[bool], Awaitable[None]],
        *,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.db = db
        self._set_serving = set_serving
        self._sleep = sleep
        self._clock = clock
        self._changed = asyncio.Event()
        self.outages = 0  # how many times the database went down
        self.reconnects = 0
        loop = asyncio.get_running_loop()

        def changed(up: bool) -> None:
            loop.call_soon_threadsafe(self._changed.set)

        db.on_availability(changed)

    async def run(self) -> None:
        while True:
            if not self.db.down:
                self._changed.clear()
                if self.db.fail_fast:  # a server: look at the connection now and then
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(self._changed.wait(), CHECK_INTERVAL)
                    if not self.db.down:
                        try:
                            self.db.check()
                        except Exception:  # not an outage: the call that meets it reports it
                            log.exception("database check failed")
                else:
                    await self._changed.wait()
                continue
            await self._ride_out()

    async def _ride_out(self) -> None:
        """The database is down: NOT_SERVING until it is back, reconnecting meanwhile."""
        self.outages += 1
        since = self._clock()
        await self._set_serving(False)
        delay = FIRST_RETRY
        tries = 0
        while self.db.down:
            await self._sleep(delay)
            delay = min(delay * 2, MAX_RETRY)
            tries += 1
            if not await asyncio.to_thread(self.db.reachable):
                continue
            if self.db.recover():
                break
        self.reconnects += 1
        log.info(
            "database reconnected",
            seconds=round(self._clock() - since, 3),
            tries=tries,
        )
        await self._set_serving(True)
