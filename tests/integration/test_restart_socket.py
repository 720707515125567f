"""The API socket through a planned restart in place: clients wait, nobody is refused
(daemon/listener.py, daemon/backlog.py)."""

from __future__ import annotations

import errno
import signal
import socket
import threading
from collections import Counter
from pathlib import Path

import grpc
from atomizer.v1 import daemon_pb2
from atomizer.v1 import session_pb2 as pb

from tests.conftest import stubs_for
from tests.support.daemon import RunningDaemon
from tests.support.waiting import wait_for


class Callers:
    """Callers running until told to stop: one calls GetSession in a loop on one channel, one
    opens a fresh connection to the socket in a loop (what a new client does)."""

    def __init__(self, d: RunningDaemon, session_id: str) -> None:
        self.d = d
        self.session_id = session_id
        self.done = threading.Event()
        self.calls = 0
        self.connects = 0
        self.call_errors: Counter[str] = Counter()
        self.connect_errors: Counter[str] = Counter()
        self.threads = [
            threading.Thread(target=self._call, daemon=True),
            threading.Thread(target=self._connect, daemon=True),
        ]

    def __enter__(self) -> Callers:
        for t in self.threads:
            t.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.done.set()
        for t in self.threads:
            t.join(30)

    def _call(self) -> None:
        with grpc.insecure_channel(self.d.target) as ch:
            stubs = stubs_for(ch)
            while not self.done.is_set():
                try:
                    stubs.sessions.GetSession(
                        pb.GetSessionRequest(session_id=self.session_id), timeout=30
                    )
                    self.calls += 1
                except grpc.RpcError as e:
                    self.call_errors[f"{e.code().name}: {e.details()}"] += 1

    def _connect(self) -> None:
        while not self.done.is_set():
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
                try:
                    s.connect(str(self.d.socket))
                    self.connects += 1
                except OSError as e:
                    self.connect_errors[errno.errorcode.get(e.errno or 0, str(e))] += 1
            self.done.wait(0.005)  # a new client now and then, not a flood


def started_at(d: RunningDaemon) -> int | None:
    """When the daemon serving now started (None: a call the stopping one ended)."""
    try:
        status = stubs_for(d.channel()).daemon.GetStatus(daemon_pb2.GetStatusRequest(), timeout=30)
    except grpc.RpcError as e:
        if e.code() not in (grpc.StatusCode.CANCELLED, grpc.StatusCode.UNAVAILABLE):
            raise
        return None
    return int(status.started_at.ToNanoseconds())


def test_a_planned_restart_refuses_no_connection(short_tmp: Path) -> None:
    with RunningDaemon(short_tmp) as d:
        stubs = stubs_for(d.channel())
        sid = stubs.sessions.CreateSession(pb.CreateSessionRequest()).session.session_id
        before = started_at(d)
        with Callers(d, sid) as callers:
            wait_for("the callers", lambda: callers.calls > 20 and callers.connects > 20, 30)
            stubs.daemon.RestartDaemon(daemon_pb2.RestartDaemonRequest(), timeout=30)
            wait_for("the next daemon", lambda: started_at(d) not in (before, None), 60)
            served = callers.calls
            wait_for("calls to the next daemon", lambda: callers.calls > served + 20, 30)
        assert callers.connect_errors == Counter()
        # Calls the stopping server had in flight, or got on a connection it was closing, may
        # end (the old server's own stop); a call that could not connect never does.
        refused = [e for e in callers.call_errors if "refused" in e or "No such file" in e]
        assert refused == []
        assert d.proc is not None and d.proc.poll() is None  # the same process, exec'd
        # The waiting connections were handed to the next daemon, and the holding socket is
        # gone: only the socket itself is left in its directory.
        wait_for("the relay", lambda: "relayed connections made during the restart" in d.log())
        assert sorted(p.name for p in d.socket.parent.iterdir() if p.is_socket()) == [d.socket.name]


def test_a_stop_after_a_restart_still_removes_the_socket(short_tmp: Path) -> None:
    d = RunningDaemon(short_tmp).start()
    before = started_at(d)
    d.signal(signal.SIGUSR2)
    wait_for("the next daemon", lambda: started_at(d) not in (before, None), 60)
    assert d.stop() == 0
    assert not d.socket.exists()
