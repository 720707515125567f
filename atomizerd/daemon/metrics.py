"""Prometheus metrics on an optional `/metrics` endpoint (`metrics.listen`, off by default).

Two kinds of figures (docs/metrics.md lists every one):

- What is true right now (live, spare and queued agents, busy sessions, queued turns, the event
  loop's lag) is read from the pool, the registry and the loop probe when a scrape asks for it:
  nothing is kept up to date between scrapes.
- What happened (turns by outcome, their timings, spend, evictions, failed spawns, permission
  decisions, reaper actions) is counted where it happens, through the telemetry hooks the
  domain calls (`atomizerd/telemetry.py`): `Metrics` implements them. The parts report to the
  daemon's `Relay` (wired in `server.py`), which points at its `Metrics` while the endpoint is
  open; without an endpoint (or in a test building the parts by hand) the hooks do nothing.

Each daemon has its own `CollectorRegistry`, never prometheus_client's global one: two daemons
(or tests) in one process do not mix their figures or collide on names. prometheus_client is
imported only when the endpoint is on.

The endpoint is a minimal HTTP/1.1 responder on the daemon's own asyncio loop (one request per
connection, `GET`/`HEAD /metrics`), over loopback TCP or a Unix socket, rather than
prometheus_client's threaded server: the scrape-time figures live in loop-owned objects (the
pool's dict of agents, the sessions, the probe's deque), which a thread would read while the
loop changes them, and a thread would hold the GIL for the same work anyway. Generating the
exposition is cheap enough to do on the loop (docs/metrics.md, "Cost of a scrape"). A request
must arrive within `REQUEST_TIMEOUT` and fit in `MAX_REQUEST_BYTES`; at most `MAX_CONNECTIONS`
are open at once, more are closed unanswered.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import weakref
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import structlog

from atomizerd import __version__
from atomizerd.config import Config, MetricsAddress, metrics_address, parse_webhooks, socket_mode
from atomizerd.daemon.notifymetrics import NotifyMetrics
from atomizerd.daemon.sockets import Claim, claim_socket_path
from atomizerd.telemetry import DECIDERS, SPAWN_REASONS, Telemetry

if TYPE_CHECKING:
    from prometheus_client import CollectorRegistry, Counter, Histogram
    from prometheus_client.metrics_core import Metric
    from prometheus_client.registry import Collector

    from atomizerd.daemon.report import StatusReporter
    from atomizerd.telemetry import Relay

log = structlog.get_logger("atomizerd.daemon.metrics")

PREFIX = "atomizerd_"
# Seconds from the user message written to the agent to its first output line: the CLI opens a
# turn with its `init` line, within milliseconds when all is well; slow MCP servers or a loaded
# machine show here, and agent.first_event_timeout (120 s by default) ends the wait.
FIRST_EVENT_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 3.0, 5.0, 10.0, 20.0, 30.0, 60.0, 120.0)
# Seconds from the message written to the agent to the turn's end: a chat answer takes
# seconds, a study's tool runs minutes; agent.turn_timeout (an hour by default) is the backstop.
DURATION_BUCKETS = (
    *(0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0),
    *(120.0, 300.0, 600.0, 1200.0, 1800.0, 3600.0),
)

REQUEST_TIMEOUT = 10.0  # seconds for a client to send its request, and to take the answer
MAX_REQUEST_BYTES = 16 * 1024
MAX_CONNECTIONS = 16


class MetricsError(RuntimeError):
    """The endpoint cannot listen where `metrics.listen` says; worded for the operator."""


class Metrics(Telemetry):
    """One daemon's metrics: its own registry, the counters its hooks feed, and the figures
    read from `status` (the GetStatus reporter: pool, registry, loop probe) at each scrape."""

    def __init__(
        self, status: StatusReporter | None = None, endpoints: tuple[str, ...] = ()
    ) -> None:
        from prometheus_client import CollectorRegistry, Counter, Histogram

        self.registry: CollectorRegistry = CollectorRegistry()
        # `endpoints`: the webhooks' names, shown from the start at 0.
        self.notify = NotifyMetrics(self.registry, endpoints)
        self.status = status
        self._running: weakref.WeakKeyDictionary[Any, float] = weakref.WeakKeyDictionary()
        reg = self.registry
        self.turns: Counter = Counter(
            PREFIX + "turns",
            "Turns ended, by outcome (completed, interrupted, failed) and failure code.",
            ["outcome", "code"],
            registry=reg,
        )
        self.first_event_seconds: Histogram = Histogram(
            PREFIX + "turn_first_event_seconds",
            "Seconds from a turn's message written to the agent to the agent's first output.",
            buckets=FIRST_EVENT_BUCKETS,
            registry=reg,
        )
        self.duration_seconds: Histogram = Histogram(
            PREFIX + "turn_duration_seconds",
            "Seconds from a turn's message written to the agent to the turn's end.",
            buckets=DURATION_BUCKETS,
            registry=reg,
        )
        self.spend_usd: Counter = Counter(
            PREFIX + "spend_usd", "Cost of the turns ended by this daemon, in USD.", registry=reg
        )
        self.evictions: Counter = Counter(
            PREFIX + "agent_evictions",
            "Idle agents stopped to give their slot to a waiting turn (pool.max_live reached).",
            registry=reg,
        )
        self.spawn_failures: Counter = Counter(
            PREFIX + "agent_spawn_failures",
            "Agent starts that failed, by reason.",
            ["reason"],
            registry=reg,
        )
        self.permission_decisions: Counter = Counter(
            PREFIX + "permission_decisions",
            "Permission requests decided, by decider and decision.",
            ["decider", "decision"],
            registry=reg,
        )
        self.reaper_passes: Counter = Counter(
            PREFIX + "reaper_passes", "Reaper passes run.", registry=reg
        )
        self.reaper_stopped: Counter = Counter(
            PREFIX + "reaper_processes_stopped",
            "Agent processes the reaper stopped (idle past reaper.idle_timeout, or dead).",
            registry=reg,
        )
        self.reaper_purged: Counter = Counter(
            PREFIX + "reaper_sessions_purged",
            "Sessions the reaper purged (inactive past reaper.retention).",
            registry=reg,
        )
        self.reaper_errors: Counter = Counter(
            PREFIX + "reaper_errors",
            "Agents the reaper failed to stop and sessions it failed to purge (each is logged).",
            registry=reg,
        )
        # Every label value known in advance is shown from the start, at 0.
        for outcome in ("completed", "interrupted"):
            self.turns.labels(outcome, "")
        for decider in DECIDERS:
            for decision in ("allow", "deny"):
                self.permission_decisions.labels(decider, decision)
        for reason in SPAWN_REASONS:
            self.spawn_failures.labels(reason)
        if status is not None:
            reg.register(cast("Collector", _StateCollector(status)))

    def turn_running(self, key: object, started: float) -> None:
        self._running[key] = started

    def first_event(self, key: object, now: float) -> None:
        started = self._running.get(key)
        if started is not None:
            self.first_event_seconds.observe(max(now - started, 0.0))

    def turn_ended(self, key: object, outcome: str, code: str, cost_usd: float) -> None:
        self.turns.labels(outcome, code).inc()
        if cost_usd > 0:
            self.spend_usd.inc(cost_usd)
        started = self._running.pop(key, None)
        if started is not None:
            now = asyncio.get_running_loop().time()
            self.duration_seconds.observe(max(now - started, 0.0))

    def agent_evicted(self) -> None:
        self.evictions.inc()

    def spawn_failed(self, reason: str) -> None:
        self.spawn_failures.labels(reason).inc()

    def permission_decided(self, decider: str, allow: bool) -> None:
        self.permission_decisions.labels(decider, "allow" if allow else "deny").inc()

    def reaper_pass(self, stopped: int, purged: int, errors: int) -> None:
        self.reaper_passes.inc()
        self.reaper_stopped.inc(stopped)
        self.reaper_purged.inc(purged)
        self.reaper_errors.inc(errors)

    def notify_delivered(self, endpoint: str, outcome: str, latency: float) -> None:
        self.notify.delivered(endpoint, outcome, latency)

    def notify_attempt_failed(self, endpoint: str) -> None:
        self.notify.attempt_failed(endpoint)

    def notify_dropped(self, endpoint: str) -> None:
        self.notify.drop(endpoint)

    def notify_state(self, endpoint: str, queued: int, failing: bool) -> None:
        self.notify.state(endpoint, queued, failing)

    def exposition(self, accept: str = "") -> tuple[bytes, str]:
        """The metrics in the format `accept` asks for (Prometheus text by default), and its
        content type."""
        from prometheus_client.exposition import choose_encoder

        encoder, content_type = choose_encoder(accept)
        return encoder(self.registry), content_type


class _StateCollector:
    """The figures that are read, not counted: asked of their owners at each scrape."""

    def __init__(self, status: StatusReporter) -> None:
        self.status = status

    def collect(self) -> Iterator[Metric]:
        from prometheus_client.core import (
            CounterMetricFamily,
            GaugeMetricFamily,
            InfoMetricFamily,
        )

        status = self.status
        pool = status.pool
        counts = status.registry.counts()
        probe = status.loop_probe

        def gauge(name: str, doc: str, value: float) -> GaugeMetricFamily:
            return GaugeMetricFamily(PREFIX + name, doc, value=value)

        yield InfoMetricFamily(PREFIX + "build", "The daemon's version.", {"version": __version__})
        yield gauge("start_time_seconds", "When the daemon started (Unix time).", status.started_at)
        yield gauge(
            "agents_live",
            "Agent processes that hold a slot (starting, ready, busy or stopping).",
            pool.live_count,
        )
        yield gauge(
            "agents_spare",
            "Agents started ahead of need, not yet given to a session.",
            int(getattr(pool, "spare_count", 0)),
        )
        yield gauge(
            "agents_queued", "Turns waiting for a free agent slot (pool.max_queued).", pool.queued
        )
        yield gauge(
            "agents_capacity", "Agent slots at most (pool.max_live).", status.config.pool.max_live
        )
        yield gauge(
            "sessions_busy",
            "Sessions with a turn under way (waiting for an agent or running).",
            counts["busy"],
        )
        yield gauge(
            "turns_queued",
            "Turns accepted and not yet running: behind their session's earlier work or "
            "waiting for an agent slot (GetStatus queued_turns).",
            counts["queued"],
        )
        yield gauge(
            "event_loop_lag_max_seconds",
            "The event loop's worst lag since the daemon started.",
            probe.max_ms / 1000,
        )
        yield gauge(
            "event_loop_lag_recent_max_seconds",
            "The event loop's worst lag of the last minute.",
            probe.recent_max_ms() / 1000,
        )
        yield CounterMetricFamily(
            PREFIX + "event_loop_stalls",
            "Event-loop lags of at least daemon.loop_stall_log_ms (each is logged).",
            value=probe.stalls_logged,
        )


# --- the endpoint --------------------------------------------------------------------------

_REASONS = {200: "OK", 400: "Bad Request", 404: "Not Found", 405: "Method Not Allowed"}


class MetricsEndpoint:
    """`/metrics` over HTTP on loopback TCP or a Unix socket, served on the running loop."""

    def __init__(
        self,
        metrics: Metrics,
        address: MetricsAddress,
        mode: int = 0o600,
        relay: Relay | None = None,
    ) -> None:
        self.metrics = metrics
        self.address = address
        self.mode = mode
        self.relay = relay  # pointed at `metrics` while the endpoint is open
        self._server: asyncio.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()
        self.where = ""  # what it listens on, once started

    async def start(self) -> None:
        a = self.address
        try:
            if a.path:
                self._claim_socket_path(Path(a.path))
                self._server = await asyncio.start_unix_server(
                    self._serve, path=a.path, limit=MAX_REQUEST_BYTES
                )
                os.chmod(a.path, self.mode)
                self.where = a.path
            else:
                self._server = await asyncio.start_server(
                    self._serve, a.host, a.port, limit=MAX_REQUEST_BYTES
                )
                host, port = self._server.sockets[0].getsockname()[:2]
                self.where = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
        except OSError as e:
            where = a.path or f"{a.host}:{a.port}"
            raise MetricsError(
                f"the metrics endpoint cannot listen on {where} (metrics.listen): {e.strerror or e}"
            ) from None
        if self.relay is not None:
            self.relay.point_at(self.metrics)
        log.info("metrics endpoint listening", address=self.where, path="/metrics")

    def _claim_socket_path(self, path: Path) -> None:
        """Replaces a dead daemon's socket; refuses to take a live one or another file."""
        claim = claim_socket_path(path)
        if claim is Claim.NOT_A_SOCKET:
            raise MetricsError(f"{path} exists and is not a socket (metrics.listen)")
        if claim is Claim.IN_USE:
            raise MetricsError(f"another process is serving on {path} (metrics.listen)")

    async def close(self) -> None:
        if self.relay is not None and self.relay.target is self.metrics:
            self.relay.point_at(None)
        if self._server is None:
            return
        self._server.close()
        for writer in list(self._writers):
            writer.transport.abort()
        await self._server.wait_closed()
        self._server = None
        if self.address.path:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.address.path)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if len(self._writers) >= MAX_CONNECTIONS:
            writer.close()
            return
        self._writers.add(writer)
        try:
            try:
                head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), REQUEST_TIMEOUT)
            except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, TimeoutError):
                return  # incomplete, too big or too slow: closed unanswered
            code, headers, body = self._answer(head)
            lines = [f"HTTP/1.1 {code} {_REASONS[code]}", *headers, "Connection: close"]
            writer.write(("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body)
            await asyncio.wait_for(writer.drain(), REQUEST_TIMEOUT)
        except (ConnectionError, TimeoutError):
            writer.transport.abort()  # gone, or not taking the answer: nothing left to flush
        finally:
            self._writers.discard(writer)
            writer.close()

    def _answer(self, head: bytes) -> tuple[int, list[str], bytes]:
        lines = head.decode("latin-1").split("\r\n")
        parts = lines[0].split(" ")
        if len(parts) != 3 or not parts[2].startswith("HTTP/"):
            return _text(400, "bad request\n")
        method, target, _ = parts
        if target.split("?", 1)[0] != "/metrics":
            return _text(404, "not found: the metrics are at /metrics\n")
        if method not in ("GET", "HEAD"):
            code, headers, body = _text(405, "only GET and HEAD\n")
            return code, [*headers, "Allow: GET, HEAD"], body
        accept = ""
        for line in lines[1:]:
            name, _, value = line.partition(":")
            if name.strip().lower() == "accept":
                accept = value.strip()
        body, content_type = self.metrics.exposition(accept)
        headers = [f"Content-Type: {content_type}", f"Content-Length: {len(body)}"]
        return 200, headers, b"" if method == "HEAD" else body


def _text(code: int, text: str) -> tuple[int, list[str], bytes]:
    body = text.encode()
    return code, ["Content-Type: text/plain; charset=utf-8", f"Content-Length: {len(body)}"], body


async def start_endpoint(
    config: Config, relay: Relay, status: StatusReporter
) -> MetricsEndpoint | None:
    """The daemon's metrics, counted (`relay`, which its parts report to, points at them) and
    served, when `metrics.listen` is set; else None. Raises MetricsError when it cannot listen
    there."""
    address = metrics_address(config)
    if address is None:
        return None
    hooks = tuple(h.name for h in parse_webhooks(config.notify.webhooks))
    endpoint = MetricsEndpoint(Metrics(status, hooks), address, socket_mode(config), relay)
    await endpoint.start()
    return endpoint
