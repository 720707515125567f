"""systemd's notify protocol: READY=1 once serving, WATCHDOG=1 while alive, STOPPING=1 on
SIGTERM, in that order, on the datagram socket named by NOTIFY_SOCKET."""

from __future__ import annotations

import socket
import time
from pathlib import Path

from tests.support.daemon import RunningDaemon


def test_ready_watchdog_and_stopping_are_sent_in_order(short_tmp: Path) -> None:
    address = str(short_tmp / "notify.sock")
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sink:
        sink.bind(address)
        sink.settimeout(0.2)
        env = {"NOTIFY_SOCKET": address, "WATCHDOG_USEC": "400000"}
        d = RunningDaemon(short_tmp, env=env).start()
        messages: list[str] = []
        deadline = time.monotonic() + 10
        while messages.count("WATCHDOG=1") < 2 and time.monotonic() < deadline:
            try:
                messages.append(sink.recv(4096).decode())
            except TimeoutError:
                continue
        assert d.stop() == 0
        while True:
            try:
                messages.append(sink.recv(4096).decode())
            except TimeoutError:
                break
    assert messages[0] == "READY=1"
    assert "WATCHDOG=1" in messages
    assert messages[-1] == "STOPPING=1"
    assert messages.index("STOPPING=1") > max(
        i for i, m in enumerate(messages) if m == "WATCHDOG=1"
    )


def test_no_watchdog_pings_for_another_pid(short_tmp: Path) -> None:
    address = str(short_tmp / "notify.sock")
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sink:
        sink.bind(address)
        sink.settimeout(0.2)
        env = {"NOTIFY_SOCKET": address, "WATCHDOG_USEC": "200000", "WATCHDOG_PID": "1"}
        with RunningDaemon(short_tmp, env=env):
            time.sleep(1.0)
        messages = []
        while True:
            try:
                messages.append(sink.recv(4096).decode())
            except TimeoutError:
                break
    assert "WATCHDOG=1" not in messages
    assert messages[0] == "READY=1" and messages[-1] == "STOPPING=1"
