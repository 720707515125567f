"""A real HTTP receiver of the daemon's webhooks, on loopback TCP or a Unix socket, that checks
each delivery's signature and timestamp the way docs/clients.md tells a receiver to.

`answers` is consumed one status per request (then `default`); `on_request(doc)` runs before
the answer is written (a test acting on a notification, as a person would).
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import socketserver
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler
from pathlib import Path
from typing import Any

# How old a delivery's timestamp may be before a receiver rejects it as a replay.
TOLERANCE_S = 300


@dataclass
class Received:
    headers: dict[str, str]
    body: bytes
    doc: dict[str, Any]
    verified: bool
    status: int = 0
    at: float = field(default_factory=time.monotonic)
    wall: float = field(default_factory=time.time)


def verify(secret: str, headers: dict[str, str], body: bytes, now: float | None = None) -> bool:
    """What a receiver does: the signature over timestamp + "." + body, then the timestamp's
    age (a replayed request carries an old one, and it cannot be re-signed without the key)."""
    stamp = headers.get("X-Atomizer-Timestamp", "")
    given = headers.get("X-Atomizer-Signature", "")
    mac = hmac.new(secret.encode(), stamp.encode() + b"." + body, hashlib.sha256).hexdigest()
    if not stamp.isdigit() or not hmac.compare_digest(given, f"v1={mac}"):
        return False
    return abs((time.time() if now is None else now) - int(stamp)) <= TOLERANCE_S


class Receiver:
    def __init__(self, secret: str, unix_path: Path | None = None) -> None:
        self.secret = secret
        self.received: list[Received] = []
        self.answers: list[int] = []
        self.default = 200
        self.delay = 0.0  # seconds before each answer: a slow receiver
        self.on_request: Callable[[dict[str, Any]], None] | None = None
        self._cond = threading.Condition()
        self.unix_path = unix_path
        handler = self._handler()
        if unix_path is not None:
            self.server: socketserver.BaseServer = _UnixServer(str(unix_path), handler)
        else:
            self.server = _TcpServer(("127.0.0.1", 0), handler)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        if self.unix_path is not None:
            return str(self.unix_path)
        address: Any = self.server.server_address
        host, port = address[:2]
        return f"http://{host}:{port}/hooks/atomizer"

    def __enter__(self) -> Receiver:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()
        if self.unix_path is not None and self.unix_path.exists():
            os.unlink(self.unix_path)

    def wait_for(
        self, count: int, timeout: float = 60.0, event: str | None = None
    ) -> list[Received]:
        """The first `count` accepted deliveries (of `event`, if given): waits for them."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                got = [r for r in self.accepted() if event is None or r.doc["event"] == event]
                if len(got) >= count:
                    return got
                left = deadline - time.monotonic()
                if left <= 0:
                    raise AssertionError(f"{len(got)} deliveries, wanted {count}: {self.events()}")
                self._cond.wait(left)

    def accepted(self) -> list[Received]:
        return [r for r in self.received if r.verified and r.status == 200]

    def events(self) -> list[str]:
        return [r.doc.get("event", "?") for r in self.received]

    def _record(self, headers: dict[str, str], body: bytes) -> int:
        doc = json.loads(body)
        ok = verify(self.secret, headers, body)
        arrived = time.time()
        if ok and self.on_request is not None:
            self.on_request(doc)
        if self.delay:
            time.sleep(self.delay)
        with self._cond:
            code = self.answers.pop(0) if self.answers else self.default
            if not ok:
                code = 401
            r = Received(headers, body, doc, ok, code, wall=arrived)
            self.received.append(r)
            self._cond.notify_all()
        return code

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                length = int(self.headers.get("Content-Length", "0"))
                body = self.rfile.read(length)
                code = receiver._record(dict(self.headers.items()), body)
                self.send_response(code)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, format: str, *args: Any) -> None:
                pass

        return Handler


class _TcpServer(socketserver.ThreadingMixIn, socketserver.TCPServer):
    daemon_threads = True
    allow_reuse_address = True


class _UnixServer(socketserver.ThreadingMixIn, socketserver.UnixStreamServer):
    daemon_threads = True

    def get_request(self) -> tuple[Any, Any]:
        conn, _ = self.socket.accept()
        return conn, ("unix", 0)  # BaseHTTPRequestHandler wants a (host, port) address
