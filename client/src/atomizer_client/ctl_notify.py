"""`atomizerctl notify test URL`: a signed sample delivery, sent from here to a webhook
receiver, so its author can check their verification before the daemon sends real ones.

Sent by the client, not through the daemon: it needs no daemon (nor a session), and what it
tests is the receiver. It signs exactly as the daemon does (docs/clients.md,
"Notifications"): HMAC-SHA256 with the secret over the timestamp, a dot and the body.
"""

from __future__ import annotations

import argparse
import hashlib
import hmac
import http.client
import json
import os
import socket
import time
import uuid
from collections.abc import Callable
from typing import Any
from urllib.parse import urlsplit

from atomizer_client.ctl_output import EXIT_FAILED, EXIT_INVALID, EXIT_OK, Output

SECRET_ENV = "ATOMIZER_WEBHOOK_SECRET"
EVENTS = (
    "permission_request",
    "question",
    "turn_completed",
    "turn_failed",
    "task_ended",
    "session_failed",
    "budget_exhausted",
)


def add_commands(add: Callable[[str, Any, str], argparse.ArgumentParser]) -> None:
    p = add("notify", cmd_notify, "send a signed sample webhook delivery to a receiver")
    p.add_argument("action", choices=("test",))
    p.add_argument("url", help="an http(s):// URL, or a Unix socket path (/path or unix:/path)")
    p.add_argument(
        "--secret",
        metavar="S",
        help=f"the endpoint's secret (default: ${SECRET_ENV}; a flag shows in `ps`)",
    )
    p.add_argument("--event", choices=EVENTS, default="turn_completed", help="the sample's event")
    p.set_defaults(no_daemon=True)


def sample(event: str) -> bytes:
    doc = {
        "delivery_id": uuid.uuid4().hex,
        "event": event,
        "time": time.time(),
        "session": {"id": "test", "title": "", "labels": {}, "study": "", "mode": "user"},
        "turn_id": "",
        "seq": 0,
        "summary": "a test delivery from atomizerctl notify test",
        "data": {"test": True},
    }
    return json.dumps(doc, separators=(",", ":")).encode()


def sign(secret: str, stamp: str, body: bytes) -> str:
    mac = hmac.new(secret.encode(), stamp.encode() + b"." + body, hashlib.sha256)
    return f"v1={mac.hexdigest()}"


def cmd_notify(_client: object, args: argparse.Namespace, out: Output) -> int:
    secret = args.secret or os.environ.get(SECRET_ENV, "")
    if not secret:
        out.error(f"notify test: give the endpoint's secret (--secret or ${SECRET_ENV})")
        return EXIT_INVALID
    body = sample(args.event)
    stamp = str(int(time.time()))
    headers = {
        "Content-Type": "application/json",
        "X-Atomizer-Timestamp": stamp,
        "X-Atomizer-Signature": sign(secret, stamp, body),
        "X-Atomizer-Event": args.event,
    }
    try:
        conn, target = _connection(args.url, args.timeout)
        try:
            conn.request("POST", target, body=body, headers=headers)
            status = conn.getresponse().status
        finally:
            conn.close()
    except (OSError, http.client.HTTPException, ValueError) as e:
        out.error(f"notify test: {args.url}: {e}")
        return EXIT_FAILED
    ok = 200 <= status < 300
    if out.json:
        out.record({"url": args.url, "status": status, "delivered": ok})
    else:
        out.line(f"HTTP {status} from {args.url}" + ("" if ok else " (not delivered)"))
    return EXIT_OK if ok else EXIT_FAILED


def _connection(url: str, timeout: float) -> tuple[http.client.HTTPConnection, str]:
    if url.startswith(("/", "unix:")):
        return _UnixConnection(url.removeprefix("unix:").removeprefix("//"), timeout), "/"
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError("expected an http:// or https:// URL or a Unix socket path")
    target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    cls = http.client.HTTPSConnection if parts.scheme == "https" else http.client.HTTPConnection
    return cls(parts.hostname, parts.port, timeout=timeout), target


class _UnixConnection(http.client.HTTPConnection):
    def __init__(self, path: str, timeout: float) -> None:
        super().__init__("localhost", timeout=timeout)
        self.path = path

    def connect(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(self.timeout)
        sock.connect(self.path)
        self.sock = sock
