"""systemd's notify protocol (sd_notify), without libsystemd: one datagram per state change."""

from __future__ import annotations

import os
import socket


class Notifier:
    """Sends READY=1 / STOPPING=1 / WATCHDOG=1 to $NOTIFY_SOCKET; a no-op when it is unset."""

    def __init__(self, environ: dict[str, str] | None = None) -> None:
        env = os.environ if environ is None else environ
        address = env.get("NOTIFY_SOCKET", "")
        if address.startswith("@"):  # abstract namespace
            address = "\0" + address[1:]
        self.address = address or None
        self.watchdog_interval = self._watchdog_interval(env)

    @staticmethod
    def _watchdog_interval(env: os._Environ[str] | dict[str, str]) -> float | None:
        usec = env.get("WATCHDOG_USEC")
        pid = env.get("WATCHDOG_PID")
        if not usec or (pid and pid != str(os.getpid())):
            return None
        try:
            # Ping at half the period, as systemd recommends.
            return int(usec) / 1e6 / 2
        except ValueError:
            return None

    def notify(self, state: str) -> bool:
        if self.address is None:
            return False
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
            try:
                sock.sendto(state.encode(), self.address)
            except OSError:
                return False
        return True
