"""Where is the daemon's socket?

In order: the explicit argument (`--socket`), `$ATOMIZERD_SOCKET`, the per-user daemon's
`$XDG_RUNTIME_DIR/atomizerd/atomizerd.sock`, the system daemon's `/run/atomizerd/atomizerd.sock`.
An explicit choice (argument or variable) is used as given; the two defaults are probed and the
first that exists wins, so a user's own daemon shadows the system one.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

from atomizer_client.errors import DaemonNotFoundError

ENV_VAR = "ATOMIZERD_SOCKET"
SYSTEM_SOCKET = Path("/run/atomizerd/atomizerd.sock")
SOCKET_NAME = "atomizerd.sock"


def _strip_scheme(value: str) -> Path:
    # Accept a gRPC target as well as a path: unix:///abs, unix:/abs, unix:rel.
    if value.startswith("unix://"):
        return Path(value[len("unix://") :])
    if value.startswith("unix:"):
        return Path(value[len("unix:") :])
    return Path(value)


def default_candidates(environ: Mapping[str, str] | None = None) -> list[Path]:
    """The default socket locations, most specific first."""
    env = os.environ if environ is None else environ
    out = []
    runtime = env.get("XDG_RUNTIME_DIR")
    if runtime:
        out.append(Path(runtime) / "atomizerd" / SOCKET_NAME)
    out.append(SYSTEM_SOCKET)
    return out


def find_socket(
    explicit: str | os.PathLike[str] | None = None,
    environ: Mapping[str, str] | None = None,
) -> Path:
    """The socket path to connect to; `DaemonNotFoundError` names every place searched."""
    env = os.environ if environ is None else environ
    if explicit:
        return _checked(_strip_scheme(os.fspath(explicit)), "the --socket argument")
    if env.get(ENV_VAR):
        return _checked(_strip_scheme(env[ENV_VAR]), f"${ENV_VAR}")
    candidates = default_candidates(env)
    for path in candidates:
        if path.exists():
            return path
    looked = "\n".join(f"  {p}" for p in candidates)
    hint = "" if env.get("XDG_RUNTIME_DIR") else " ($XDG_RUNTIME_DIR is not set)"
    raise DaemonNotFoundError(
        f"no atomizerd socket found{hint}; looked in:\n{looked}\n"
        f"start the daemon (systemctl [--user] start atomizerd), or pass --socket / "
        f"set ${ENV_VAR}"
    )


def _checked(path: Path, source: str) -> Path:
    if not path.exists():
        raise DaemonNotFoundError(f"no atomizerd socket at {path} (from {source})")
    return path


def target_for(path: Path) -> str:
    """The gRPC target string for a socket path."""
    return f"unix://{path.absolute()}"


__all__ = ["ENV_VAR", "SYSTEM_SOCKET", "default_candidates", "find_socket", "target_for"]
