"""One webhook delivery: an HTTP/1.1 POST over TCP, TLS or a Unix socket, on the event loop's
own streams (nothing blocks the loop, no thread per delivery), bounded in time and in what is
read back (the status line; the receiver's body is never read).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import ssl
from urllib.parse import urlsplit

from atomizerd import __version__
from atomizerd.config.notify import Webhook

USER_AGENT = f"atomizerd/{__version__}"

# What is read of an answer: its status line, at most this long.
MAX_STATUS_LINE = 8192


class DeliveryError(Exception):
    """The attempt failed without an HTTP status (refused, reset, timed out, not HTTP): worth
    retrying."""


async def post(hook: Webhook, body: bytes, headers: dict[str, str], timeout: float) -> int:
    """Sends `body` to the endpoint; the HTTP status of its answer."""
    try:
        async with asyncio.timeout(timeout):
            reader, writer = await _connect(hook)
            try:
                writer.write(_request(hook, body, headers))
                await writer.drain()
                line = await reader.readline()
            finally:
                writer.close()
                with contextlib.suppress(OSError, ssl.SSLError):
                    await writer.wait_closed()
    except TimeoutError:
        raise DeliveryError(f"no answer within {timeout:g} s") from None
    except (OSError, ValueError, asyncio.IncompleteReadError, asyncio.LimitOverrunError) as e:
        raise DeliveryError(f"{type(e).__name__}: {e}") from None
    return _status(line)


async def _connect(hook: Webhook) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    path = hook.unix_path
    if path is not None:
        return await asyncio.open_unix_connection(path, limit=MAX_STATUS_LINE)
    parts = urlsplit(hook.url)
    host = parts.hostname or ""
    if parts.scheme == "https":
        return await asyncio.open_connection(
            host,
            parts.port or 443,
            ssl=_tls(),
            server_hostname=host,
            limit=MAX_STATUS_LINE,
        )
    return await asyncio.open_connection(host, parts.port or 80, limit=MAX_STATUS_LINE)


@functools.cache
def _tls() -> ssl.SSLContext:
    """The system's trust store, loaded once: loading it takes milliseconds of the loop."""
    return ssl.create_default_context()


def _request(hook: Webhook, body: bytes, headers: dict[str, str]) -> bytes:
    if hook.unix_path is not None:
        target, host = "/", "localhost"
    else:
        parts = urlsplit(hook.url)
        target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
        host = parts.netloc.rpartition("@")[2]
    lines = [
        f"POST {target} HTTP/1.1",
        f"Host: {host}",
        f"User-Agent: {USER_AGENT}",
        "Content-Type: application/json",
        f"Content-Length: {len(body)}",
        "Connection: close",
        *(f"{k}: {v}" for k, v in headers.items()),
    ]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body


def _status(line: bytes) -> int:
    parts = line.split(None, 2)
    if len(parts) < 2 or not parts[0].startswith(b"HTTP/") or not parts[1].isdigit():
        raise DeliveryError(f"not an HTTP answer: {line[:80]!r}")
    return int(parts[1])
