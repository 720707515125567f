"""The Prometheus endpoint of a real daemon (fake agent), scraped over HTTP on loopback TCP and
on a Unix socket, read with prometheus_client's own parser."""

from __future__ import annotations

import http.client
import socket
import stat
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
from atomizer.v1 import daemon_pb2
from atomizer.v1 import session_pb2 as pb
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import Stubs, stubs_for
from tests.support.daemon import RunningDaemon
from tests.support.turns import kinds, send
from tests.support.waiting import wait_for


@dataclass
class Scrape:
    """One exposition: every sample by name and labels, and the families' types."""

    samples: dict[tuple[str, frozenset[tuple[str, str]]], float]
    types: dict[str, str]

    def value(self, name: str, default: float | None = None, **labels: str) -> float:
        key = (name, frozenset(labels.items()))
        if key not in self.samples:
            if default is not None:
                return default
            raise AssertionError(f"no sample {name}{labels} in the exposition")
        return self.samples[key]


def parse(text: str) -> Scrape:
    samples: dict[tuple[str, frozenset[tuple[str, str]]], float] = {}
    types: dict[str, str] = {}
    for family in text_string_to_metric_families(text):
        types[family.name] = family.type
        for s in family.samples:
            samples[(s.name, frozenset(s.labels.items()))] = s.value
    return Scrape(samples, types)


def listening_on(d: RunningDaemon) -> str:
    """Where the daemon says its metrics endpoint listens."""
    found: list[str] = []

    def logged() -> bool:
        found[:] = [
            r["address"] for r in d.log_records() if r.get("event") == "metrics endpoint listening"
        ]
        return bool(found)

    wait_for("the metrics endpoint's start", logged)
    return found[0]


def tcp_scraper(d: RunningDaemon) -> Callable[[], Scrape]:
    url = f"http://{listening_on(d)}/metrics"

    def scrape() -> Scrape:
        with urllib.request.urlopen(url, timeout=10) as resp:
            assert resp.status == 200
            assert resp.headers["Content-Type"].startswith("text/plain")
            return parse(resp.read().decode())

    return scrape


def unix_request(path: str, method: str = "GET", target: str = "/metrics") -> tuple[int, bytes]:
    conn = http.client.HTTPConnection("localhost", timeout=10)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(10)
    sock.connect(path)
    conn.sock = sock
    try:
        conn.request(method, target)
        resp = conn.getresponse()
        return resp.status, resp.read()
    finally:
        conn.close()


def create(stubs: Stubs) -> str:
    # No session id of its own: a session like this may take a spare agent where there is one.
    return str(
        stubs.sessions.CreateSession(pb.CreateSessionRequest(), timeout=10).session.session_id
    )


def status(stubs: Stubs) -> daemon_pb2.GetStatusResponse:
    return stubs.daemon.GetStatus(daemon_pb2.GetStatusRequest(), timeout=10)


def turns(m: Scrape, outcome: str, code: str = "") -> float:
    return m.value("atomizerd_turns_total", 0.0, outcome=outcome, code=code)


def test_turns_evictions_decisions_and_state_on_loopback_tcp(short_tmp: Path) -> None:
    config = {"metrics": {"listen": "127.0.0.1:0"}, "pool": {"max_live": 1}}
    with RunningDaemon(short_tmp, config) as d:
        stubs = stubs_for(d.channel())
        scrape = tcp_scraper(d)

        m = scrape()
        assert m.types and all(name.startswith("atomizerd_") for name in m.types)
        assert turns(m, "completed") == 0 and turns(m, "interrupted") == 0
        assert m.value("atomizerd_turn_duration_seconds_count") == 0
        assert m.types["atomizerd_turns"] == "counter"
        assert m.types["atomizerd_turn_first_event_seconds"] == "histogram"
        assert m.types["atomizerd_agents_live"] == "gauge"

        a = create(stubs)
        assert kinds(send(stubs, a, "hello"))[-1] == "turn_completed"
        m = scrape()
        assert turns(m, "completed") == 1
        assert m.value("atomizerd_turn_first_event_seconds_count") == 1
        assert m.value("atomizerd_turn_duration_seconds_count") == 1
        # The spend counted is what the store added up.
        spent = status(stubs).total_cost_usd
        assert spent > 0
        assert m.value("atomizerd_spend_usd_total") == pytest.approx(spent)

        events = send(stubs, a, "[[crash]]")
        assert events[-1].turn_failed.code == pb.FAILURE_CODE_AGENT_EXITED
        m = scrape()
        assert turns(m, "failed", "AGENT_EXITED") == 1
        assert turns(m, "completed") == 1

        # One slot: b's turn evicts a's idle agent.
        assert kinds(send(stubs, a, "again"))[-1] == "turn_completed"
        b = create(stubs)
        before = scrape().value("atomizerd_agent_evictions_total")
        assert kinds(send(stubs, b, "hi"))[-1] == "turn_completed"
        assert scrape().value("atomizerd_agent_evictions_total") == before + 1
        evictions = [
            r for r in d.log_records() if r.get("event") == "evicting least-recently-used agent"
        ]
        assert scrape().value("atomizerd_agent_evictions_total") == len(evictions)

        # A permission request still pending when the turn is interrupted: denied by policy.
        stream = stubs.sessions.SendMessage(
            pb.SendMessageRequest(session_id=b, text="[[ask:Bash]]"), timeout=60
        )
        seen = []
        for r in stream:
            seen.append(r.event.WhichOneof("kind"))
            if seen[-1] == "permission_request":
                stubs.sessions.Interrupt(pb.InterruptRequest(session_id=b), timeout=10)
        assert "permission_request" in seen and seen[-1] == "turn_completed"
        m = scrape()
        assert turns(m, "interrupted") == 1
        assert (
            m.value("atomizerd_permission_decisions_total", decider="policy", decision="deny") == 1
        )
        assert (
            m.value("atomizerd_permission_decisions_total", decider="client", decision="allow") == 0
        )
        assert m.value("atomizerd_turn_duration_seconds_count") == turns(m, "completed") + 2

        # Nothing is running now: the figures read at scrape time are GetStatus's.
        def agree() -> bool:
            s, m = status(stubs), scrape()
            return (
                m.value("atomizerd_agents_live") == s.live_processes
                and m.value("atomizerd_sessions_busy") == s.busy_sessions
                and m.value("atomizerd_turns_queued") == s.queued_turns
                and m.value("atomizerd_agents_capacity") == s.pool_capacity == 1
            )

        wait_for("the scraped gauges to match GetStatus", agree)
        m, s = scrape(), status(stubs)
        assert m.value("atomizerd_agents_live") >= 1  # b's agent, idle
        assert m.value("atomizerd_agents_queued") == 0
        assert (
            0
            <= m.value("atomizerd_event_loop_lag_recent_max_seconds")
            <= m.value("atomizerd_event_loop_lag_max_seconds")
        )
        assert m.value("atomizerd_event_loop_lag_max_seconds") <= s.loop_lag_max_ms / 1000
        assert m.value("atomizerd_build_info", version=s.version) == 1
        assert m.value("atomizerd_start_time_seconds") == pytest.approx(
            s.started_at.seconds + s.started_at.nanos / 1e9, abs=1
        )


def test_a_turn_waiting_for_a_slot_shows_as_queued(short_tmp: Path) -> None:
    config = {
        "metrics": {"listen": "127.0.0.1:0"},
        "pool": {"max_live": 1},
        "agent": {"prewarm": False},
    }
    with RunningDaemon(short_tmp, config) as d:
        stubs = stubs_for(d.channel())
        scrape = tcp_scraper(d)
        a, b = create(stubs), create(stubs)
        # a's turn holds the only slot while it waits for a permission answer.
        held = stubs.sessions.SendMessage(
            pb.SendMessageRequest(session_id=a, text="[[ask:Bash]]"), timeout=60
        )
        request = next(
            r.event.permission_request for r in held if r.event.HasField("permission_request")
        )
        queued = stubs.sessions.SendMessage(
            pb.SendMessageRequest(session_id=b, text="hi"), timeout=60
        )
        wait_for(
            "b's turn to wait for the slot", lambda: scrape().value("atomizerd_agents_queued") == 1
        )
        m, s = scrape(), status(stubs)
        assert m.value("atomizerd_sessions_busy") == s.busy_sessions == 2
        assert m.value("atomizerd_turns_queued") == s.queued_turns == 1
        assert m.value("atomizerd_agents_live") == s.live_processes == 1

        stubs.sessions.RespondToPermission(
            pb.RespondToPermissionRequest(session_id=a, request_id=request.request_id, allow=True),
            timeout=10,
        )
        assert [r.event.WhichOneof("kind") for r in held][-1] == "turn_completed"
        assert [r.event.WhichOneof("kind") for r in queued][-1] == "turn_completed"
        m = scrape()
        assert m.value("atomizerd_agents_queued") == 0
        assert m.value("atomizerd_agent_evictions_total") == 1  # a's agent, for b's turn
        assert (
            m.value("atomizerd_permission_decisions_total", decider="client", decision="allow") == 1
        )
        assert turns(m, "completed") == 2


def test_unix_socket_endpoint_and_reaper_actions(short_tmp: Path) -> None:
    path = str(short_tmp / "metrics.sock")
    config = {
        "metrics": {"listen": path},
        "daemon": {"socket_mode": "0660"},
        "reaper": {"interval": 0.2, "idle_timeout": 0.3},
    }
    with RunningDaemon(short_tmp, config) as d:
        stubs = stubs_for(d.channel())
        assert listening_on(d) == path
        st = Path(path).lstat()
        assert stat.S_ISSOCK(st.st_mode) and stat.S_IMODE(st.st_mode) == 0o660

        code, body = unix_request(path)
        assert code == 200
        m = parse(body.decode())
        assert all(name.startswith("atomizerd_") for name in m.types)

        # An idle agent is stopped by the reaper, and counted.
        a = create(stubs)
        assert kinds(send(stubs, a, "hello"))[-1] == "turn_completed"
        wait_for(
            "the reaper to stop the idle agent",
            lambda: (
                parse(unix_request(path)[1].decode()).value(
                    "atomizerd_reaper_processes_stopped_total"
                )
                >= 1
            ),
        )
        m = parse(unix_request(path)[1].decode())
        assert m.value("atomizerd_reaper_passes_total") >= 1
        assert m.value("atomizerd_reaper_errors_total") == 0
        reaped = [r for r in d.log_records() if r.get("event") == "agent process reaped"]
        assert len(reaped) >= 1

        assert unix_request(path, target="/")[0] == 404
        assert unix_request(path, method="POST")[0] == 405
        code, body = unix_request(path, method="HEAD")
        assert code == 200 and body == b""
    assert not Path(path).exists()  # removed at shutdown


def test_failed_spawns_are_counted_by_reason(short_tmp: Path) -> None:
    config = {
        "metrics": {"listen": "[::1]:0" if socket.has_ipv6 and _ipv6_loopback() else "localhost:0"},
        "agent": {
            "spawn_retries": 1,
            "spawn_retry_backoff": 0.05,
            "env": {"HOME": str(short_tmp / "home"), "FAKE_AGENT_EXIT_AT_START": "1"},
        },
    }
    with RunningDaemon(short_tmp, config) as d:
        stubs = stubs_for(d.channel())
        scrape = tcp_scraper(d)
        a = create(stubs)
        events = send(stubs, a, "hello")
        assert events[-1].turn_failed.code == pb.FAILURE_CODE_AGENT_EXITED
        m = scrape()
        # The turn's start and its one retry at least (a prewarm may have failed too).
        assert m.value("atomizerd_agent_spawn_failures_total", reason="died_at_start") >= 2
        assert m.value("atomizerd_agent_spawn_failures_total", reason="spawn_error") == 0
        assert turns(m, "failed", "AGENT_EXITED") == 1
        # The turn never reached an agent: counted, but it has no duration.
        assert m.value("atomizerd_turn_duration_seconds_count") == 0


def _ipv6_loopback() -> bool:
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as s:
            s.bind(("::1", 0))
        return True
    except OSError:
        return False


def test_the_endpoint_is_off_by_default(short_tmp: Path) -> None:
    with RunningDaemon(short_tmp) as d:
        stubs_for(d.channel())
        assert not any(r.get("event") == "metrics endpoint listening" for r in d.log_records())


def test_a_non_loopback_address_is_a_configuration_error(short_tmp: Path) -> None:
    d = RunningDaemon(short_tmp, {"metrics": {"listen": "0.0.0.0:9464"}})
    d.start(wait=False)
    assert d.proc is not None
    assert d.proc.wait(30) == 2
    assert "metrics.listen: 0.0.0.0 is not a loopback address" in d.log()


def test_a_port_in_use_stops_the_start_with_a_clear_error(short_tmp: Path) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        d = RunningDaemon(short_tmp, {"metrics": {"listen": f"127.0.0.1:{port}"}})
        d.start(wait=False)
        assert d.proc is not None
        assert d.proc.wait(30) == 1
    assert f"cannot listen on 127.0.0.1:{port} (metrics.listen)" in d.log()
    assert not d.socket.exists()
