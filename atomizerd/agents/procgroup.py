"""OS-level lifecycle of an agent's process group: a parent-death signal at spawn (util-linux
`setpriv`, see `pdeathsig_argv`), a stable identity (pid, pgid, start time) and signalling a
group only while it is provably ours.

Why the start time: a daemon that was SIGKILLed records its agents' pids; by the time a new
daemon sweeps them, a pid may belong to someone else. A pid plus the process's start time
(`/proc/<pid>/stat` field 22, clock ticks since boot) names one process for the life of the
boot, so a group is only signalled when its leader still has the recorded start time.

Why a group can be trusted without its leader: the kernel keeps a pid number allocated while any
process uses it as a process-group id, so if members of group P exist and no process P does,
the group has existed continuously since its leader died. Every member of an agent's group is a
descendant of the agent (the agent started a new session), hence started no earlier than the
agent; a member older than the recorded start time proves the group is someone else's.

Why the scan of /proc is rare, and never on the event loop when it matters: finding a group's
members means reading every process's stat (milliseconds on a busy machine), but it is only
needed when the leader is gone and the group still has members. While the leader is alive (or
an unreaped zombie of ours) its own stat decides; once it is gone, signal 0 to the group tells
whether any member is left, and usually none is. `kill_group_if_same_async` does the remaining
case, a scan, in a worker thread.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import signal
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class ProcStat:
    """The fields of `/proc/<pid>/stat` we use."""

    pid: int
    state: str
    ppid: int
    pgrp: int
    session: int
    start_time: int


def read_stat(pid: int) -> ProcStat | None:
    """The process's stat, or None if there is no such process (or no procfs)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            raw = f.read()
    except OSError:
        return None
    return _parse_stat(pid, raw)


def _parse_stat(pid: int, raw: bytes) -> ProcStat | None:
    # Field 2 (comm) is in parentheses and may itself contain spaces and ')': split after the
    # last ')'. What follows starts at field 3 (state), so field N is at index N - 3.
    close = raw.rfind(b")")
    if close < 0:
        return None
    fields = raw[close + 1 :].split()
    try:
        return ProcStat(
            pid=pid,
            state=fields[0].decode("ascii", "replace"),
            ppid=int(fields[1]),
            pgrp=int(fields[2]),
            session=int(fields[3]),
            start_time=int(fields[19]),
        )
    except (IndexError, ValueError):
        return None


def process_start_time(pid: int) -> int | None:
    """Start time of `pid` in clock ticks since boot (stat field 22); None if it is gone."""
    stat = read_stat(pid)
    return stat.start_time if stat else None


def is_running(pid: int, start_time: int | None = None) -> bool:
    """True if `pid` exists, is not a zombie, and (if given) still has `start_time`."""
    stat = read_stat(pid)
    if stat is None or stat.state in ("Z", "X"):
        return False
    return start_time is None or stat.start_time == start_time


def _all_stats() -> Iterator[ProcStat]:
    with contextlib.suppress(OSError):
        for name in os.listdir("/proc"):
            if name.isdigit():
                stat = read_stat(int(name))
                if stat is not None:
                    yield stat


def group_members(pgid: int) -> list[ProcStat]:
    """Live (non-zombie) processes whose process group is `pgid`: a scan of all of /proc,
    milliseconds on a busy machine (run it off the event loop)."""
    return [s for s in _all_stats() if s.pgrp == pgid and s.state not in ("Z", "X")]


def group_exists(pgid: int) -> bool:
    """True if some process (zombies included) is in process group `pgid`; no scan."""
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # it exists, and is not ours to signal
    return True


def _decided_without_scan(pgid: int, start_time: int) -> bool | None:
    """is_our_group's answer where the leader's stat (or an empty group) settles it; None when
    only the members' start times can tell (the leader is gone, members are left)."""
    leader = read_stat(pgid)
    if leader is not None and leader.state not in ("Z", "X"):
        return leader.start_time == start_time and leader.pgrp == pgid
    if leader is not None:
        # A zombie holds the number, so the group cannot have been recreated since: ours if
        # the zombie is our leader (live members left or not), else someone else's.
        return leader.start_time == start_time and leader.pgrp == pgid
    if not group_exists(pgid):
        return False  # nobody left to signal
    return None


def is_our_group(pgid: int, start_time: int) -> bool:
    """True if group `pgid` has members and is the group whose leader had `start_time`.
    Scans /proc only if the leader is gone and members are left."""
    decided = _decided_without_scan(pgid, start_time)
    if decided is not None:
        return decided
    members = group_members(pgid)
    return bool(members) and all(m.start_time >= start_time for m in members)


def _signal_group(pgid: int, sig: int) -> bool:
    try:
        os.killpg(pgid, sig)
    except ProcessLookupError:
        return False
    return True


def kill_group_if_same(pgid: int, start_time: int, sig: int = signal.SIGKILL) -> bool:
    """Signal process group `pgid` if it is still the one led by the process that had
    `start_time` (see the module docstring). Returns True if the group was signalled.

    May scan /proc (see `is_our_group`): on the event loop use `kill_group_if_same_async`."""
    return is_our_group(pgid, start_time) and _signal_group(pgid, sig)


async def kill_group_if_same_async(pgid: int, start_time: int, sig: int = signal.SIGKILL) -> bool:
    """`kill_group_if_same` for the event loop: decided and signalled at once while the
    leader's stat (or an empty group) settles it; otherwise the scan of /proc, and the signal,
    run in a worker thread."""
    decided = _decided_without_scan(pgid, start_time)
    if decided is None:
        return await asyncio.to_thread(kill_group_if_same, pgid, start_time, sig)
    return decided and _signal_group(pgid, sig)


# --- parent-death signal ------------------------------------------------------------------------

# util-linux's setpriv (Debian: package util-linux, /usr/bin/setpriv; --pdeathsig since 2.33).
SETPRIV_CANDIDATES = ("/usr/bin/setpriv", "/bin/setpriv")


class SetprivMissing(RuntimeError):
    """No usable `setpriv --pdeathsig` on this machine: agents could outlive their parent."""


_setpriv: str | None = None


def find_setpriv() -> str:
    """The path of setpriv, looked up once (the fixed Debian paths, then PATH) and remembered.

    Raises SetprivMissing if there is none.
    """
    global _setpriv
    if _setpriv is None:
        found = next((c for c in SETPRIV_CANDIDATES if os.access(c, os.X_OK)), None)
        found = found or shutil.which("setpriv")
        if found is None:
            raise SetprivMissing(
                "setpriv not found (looked in "
                + ", ".join(SETPRIV_CANDIDATES)
                + " and PATH); install util-linux: agents are started through "
                "`setpriv --pdeathsig KILL` so they die with their parent (daemon or shim)"
            )
        _setpriv = found
    return _setpriv


def check_setpriv(timeout: float = 10.0) -> str:
    """Find setpriv and prove it sets a parent-death signal (`setpriv --pdeathsig KILL --
    setpriv --version`), for the start-up check. Returns its path; raises SetprivMissing."""
    path = find_setpriv()
    try:
        done = subprocess.run(
            [*pdeathsig_argv(), path, "--version"],
            stdin=subprocess.DEVNULL,
            capture_output=True,
            timeout=timeout,
            check=False,
        )
    except (OSError, subprocess.SubprocessError) as exc:
        raise SetprivMissing(f"{path} cannot be run: {exc}") from exc
    if done.returncode != 0:
        err = done.stderr.decode("utf-8", "replace").strip()[-300:]
        raise SetprivMissing(
            f"{path} --pdeathsig failed (exit {done.returncode}: {err}); util-linux 2.33 or "
            "later is needed"
        )
    return path


def pdeathsig_argv() -> list[str]:
    """The argv prefix that runs a program with SIGKILL as its parent-death signal:
    `setpriv --pdeathsig KILL --` (then the program's own argv).

    Why a wrapper and not a `preexec_fn`: the daemon is full of gRPC threads, and Python code
    between fork and exec in such a process crashed (SIGSEGV/SIGABRT) in up to a quarter of
    the spawns under load, before the agent ever ran. Without a `preexec_fn`, subprocess forks
    (vfork) and execs in C with nothing of ours in between; setpriv then calls
    prctl(PR_SET_PDEATHSIG) and execs the program, so the pid the caller records is the
    program's own.

    The kernel sends the signal when the *thread* that forked the child exits, not only when the
    whole parent process does. asyncio forks in the thread that calls `subprocess_exec`, i.e.
    the event loop's thread (its child watcher only waits for children, it never forks), so an
    agent lives as long as the loop's thread: in the daemon the main thread, i.e. the daemon
    itself. Never spawn agents from an executor thread.

    setpriv does not check whether its parent already died before its prctl, so a daemon
    killed within that millisecond leaves the agent running; the agent then reads end of file
    on its stdin (only the daemon held the pipe) and exits, as the CLI does at end of input.
    """
    return [find_setpriv(), "--pdeathsig", "KILL", "--"]
