"""The connections that waited in a restart's holding socket (daemon/listener.py), relayed to
the server that now serves under the socket's name.

Each is relayed byte for byte for as long as the client keeps it: only the connections made
during the restart are, and the next stop or restart ends them (the server's GOAWAY reaches
the client through the relay, and the client's next connection goes to the server itself).
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
from pathlib import Path

import structlog

log = structlog.get_logger("atomizerd.daemon.relay")

# After the rename, the holding socket is still accepted from this long: a client that found
# it under the name just before may connect just after.
DRAIN = 1.0
READ = 64 * 1024


async def relay_backlog(held: socket.socket, path: Path) -> None:
    """Accepts what `held` has (and gets within DRAIN), relays each to the server at `path`,
    then closes it; returns once every relayed connection has ended."""
    loop = asyncio.get_running_loop()
    relays: set[asyncio.Task[None]] = set()
    deadline = loop.time() + DRAIN
    accepted = 0
    try:
        while (left := deadline - loop.time()) > 0:
            try:
                conn, _ = await asyncio.wait_for(loop.sock_accept(held), left)
            except TimeoutError:
                break
            accepted += 1
            relay = asyncio.create_task(_relay(conn, path))
            relays.add(relay)
            relay.add_done_callback(relays.discard)
    finally:
        held.close()
    if accepted:
        log.info("relayed connections made during the restart", connections=accepted)
    if relays:
        await asyncio.gather(*relays, return_exceptions=True)


async def _relay(conn: socket.socket, path: Path) -> None:
    conn.setblocking(False)
    try:
        client_r, client_w = await asyncio.open_connection(sock=conn)
    except OSError:
        conn.close()
        return
    try:
        server_r, server_w = await asyncio.open_unix_connection(str(path))
    except OSError as e:
        log.warning("could not relay a connection made during the restart", error=str(e))
        client_w.close()
        return
    directions = {
        asyncio.ensure_future(_copy(client_r, server_w)),
        asyncio.ensure_future(_copy(server_r, client_w)),
    }
    try:
        # Either side closing ends the connection (HTTP/2 has no use for a half-closed one).
        await asyncio.wait(directions, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for d in directions:
            d.cancel()
        await asyncio.gather(*directions, return_exceptions=True)
        for w in (client_w, server_w):
            w.close()
            with contextlib.suppress(OSError, asyncio.CancelledError):
                await w.wait_closed()


async def _copy(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
    with contextlib.suppress(OSError):
        while data := await src.read(READ):
            dst.write(data)
            await dst.drain()
