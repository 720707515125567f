"""The event-loop lag probe: worst since start, worst of the last minute, warnings."""

from __future__ import annotations

import asyncio
import time

from structlog.testing import capture_logs

from atomizerd.daemon.loopprobe import RECENT_SECONDS, LoopProbe


def test_it_keeps_the_worst_lag_and_the_worst_of_the_last_minute() -> None:
    probe = LoopProbe(interval=0.05, log_over_ms=100.0)
    with capture_logs() as logs:
        probe.record(3.0, now=1000.2)
        probe.record(250.0, now=1000.7)  # a stall: logged
        probe.record(1.0, now=1001.1)
        probe.record(7.0, now=1030.0)
    assert probe.max_ms == 250.0
    assert probe.recent_max_ms(now=1030.5) == 250.0
    assert probe.recent_max_ms(now=1000.0 + RECENT_SECONDS + 1.5) == 7.0  # that second is old
    assert probe.recent_max_ms(now=5000.0) == 0.0
    assert probe.ticks == 4
    assert [(e["event"], e["lag_ms"]) for e in logs] == [("event loop stalled", 250.0)]


def test_a_blocked_loop_shows_as_lag_and_the_summary_is_logged_at_the_end() -> None:
    probe = LoopProbe(interval=0.001, log_over_ms=10.0)

    async def scenario() -> None:
        task = asyncio.create_task(probe.run())
        await asyncio.sleep(0.02)  # the probe is asleep, due within a millisecond
        time.sleep(0.05)  # noqa: ASYNC251 - the point: the loop blocked for 50 ms
        await asyncio.sleep(0.02)
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)

    with capture_logs() as logs:
        asyncio.run(scenario())
    assert probe.max_ms >= 40.0  # due within 1 ms of the block's start, woken at its end
    stalls = [e for e in logs if e["event"] == "event loop stalled"]
    worst = max(stalls, key=lambda e: e["lag_ms"])
    assert worst["lag_ms"] == round(probe.max_ms, 2)
    assert worst["cpu_ms"] < worst["lag_ms"] / 2  # the loop slept: a wait, not work
    [summary] = [e for e in logs if e["event"] == "event loop lag"]
    assert summary["max_ms"] == round(probe.max_ms, 2) and summary["ticks"] == probe.ticks


def test_an_interval_of_zero_turns_it_off() -> None:
    probe = LoopProbe(interval=0.0)
    asyncio.run(asyncio.wait_for(probe.run(), 1.0))  # returns at once
    assert not probe.enabled and probe.ticks == 0 and probe.max_ms == 0.0
