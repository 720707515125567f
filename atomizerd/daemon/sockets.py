"""Taking a Unix socket path over from a daemon that died: its socket file stays behind, and a
new listener cannot bind while it is there. Shared by the API socket and the metrics socket."""

from __future__ import annotations

import enum
import socket
import stat
from pathlib import Path


class Claim(enum.Enum):
    """What `claim_socket_path` found."""

    FREE = "free"
    REPLACED = "replaced"  # a dead socket was removed
    NOT_A_SOCKET = "not a socket"
    IN_USE = "in use"


def claim_socket_path(path: Path) -> Claim:
    """Frees `path` for a new listener where that is safe: a socket nobody accepts on (its
    daemon died) is removed; a live one is never taken from the process serving it, and a file
    of another kind is never removed."""
    if not path.exists() and not path.is_symlink():
        return Claim.FREE
    if not stat.S_ISSOCK(path.lstat().st_mode):
        return Claim.NOT_A_SOCKET
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
        probe.settimeout(1.0)
        try:
            probe.connect(str(path))
        except OSError:
            path.unlink()
            return Claim.REPLACED
    return Claim.IN_USE
