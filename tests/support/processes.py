"""The agent processes the test suite starts, found by pid: the shims of this checkout (their
command line names its shim.py) and what runs under them, and the fake agent.

Shims outlive their daemon by design (docs/restart.md), so a test that kills a daemon leaves
them running until their orphan timeout; `end_shims` ends a daemon's leftovers, and the suite
checks at its end that nothing of its own is still alive (tests/conftest.py).
"""

from __future__ import annotations

import contextlib
import os
import signal
import time
from dataclasses import dataclass
from pathlib import Path

from atomizerd.agents import shim

SHIM = str(Path(shim.__file__).resolve())
FAKE_AGENT = str(Path(__file__).resolve().with_name("fake_agent.py"))


@dataclass(frozen=True)
class Proc:
    pid: int
    ppid: int
    pgid: int
    argv: tuple[str, ...]

    def describe(self) -> str:
        return (
            f"pid {self.pid} (group {self.pgid}, parent {self.ppid}): {' '.join(self.argv)[:200]}"
        )


def _read(pid: int) -> Proc | None:
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            argv = tuple(a.decode(errors="replace") for a in f.read().split(b"\0") if a)
    except OSError:
        return None
    fields = stat[stat.rfind(b")") + 1 :].split()
    if fields[0] in (b"Z", b"X"):
        return None  # exited (a zombie waits for its parent only)
    return Proc(pid, int(fields[1]), int(fields[2]), argv)


def processes() -> list[Proc]:
    out = []
    for name in os.listdir("/proc"):
        if name.isdigit() and (p := _read(int(name))) is not None:
            out.append(p)
    return out


def is_shim(p: Proc) -> bool:
    return SHIM in p.argv


def shims(runtime_dir: Path | None = None) -> list[Proc]:
    """Live shims of this checkout; of one daemon's runtime dir if given."""
    found = [p for p in processes() if is_shim(p)]
    if runtime_dir is None:
        return found
    prefix = str(runtime_dir / "agents") + os.sep
    return [p for p in found if any(a.startswith(prefix) for a in p.argv)]


def suite_processes() -> list[Proc]:
    """The shims of this checkout, what runs under them, and fake agents (with or without)."""
    every = processes()
    shim_pids = {p.pid for p in every if is_shim(p)}
    return [
        p
        for p in every
        if p.pid in shim_pids or p.ppid in shim_pids or any(a == FAKE_AGENT for a in p.argv)
    ]


def end(procs: list[Proc]) -> None:
    """SIGKILL each process's group (an agent also dies with its shim)."""
    for p in procs:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(p.pgid, signal.SIGKILL)


def end_shims(runtime_dir: Path) -> list[Proc]:
    """Ends the shims a daemon of `runtime_dir` left (and their agents); returns them."""
    left = shims(runtime_dir)
    under = [p for p in processes() if p.ppid in {s.pid for s in left}]
    end(under + left)
    return left


def wait_gone(procs: list[Proc], timeout: float) -> list[Proc]:
    """Those of `procs` still alive (same pid and command line) after `timeout`."""
    deadline = time.monotonic() + timeout
    while True:
        alive = [p for p in procs if (q := _read(p.pid)) is not None and q.argv == p.argv]
        if not alive or time.monotonic() > deadline:
            return alive
        time.sleep(0.1)
