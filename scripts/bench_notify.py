"""The notification rows of scripts/bench: event → POST received (p50/p99) against the floor of
a bare POST to the same loopback receiver, and a turn's round trip with a receiver that takes a
second per request against one with no webhooks (a slow receiver must not slow a turn).

Synchronous (the bench runs it in a thread): the real daemon with the fake agent, the tests'
real HTTP receiver on loopback.
"""

from __future__ import annotations

import asyncio
import statistics
import time
from pathlib import Path
from typing import Any

from atomizer.v1 import session_pb2 as pb

from atomizerd.config.notify import parse_webhooks
from atomizerd.notify.http import post
from tests.conftest import stubs_for
from tests.support.daemon import RunningDaemon
from tests.support.webhook_receiver import Receiver

SECRET = "bench-secret"
SLOW_RECEIVER_S = 1.0


def _pct(xs: list[float], p: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, max(0, round(p / 100 * (len(xs) - 1))))]


def _floor(r: Receiver, n: int) -> list[float]:
    """A bare POST of a delivery-sized body to the receiver, from an asyncio client."""
    (hook,) = parse_webhooks([{"url": r.url, "secret": SECRET}])
    body = b'{"event":"turn_completed","data":{}}'

    async def run() -> list[float]:
        out = []
        for _ in range(n):
            t0 = time.perf_counter()
            await post(hook, body, {}, 10.0)
            out.append(time.perf_counter() - t0)
        return out

    return asyncio.run(run())


def _turns(d: RunningDaemon, n: int) -> list[float]:
    stubs = stubs_for(d.channel())
    stubs.sessions.CreateSession(pb.CreateSessionRequest(session_id="bench"), timeout=30)
    times = []
    for i in range(n):
        t0 = time.perf_counter()
        list(stubs.sessions.SendMessage(pb.SendMessageRequest(session_id="bench", text=f"t{i}")))
        times.append(time.perf_counter() - t0)
    return times


def measure(workdir: Path, turns: int) -> dict[str, Any]:
    out: dict[str, Any] = {"turns": turns}
    with Receiver(SECRET) as r:
        floor = _floor(r, turns)
        hook = {"url": r.url, "secret": SECRET, "events": ["turn_completed"]}
        r.received.clear()
        with RunningDaemon(workdir / "notify-fast", {"notify": {"webhooks": [hook]}}) as d:
            _turns(d, turns)
            got = r.wait_for(turns, event="turn_completed")
        latency = [g.wall - g.doc["time"] for g in got]
    out.update(
        floor_p50_s=statistics.median(floor),
        floor_p99_s=_pct(floor, 99),
        ours_p50_s=statistics.median(latency),
        ours_p99_s=_pct(latency, 99),
    )
    n = max(turns // 4, 10)
    with RunningDaemon(workdir / "notify-none") as d:
        plain = _turns(d, n)
    with Receiver(SECRET) as slow:
        slow.delay = SLOW_RECEIVER_S
        hook = {"url": slow.url, "secret": SECRET}
        with RunningDaemon(workdir / "notify-slow", {"notify": {"webhooks": [hook]}}) as d:
            slowed = _turns(d, n)
    out.update(
        plain_turn_p50_s=statistics.median(plain),
        slow_receiver_turn_p50_s=statistics.median(slowed),
    )
    return out
