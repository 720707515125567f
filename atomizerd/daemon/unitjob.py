"""Under systemd: whether a SIGTERM is the stop half of `systemctl restart`.

systemd stops a service the same way for `systemctl stop` and `systemctl restart`: its
KillSignal to the main process. The two must end differently here (a restart hands the agents
and their running turns to the next daemon, docs/restart.md; a stop stops them), so on SIGTERM
the daemon asks systemd which job is running for its own unit (`systemctl list-jobs`). Anything
unclear (not under systemd, no systemctl, no answer in time) is a stop: today's behaviour.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
from pathlib import Path

import structlog

log = structlog.get_logger("atomizerd.daemon.unitjob")

RESTART_JOBS = frozenset({"restart", "try-restart", "reload-or-restart"})
_ANSWER_TIMEOUT = 2.0


def own_unit(cgroup: str) -> tuple[str, bool] | None:
    """The service this process runs in, from /proc/self/cgroup, and whether it is a user
    manager's (then `systemctl --user` knows its jobs)."""
    for line in cgroup.splitlines():
        parts = line.split(":", 2)[-1].split("/")
        services = [p for p in parts if p.endswith(".service")]
        if services:
            user = any(p.startswith("user@") for p in parts[: parts.index(services[-1])])
            return services[-1], user
    return None


def job_types(listing: str, unit: str) -> set[str]:
    """The types of `unit`'s jobs in `systemctl list-jobs --no-legend --plain` output
    (columns: JOB UNIT TYPE STATE)."""
    types = set()
    for line in listing.splitlines():
        fields = line.split()
        if len(fields) >= 4 and fields[1] == unit:
            types.add(fields[2])
    return types


async def restart_pending() -> bool:
    """Whether systemd is restarting this daemon's unit right now."""
    if not os.environ.get("INVOCATION_ID"):
        return False
    systemctl = shutil.which("systemctl")
    try:
        unit = own_unit(await asyncio.to_thread(Path("/proc/self/cgroup").read_text))
    except OSError:
        unit = None
    if systemctl is None or unit is None:
        return False
    name, user = unit
    argv = [systemctl, "--user" if user else "--system", "list-jobs", "--no-legend", "--plain"]
    try:
        proc = await asyncio.create_subprocess_exec(
            *argv,
            name,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.DEVNULL,
        )
    except OSError as e:
        log.warning("cannot ask systemd about the running job", error=str(e))
        return False
    try:
        out, _ = await asyncio.wait_for(proc.communicate(), _ANSWER_TIMEOUT)
    except TimeoutError:
        with contextlib.suppress(ProcessLookupError):
            proc.kill()
        await proc.wait()
        log.warning("systemd did not say which job is running; stopping")
        return False
    types = job_types(out.decode(errors="replace"), name)
    log.info("systemd job of this unit", unit=name, jobs=sorted(types))
    return bool(types & RESTART_JOBS)
