"""The webhook deliveries' metrics (docs/metrics.md, "Notifications"), part of `Metrics`:
counted from the telemetry hooks the endpoints call (notify/endpoint.py)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from atomizerd.telemetry import DELIVERY_OUTCOMES

if TYPE_CHECKING:
    from prometheus_client import CollectorRegistry

PREFIX = "atomizerd_notify_"
# Event to receipt: milliseconds on a healthy loopback receiver, up to notify.give_up_after
# when a receiver was down.
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 60.0, 600.0)


class NotifyMetrics:
    def __init__(self, reg: CollectorRegistry, endpoints: tuple[str, ...] = ()) -> None:
        from prometheus_client import Counter, Gauge, Histogram

        self.deliveries = Counter(
            PREFIX + "deliveries",
            "Webhook deliveries ended, by endpoint and outcome (delivered, rejected: a 4xx, "
            "given_up: retried past notify.give_up_after).",
            ["endpoint", "outcome"],
            registry=reg,
        )
        self.retries = Counter(
            PREFIX + "attempts_failed",
            "Delivery attempts that failed and were retried (5xx, timeout, connection error).",
            ["endpoint"],
            registry=reg,
        )
        self.dropped = Counter(
            PREFIX + "dropped",
            "Deliveries dropped because the endpoint's queue was full (notify.queue_size).",
            ["endpoint"],
            registry=reg,
        )
        self.queued = Gauge(
            PREFIX + "queued", "Deliveries waiting per endpoint.", ["endpoint"], registry=reg
        )
        self.failing = Gauge(
            PREFIX + "endpoint_failing",
            "1 while an endpoint's last notify.failing_after attempts failed.",
            ["endpoint"],
            registry=reg,
        )
        self.latency = Histogram(
            PREFIX + "latency_seconds",
            "Seconds from an event to its delivery's 2xx.",
            ["endpoint"],
            buckets=LATENCY_BUCKETS,
            registry=reg,
        )
        for name in endpoints:
            for outcome in DELIVERY_OUTCOMES:
                self.deliveries.labels(name, outcome)
            self.dropped.labels(name)
            self.queued.labels(name)
            self.failing.labels(name)

    def delivered(self, endpoint: str, outcome: str, latency: float) -> None:
        self.deliveries.labels(endpoint, outcome).inc()
        if outcome == "delivered":
            self.latency.labels(endpoint).observe(latency)

    def attempt_failed(self, endpoint: str) -> None:
        self.retries.labels(endpoint).inc()

    def drop(self, endpoint: str) -> None:
        self.dropped.labels(endpoint).inc()

    def state(self, endpoint: str, queued: int, failing: bool) -> None:
        self.queued.labels(endpoint).set(queued)
        self.failing.labels(endpoint).set(1 if failing else 0)
