#!/usr/bin/env python3
"""Restarts and kills during a soak, and what they must leave unchanged.

Used by the autonomy soak (scripts/soak_autonomy.py) with `--restart-every S` and
`--kill-every S`:

- `Churn` asks the daemon for a planned restart every `restart_every` seconds (RestartDaemon
  and SIGUSR2 in turn) and, every `kill_every` seconds, SIGKILLs it instead and starts it
  again (the next daemon adopts the agents and their turns). After each it waits for health
  SERVING; a daemon not serving within HUNG_AFTER is a hung restart (counted, then killed and
  started again so the soak goes on).
- `Vitals` samples, every few seconds, the daemon's RSS and open file descriptors (from /proc,
  whatever its pid is now) and the agents live under this run's shims — the pool's cap across
  daemons, which a sampler of one daemon's children cannot see once a killed daemon's shims
  are adopted by the next.
- `non_json_lines` reads the daemon's whole log: every line must be a JSON object.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import grpc.aio
from atomizer.v1 import daemon_pb2, daemon_pb2_grpc

from scripts.soak_children import ChildCount, ChildSampler
from tests.support import processes
from tests.support.daemon import RunningDaemon, health_serving

HUNG_AFTER = 60.0  # a restart not serving by then hangs (they take about a second)
VITALS_EVERY = 2.0
AGENT_MARKER = "--mcp-config="  # in every agent's argv (scripts/soak_children.py)


@dataclass
class ChurnTally:
    planned: int = 0
    kills: int = 0
    hung: list[str] = field(default_factory=list)
    serving_after: list[float] = field(default_factory=list)  # seconds, per fault
    pids: list[int] = field(default_factory=list)  # the daemon's pid after each fault
    at: list[float] = field(default_factory=list)  # when each fault came (since the start)
    counts: list[ChildCount] = field(default_factory=list)  # one per daemon process


class Churn:
    """Planned restarts and SIGKILLs of one daemon on a schedule, until stopped."""

    def __init__(self, d: RunningDaemon, restart_every: float, kill_every: float) -> None:
        self.d = d
        self.restart_every = restart_every
        self.kill_every = kill_every
        self.tally = ChurnTally()
        self._sampler: ChildSampler | None = None
        self._t0 = time.monotonic()

    def start_sampler(self) -> None:
        assert self.d.proc is not None
        # Agents run under shims here: the daemon's start-up probes are not agents.
        self._sampler = ChildSampler(self.d.proc.pid, shims=True).start()

    def stop_sampler(self) -> None:
        if self._sampler is not None:
            self.tally.counts.append(self._sampler.stop())
            self._sampler = None

    async def run(self, until: float) -> None:
        """Faults on schedule until `until` (monotonic); returns with the daemon serving."""
        started = time.monotonic()
        step = self.restart_every or self.kill_every
        next_kill = started + self.kill_every if self.kill_every else float("inf")
        n = 0
        while True:
            n += 1
            at = started + n * step
            if at > until - 5:
                return
            await asyncio.sleep(max(0.0, at - time.monotonic()))
            if at >= next_kill - 0.001:  # this tick's fault is a kill
                next_kill += self.kill_every
                await self.kill()
            else:
                await self.restart(n)

    async def restart(self, n: int) -> None:
        since = time.monotonic()
        self.tally.at.append(since - self._t0)
        if n % 2:
            try:
                async with grpc.aio.insecure_channel(self.d.target) as ch:
                    stub = daemon_pb2_grpc.DaemonServiceStub(ch)
                    await stub.RestartDaemon(daemon_pb2.RestartDaemonRequest(), timeout=15)
            except grpc.aio.AioRpcError as e:
                self.tally.hung.append(f"RestartDaemon answered {e.code().name}: {e.details()}")
                return
        else:
            self.d.signal(signal.SIGUSR2)
        self.tally.planned += 1
        await asyncio.sleep(0.2)  # the old daemon stops serving first
        await self.wait_serving(since, "planned restart")

    async def kill(self) -> None:
        since = time.monotonic()
        self.tally.at.append(since - self._t0)
        self.d.kill()
        self.stop_sampler()
        self.d.start(wait=False)
        self.start_sampler()
        self.tally.kills += 1
        await self.wait_serving(since, "SIGKILL")

    async def wait_serving(self, since: float, what: str) -> None:
        assert self.d.proc is not None
        while time.monotonic() - since < HUNG_AFTER:
            if await asyncio.to_thread(health_serving, self.d.target):
                self.tally.serving_after.append(time.monotonic() - since)
                self.tally.pids.append(self.d.proc.pid)
                return
            if self.d.proc.poll() is not None:
                self.tally.hung.append(f"{what}: the daemon exited with {self.d.proc.returncode}")
                break
            await asyncio.sleep(0.05)
        else:
            self.tally.hung.append(f"{what}: not serving {HUNG_AFTER:.0f} s later")
        # Go on with a fresh daemon: the soak's other checks still mean something.
        with contextlib.suppress(ProcessLookupError):
            self.d.kill()
        self.stop_sampler()
        self.d.start(wait=False)
        self.start_sampler()
        await asyncio.to_thread(self.d.wait_serving, HUNG_AFTER)


@dataclass
class Sample:
    at: float  # seconds since the sampler started
    pid: int
    rss_kib: int
    fds: int
    agents: int  # live under this run's shims


class Vitals:
    """The daemon's RSS and fds and the run's live agents, every VITALS_EVERY seconds."""

    def __init__(self, d: RunningDaemon) -> None:
        self.d = d
        self.samples: list[Sample] = []
        self._t0 = time.monotonic()

    async def run(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            sample = await asyncio.to_thread(self.sample)
            if sample is not None:
                self.samples.append(sample)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), VITALS_EVERY)

    def sample(self) -> Sample | None:
        if self.d.proc is None:
            return None
        pid = self.d.proc.pid
        try:
            status = Path(f"/proc/{pid}/status").read_text()
            fds = len(os.listdir(f"/proc/{pid}/fd"))
        except OSError:
            return None  # between a kill and the next start
        rss = next(
            (int(line.split()[1]) for line in status.splitlines() if line.startswith("VmRSS:")), 0
        )
        shims = {p.pid for p in processes.shims(self.d.runtime_dir)}
        agents = sum(
            1
            for p in processes.processes()
            if p.ppid in shims and "--mcp-config=" in " ".join(p.argv)
        )
        return Sample(time.monotonic() - self._t0, pid, rss, fds, agents)

    def by_minute(self) -> list[tuple[int, float, float, int, int]]:
        """(minute, median RSS MiB, max RSS MiB, max fds, most agents) per minute."""
        rows = []
        minutes = sorted({int(s.at // 60) for s in self.samples})
        for m in minutes:
            got = [s for s in self.samples if int(s.at // 60) == m]
            rss = [s.rss_kib / 1024 for s in got]
            rows.append(
                (
                    m,
                    statistics.median(rss),
                    max(rss),
                    max(s.fds for s in got),
                    max(s.agents for s in got),
                )
            )
        return rows

    def flat(self) -> tuple[bool, str]:
        """Whether RSS and fds stayed flat: the last third of the run against its middle third
        (the first third is warm-up: caches and the replay logs fill)."""
        if len(self.samples) < 9:
            return True, "too short to tell"
        third = len(self.samples) // 3
        middle = self.samples[third : 2 * third]
        last = self.samples[2 * third :]
        rss_mid = statistics.median(s.rss_kib for s in middle) / 1024
        rss_last = statistics.median(s.rss_kib for s in last) / 1024
        fds_mid = max(s.fds for s in middle)
        fds_last = max(s.fds for s in last)
        # A tenth, or 8 MiB: the allocator's high-water mark moves by that much on its own.
        rss_ok = rss_last <= max(rss_mid * 1.10, rss_mid + 8)
        fds_ok = fds_last <= fds_mid + 4  # a few sockets of the moment's streams
        text = (
            f"RSS median {rss_mid:.1f} → {rss_last:.1f} MiB, most fds {fds_mid} → {fds_last} "
            "(middle third → last third)"
        )
        return rss_ok and fds_ok, text


def non_json_lines(log: Path) -> list[str]:
    """Lines of the daemon's log that are not a JSON object."""
    bad = []
    with log.open("rb") as f:
        for raw in f:
            line = raw.decode(errors="replace").rstrip("\n")
            try:
                ok = isinstance(json.loads(line), dict)
            except ValueError:
                ok = False
            if not ok:
                bad.append(line[:200])
    return bad
