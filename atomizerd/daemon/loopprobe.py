"""How long the event loop goes without running anything: an always-on probe of its lag.

Everything the daemon serves runs on one asyncio loop, so a callback that blocks (a long SQL
statement, a scan of /proc, a walk of a big folder) delays every stream, every request and the
systemd watchdog ping alike. The probe is a task that sleeps `interval` again and again and
measures how late it wakes up: a stall of S seconds that covers one of its wake-up times shows
as a lag between S - interval and S. Any stall longer than `interval` is seen; shorter ones may
fall between two wake-ups.

It keeps the worst lag since start and the worst of each second of the last `RECENT_SECONDS`
(GetStatus reports both), logs a warning for every lag of at least `log_over_ms` and a summary
line when it stops. The warning gives the lag and the CPU time the loop's thread used since the
previous wake-up (`cpu_ms`): close to the lag, the loop was busy with our own work; much less,
it was waiting (for a CPU on a loaded machine, for the GIL held by another thread, or in a
blocking system call). A wake-up does next to nothing, so even a short interval costs little.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections import deque

import structlog

log = structlog.get_logger("atomizerd.daemon.loopprobe")

RECENT_SECONDS = 60


class LoopProbe:
    def __init__(self, interval: float = 0.05, log_over_ms: float = 100.0) -> None:
        self.interval = interval
        self.log_over_ms = log_over_ms
        self.max_ms = 0.0  # worst lag since start
        self.ticks = 0
        self.stalls_logged = 0
        # (whole second of time.monotonic(), worst lag in it), oldest first.
        self._seconds: deque[list[float]] = deque(maxlen=RECENT_SECONDS + 1)

    @property
    def enabled(self) -> bool:
        return self.interval > 0

    def recent_max_ms(self, now: float | None = None) -> float:
        """The worst lag of the last `RECENT_SECONDS` seconds."""
        since = (time.monotonic() if now is None else now) - RECENT_SECONDS
        return max((worst for second, worst in self._seconds if second >= since), default=0.0)

    def record(self, lag_ms: float, now: float, cpu_ms: float = 0.0) -> None:
        self.ticks += 1
        self.max_ms = max(self.max_ms, lag_ms)
        second = math.floor(now)
        if self._seconds and self._seconds[-1][0] == second:
            self._seconds[-1][1] = max(self._seconds[-1][1], lag_ms)
        else:
            self._seconds.append([second, lag_ms])
        if lag_ms >= self.log_over_ms:
            self.stalls_logged += 1
            log.warning("event loop stalled", lag_ms=round(lag_ms, 2), cpu_ms=round(cpu_ms, 2))

    async def run(self) -> None:
        """Runs until cancelled; then logs the worst lag seen. Returns at once if disabled."""
        if not self.enabled:
            return
        clock = time.monotonic  # the loop's own clock
        cpu = time.thread_time
        interval = self.interval
        try:
            while True:
                due = clock() + interval
                used = cpu()
                await asyncio.sleep(interval)
                now = clock()
                self.record(max(now - due, 0.0) * 1000, now, (cpu() - used) * 1000)
        finally:
            log.info(
                "event loop lag",
                max_ms=round(self.max_ms, 2),
                ticks=self.ticks,
                stalls_logged=self.stalls_logged,
                interval_ms=round(interval * 1000, 1),
            )
