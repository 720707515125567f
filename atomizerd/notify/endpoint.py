"""One webhook endpoint's deliveries: a bounded queue, stored, delivered one at a time in the
order of their events, retried with backoff.

A receiver that is down holds up only its own endpoint: its head delivery is retried (5xx,
timeouts, connection errors; never a 4xx, which refused that body) with exponential backoff
and jitter, up to `notify.give_up_after`, while later ones wait behind it in order. A full
queue drops its oldest waiting delivery (counted). Every delivery is a row of the store until
it is done with, so a restart starts again from the same queue.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import structlog

from atomizerd.config.notify import NotifyConfig, Webhook
from atomizerd.errors import StoreDown
from atomizerd.model import WebhookStatus
from atomizerd.notify import payload
from atomizerd.notify.http import DeliveryError, post
from atomizerd.store.db import Store
from atomizerd.telemetry import NULL, Telemetry

log = structlog.get_logger("atomizerd.notify")

Post = Callable[[Webhook, bytes, dict[str, str], float], Awaitable[int]]


@dataclass
class Delivery:
    body: bytes
    event: str
    created_at: float  # the event's wall-clock time (latency; survives a restart)
    give_up_at: float  # the loop's clock
    row_id: int | None = None  # None: the store could not take it (kept in memory only)
    ref: str = ""  # a permission request's id


def backoff(attempt: int, initial: float, most: float, rand: Callable[[], float]) -> float:
    """The wait before retry `attempt` (0 for the first): `initial` doubled per attempt, at
    most `most`, then drawn between half of it and all of it, so endpoints that failed
    together do not retry together."""
    ceiling = min(most, initial * 2.0 ** min(attempt, 62))
    return ceiling * (0.5 + 0.5 * rand())


class Endpoint:
    def __init__(
        self,
        hook: Webhook,
        settings: NotifyConfig,
        store: Store,
        telemetry: Telemetry = NULL,
        *,
        send: Post = post,
        rand: Callable[[], float] = random.random,
        on_delivered: Callable[[Delivery], None] = lambda d: None,
    ) -> None:
        self.hook = hook
        self.settings = settings
        self.store = store
        self.telemetry = telemetry
        self.send = send
        self.rand = rand
        self.on_delivered = on_delivered
        self.waiting: deque[Delivery] = deque()
        self.in_flight: Delivery | None = None
        self._wake = asyncio.Event()
        self.delivered = self.failed = self.dropped = 0
        self.failures_in_row = 0
        self.last_error = ""
        self.failing_since = 0.0

    # --- the queue -------------------------------------------------------------------------

    def put(self, d: Delivery) -> None:
        """Queues `d` behind the others; a full queue drops its oldest waiting one."""
        while len(self.waiting) >= self.settings.queue_size:
            old = self.waiting.popleft()
            self.dropped += 1
            self.telemetry.notify_dropped(self.hook.name)
            log.warning("webhook queue full: oldest delivery dropped", endpoint=self.hook.name)
            self._forget(old)
        self.waiting.append(d)
        self._wake.set()
        self._report()

    def give_up_at(self, created_at: float) -> float:
        """The loop's time at which a delivery of an event at `created_at` is given up."""
        age = max(time.time() - created_at, 0.0)
        return asyncio.get_running_loop().time() + self.settings.give_up_after - age

    def status(self) -> WebhookStatus:
        return WebhookStatus(
            name=self.hook.name,
            url=self.hook.shown,
            queued=len(self.waiting) + (self.in_flight is not None),
            delivered=self.delivered,
            failed=self.failed,
            dropped=self.dropped,
            failing=self.failing,
            last_error=self.last_error,
            failing_since=self.failing_since,
        )

    @property
    def failing(self) -> bool:
        return self.failures_in_row >= self.settings.failing_after

    # --- the worker ------------------------------------------------------------------------

    async def run(self) -> None:
        """Delivers the queue, one at a time, for as long as the daemon runs."""
        while True:
            while not self.waiting:
                self._wake.clear()
                await self._wake.wait()
            self.in_flight = self.waiting.popleft()
            try:
                await self._deliver(self.in_flight)
            except Exception:  # a bug: that delivery is lost, never the endpoint's worker
                log.exception("webhook delivery crashed", endpoint=self.hook.name)
                self._forget(self.in_flight)
            finally:
                self.in_flight = None
            self._report()

    async def _deliver(self, d: Delivery) -> None:
        loop = asyncio.get_running_loop()
        attempt = 0
        while True:
            outcome = await self._attempt(d)
            if outcome is not None:
                self._done(d, outcome)
                return
            if loop.time() >= d.give_up_at:
                self._done(d, "given_up")
                return
            self.telemetry.notify_attempt_failed(self.hook.name)
            wait = backoff(attempt, self.settings.retry_initial, self.settings.retry_max, self.rand)
            await asyncio.sleep(min(wait, max(d.give_up_at - loop.time(), 0.0)))
            attempt += 1

    async def _attempt(self, d: Delivery) -> str | None:
        """One POST: its outcome (delivered, rejected), or None to retry it."""
        stamp = str(int(time.time()))
        headers = {
            payload.TIMESTAMP_HEADER: stamp,
            payload.SIGNATURE_HEADER: payload.signature(self.hook.secret, stamp, d.body),
            payload.EVENT_HEADER: d.event,
        }
        try:
            code = await self.send(self.hook, d.body, headers, self.settings.timeout)
        except DeliveryError as e:
            self._failed_attempt(str(e))
            return None
        if 200 <= code < 300:
            self._recovered()
            return "delivered"
        if code >= 500 or code in (408, 429):
            # The receiver's trouble, or its ask to come back later: try again.
            self._failed_attempt(f"HTTP {code}")
            return None
        # A 4xx (or a redirect, which is not followed): the receiver refused this body; the
        # endpoint itself answers, so it is not failing.
        self._recovered()
        self.last_error = f"HTTP {code}: delivery rejected"
        return "rejected"

    def _failed_attempt(self, error: str) -> None:
        self.failures_in_row += 1
        self.last_error = error
        if self.failing and not self.failing_since:
            self.failing_since = time.time()
            log.warning("webhook endpoint failing", endpoint=self.hook.name, error=error)
        self._report()

    def _recovered(self) -> None:
        if self.failing:
            log.info("webhook endpoint delivers again", endpoint=self.hook.name)
        self.failures_in_row = 0
        self.failing_since = 0.0

    def _done(self, d: Delivery, outcome: str) -> None:
        if outcome == "delivered":
            self.delivered += 1
            self.on_delivered(d)
        else:
            self.failed += 1
            log.warning(
                "webhook delivery not made",
                endpoint=self.hook.name,
                outcome=outcome,
                kind=d.event,
                error=self.last_error,
            )
        self.telemetry.notify_delivered(
            self.hook.name, outcome, max(time.time() - d.created_at, 0.0)
        )
        self._forget(d)

    def _forget(self, d: Delivery) -> None:
        if d.row_id is None:
            return
        try:
            self.store.forget_deliveries([d.row_id])
        except StoreDown as e:  # delivered twice after a restart at worst
            log.error("webhook delivery row not removed", endpoint=self.hook.name, error=str(e))

    def _report(self) -> None:
        queued = len(self.waiting) + (self.in_flight is not None)
        self.telemetry.notify_state(self.hook.name, queued, self.failing)
