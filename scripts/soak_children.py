#!/usr/bin/env python3
"""The daemon's live agents, counted from /proc often, by a process of its own.

    python scripts/soak_children.py DAEMON_PID [--interval 0.01]

Used by scripts/soak and scripts/bench (`ChildSampler`) to check the pool's cap from outside:
every `interval` it counts the daemon's agents: its own children (ppid = the daemon) and,
when agents run under shims, the shims' children; the CLI's own children (its sandbox helpers
and tools, background commands) are not counted. An agent is a process whose argv has
AGENT_MARKER, which every agent's has, or a fork of the daemon not yet exec'd (the daemon's
own command line); a shim (SHIM_MARKER) is not one: it holds no agent once its agent has
exited, whatever it does in the milliseconds before it exits itself. Other children (the
start-up `--version` probe, the sandbox probe) are counted apart. A zombie counts as what it
was: a zombie agent still holds its pool slot until it is reaped.

Prints "ready" once it has taken its first sample, then runs until its stdin closes and
writes one JSON line: how often it sampled, the most agents seen and when, the most agents of
each second, and every change of the count. Standard library only, so it starts in tens of
milliseconds; in its own process it neither waits for the caller's event loop nor holds its
GIL.

One scan lists /proc and reads the stat of new pids only (a process never becomes the
daemon's child later, and no pid is reused within one interval), then the few children's
cmdline: a fraction of a millisecond.
"""

from __future__ import annotations

import argparse
import json
import os
import select
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

AGENT_MARKER = b"--mcp-config="  # every agent's argv has it (its private MCP config)
SHIM_MARKER = b"/agents/shim.py"  # a shim's argv (it holds the agent's argv too)
SAMPLE_INTERVAL = 0.01


def _ppid(pid: int) -> int | None:
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            raw = f.read()
    except OSError:
        return None
    # comm (field 2) may hold spaces and ')': fields after the last ')' start at state.
    fields = raw[raw.rfind(b")") + 1 :].split()
    try:
        return int(fields[1])
    except (IndexError, ValueError):
        return None


def _cmdline(pid: int) -> bytes:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read()
    except OSError:
        return b""


def _kind(cmd: bytes, own: bytes, under_shim: bool, shims: bool = False) -> str:
    """What a child of the daemon (or of a shim: `under_shim`) is. A shim's own fork that has
    not exec'd the agent yet carries the shim's argv: under a shim it already is the agent.
    With `shims` (the daemon runs every agent under one), a fork of the daemon that has not
    exec'd yet is a shim or a probe to be, never an agent."""
    if under_shim:
        return "agent" if AGENT_MARKER in cmd else "other"
    if any(SHIM_MARKER in arg for arg in cmd.split(b"\0")[:4]):
        return "shim"
    return "agent" if AGENT_MARKER in cmd or (cmd == own and not shims) else "other"


def count_children(
    daemon_pid: int, interval: float, out: IO[str], agents_under_shims: bool = False
) -> None:
    own = _cmdline(daemon_pid)
    children: dict[int, str] = {}  # pid -> "agent" | "shim" | "other"
    under_shim: set[int] = set()  # children of a shim (the agent it started)
    strangers: set[int] = set()
    t0 = time.monotonic()
    last = t0
    gaps: list[float] = []
    changes: list[tuple[float, int]] = []  # (seconds, agents) whenever the count changed
    per_second: dict[int, int] = {}  # whole second -> most agents in it
    most = most_other = samples = 0
    most_seen: list[tuple[int, int, str]] = []
    most_at = 0.0
    current = -1
    stdin = sys.stdin.buffer
    while True:
        if samples:
            readable, _, _ = select.select([stdin], [], [], interval)
            if readable and not os.read(stdin.fileno(), 4096):
                break
        now = time.monotonic()
        gaps.append(now - last)
        last = now
        pids = {int(n) for n in os.listdir("/proc") if n.isdigit()}
        if daemon_pid not in pids:
            break
        strangers &= pids
        for pid in [p for p in children if p not in pids]:
            del children[pid]
            under_shim.discard(pid)
        new = {pid: _ppid(pid) for pid in pids - strangers - children.keys()}
        for pid, ppid in new.items():  # the daemon's children first: a new shim's child next
            if ppid == daemon_pid:
                children[pid] = _kind(_cmdline(pid), own, False, agents_under_shims)
        shims = {pid for pid, kind in children.items() if kind == "shim"}
        for pid, ppid in new.items():
            if ppid == daemon_pid:
                continue
            if ppid is not None and ppid in shims:
                children[pid] = "agent"
                under_shim.add(pid)
            elif ppid is not None:
                strangers.add(pid)
        for pid in children:
            cmd = _cmdline(pid)
            if cmd:  # empty: a zombie, which keeps what it was
                children[pid] = _kind(cmd, own, pid in under_shim, agents_under_shims)
        agents = sum(1 for kind in children.values() if kind == "agent")
        shim_count = sum(1 for kind in children.values() if kind == "shim")
        second = int(now - t0)
        per_second[second] = max(per_second.get(second, 0), agents)
        most_other = max(most_other, len(children) - agents - shim_count)
        if agents > most:
            most, most_at = agents, now - t0
            # Which processes they were: (pid, parent, argv), for a cap exceeded.
            most_seen = [
                (
                    pid,
                    _ppid(pid) or 0,
                    _cmdline(pid).replace(b"\0", b" ")[:160].decode(errors="replace"),
                )
                for pid, kind in children.items()
                if kind == "agent"
            ]
        if agents != current:
            changes.append((round(now - t0, 3), agents))
            current = agents
        if not samples:
            out.write("ready\n")
            out.flush()
        samples += 1
    gaps_ms = sorted(g * 1000 for g in gaps[1:]) or [0.0]
    summary = {
        "samples": samples,
        "seconds": last - t0,
        "gap_ms": {
            "p50": gaps_ms[len(gaps_ms) // 2],
            "p99": gaps_ms[min(len(gaps_ms) - 1, int(len(gaps_ms) * 0.99))],
            "max": gaps_ms[-1],
        },
        "most_agents": most,
        "most_seen": most_seen,
        "most_agents_at_s": most_at,
        "most_other_children": most_other,
        "per_second": [per_second.get(i, 0) for i in range(max(per_second, default=-1) + 1)],
        "changes": changes,
    }
    out.write(json.dumps(summary) + "\n")
    out.flush()


@dataclass
class ChildCount:
    """What the sampler saw."""

    samples: int = 0
    seconds: float = 0.0
    gap_ms: dict[str, float] = field(default_factory=dict)
    most_agents: int = 0
    most_agents_at_s: float = 0.0
    most_other_children: int = 0
    most_seen: list[tuple[int, int, str]] = field(default_factory=list)  # (pid, ppid, argv)
    per_second: list[int] = field(default_factory=list)
    changes: list[tuple[float, int]] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        """The sampler ran and reported."""
        return self.samples > 0

    def describe(self) -> str:
        g = self.gap_ms
        return (
            f"{self.samples} samples in {self.seconds:.0f} s, one every "
            f"{g.get('p50', 0):.1f} ms (p99 {g.get('p99', 0):.1f}, max {g.get('max', 0):.0f})"
        )


class ChildSampler:
    """`count_children` for one daemon pid in a process of its own, from start() to stop()."""

    def __init__(
        self, daemon_pid: int, interval: float = SAMPLE_INTERVAL, *, shims: bool = False
    ) -> None:
        self.daemon_pid = daemon_pid
        self.interval = interval
        self.shims = shims
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> ChildSampler:
        argv = [sys.executable, str(Path(__file__).resolve()), str(self.daemon_pid)]
        self.proc = subprocess.Popen(
            [*argv, "--interval", str(self.interval), *(["--shims"] if self.shims else [])],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
        )
        assert self.proc.stdout is not None
        if self.proc.stdout.readline().strip() != b"ready":
            self.proc.kill()
            self.proc.wait()
            raise RuntimeError(f"the child sampler did not start for pid {self.daemon_pid}")
        return self

    def stop(self) -> ChildCount:
        """Ends the sampling; what it saw (empty if it failed)."""
        if self.proc is None:
            return ChildCount()
        try:
            out, _ = self.proc.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            return ChildCount()
        finally:
            self.proc = None
        lines = out.decode().strip().splitlines()
        if not lines:
            return ChildCount()
        data = json.loads(lines[-1])
        data["changes"] = [(float(t), int(n)) for t, n in data["changes"]]
        return ChildCount(**data)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("pid", type=int, help="the daemon's pid")
    parser.add_argument("--interval", type=float, default=SAMPLE_INTERVAL)
    parser.add_argument(
        "--shims", action="store_true", help="agents run under shims: a daemon fork is none"
    )
    args = parser.parse_args(argv)
    count_children(args.pid, args.interval, sys.stdout, args.shims)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
