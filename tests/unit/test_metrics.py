"""The metrics module on its own: `metrics.listen` checks, the HTTP responder, the per-daemon
registries and hooks."""

from __future__ import annotations

import asyncio
import errno
import http.client
import socket
import stat
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

import atomizerd.config as config_mod
from atomizerd.agents.pool import DiedAtStart, ResumeFailed, spawn_failure_reason
from atomizerd.agents.vocabulary import AgentSpawnError
from atomizerd.config import ConfigError, MetricsAddress
from atomizerd.daemon import metrics
from atomizerd.errors import FailedPrecondition
from atomizerd.sessions import events as ev
from atomizerd.sessions.relay import reported_outcome
from atomizerd.telemetry import SPAWN_REASONS, Relay
from tests.support.waiting import wait_for


def address(listen: str) -> MetricsAddress | None:
    cfg = config_mod.load(environ={}, overrides={"metrics.listen": listen})
    return config_mod.metrics_address(cfg)


@pytest.mark.parametrize(
    ("listen", "expected"),
    [
        ("", None),
        ("127.0.0.1:9464", MetricsAddress(host="127.0.0.1", port=9464)),
        ("127.8.9.10:0", MetricsAddress(host="127.8.9.10", port=0)),
        ("localhost:9464", MetricsAddress(host="127.0.0.1", port=9464)),
        ("[::1]:9464", MetricsAddress(host="::1", port=9464)),
        ("/run/atomizerd/metrics.sock", MetricsAddress(path="/run/atomizerd/metrics.sock")),
    ],
)
def test_listen_accepts_loopback_and_unix_paths(listen: str, expected: MetricsAddress) -> None:
    assert address(listen) == expected


def test_a_relative_socket_path_is_made_absolute(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    assert address("./m.sock") == MetricsAddress(path=str(tmp_path / "m.sock"))


@pytest.mark.parametrize(
    ("listen", "says"),
    [
        ("0.0.0.0:9464", "0.0.0.0 is not a loopback address"),
        ("192.168.1.5:9464", "192.168.1.5 is not a loopback address"),
        ("[::]:9464", ":: is not a loopback address"),
        ("example.com:9464", "example.com is not a loopback address"),
        ("[::ffff:127.0.0.1]:9464", "is not a loopback address"),
        (":9464", "expected a loopback host:port"),
        ("9464", "expected a loopback host:port"),
        ("127.0.0.1", "expected a loopback host:port"),
        ("127.0.0.1:http", "port must be 0 to 65535"),
        ("127.0.0.1:65536", "port must be 0 to 65535"),
        ("::1:9464", "IPv6 address in brackets"),
        ("/" + "x" * 120, "longer than a Unix socket allows"),
    ],
)
def test_listen_refuses_anything_else_naming_the_key(listen: str, says: str) -> None:
    with pytest.raises(ConfigError) as err:
        address(listen)
    assert str(err.value).startswith("metrics.listen: ") and says in str(err.value)


# --- the responder -------------------------------------------------------------------------


def serve(
    where: MetricsAddress,
    test: Callable[[metrics.MetricsEndpoint], None],
    m: metrics.Metrics | None = None,
) -> None:
    """Runs `test(endpoint)` (blocking calls, in a thread) against a started endpoint."""

    async def main() -> None:
        endpoint = metrics.MetricsEndpoint(m or metrics.Metrics(), where)
        await endpoint.start()
        try:
            await asyncio.to_thread(test, endpoint)
        finally:
            await endpoint.close()

    asyncio.run(main())


def raw(endpoint: metrics.MetricsEndpoint, data: bytes) -> bytes:
    host, _, port = endpoint.where.rpartition(":")
    chunks = []
    with socket.create_connection((host, int(port)), timeout=10) as s:
        try:
            s.sendall(data)
            s.shutdown(socket.SHUT_WR)
            while chunk := s.recv(65536):
                chunks.append(chunk)
        except OSError as e:  # closed with our request unread (reset, or gone before our
            if e.errno not in (errno.ECONNRESET, errno.ENOTCONN, errno.EPIPE):  # shutdown)
                raise
    return b"".join(chunks)


def test_get_head_and_errors_over_tcp() -> None:
    m = metrics.Metrics()
    m.turns.labels("failed", "STALL_TIMEOUT").inc()

    def test(endpoint: metrics.MetricsEndpoint) -> None:
        url = f"http://{endpoint.where}/metrics"
        with urllib.request.urlopen(url, timeout=10) as resp:
            assert resp.headers["Content-Type"].startswith("text/plain")
            assert resp.headers["Connection"] == "close"
            text = resp.read().decode()
        families = {f.name: f for f in text_string_to_metric_families(text)}
        [failed] = [
            s
            for s in families["atomizerd_turns"].samples
            if s.name == "atomizerd_turns_total" and s.labels["outcome"] == "failed"
        ]
        assert failed.labels["code"] == "STALL_TIMEOUT" and failed.value == 1
        with urllib.request.urlopen(url + "?x=1", timeout=10) as resp:  # a query is ignored
            assert resp.status == 200

        head = urllib.request.Request(url, method="HEAD")
        with urllib.request.urlopen(head, timeout=10) as resp:
            assert int(resp.headers["Content-Length"]) > 0 and resp.read() == b""

        with pytest.raises(urllib.error.HTTPError) as err:
            urllib.request.urlopen(f"http://{endpoint.where}/", timeout=10)
        assert err.value.code == 404
        with pytest.raises(urllib.error.HTTPError) as err:
            urllib.request.urlopen(urllib.request.Request(url, data=b"x"), timeout=10)
        assert err.value.code == 405 and err.value.headers["Allow"] == "GET, HEAD"

        assert raw(endpoint, b"nonsense\r\n\r\n").startswith(b"HTTP/1.1 400 ")
        assert raw(endpoint, b"GET /metrics HTTP/1.1\r\nX: " + b"y" * 20000) == b""  # too big
        assert raw(endpoint, b"GET /metrics") == b""  # the client gave up half-way

        openmetrics = urllib.request.Request(
            url, headers={"Accept": "application/openmetrics-text; version=1.0.0"}
        )
        with urllib.request.urlopen(openmetrics, timeout=10) as resp:
            assert resp.headers["Content-Type"].startswith("application/openmetrics-text")
            assert resp.read().decode().endswith("# EOF\n")

    serve(MetricsAddress(host="127.0.0.1", port=0), test, m)


def test_a_request_that_never_completes_is_dropped(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(metrics, "REQUEST_TIMEOUT", 0.2)

    def test(endpoint: metrics.MetricsEndpoint) -> None:
        host, _, port = endpoint.where.rpartition(":")
        with socket.create_connection((host, int(port)), timeout=10) as s:
            s.sendall(b"GET /metrics HTTP/1.1\r\n")
            assert s.recv(100) == b""  # closed unanswered, not held open

    serve(MetricsAddress(host="127.0.0.1", port=0), test)


def test_connections_beyond_the_limit_are_closed(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(metrics, "MAX_CONNECTIONS", 2)

    def test(endpoint: metrics.MetricsEndpoint) -> None:
        host, _, port = endpoint.where.rpartition(":")
        idle = [socket.create_connection((host, int(port)), timeout=10) for _ in range(2)]
        try:
            for s in idle:  # each holds a slot once the endpoint has accepted it
                s.sendall(b"GET /metrics HTTP/1.1\r\n")
            wait_for("both connections accepted", lambda: len(endpoint._writers) == 2)
            assert raw(endpoint, b"GET /metrics HTTP/1.1\r\n\r\n") == b""
        finally:
            for s in idle:
                s.close()

    serve(MetricsAddress(host="127.0.0.1", port=0), test)


def unix_get(path: str) -> tuple[int, bytes]:
    conn = http.client.HTTPConnection("localhost", timeout=10)
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(10)
    s.connect(path)
    conn.sock = s
    try:
        conn.request("GET", "/metrics")
        resp = conn.getresponse()
        return resp.status, resp.read()
    finally:
        conn.close()


def test_unix_socket_replaces_a_stale_one_and_is_removed_at_close(tmp_path: Path) -> None:
    path = tmp_path / "m.sock"
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    stale.bind(str(path))
    stale.close()  # a socket file nobody serves on

    async def main() -> None:
        endpoint = metrics.MetricsEndpoint(metrics.Metrics(), MetricsAddress(path=str(path)), 0o640)
        await endpoint.start()
        try:
            assert stat.S_IMODE(path.lstat().st_mode) == 0o640
            code, body = await asyncio.to_thread(unix_get, str(path))
            assert code == 200 and b"atomizerd_turns_total" in body
        finally:
            await endpoint.close()

    asyncio.run(main())
    assert not path.exists()


def test_unix_socket_refuses_a_live_socket_or_another_file(tmp_path: Path) -> None:
    live = tmp_path / "live.sock"
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(str(live))
    listener.listen()
    plain = tmp_path / "file"
    plain.write_text("keep me")

    async def start(path: Path) -> str:
        endpoint = metrics.MetricsEndpoint(metrics.Metrics(), MetricsAddress(path=str(path)))
        with pytest.raises(metrics.MetricsError) as err:
            await endpoint.start()
        return str(err.value)

    try:
        assert "another process is serving on" in asyncio.run(start(live))
        assert "exists and is not a socket" in asyncio.run(start(plain))
    finally:
        listener.close()
    assert live.exists() and plain.read_text() == "keep me"


def test_a_port_in_use_is_a_metrics_error() -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        endpoint = metrics.MetricsEndpoint(
            metrics.Metrics(), MetricsAddress(host="127.0.0.1", port=port)
        )
        with pytest.raises(metrics.MetricsError) as err:
            asyncio.run(endpoint.start())
    assert f"cannot listen on 127.0.0.1:{port} (metrics.listen)" in str(err.value)


# --- registries and hooks -------------------------------------------------------------------


class FakeTurn:
    pass


def sample(m: metrics.Metrics, name: str, **labels: str) -> float | None:
    return m.registry.get_sample_value(name, labels)


def test_each_daemon_counts_in_its_own_registry() -> None:
    one, two = metrics.Metrics(), metrics.Metrics()  # no name clash between registries
    # Each daemon's parts report to its own relay, pointed at its own metrics.
    relay1, relay2, other = Relay(), Relay(), Relay()
    relay1.point_at(one)
    relay2.point_at(two)
    relay1.agent_evicted()
    relay2.agent_evicted()
    relay2.agent_evicted()
    other.agent_evicted()  # pointed nowhere: counted nowhere
    assert sample(one, "atomizerd_agent_evictions_total") == 1
    assert sample(two, "atomizerd_agent_evictions_total") == 2
    from prometheus_client import REGISTRY

    assert REGISTRY.get_sample_value("atomizerd_agent_evictions_total") is None
    relay1.point_at(None)
    relay1.agent_evicted()
    assert sample(one, "atomizerd_agent_evictions_total") == 1


def test_turn_outcomes_timings_and_spend() -> None:
    m = metrics.Metrics()

    async def main() -> None:
        loop = asyncio.get_running_loop()
        done, failed, stopped, early = FakeTurn(), FakeTurn(), FakeTurn(), FakeTurn()
        for turn in (done, failed, stopped):
            m.turn_running(turn, loop.time())
        m.first_event(done, loop.time())
        m.first_event(early, loop.time())  # never running: ignored
        m.turn_ended(done, *reported_outcome(ev.TurnCompleted(text="hi", cost_usd=0.25)))
        m.turn_ended(failed, *reported_outcome(ev.TurnFailed(ev.STALL_TIMEOUT, "silent")))
        m.turn_ended(
            stopped,
            *reported_outcome(ev.TurnCompleted(text="", interrupted=True, cost_usd=0.5)),
        )
        m.turn_ended(early, *reported_outcome(ev.TurnFailed(ev.SESSION_TERMINATED, "gone")))

    asyncio.run(main())
    assert sample(m, "atomizerd_turns_total", outcome="completed", code="") == 1
    assert sample(m, "atomizerd_turns_total", outcome="interrupted", code="") == 1
    assert sample(m, "atomizerd_turns_total", outcome="failed", code="STALL_TIMEOUT") == 1
    assert sample(m, "atomizerd_turns_total", outcome="failed", code="SESSION_TERMINATED") == 1
    assert sample(m, "atomizerd_turn_first_event_seconds_count") == 1
    assert sample(m, "atomizerd_turn_duration_seconds_count") == 3  # not the one never running
    assert sample(m, "atomizerd_spend_usd_total") == pytest.approx(0.75)


@pytest.mark.parametrize(
    ("error", "reason"),
    [
        (DiedAtStart("died", 1, ""), "died_at_start"),
        (ResumeFailed("gone"), "resume_failed"),
        (AgentSpawnError("no such program"), "spawn_error"),
        (FailedPrecondition("the sandbox cannot run"), "refused"),
        (OSError("odd"), "error"),
    ],
)
def test_spawn_failures_by_reason(error: Exception, reason: str) -> None:
    m = metrics.Metrics()
    reason_given = spawn_failure_reason(error)
    assert reason_given is not None
    m.spawn_failed(reason_given)
    assert sample(m, "atomizerd_agent_spawn_failures_total", reason=reason) == 1
    others = [r for r in SPAWN_REASONS if r != reason]
    assert all(sample(m, "atomizerd_agent_spawn_failures_total", reason=r) == 0 for r in others)


def test_a_cancelled_start_is_not_a_failure() -> None:
    m = metrics.Metrics()
    assert spawn_failure_reason(asyncio.CancelledError()) is None  # so the pool reports none
    assert all(
        sample(m, "atomizerd_agent_spawn_failures_total", reason=r) == 0 for r in SPAWN_REASONS
    )
