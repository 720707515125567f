"""Webhooks from the real daemon (fake agent) to a real receiver on loopback and on a Unix
socket: signed deliveries in order, the no-client wait, retries, failing endpoints in
GetStatus, and deliveries pending across a planned restart."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from atomizer.v1 import daemon_pb2, session_pb2

from tests.conftest import Stubs, stubs_for
from tests.support.daemon import RunningDaemon
from tests.support.webhook_receiver import Receiver

SECRET = "integration-secret"


def hooks_config(*receivers: Receiver, **notify: Any) -> dict[str, Any]:
    hooks = [{"url": r.url, "secret": SECRET, "name": f"r{i}"} for i, r in enumerate(receivers)]
    return {"notify": {"webhooks": hooks, **notify}}


def create(stubs: Stubs, sid: str, **labels: str) -> None:
    stubs.sessions.CreateSession(
        session_pb2.CreateSessionRequest(session_id=sid, mode=session_pb2.MODE_USER, labels=labels),
        timeout=30,
    )


def send_all(stubs: Stubs, sid: str, text: str) -> list[session_pb2.SessionEvent]:
    req = session_pb2.SendMessageRequest(session_id=sid, text=text)
    return [r.event for r in stubs.sessions.SendMessage(req, timeout=60)]


def reply_of(stubs: Stubs, sid: str) -> str:
    history = stubs.sessions.GetHistory(session_pb2.GetHistoryRequest(session_id=sid), timeout=30)
    return [m.content for m in history.messages if m.role == session_pb2.ROLE_ASSISTANT][-1]


def test_turns_are_told_signed_in_order_over_tcp_and_a_unix_socket(short_tmp: Path) -> None:
    with (
        Receiver(SECRET) as tcp,
        Receiver(SECRET, unix_path=short_tmp / "hook.sock") as unix,
        RunningDaemon(short_tmp, hooks_config(tcp, unix)) as d,
    ):
        stubs = stubs_for(d.channel())
        create(stubs, "s1", title="Beam study", team="cfd")
        for n in range(3):
            assert send_all(stubs, "s1", f"turn {n}")[-1].HasField("turn_completed")
        for r in (tcp, unix):
            got = r.wait_for(3, event="turn_completed")
            assert [g.doc["seq"] for g in got] == sorted(g.doc["seq"] for g in got)
            first = got[0].doc
            assert first["session"]["id"] == "s1" and first["session"]["title"] == "Beam study"
            assert first["session"]["labels"] == {"title": "Beam study", "team": "cfd"}
            assert "text" not in first and "echo" not in got[0].body.decode()
            assert got[0].headers["X-Atomizer-Event"] == "turn_completed"
            assert all(g.verified for g in r.received)
        status = stubs.daemon.GetStatus(daemon_pb2.GetStatusRequest(), timeout=10)
        by_name = {w.name: w for w in status.webhooks}
        assert by_name["r0"].url == tcp.url and by_name["r1"].url == f"unix:{unix.url}"
        assert by_name["r0"].delivered >= 3 and not by_name["r0"].failing


def test_a_permission_request_with_nobody_attached_waits_for_its_delivery(
    short_tmp: Path,
) -> None:
    """approvals.timeout is 1 s, and the receiver is down for its first three attempts (at
    least 1.75 s of backoff): the request is still pending when a person, told by the
    notification, allows it. Counted from the request itself it would have timed out."""
    hold = short_tmp / "hold"
    with Receiver(SECRET) as r:
        r.answers = [503, 503, 503]
        config = hooks_config(r, retry_initial=0.5, retry_max=2.0)
        config["approvals"] = {"timeout": 1.0}
        with RunningDaemon(short_tmp, config) as d:
            stubs = stubs_for(d.channel())
            create(stubs, "s1")
            answered: list[Any] = []

            def act(doc: dict[str, Any]) -> None:  # the person told by the notification
                if doc["event"] == "permission_request" and not answered:
                    req = session_pb2.RespondToPermissionRequest(
                        session_id="s1", request_id=doc["data"]["request_id"], allow=True
                    )
                    answered.append(stubs.sessions.RespondToPermission(req, timeout=30))

            r.on_request = lambda doc: act(doc) if r.answers == [] else None
            call = stubs.sessions.SendMessage(
                session_pb2.SendMessageRequest(
                    session_id="s1", text=f"[[hold:{hold}]] [[ask:Bash]]"
                ),
                timeout=60,
            )
            assert next(call).event.HasField("turn_started")
            call.cancel()
            wait_for_log(d, "the turn's sender left")
            hold.touch()
            r.wait_for(1, event="turn_completed")
            assert len(answered) == 1
            assert "permission Bash: allow" in reply_of(stubs, "s1")
            statuses = [g.status for g in r.received if g.doc["event"] == "permission_request"]
            assert statuses == [503, 503, 503, 200]


def test_a_failing_endpoint_is_reported_and_a_4xx_is_not_retried(short_tmp: Path) -> None:
    with Receiver(SECRET) as bad, Receiver(SECRET) as refusing:
        bad.default = 500
        refusing.default = 404
        config = hooks_config(bad, refusing, retry_initial=0.2, retry_max=0.5, failing_after=2)
        with RunningDaemon(short_tmp, config) as d:
            stubs = stubs_for(d.channel())
            create(stubs, "s1")
            send_all(stubs, "s1", "hello")
            deadline = time.monotonic() + 60
            while True:
                status = stubs.daemon.GetStatus(daemon_pb2.GetStatusRequest(), timeout=10)
                by_name = {w.name: w for w in status.webhooks}
                if by_name["r0"].failing and by_name["r1"].failed == 1:
                    break
                assert time.monotonic() < deadline, status.webhooks
                time.sleep(0.05)
            assert by_name["r0"].last_error == "HTTP 500" and by_name["r0"].queued == 1
            assert by_name["r0"].failing_since.seconds > 0
            assert not by_name["r1"].failing and by_name["r1"].queued == 0
            assert [g.status for g in refusing.received] == [404]  # once: never retried
            assert len(bad.received) >= 2
            shown = subprocess.run(
                [sys.executable, "-m", "atomizer_client.ctl", "--socket", str(d.socket), "status"],
                capture_output=True,
                text=True,
                timeout=60,
            ).stdout
            assert "webhook r0" in shown and "FAILING since" in shown and "HTTP 500" in shown
            assert "webhook r1" in shown and "1 failed" in shown


def test_a_pending_delivery_survives_a_planned_restart_and_is_delivered_once(
    short_tmp: Path,
) -> None:
    sock = short_tmp / "later.sock"
    hook = {"url": str(sock), "secret": SECRET, "name": "later"}  # nobody listens there yet
    config = {"notify": {"webhooks": [hook], "retry_initial": 0.2, "retry_max": 0.5}}
    with RunningDaemon(short_tmp, config) as d:
        stubs = stubs_for(d.channel())
        create(stubs, "s1")
        # Stored as the event is emitted, before the turn's end reaches this client.
        for n in range(3):
            send_all(stubs, "s1", f"before the restart {n}")
        d.signal(signal.SIGUSR2)
        wait_for_log(d, "pending webhook deliveries taken up")
        d.wait_serving()
        with Receiver(SECRET, unix_path=sock) as r:
            got = r.wait_for(3, event="turn_completed")
            assert {g.doc["session"]["id"] for g in got} == {"s1"}
            seqs = [g.doc["seq"] for g in got]
            assert seqs == sorted(seqs)  # in the order of the events
            # Whatever else was pending arrives before this: one more turn, then its
            # notification, and each delivery exactly once.
            send_all(stubs_for(d.channel()), "s1", "after")
            r.wait_for(4, event="turn_completed")
            ids = [g.doc["delivery_id"] for g in r.accepted()]
            assert len(ids) == len(set(ids)) == 4


def wait_for_log(d: RunningDaemon, event: str, timeout: float = 60.0) -> None:
    """Waits until the daemon logged `event`."""
    deadline = time.monotonic() + timeout
    while True:
        if any(r.get("event") == event for r in d.log_records()):
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"the daemon never logged {event!r}:\n{d.log()}")
        time.sleep(0.05)


def test_ctl_notify_test_sends_a_signed_sample(
    short_tmp: Path, capsys: Any, monkeypatch: Any
) -> None:
    from atomizer_client import ctl

    monkeypatch.delenv("ATOMIZER_WEBHOOK_SECRET", raising=False)
    with Receiver(SECRET) as tcp, Receiver(SECRET, unix_path=short_tmp / "r.sock") as unix:
        for r in (tcp, unix):
            assert ctl.main(["notify", "test", r.url, "--secret", SECRET]) == 0
            (got,) = r.wait_for(1)
            assert got.verified and got.doc["data"] == {"test": True}
            assert f"HTTP 200 from {r.url}" in capsys.readouterr().out
        # A wrong secret: the receiver refuses it (401), and the command says so.
        assert ctl.main(["notify", "test", tcp.url, "--secret", "wrong"]) == 1
        assert "HTTP 401" in capsys.readouterr().out
        assert not tcp.received[-1].verified
    assert ctl.main(["notify", "test", "http://127.0.0.1:9/x"]) == 4  # no secret
    assert ctl.main(["notify", "test", "ftp://x/y", "--secret", "s"]) == 1
