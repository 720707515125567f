"""The API socket's name never points at nothing, even across a planned restart.

gRPC binds and owns its listening socket (it cannot be handed one already bound), and closing
or stopping a server makes a Unix socket refuse connections at once. So the name clients
connect to is moved, never removed, while the daemon restarts in place:

- every daemon binds gRPC on a private name beside the configured one and, once serving,
  renames it over the configured name (one atomic step: a client finds either the socket
  that was there or the new one);
- a daemon about to restart in place first binds a *holding* socket and renames it over the
  name: from then on new connections wait in its backlog while the old server stops; the
  holding socket's descriptor is kept across the exec (`ENV` names it);
- the next daemon renames its own server's socket over the name, then relays what waited in
  the holding socket's backlog to its server (`backlog.py`) and closes it.

A client therefore sees a bounded wait during a restart, never a refusal.
"""

from __future__ import annotations

import contextlib
import os
import socket
import sys
from pathlib import Path

# The holding socket's descriptor number, in the environment of the exec'd daemon.
ENV = "ATOMIZERD_LISTEN_FD"


def private_name(path: Path, what: str) -> Path:
    """A name in the socket's own directory (a rename never crosses file systems), no longer
    than the socket's own is likely to be (a Unix socket's path has a short limit)."""
    return path.with_name(f".{os.getpid()}.{what}")


def publish(private: Path, path: Path) -> None:
    """Puts the socket bound at `private` under `path`, replacing whatever is there."""
    os.rename(private, path)


def hold(path: Path, mode: int) -> socket.socket:
    """A listening socket put under `path` in place of the server's: connections made from now
    on wait in its backlog for the next daemon."""
    tmp = private_name(path, "hold")
    with contextlib.suppress(FileNotFoundError):
        tmp.unlink()
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.bind(str(tmp))
        os.chmod(tmp, mode)
        sock.listen(socket.SOMAXCONN)
        publish(tmp, path)
    except BaseException:
        sock.close()
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        raise
    return sock


def pass_on(sock: socket.socket) -> None:
    """Keeps `sock` open across the exec that follows, and tells the next daemon its number."""
    os.set_inheritable(sock.fileno(), True)
    os.environ[ENV] = str(sock.fileno())


def inherited() -> socket.socket | None:
    """The holding socket a previous daemon of this process passed on (`pass_on`), if any
    (read before the configuration and the log are: a problem goes to stderr).
    It is under the socket's name: nothing renames over it but a daemon, and this one is
    the only daemon of its runtime dir (the lock)."""
    value = os.environ.pop(ENV, None)
    if not value:
        return None
    try:
        fd = int(value)
        os.set_inheritable(fd, False)  # not to agents, nor to a later exec unless passed on
        sock = socket.socket(fileno=fd)
    except (ValueError, OSError) as e:
        print(f"atomizerd: warning: ignored inherited socket {value}: {e}", file=sys.stderr)
        return None
    if sock.family != socket.AF_UNIX or not sock.getsockopt(
        socket.SOL_SOCKET, socket.SO_ACCEPTCONN
    ):
        print(f"atomizerd: warning: ignored inherited fd {fd}: not listening", file=sys.stderr)
        sock.close()
        return None
    sock.setblocking(False)
    return sock
