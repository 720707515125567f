#!/usr/bin/env python3
"""atomizerd benchmarks, each measured side by side with its baseline in the same run.

    scripts/bench [--quick] [--only NAME[,NAME...]] [--json FILE] [--profile DIR] [--keep]

Sections (--only): warm, first, followup, getsession, events, concurrent, scale, startup, purge.
Prints one table: what, baseline, ours, ratio, target, verdict. Medians over repeated runs,
p99 where the tail matters. Everything runs on loopback and Unix sockets in a temporary dir;
every process started here is stopped before exit.

- warm / first / followup: the real pinned `claude` CLI against the fake Messages API (run in
  its own process so it is never the bottleneck). The daemon is measured at the client: from
  sending SendMessage to the first text_delta event. Baselines: the same CLI, same argv (built
  by the daemon's own Launcher), same prompt, driven directly over stdin by this script; and
  the original's one-shot `claude -p` per message (prompt over stdin, replayed history).
- getsession / events: the daemon with the scripted fake agent vs a bare grpc.aio server on a
  Unix socket (a separate process), called by the same raw-bytes client.
- concurrent: 32 sessions streaming at once (pool.max_live 32), and the event loop's worst
  stall meanwhile.
- scale / startup: 10,000 sessions inserted into the SQLite database with atomizerd.store.db.Store
  before the daemon starts; RSS, ListSessions pages, reaper passes; exec -> READY=1 on a
  NOTIFY_SOCKET datagram socket bound here.
- purge: the event loop's worst stall while the reaper purges 10,000 sessions of 50 messages
  each (inserted before the daemon starts, all past `reaper.retention`).

Loop stalls are the daemon's own account: its lag probe (atomizerd/daemon/loopprobe.py) wakes
every 2 ms here and logs every lag of 5 ms or more; a row reports the worst logged inside the
workload's wall-clock window, beside the worst of an idle stretch of the same daemon.

Rows marked INFO help read a miss: for warm turns, the time each driver spends outside the
CLI's own account of the turn (whole turn minus the `duration_ms` of its `result` line), and the
daemon's share of its first text from its own event timestamps (request -> turn_started, first
text_delta emitted -> received). Timings of the real CLI are noisy on a busy 2-core machine: the
1-minute load average is printed with the table.

--profile DIR: after the measured runs of warm, getsession, events and concurrent, repeats the
daemon's workload (and the bare grpc.aio baselines') under `py-spy record --native` (py-spy
must be installed; it is not a project requirement) and prints where the busy samples go:
atomizerd code (by innermost atomizerd function), grpc core, the asyncio loop; raw collapsed
stacks are kept in DIR.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import traceback
import uuid
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

BENCH = Path(__file__).resolve()
REPO = BENCH.parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import grpc  # noqa: E402
import grpc.aio  # noqa: E402
from atomizer.v1 import daemon_pb2, daemon_pb2_grpc, session_pb2, session_pb2_grpc  # noqa: E402

from scripts.bench_baselines import (  # noqa: E402
    ECHO_METHOD,
    STREAM_METHOD,
    DirectAgent,
    TurnTiming,
    jsonable,
    one_shot,
    original_prompt,
    serve_grpc_baseline,
    stream_request,
)
from tests.support.daemon import RunningDaemon, real_claude  # noqa: E402

pb = session_pb2
SECTIONS = (
    "warm",
    "first",
    "followup",
    "getsession",
    "events",
    "concurrent",
    "scale",
    "startup",
    "purge",
)
CLI_SECTIONS = {"warm", "first", "followup"}
REPLY = "Here is a short answer for the benchmark."
GET_SESSION = "/atomizer.v1.SessionService/GetSession"
SEND_MESSAGE = "/atomizer.v1.SessionService/SendMessage"
PREWARM_WAIT = 2.0
TURN_GAP = 0.15  # think time between turns, for both sides alike
SECTION_TIMEOUT = 180  # seconds per section (a third of it with --quick)
# The daemon's loop-lag probe, as the stall rows run it: a wake-up every 2 ms (so any stall
# longer than that is seen, measured to within 2 ms) and a log line for every lag of 5 ms or
# more. The target of those rows: no stall longer than 20 ms.
STALL_PROBE = {"loop_probe_interval": 0.002, "loop_stall_log_ms": 5.0}
STALL_TARGET_MS = 20.0


# --- statistics and the table --------------------------------------------------------------


def pct(xs: Sequence[float], p: float) -> float:
    """Percentile with linear interpolation (numpy's default)."""
    s = sorted(xs)
    if not s:
        return math.nan
    k = (len(s) - 1) * p / 100
    lo = math.floor(k)
    hi = min(lo + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (k - lo)


def med(xs: Sequence[float]) -> float:
    return pct(xs, 50)


def ms(seconds: float) -> str:
    v = seconds * 1000
    if math.isnan(v):
        return "n/a"
    return f"{v:.2f} ms" if v < 10 else f"{v:.1f} ms" if v < 100 else f"{v:.0f} ms"


@dataclass
class Row:
    what: str
    baseline: str
    ours: str
    ratio: str
    target: str
    verdict: str  # PASS, MISS, INFO, ERROR
    data: dict[str, Any] = field(default_factory=dict)


def verdict(ok: bool) -> str:
    return "PASS" if ok else "MISS"


def print_table(rows: Sequence[Row]) -> None:
    headers = ("what", "baseline", "ours", "ratio", "target", "verdict")
    cells = [headers] + [(r.what, r.baseline, r.ours, r.ratio, r.target, r.verdict) for r in rows]
    widths = [max(len(c[i]) for c in cells) for i in range(len(headers))]

    def line(c: Sequence[str]) -> str:
        return "| " + " | ".join(v.ljust(w) for v, w in zip(c, widths, strict=True)) + " |"

    print(line(headers))
    print("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    for c in cells[1:]:
        print(line(c))


def note(text: str) -> None:
    print(f"  · {text}", file=sys.stderr, flush=True)


# --- processes we start ----------------------------------------------------------------------


class Children:
    """Every process this script starts, stopped on the way out (by pid, never by name)."""

    def __init__(self) -> None:
        self.popens: list[subprocess.Popen[bytes]] = []
        self.daemons: list[RunningDaemon] = []

    def popen(self, argv: Sequence[str], **kw: Any) -> subprocess.Popen[bytes]:
        proc: subprocess.Popen[bytes] = subprocess.Popen(list(argv), **kw)
        self.popens.append(proc)
        return proc

    def stop_popen(self, proc: subprocess.Popen[bytes], sig: int = signal.SIGTERM) -> None:
        if proc.poll() is None:
            proc.send_signal(sig)
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        if proc in self.popens:
            self.popens.remove(proc)

    def daemon(self, d: RunningDaemon) -> RunningDaemon:
        self.daemons.append(d)
        return d

    def stop_daemon(self, d: RunningDaemon) -> None:
        with contextlib.suppress(Exception):
            d.stop(timeout=20)
        if d in self.daemons:
            self.daemons.remove(d)

    def close(self) -> None:
        for d in list(self.daemons):
            self.stop_daemon(d)
        for p in list(self.popens):
            self.stop_popen(p)


def rss_kib(pid: int) -> tuple[int, int]:
    """(VmRSS, VmHWM) of a process, in KiB."""
    values: dict[str, int] = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, rest = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            values[key] = int(rest.split()[0])
    return values.get("VmRSS", 0), values.get("VmHWM", 0)


Window = tuple[float, float]  # wall-clock seconds (time.time()), start and end


@dataclass(frozen=True)
class Stall:
    lag_ms: float  # how late the probe woke up
    cpu_ms: float  # CPU time of the loop's thread meanwhile: our own work, not waiting


def loop_stalls(d: RunningDaemon, windows: Sequence[Window]) -> list[Stall]:
    """What the daemon's probe logged as `event loop stalled` overlapping the windows (a line
    is written when the loop gets going again: the stall is the lag before its time)."""
    out: list[Stall] = []
    for r in d.log_records():
        if r.get("event") != "event loop stalled":
            continue
        lag = float(r["lag_ms"])
        end = datetime.fromisoformat(r["timestamp"]).timestamp()
        if any(end >= w_start and end - lag / 1000 <= w_end for w_start, w_end in windows):
            out.append(Stall(lag, float(r.get("cpu_ms", math.nan))))
    return out


def stall_text(stalls: Sequence[Stall]) -> str:
    floor = STALL_PROBE["loop_stall_log_ms"]
    if not stalls:
        return f"< {floor:g} ms"
    worst = max(stalls, key=lambda s: s.lag_ms)
    over = sum(1 for s in stalls if s.lag_ms > STALL_TARGET_MS)
    return (
        f"{worst.lag_ms:.1f} ms (CPU {worst.cpu_ms:.1f}); {len(stalls)} ≥ {floor:g} ms, "
        f"{over} > {STALL_TARGET_MS:g} ms"
    )


def stall_row(what: str, idle: Sequence[Stall], busy: Sequence[Stall], detail: str) -> Row:
    """The worst lag against the target; beside it the most CPU the loop spent in one stall
    (a loaded machine makes lags of waiting for a CPU, which is not the daemon's doing)."""
    worst = max((s.lag_ms for s in busy), default=0.0)
    worst_cpu = max((s.cpu_ms for s in busy), default=0.0)
    return Row(
        what,
        f"{stall_text(idle)} idle",
        stall_text(busy),
        f"{detail}; most CPU in one stall {worst_cpu:.1f} ms",
        f"≤ {STALL_TARGET_MS:g} ms",
        verdict(worst <= STALL_TARGET_MS),
        {
            "worst_ms": worst,
            "worst_cpu_ms": worst_cpu,
            "stalls": [s.__dict__ for s in busy],
            "idle_stalls": [s.__dict__ for s in idle],
        },
    )


# --- the environments ------------------------------------------------------------------------


@dataclass
class Opts:
    quick: bool
    workdir: Path
    profile_dir: Path | None
    keep: bool


def daemon_config(extra: dict[str, dict[str, Any]] | None = None) -> dict[str, dict[str, Any]]:
    cfg: dict[str, dict[str, Any]] = {"logging": {"level": "info", "format": "json"}}
    for section, values in (extra or {}).items():
        cfg.setdefault(section, {}).update(values)
    return cfg


async def aio_channel(d: RunningDaemon) -> grpc.aio.Channel:
    ch = grpc.aio.insecure_channel(d.target)
    await asyncio.wait_for(ch.channel_ready(), 10)
    return ch


class CliEnv:
    """The fake Messages API (own process), a daemon running the real CLI, and what the direct
    baselines need to start the very same CLI themselves."""

    def __init__(self, opts: Opts, children: Children) -> None:
        self.opts = opts
        self.children = children
        self.dir = opts.workdir / "cli"
        self.dir.mkdir(parents=True, exist_ok=True)
        self.home = self.dir / "home"
        self.tmp = self.dir / "tmp"
        self.tmp.mkdir(parents=True, exist_ok=True)
        self.api: subprocess.Popen[bytes] | None = None
        self.base_url = ""
        self.daemon: RunningDaemon | None = None
        self.channel: grpc.aio.Channel | None = None
        self.stub: session_pb2_grpc.SessionServiceAsyncStub | None = None
        self.agent_env: dict[str, str] = {}
        self.launch_env: dict[str, str] = {}
        self.cwd = ""
        self.context = ""
        self.allowed_tools = ""
        self._launcher: Any = None

    def _start_api(self) -> subprocess.Popen[bytes]:
        with open(self.dir / "fake_api.log", "wb") as api_log:
            return self.children.popen(
                [sys.executable, "-m", "tests.support.fake_messages_api", "--port", "0", "-q"],
                stdout=subprocess.PIPE,
                stderr=api_log,
                cwd=REPO,
            )

    async def start(self) -> None:
        self.api = self._start_api()
        assert self.api.stdout is not None
        self.base_url = self.api.stdout.readline().decode().strip()
        if not self.base_url.startswith("http://127.0.0.1:"):
            raise RuntimeError(f"fake Messages API did not start: {self.base_url!r}")
        self.agent_env = {
            "ANTHROPIC_BASE_URL": self.base_url,
            "ANTHROPIC_API_KEY": "sk-ant-fake-key",
            "CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC": "1",
            "CLAUDE_CODE_MAX_RETRIES": "1",
            "HOME": str(self.home),
            "CLAUDE_CONFIG_DIR": str(self.home / ".claude"),
            "TMPDIR": str(self.tmp),
        }
        self.home.mkdir(exist_ok=True)
        cfg = daemon_config(
            {
                "agent": {
                    "command": [real_claude()],
                    "env": self.agent_env,
                    "first_event_timeout": 60.0,
                    "stop_grace": 3.0,
                },
                "pool": {"max_live": 8},
            }
        )
        self.daemon = self.children.daemon(RunningDaemon(self.dir, cfg))
        self.daemon.start()
        self.channel = await aio_channel(self.daemon)
        self.stub = session_pb2_grpc.SessionServiceStub(self.channel)
        self._prepare_direct()
        # The first CLI run in a fresh config dir sets it up; keep that out of the numbers.
        await self.one_shot("warm-up", [])

    def _prepare_direct(self) -> None:
        """The daemon's own Launcher, on a copy of its config with another runtime dir, builds
        the direct processes' argv and env: the very command line the daemon uses."""
        from atomizerd.atomizer.launcher import Launcher
        from atomizerd.atomizer.prompt import ContextBuilder
        from atomizerd.atomizer.studies import Studies
        from atomizerd.daemon import config as config_mod

        assert self.daemon is not None
        cfg = config_mod.load(
            self.daemon.config_path,
            environ={},
            overrides={"daemon.runtime_dir": str(self.dir / "direct-run")},
        )
        self._launcher = Launcher(cfg, Studies(cfg), ContextBuilder())
        self.cwd = str(cfg.atomizer_root)
        self.allowed_tools = " ".join(cfg.modes.user.allowed_tools)
        spec = self._spec()
        self.launch_env = spec.env
        self.context = self._launcher.context_text(self._record())

    def _record(self) -> Any:
        from atomizerd.store.db import SessionRecord

        now = time.time()
        return SessionRecord(
            session_id="bench" + uuid.uuid4().hex[:12],
            mode="user",
            study_id=None,
            agent_session_id=str(uuid.uuid4()),
            agent_started=False,
            closed=False,
            created_at=now,
            last_active_at=now,
            message_count=0,
            total_cost_usd=0.0,
            agent_cost_usd=0.0,
            seq_reserved=0,
        )

    def _spec(self) -> Any:
        return self._launcher.spec_for(self._record(), resume=False)

    async def spawn_direct(self) -> DirectAgent:
        spec = self._spec()
        return await DirectAgent.spawn(spec.argv, spec.env, spec.cwd)

    async def one_shot(
        self, message: str, history: Sequence[tuple[str, str]]
    ) -> tuple[float, float]:
        """The original: `claude --print --allowedTools ...`, the prompt (context, the last
        messages replayed, the message) over stdin, plain text out."""
        argv = [real_claude(), "--print", f"--allowedTools={self.allowed_tools}"]
        prompt = original_prompt(self.context, history, message)
        first, total, _ = await one_shot(argv, self.launch_env, self.cwd, prompt)
        return first, total

    async def create_session(self) -> str:
        assert self.stub is not None
        resp = await self.stub.CreateSession(pb.CreateSessionRequest(mode=pb.MODE_USER), timeout=10)
        return resp.session.session_id

    async def terminate(self, sid: str) -> None:
        assert self.stub is not None
        await self.stub.TerminateSession(
            pb.TerminateSessionRequest(session_id=sid, purge=True), timeout=30
        )

    async def wait_prewarmed(self, sid: str, since: float, limit: float) -> float:
        """Seconds from `since` until the session is READY (its process initialized)."""
        assert self.stub is not None
        while time.perf_counter() - since < limit:
            r = await self.stub.GetSession(pb.GetSessionRequest(session_id=sid), timeout=10)
            if r.session.state == pb.SESSION_STATE_READY:
                return time.perf_counter() - since
            await asyncio.sleep(0.05)
        return math.nan

    async def daemon_turn(self, sid: str, text: str) -> DaemonTurn:
        assert self.stub is not None
        wall0 = time.time()
        t0 = time.perf_counter()
        first: float | None = None
        started_at = delta_at = delta_seen = math.nan
        call = self.stub.SendMessage(pb.SendMessageRequest(session_id=sid, text=text), timeout=60)
        async for resp in call:
            kind = resp.event.WhichOneof("kind")
            if kind == "turn_started":
                started_at = resp.event.time.ToNanoseconds() / 1e9
            elif kind == "text_delta" and first is None:
                first = time.perf_counter() - t0
                delta_seen = time.time()
                delta_at = resp.event.time.ToNanoseconds() / 1e9
            elif kind == "turn_failed":
                raise RuntimeError(f"turn failed: {resp.event.turn_failed.message}")
            elif kind == "turn_completed":
                if first is None:
                    raise RuntimeError("turn completed without text")
                return DaemonTurn(
                    first_text=first,
                    total=time.perf_counter() - t0,
                    cli_duration=resp.event.turn_completed.duration_ms / 1000,
                    to_started=started_at - wall0,
                    started_to_delta=delta_at - started_at,
                    delta_to_client=delta_seen - delta_at,
                )
        raise RuntimeError("stream ended without a terminal event")

    async def close(self) -> None:
        if self.channel is not None:
            await self.channel.close(None)
        if self.daemon is not None:
            self.children.stop_daemon(self.daemon)
        if self.api is not None:
            self.children.stop_popen(self.api)


@dataclass
class DaemonTurn:
    """One turn through the daemon, timed at the client; the split uses the daemon's own event
    timestamps (same machine, same clock)."""

    first_text: float  # SendMessage sent -> first text_delta event received
    total: float  # ... -> turn_completed received
    cli_duration: float  # the CLI's own duration_ms of the turn (relayed in turn_completed)
    to_started: float  # SendMessage sent -> turn_started emitted (user message committed)
    started_to_delta: float  # turn_started emitted -> first text_delta emitted (the agent)
    delta_to_client: float  # first text_delta emitted -> received by the client


def prompt(i: int) -> str:
    return f"benchmark message {i} [[reply:{REPLY}]]"


class FakeDaemon:
    """A daemon with the scripted fake agent, and a raw-bytes client for it."""

    def __init__(
        self, opts: Opts, children: Children, name: str, extra: dict[str, dict[str, Any]]
    ) -> None:
        self.dir = opts.workdir / name
        self.dir.mkdir(parents=True, exist_ok=True)
        self.children = children
        self.daemon = children.daemon(RunningDaemon(self.dir, daemon_config(extra)))
        self.channel: grpc.aio.Channel | None = None

    async def start(self, *, wait: bool = True) -> None:
        self.daemon.start(wait=wait)
        self.channel = await aio_channel(self.daemon)

    @property
    def stub(self) -> session_pb2_grpc.SessionServiceAsyncStub:
        assert self.channel is not None
        return session_pb2_grpc.SessionServiceStub(self.channel)

    @property
    def status_stub(self) -> daemon_pb2_grpc.DaemonServiceAsyncStub:
        assert self.channel is not None
        return daemon_pb2_grpc.DaemonServiceStub(self.channel)

    @property
    def pid(self) -> int:
        assert self.daemon.proc is not None
        return self.daemon.proc.pid

    async def wait_ready(self, sids: Sequence[str], timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        pending = set(sids)
        while pending:
            if time.monotonic() > deadline:
                raise TimeoutError(f"{len(pending)} sessions not READY after {timeout:g} s")
            for sid in list(pending):
                r = await self.stub.GetSession(pb.GetSessionRequest(session_id=sid), timeout=10)
                if r.session.state == pb.SESSION_STATE_READY:
                    pending.discard(sid)
            if pending:
                await asyncio.sleep(0.05)

    async def close(self) -> None:
        if self.channel is not None:
            await self.channel.close(None)
        self.children.stop_daemon(self.daemon)


class BaselineServer:
    """The bare grpc.aio server (`bench.py --serve-baseline`) in its own process."""

    def __init__(self, opts: Opts, children: Children) -> None:
        self.socket = opts.workdir / "baseline.sock"
        self.children = children
        self.proc: subprocess.Popen[bytes] | None = None
        self.channel: grpc.aio.Channel | None = None

    async def start(self) -> None:
        self.proc = self.children.popen(
            [sys.executable, str(BENCH), "--serve-baseline", str(self.socket)],
            stdout=subprocess.PIPE,
            cwd=REPO,
        )
        assert self.proc.stdout is not None
        if self.proc.stdout.readline().strip() != b"ready":
            raise RuntimeError("baseline grpc server did not start")
        self.channel = grpc.aio.insecure_channel(f"unix://{self.socket}")
        await asyncio.wait_for(self.channel.channel_ready(), 10)

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    async def close(self) -> None:
        if self.channel is not None:
            await self.channel.close(None)
        if self.proc is not None:
            self.children.stop_popen(self.proc)


# --- raw-bytes client calls (identical for the daemon and the baseline) -------------------------


async def unary_latencies(
    channel: grpc.aio.Channel, method: str, request: bytes, n: int
) -> list[float]:
    call = channel.unary_unary(method, request_serializer=None, response_deserializer=None)
    out: list[float] = []
    clock = time.perf_counter
    for _ in range(n):
        t0 = clock()
        await call(request, timeout=10)
        out.append(clock() - t0)
    return out


async def stream_arrivals(
    channel: grpc.aio.Channel, method: str, request: bytes
) -> tuple[float, list[float], list[bytes]]:
    """(time the call was made, arrival time of each message, the messages), perf_counter."""
    call = channel.unary_stream(method, request_serializer=None, response_deserializer=None)
    clock = time.perf_counter
    times: list[float] = []
    msgs: list[bytes] = []
    t0 = clock()
    async for msg in call(request, timeout=120):
        times.append(clock())
        msgs.append(msg)
    return t0, times, msgs


def rate(times: Sequence[float]) -> float:
    if len(times) < 2 or times[-1] <= times[0]:
        return math.nan
    return (len(times) - 1) / (times[-1] - times[0])


# --- profiling ----------------------------------------------------------------------------------


RATE_HZ = 250
# Leaf functions where a sampled thread is waiting, not working.
_IDLE_LEAVES = frozenset(
    {
        "epoll_wait",
        "epoll_pwait",
        "wait4",
        "waitpid",
        "poll",
        "ppoll",
        "select",
        "pselect6",
        "nanosleep",
        "clock_nanosleep",
        "pthread_cond_wait",
        "pthread_cond_timedwait",
        "__futex_abstimed_wait_common",
        "sem_wait",
        "accept4",
    }
)
_BOOT = ("atomizerd/__main__.py", "atomizerd/daemon/main.py")


@dataclass(frozen=True)
class Frame:
    name: str
    file: str  # "atomizerd/sessions/turns.py", "libc.so.6", "grpc/_cython/cygrpc....so"

    @property
    def label(self) -> str:
        short = "/".join(self.file.split("/")[-2:])
        return f"{short}:{self.name}"


def _parse_frame(text: str) -> Frame | None:
    """'func (path/to/file.py:123)' or 'func (lib.so)'; py-spy's process/thread frames: None."""
    text = text.strip()
    if text.startswith(("process ", "thread ")):
        return None
    name, _, where = text.partition(" (")
    where = where.removesuffix(")")
    path, _, line = where.rpartition(":")
    if not line.isdigit():
        path = where
    return Frame(name, path)


class Profiler:
    """py-spy record (raw collapsed stacks, native frames) against one pid during a workload;
    then the busy samples are split into atomizerd code, grpc core and the asyncio loop."""

    def __init__(self, children: Children, out: Path, rate: int = RATE_HZ) -> None:
        self.children = children
        self.out = out
        self.rate = rate
        self.proc: subprocess.Popen[bytes] | None = None
        self.exe = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")

    @property
    def available(self) -> bool:
        return Path(self.exe).exists()

    def start(self, pid: int) -> None:
        argv = [self.exe, "record", "--pid", str(pid), "--rate", str(self.rate), "--format", "raw"]
        argv += ["--native", "--output", str(self.out)]
        with open(self.out.with_suffix(".log"), "wb") as log:
            self.proc = self.children.popen(argv, stdout=log, stderr=subprocess.STDOUT)
        time.sleep(0.5)  # py-spy attaches

    def stop(self) -> None:
        if self.proc is not None:
            self.children.stop_popen(self.proc, signal.SIGINT)

    def summary(self, ops: int, op: str, top: int = 10) -> list[str]:
        if not self.out.exists():
            return [f"(no profile: see {self.out.with_suffix('.log')})"]
        idle = busy = 0
        buckets: Counter[str] = Counter()
        owners: Counter[str] = Counter()
        leaves: Counter[str] = Counter()
        for line in self.out.read_text(errors="replace").splitlines():
            stack, _, count_s = line.rpartition(" ")
            if not stack or not count_s.isdigit():
                continue
            count = int(count_s)
            frames = [f for f in map(_parse_frame, stack.split(";")) if f is not None]
            if not frames:
                continue
            if frames[-1].name in _IDLE_LEAVES:
                idle += count
                continue
            busy += count
            leaves[frames[-1].label] += count
            ours = [f for f in frames if f.file.startswith("atomizerd/") and f.file not in _BOOT]
            main_thread = any(f.file == "atomizerd/__main__.py" for f in frames)
            if ours:
                buckets["atomizerd code (and what it calls)"] += count
                owners[ours[-1].label] += count
            elif any("cygrpc" in f.file for f in frames):
                buckets["grpc core / cygrpc, no atomizerd frame"] += count
            elif main_thread:
                buckets["asyncio loop, other Python"] += count
            else:
                buckets["other threads"] += count
        if not busy:
            return ["(no busy samples)"]
        # Wall-clock sampling: "busy" is on-CPU or runnable (it includes waiting for a CPU on
        # a loaded machine), so this is an upper bound of the CPU time.
        busy_ms = busy * 1000 / self.rate
        out = [
            f"{busy} busy samples at {self.rate} Hz ({idle} idle left out): "
            f"{busy_ms / max(ops, 1):.3f} busy ms per {op} over {ops} {op}s"
        ]
        out += [f"  {100 * c / busy:5.1f}%  {b}" for b, c in buckets.most_common()]
        out.append("innermost atomizerd function (share of busy samples):")
        out += [f"  {100 * c / busy:5.1f}%  {f}" for f, c in owners.most_common(top)]
        out.append("leaf functions (share of busy samples):")
        out += [f"  {100 * c / busy:5.1f}%  {f}" for f, c in leaves.most_common(top)]
        return out


# --- sections ------------------------------------------------------------------------------------


class Bench:
    def __init__(self, opts: Opts) -> None:
        self.opts = opts
        self.children = Children()
        self.rows: list[Row] = []
        self.samples: dict[str, Any] = {}
        self.profiles: dict[str, list[str]] = {}
        self._cli: CliEnv | None = None
        self._fake: FakeDaemon | None = None
        self._baseline: BaselineServer | None = None
        self._followups: list[float] = []
        self._direct_followups: list[float] = []
        self._one_shot_followups: list[float] = []

    def n(self, full: int, quick: int) -> int:
        return quick if self.opts.quick else full

    async def cli(self) -> CliEnv:
        if self._cli is None:
            note("starting the fake Messages API and a daemon running the real claude CLI")
            self._cli = CliEnv(self.opts, self.children)
            await self._cli.start()
        return self._cli

    async def fake(self) -> FakeDaemon:
        if self._fake is None:
            self._fake = FakeDaemon(self.opts, self.children, "fake", {})
            await self._fake.start()
        return self._fake

    async def baseline(self) -> BaselineServer:
        if self._baseline is None:
            self._baseline = BaselineServer(self.opts, self.children)
            await self._baseline.start()
        return self._baseline

    async def close(self) -> None:
        for thing in (self._cli, self._fake, self._baseline):
            if thing is not None:
                with contextlib.suppress(Exception):
                    await thing.close()
        self.children.close()

    async def run(self, names: Sequence[str]) -> None:
        limit = self.n(SECTION_TIMEOUT, SECTION_TIMEOUT // 3)
        for i, name in enumerate(names):
            started = time.monotonic()
            note(f"section {name}")
            try:
                await asyncio.wait_for(getattr(self, f"sec_{name}")(), limit)
            except Exception as e:
                traceback.print_exc()
                what = f"{name}: timed out after {limit} s" if isinstance(e, TimeoutError) else name
                self.rows.append(Row(what, "", "", "", "", "ERROR", {"error": repr(e)}))
            note(f"section {name} took {time.monotonic() - started:.1f} s")
            await self._release_unneeded(set(names[i + 1 :]))

    async def _release_unneeded(self, later: set[str]) -> None:
        """Stops the shared daemons no later section needs, so they are not in the way."""
        if self._cli is not None and not later & CLI_SECTIONS:
            await self._cli.close()
            self._cli = None
        if not later & {"getsession", "events"}:
            for thing in (self._fake, self._baseline):
                if thing is not None:
                    await thing.close()
            self._fake = self._baseline = None

    # warm turns -------------------------------------------------------------------------------

    async def sec_warm(self) -> None:
        env = await self.cli()
        warmups, n = 3, self.n(25, 6)
        sid = await env.create_session()
        direct = await env.spawn_direct()
        try:
            await direct.initialize()
            await asyncio.sleep(PREWARM_WAIT)
            ours: list[float] = []
            base: list[float] = []
            ours_out: list[float] = []
            base_out: list[float] = []
            split: list[DaemonTurn] = []
            direct_runs: list[TurnTiming] = []
            for i in range(warmups + n):
                # Alternate who goes first, so drift and neighbours' noise hit both alike.
                if i % 2 == 0:
                    daemon_t = await env.daemon_turn(sid, prompt(i))
                    await asyncio.sleep(TURN_GAP)
                    direct_t = await direct.turn(prompt(i))
                else:
                    direct_t = await direct.turn(prompt(i))
                    await asyncio.sleep(TURN_GAP)
                    daemon_t = await env.daemon_turn(sid, prompt(i))
                await asyncio.sleep(TURN_GAP)
                if i >= warmups:
                    ours.append(daemon_t.first_text)
                    base.append(direct_t.first_text)
                    # The whole turn minus the CLI's own account of it: what the driver
                    # (the daemon, or this script) adds, free of the CLI's own noise.
                    ours_out.append(daemon_t.total - daemon_t.cli_duration)
                    base_out.append(direct_t.total - direct_t.cli_duration)
                    split.append(daemon_t)
                    direct_runs.append(direct_t)
            if self.opts.profile_dir is not None:
                assert env.daemon is not None and env.daemon.proc is not None
                prof = Profiler(self.children, self.opts.profile_dir / "warm.txt", rate=1000)
                if prof.available:
                    prof.start(env.daemon.proc.pid)
                    for i in range(n):
                        await env.daemon_turn(sid, prompt(i))
                        await asyncio.sleep(TURN_GAP)
                    prof.stop()
                    self.profiles["warm turns (real CLI), daemon"] = prof.summary(n, "turn")
        finally:
            await direct.close()
            await env.terminate(sid)
        b, o = med(base), med(ours)
        self.samples["warm"] = {
            "direct_s": base,
            "daemon_s": ours,
            "direct_outside_cli_s": base_out,
            "daemon_outside_cli_s": ours_out,
            "daemon_split": [t.__dict__ for t in split],
            "direct_runs": [t.__dict__ for t in direct_runs],
        }
        self.rows.append(
            Row(
                f"first text, warm turn (median of {n})",
                f"{ms(b)} direct stream-json",
                f"{ms(o)} (p90 {ms(pct(ours, 90))})",
                f"{o / b:.2f}× ({(o - b) * 1000:+.1f} ms)",
                "≤ baseline + 5 ms",
                verdict(o <= b + 0.005),
                {"baseline_s": b, "ours_s": o},
            )
        )
        bo, oo = med(base_out), med(ours_out)
        self.rows.append(
            Row(
                "  warm turn time outside the CLI (turn − its duration_ms)",
                f"{ms(bo)} direct",
                ms(oo),
                f"{(oo - bo) * 1000:+.1f} ms",
                "(reported)",
                "INFO",
                {"baseline_s": bo, "ours_s": oo},
            )
        )
        self.rows.append(_share_row("  daemon's share of its warm first text", split))

    # first turn of a pre-warmed session, and follow-ups -------------------------------------

    async def sec_first(self) -> None:
        env = await self.cli()
        reps = self.n(8, 2)
        cold: list[float] = []
        cold_total: list[float] = []
        prewarmed: list[float] = []
        ours: list[float] = []
        followups: list[float] = []
        first_split: list[DaemonTurn] = []
        prewarmed_out: list[float] = []  # whole turn minus the CLI's duration_ms
        ours_out: list[float] = []
        ready_after: list[float] = []  # CreateSession -> state READY (daemon's prewarm done)
        init_after: list[float] = []  # direct: spawn -> initialize answered
        direct_cli: list[float] = []  # the CLI's own duration_ms of that first turn
        direct_followups: list[float] = []
        one_shot_followups: list[float] = []
        daemon_cli: list[float] = []

        async def direct_run(rep: int) -> None:
            direct = await env.spawn_direct()
            try:
                init_after.append(await direct.initialize())
                await asyncio.sleep(
                    max(0.0, PREWARM_WAIT - (time.perf_counter() - direct.spawned_at))
                )
                t = await direct.turn(prompt(rep))
                prewarmed.append(t.first_text)
                prewarmed_out.append(t.total - t.cli_duration)
                direct_cli.append(t.cli_duration)
                for k in range(2):  # the same follow-ups as the daemon's, for reference
                    await asyncio.sleep(TURN_GAP)
                    direct_followups.append((await direct.turn(prompt(100 + k))).first_text)
            finally:
                await direct.close()

        async def daemon_run(rep: int) -> None:
            created = time.perf_counter()
            sid = await env.create_session()
            try:
                ready_after.append(await env.wait_prewarmed(sid, created, PREWARM_WAIT))
                await asyncio.sleep(max(0.0, PREWARM_WAIT - (time.perf_counter() - created)))
                r = await env.daemon_turn(sid, prompt(rep))
                ours.append(r.first_text)
                ours_out.append(r.total - r.cli_duration)
                daemon_cli.append(r.cli_duration)
                first_split.append(r)
                for k in range(2):
                    await asyncio.sleep(TURN_GAP)
                    followups.append((await env.daemon_turn(sid, prompt(100 + k))).first_text)
            finally:
                await env.terminate(sid)

        history = [(f"benchmark message {k}", REPLY) for k in range(2)]
        for rep in range(reps):
            first, total = await env.one_shot(prompt(rep), [])
            cold.append(first)
            cold_total.append(total)
            await asyncio.sleep(TURN_GAP)
            # The original's follow-up, in the same conditions as the daemon's follow-ups.
            first, _ = await env.one_shot(prompt(200 + rep), history)
            one_shot_followups.append(first)
            await asyncio.sleep(TURN_GAP)
            # Alternate which pre-warmed process goes first.
            for run in (direct_run, daemon_run) if rep % 2 == 0 else (daemon_run, direct_run):
                await run(rep)
                await asyncio.sleep(TURN_GAP)
        self._followups = followups
        self._direct_followups = direct_followups
        self._one_shot_followups = one_shot_followups
        self.samples["first"] = {
            "one_shot_first_byte_s": cold,
            "one_shot_exit_s": cold_total,
            "direct_prewarmed_s": prewarmed,
            "daemon_prewarmed_s": ours,
            "daemon_followup_s": followups,
            "direct_followup_s": direct_followups,
            "daemon_ready_after_create_s": ready_after,
            "direct_prewarmed_outside_cli_s": prewarmed_out,
            "daemon_prewarmed_outside_cli_s": ours_out,
            "daemon_prewarmed_split": [t.__dict__ for t in first_split],
            "direct_prewarmed_cli_duration_s": direct_cli,
            "daemon_prewarmed_cli_duration_s": daemon_cli,
            "direct_initialized_after_spawn_s": init_after,
        }
        note(
            f"pre-warm: daemon session READY {ms(med(ready_after))} after CreateSession; "
            f"direct initialize answered {ms(med(init_after))} after spawn"
        )
        b, o, p = med(cold), med(ours), med(prewarmed)
        self.rows.append(
            Row(
                f"first text, 1st turn of pre-warmed session ({reps} runs)",
                f"{ms(b)} one-shot claude -p (exit {ms(med(cold_total))})",
                ms(o),
                f"{b / o:.1f}× faster",
                "≥ 3× faster",
                verdict(b / o >= 3),
                {"baseline_s": b, "ours_s": o},
            )
        )
        self.rows.append(
            Row(
                "  same, vs direct pre-warmed stream-json",
                f"{ms(p)} direct, initialize + 2 s",
                f"{ms(o)} (outside CLI {ms(med(ours_out))} vs {ms(med(prewarmed_out))})",
                f"{o / p:.2f}× ({(o - p) * 1000:+.1f} ms)",
                "(reported)",
                "INFO",
                {"baseline_s": p, "ours_s": o},
            )
        )
        self.rows.append(
            _share_row(
                "  daemon's share of that first text",
                first_split,
                f"; CLI's own duration {ms(med(daemon_cli))} vs {ms(med(direct_cli))} direct",
            )
        )

    async def sec_followup(self) -> None:
        env = await self.cli()
        reps = self.n(8, 2)
        ours = list(self._followups)
        if not ours:  # `first` did not run: follow-ups of fresh pre-warmed sessions
            for rep in range(reps):
                sid = await env.create_session()
                try:
                    await asyncio.sleep(PREWARM_WAIT)
                    await env.daemon_turn(sid, prompt(rep))
                    for k in range(2):
                        await asyncio.sleep(TURN_GAP)
                        ours.append((await env.daemon_turn(sid, prompt(100 + k))).first_text)
                finally:
                    await env.terminate(sid)
        base = list(self._one_shot_followups)
        history = [(f"benchmark message {k}", REPLY) for k in range(2)]
        for rep in range(reps if not base else 0):
            first, _ = await env.one_shot(prompt(200 + rep), history)
            base.append(first)
            await asyncio.sleep(TURN_GAP)
        self.samples["followup"] = {"one_shot_history_s": base, "daemon_followup_s": ours}
        b, o = med(base), med(ours)
        self.rows.append(
            Row(
                f"first text, follow-up message ({len(ours)} vs {len(base)})",
                f"{ms(b)} one-shot + history replay",
                ms(o),
                f"{b / o:.1f}× faster",
                "≥ 10× faster",
                verdict(b / o >= 10),
                {"baseline_s": b, "ours_s": o},
            )
        )
        if self._direct_followups:
            d = med(self._direct_followups)
            self.rows.append(
                Row(
                    "  same, direct stream-json follow-ups (the CLI's own floor)",
                    f"{ms(b)} one-shot + history replay",
                    f"{ms(d)} direct ({len(self._direct_followups)})",
                    f"{b / d:.1f}× faster; daemon {(o - d) * 1000:+.1f} ms",
                    "(reported)",
                    "INFO",
                    {"baseline_s": b, "direct_s": d},
                )
            )

    # GetSession round trip --------------------------------------------------------------------

    async def sec_getsession(self) -> None:
        fake = await self.fake()
        base_srv = await self.baseline()
        assert fake.channel is not None and base_srv.channel is not None
        resp = await fake.stub.CreateSession(pb.CreateSessionRequest(mode=pb.MODE_USER), timeout=10)
        request = pb.GetSessionRequest(session_id=resp.session.session_id).SerializeToString()
        await fake.wait_ready([resp.session.session_id])
        n, blocks = self.n(3000, 600), 6
        ours: list[float] = []
        base: list[float] = []
        await unary_latencies(fake.channel, GET_SESSION, request, 200)
        await unary_latencies(base_srv.channel, ECHO_METHOD, request, 200)
        for _ in range(blocks):
            ours += await unary_latencies(fake.channel, GET_SESSION, request, n // blocks)
            base += await unary_latencies(base_srv.channel, ECHO_METHOD, request, n // blocks)
        self.samples["getsession"] = {
            "baseline_p50_s": med(base),
            "baseline_p99_s": pct(base, 99),
            "ours_p50_s": med(ours),
            "ours_p99_s": pct(ours, 99),
        }
        for label, p in (("p50", 50), ("p99", 99)):
            b, o = pct(base, p), pct(ours, p)
            self.rows.append(
                Row(
                    f"GetSession round trip {label} ({len(ours)} calls)",
                    f"{ms(b)} bare grpc.aio echo",
                    ms(o),
                    f"{o / b:.2f}×",
                    "≤ 1.5×",
                    verdict(o / b <= 1.5),
                    {"baseline_s": b, "ours_s": o},
                )
            )
        if self.opts.profile_dir is not None:
            prof = Profiler(self.children, self.opts.profile_dir / "getsession.txt")
            if prof.available:
                prof.start(fake.pid)
                await unary_latencies(fake.channel, GET_SESSION, request, n)
                prof.stop()
                self.profiles["GetSession, daemon"] = prof.summary(n, "call")
                prof = Profiler(self.children, self.opts.profile_dir / "echo.txt")
                prof.start(base_srv.pid)
                await unary_latencies(base_srv.channel, ECHO_METHOD, request, n)
                prof.stop()
                self.profiles["GetSession baseline, bare grpc.aio echo"] = prof.summary(n, "call")

    # events per second ------------------------------------------------------------------------

    async def sec_events(self) -> None:
        fake = await self.fake()
        base_srv = await self.baseline()
        assert fake.channel is not None and base_srv.channel is not None
        n = self.n(20000, 5000)
        reps = self.n(3, 1)
        resp = await fake.stub.CreateSession(pb.CreateSessionRequest(mode=pb.MODE_USER), timeout=10)
        sid = resp.session.session_id
        await fake.wait_ready([sid])

        def send(count: int) -> bytes:
            req = pb.SendMessageRequest(session_id=sid, text=f"go [[deltas:{count}]]")
            return req.SerializeToString()

        async def daemon_run(count: int) -> tuple[float, float, int, int]:
            t0, times, msgs = await stream_arrivals(fake.channel, SEND_MESSAGE, send(count))  # type: ignore[arg-type]
            deltas = []
            sizes = []
            for t, m in zip(times, msgs, strict=True):
                if pb.SendMessageResponse.FromString(m).event.WhichOneof("kind") == "text_delta":
                    deltas.append(t)
                    sizes.append(len(m))
            if len(deltas) != count:
                raise RuntimeError(f"expected {count} text deltas, got {len(deltas)}")
            return rate(deltas), times[-1] - t0, len(msgs), round(med(sizes))

        await daemon_run(min(n, 2000))  # warm-up
        ours: list[float] = []
        whole: list[float] = []
        size = 0
        for _ in range(reps):
            r, total, _, size = await daemon_run(n)
            ours.append(r)
            whole.append(total)
        base: list[float] = []
        await stream_arrivals(base_srv.channel, STREAM_METHOD, stream_request(2000, size))
        for _ in range(reps):
            _, times, _ = await stream_arrivals(
                base_srv.channel, STREAM_METHOD, stream_request(n, size)
            )
            base.append(rate(times))
        b, o = med(base), med(ours)
        self.samples["events"] = {
            "n": n,
            "payload_bytes": size,
            "baseline_per_s": base,
            "ours_per_s": ours,
            "ours_whole_turn_s": whole,
        }
        self.rows.append(
            Row(
                f"events/s, one stream ({n} deltas of {size} B)",
                f"{b:,.0f}/s bare grpc.aio stream",
                f"{o:,.0f}/s (turn {med(whole):.2f} s)",
                f"{o / b:.2f}×",
                "≥ 0.5×",
                verdict(o / b >= 0.5),
                {"baseline_per_s": b, "ours_per_s": o},
            )
        )
        if self.opts.profile_dir is not None:
            prof = Profiler(self.children, self.opts.profile_dir / "events.txt")
            if prof.available:
                prof.start(fake.pid)
                for _ in range(2):
                    await daemon_run(n)
                prof.stop()
                self.profiles["events/s, daemon"] = prof.summary(2 * n, "event")
                prof = Profiler(self.children, self.opts.profile_dir / "stream.txt")
                prof.start(base_srv.pid)
                for _ in range(2):
                    await stream_arrivals(base_srv.channel, STREAM_METHOD, stream_request(n, size))
                prof.stop()
                self.profiles["events/s baseline, bare grpc.aio stream"] = prof.summary(
                    2 * n, "event"
                )

    # 32 sessions at once --------------------------------------------------------------------

    async def sec_concurrent(self) -> None:
        sessions = 32
        rounds, deltas = self.n(3, 1), self.n(500, 200)
        fake = FakeDaemon(
            self.opts,
            self.children,
            "concurrent",
            {"pool": {"max_live": sessions, "max_queued": 64}, "daemon": STALL_PROBE},
        )
        try:
            await fake.start()
            stub = fake.stub
            created = await asyncio.gather(
                *(
                    stub.CreateSession(pb.CreateSessionRequest(mode=pb.MODE_USER), timeout=30)
                    for _ in range(sessions)
                )
            )
            sids = [c.session.session_id for c in created]
            await fake.wait_ready(sids)
            idle_window = (time.time(), time.time() + 1.0)
            await asyncio.sleep(1.0)

            async def one(sid: str, go: asyncio.Event) -> tuple[float, float, float, bool]:
                await go.wait()
                t0 = time.perf_counter()
                first_event = first_text = math.nan
                call = stub.SendMessage(
                    pb.SendMessageRequest(session_id=sid, text=f"go [[deltas:{deltas}]]"),
                    timeout=120,
                )
                async for r in call:
                    now = time.perf_counter() - t0
                    if math.isnan(first_event):
                        first_event = now
                    kind = r.event.WhichOneof("kind")
                    if kind == "text_delta" and math.isnan(first_text):
                        first_text = now
                    if kind in ("turn_completed", "turn_failed"):
                        return first_event, first_text, now, kind == "turn_completed"
                return first_event, first_text, math.nan, False

            errors: list[str] = []
            fe: list[float] = []
            ft: list[float] = []
            done: list[float] = []
            completed = 0
            walls: list[float] = []
            windows: list[Window] = []

            async def round_() -> list[tuple[float, float, float, bool] | BaseException]:
                go = asyncio.Event()
                tasks = [asyncio.ensure_future(one(s, go)) for s in sids]
                await asyncio.sleep(0.05)
                t0 = time.perf_counter()
                start = time.time()
                go.set()
                results = await asyncio.gather(*tasks, return_exceptions=True)
                walls.append(time.perf_counter() - t0)
                windows.append((start, time.time()))
                return results

            for _ in range(rounds):
                for res in await round_():
                    if isinstance(res, BaseException):
                        errors.append(repr(res))
                        continue
                    fe.append(res[0])
                    ft.append(res[1])
                    done.append(res[2])
                    completed += int(res[3])
                await asyncio.sleep(0.2)
            if self.opts.profile_dir is not None:
                prof = Profiler(self.children, self.opts.profile_dir / "concurrent.txt")
                if prof.available:
                    prof.start(fake.pid)
                    await round_()
                    prof.stop()
                    self.profiles[f"{sessions} sessions at once, daemon"] = prof.summary(
                        sessions * (deltas + 2), "event"
                    )
                    walls.pop()
                    windows.pop()
        finally:
            await fake.close()
        idle_stalls = loop_stalls(fake.daemon, [idle_window])
        stalls = loop_stalls(fake.daemon, windows)
        total = sessions * rounds
        self.samples["concurrent"] = {
            "first_event_s": fe,
            "first_text_s": ft,
            "turn_s": done,
            "wall_s": walls,
            "completed": completed,
            "turns": total,
            "errors": errors[:5],
        }
        events_per_s = (deltas + 2) * sessions / med(walls)
        self.rows.append(
            Row(
                f"{sessions} sessions at once ({rounds}×{sessions} turns, {deltas} deltas)",
                "—",
                f"{completed}/{total} done; 1st event p50 {ms(med(fe))} p99 {ms(pct(fe, 99))}",
                f"1st text p99 {ms(pct(ft, 99))}; {events_per_s:,.0f} ev/s",
                "all complete",
                verdict(completed == total),
                {"completed": completed, "turns": total, "first_event_p99_s": pct(fe, 99)},
            )
        )
        self.samples["concurrent"]["loop_stalls"] = [x.__dict__ for x in stalls]
        self.rows.append(
            stall_row(
                f"  loop worst stall during {sessions} concurrent streams",
                idle_stalls,
                stalls,
                f"{rounds} rounds, {sum(walls):.1f} s streaming",
            )
        )

    # 10,000 stored sessions ------------------------------------------------------------------

    def _populate(self, directory: Path, count: int) -> None:
        from atomizerd import ids
        from atomizerd.store.db import Store

        state = directory / "state"
        state.mkdir(parents=True, exist_ok=True)
        db = state / "atomizerd.db"
        if db.exists():
            return
        store = Store(f"sqlite:///{db}")
        try:
            with store.atomic():
                for _ in range(count):
                    store.create_session(
                        ids.new_session_id(), "user", None, ids.new_agent_session_id()
                    )
        finally:
            store.close()

    async def sec_scale(self) -> None:
        count = 10_000
        directory = self.opts.workdir / "scale"
        t = time.perf_counter()
        self._populate(directory, count)
        note(f"{count} sessions inserted in {time.perf_counter() - t:.1f} s")
        fake = FakeDaemon(self.opts, self.children, "scale", {"reaper": {"interval": 0.2}})
        try:
            await fake.start()
            stub = fake.stub
            rss_start, _ = rss_kib(fake.pid)
            page_times: list[float] = []
            sids: list[str] = []
            for rnd in range(self.n(3, 1)):
                token = ""
                while True:
                    t0 = time.perf_counter()
                    r = await stub.ListSessions(
                        pb.ListSessionsRequest(page_size=100, page_token=token), timeout=10
                    )
                    page_times.append(time.perf_counter() - t0)
                    if rnd == 0:
                        sids += [s.session_id for s in r.sessions]
                    token = r.next_page_token
                    if not token:
                        break
            if len(sids) != count:
                raise RuntimeError(f"ListSessions paged {len(sids)} sessions, expected {count}")
            passes = await self._reaper_passes(fake, 1.5 if self.opts.quick else 3.0)
            rss_listed, hwm_listed = rss_kib(fake.pid)
            loaded = 0
            if not self.opts.quick:
                # Every session touched once (GetSession loads it into the registry).
                sem = asyncio.Semaphore(32)

                async def get(sid: str) -> None:
                    async with sem:
                        await stub.GetSession(pb.GetSessionRequest(session_id=sid), timeout=10)

                await asyncio.gather(*(get(s) for s in sids))
                loaded = len(sids)
                passes += await self._reaper_passes(fake, 1.5)
            rss_end, hwm_end = rss_kib(fake.pid)
        finally:
            await fake.close()
        self.samples["scale"] = {
            "rss_kib_at_start": rss_start,
            "rss_kib_after_listing": rss_listed,
            "rss_kib_after_loading_all": rss_end,
            "hwm_kib": hwm_end,
            "list_page_s": page_times,
            "reaper_pass_ms": passes,
        }
        peak = max(hwm_listed, hwm_end) / 1024
        self.rows.append(
            Row(
                f"daemon RSS, {count} sessions stored",
                "—",
                f"{rss_end / 1024:.0f} MiB, peak {peak:.0f} (start {rss_start / 1024:.0f})"
                + (f", {loaded} loaded" if loaded else ""),
                "",
                "≤ 150 MB",
                verdict(peak * 1024 * 1024 <= 150e6),
                {"rss_mib": rss_end / 1024, "peak_mib": peak},
            )
        )
        p50 = med(page_times)
        self.rows.append(
            Row(
                f"ListSessions page of 100, {count} stored ({len(page_times)} pages)",
                "—",
                f"p50 {ms(p50)}, p99 {ms(pct(page_times, 99))}",
                "",
                "p50 ≤ 10 ms",
                verdict(p50 <= 0.010),
                {"p50_s": p50, "p99_s": pct(page_times, 99)},
            )
        )
        worst = max(passes) if passes else math.nan
        self.rows.append(
            Row(
                f"reaper pass, {count} stored ({len(passes)} passes)",
                "—",
                f"median {med(passes):.2f} ms, max {worst:.2f} ms",
                "",
                "≤ 50 ms",
                verdict(bool(passes) and worst <= 50),
                {"median_ms": med(passes), "max_ms": worst},
            )
        )

    async def _reaper_passes(self, fake: FakeDaemon, seconds: float) -> list[float]:
        seen: dict[float, float] = {}
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            st = await fake.status_stub.GetStatus(daemon_pb2.GetStatusRequest(), timeout=10)
            if st.HasField("last_reaper_pass"):
                p = st.last_reaper_pass
                seen[p.finished_at.ToNanoseconds() / 1e9] = p.duration_ms
            await asyncio.sleep(0.05)
        return list(seen.values())

    # start to READY ---------------------------------------------------------------------------

    async def sec_startup(self) -> None:
        count = 10_000
        directory = self.opts.workdir / "scale"
        self._populate(directory, count)
        notify_path = self.opts.workdir / "notify.sock"
        reps = self.n(5, 2)
        times: list[float] = []
        serving: list[float] = []
        loop = asyncio.get_running_loop()
        for _ in range(reps):
            notify_path.unlink(missing_ok=True)
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
            sock.bind(str(notify_path))
            sock.setblocking(False)
            d = self.children.daemon(
                RunningDaemon(
                    directory,
                    daemon_config({"reaper": {"interval": 0.2}}),
                    env={"NOTIFY_SOCKET": str(notify_path)},
                )
            )
            try:
                t0 = time.perf_counter()
                d.start(wait=False)
                deadline = time.monotonic() + 30
                while True:
                    left = deadline - time.monotonic()
                    if left <= 0:
                        raise TimeoutError(f"no READY=1 within 30 s:\n{d.log()[-2000:]}")
                    data = await asyncio.wait_for(loop.sock_recv(sock, 4096), left)
                    if b"READY=1" in data.split(b"\n"):
                        times.append(time.perf_counter() - t0)
                        break
                d.wait_serving(timeout=10)
                serving.append(time.perf_counter() - t0)
            finally:
                self.children.stop_daemon(d)
                sock.close()
        notify_path.unlink(missing_ok=True)
        self.samples["startup"] = {"ready_s": times, "serving_checked_s": serving}
        o = med(times)
        self.rows.append(
            Row(
                f"exec → READY=1, {count} sessions stored ({reps} starts)",
                "—",
                f"{ms(o)} (max {ms(max(times))})",
                "",
                "≤ 1.5 s",
                verdict(o <= 1.5),
                {"median_s": o, "max_s": max(times)},
            )
        )

    # the retention purge ---------------------------------------------------------------------

    def _populate_inactive(self, db: Path, count: int, messages: int, keep: int) -> None:
        """`count` sessions of `messages` messages each, inactive for two days, and `keep`
        recent ones; plain SQL after the store made the schema (500,000 rows in seconds)."""
        import sqlite3

        from atomizerd import ids
        from atomizerd.store.db import Store

        db.parent.mkdir(parents=True, exist_ok=True)
        Store(f"sqlite:///{db}").close()
        now = time.time()
        conn = sqlite3.connect(db)
        try:
            sessions = []
            rows = []
            for i in range(count + keep):
                sid = ids.new_session_id()
                at = now - 2 * 86400 if i < count else now
                sessions.append((sid, str(uuid.uuid4()), at, at, messages))
                for k in range(messages if i < count else 0):
                    text = f"benchmark message {k}" if k % 2 == 0 else REPLY * 4
                    role = "user" if k % 2 == 0 else "assistant"
                    rows.append((sid, f"turn{k // 2}", role, text, at))
            with conn:
                conn.executemany(
                    "INSERT INTO sessions (session_id, mode, agent_session_id, agent_started,"
                    " closed, created_at, last_active_at, message_count, total_cost_usd,"
                    " agent_cost_usd, seq_reserved, budget_usd, turn_budget_usd, context_stale)"
                    " VALUES (?, 'user', ?, 1, 0, ?, ?, ?, 0, 0, 0, 0, 0, 0)",
                    sessions,
                )
                conn.executemany(
                    "INSERT INTO messages (session_id, turn_id, role, content, status,"
                    " tool_calls, cost_usd, usage, detail, created_at)"
                    " VALUES (?, ?, ?, ?, 'complete', '[]', 0, '{}', '', ?)",
                    rows,
                )
        finally:
            conn.close()

    async def sec_purge(self) -> None:
        count, messages, keep = self.n(10_000, 2_000), 50, 100
        directory = self.opts.workdir / "purge"
        t = time.perf_counter()
        self._populate_inactive(directory / "state" / "atomizerd.db", count, messages, keep)
        note(f"{count} sessions of {messages} messages inserted in {time.perf_counter() - t:.1f} s")
        interval = 0.25
        fake = FakeDaemon(
            self.opts,
            self.children,
            "purge",
            {"reaper": {"interval": interval, "retention": 86400.0}, "daemon": STALL_PROBE},
        )
        try:
            await fake.start()
            ready = time.time()
            deadline = time.monotonic() + self.n(SECTION_TIMEOUT, SECTION_TIMEOUT // 3) - 10
            known = count + keep
            while known > keep:
                if time.monotonic() > deadline:
                    raise TimeoutError(f"{known - keep} sessions still stored")
                await asyncio.sleep(0.25)
                st = await fake.status_stub.GetStatus(daemon_pb2.GetStatusRequest(), timeout=30)
                known = st.sessions_known
        finally:
            await fake.close()
        passes = [
            r
            for r in fake.daemon.log_records()
            if r.get("event") == "reaper pass" and int(r.get("purged", 0)) > 0
        ]
        if not passes:
            raise RuntimeError("no reaper pass purged anything")

        def span(r: dict[str, Any]) -> Window:
            end = datetime.fromisoformat(r["timestamp"]).timestamp()
            return end - float(r["duration_ms"]) / 1000, end

        windows = [span(r) for r in passes]
        # Before the first pass the daemon only waits for it: the idle floor.
        idle_stalls = loop_stalls(fake.daemon, [(ready, windows[0][0])])
        stalls = loop_stalls(fake.daemon, windows)
        purging = sum(end - start for start, end in windows)
        self.samples["purge"] = {
            "sessions": count,
            "messages_each": messages,
            "passes": len(passes),
            "pass_ms": [float(r["duration_ms"]) for r in passes],
            "loop_stalls": [x.__dict__ for x in stalls],
        }
        self.rows.append(
            stall_row(
                f"loop worst stall, purge of {count:,} sessions ({messages} messages each)",
                idle_stalls,
                stalls,
                f"{len(passes)} passes, {purging:.1f} s purging",
            )
        )


# --- entry point -----------------------------------------------------------------------------


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="scripts/bench", description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="fewer repetitions (about a minute)")
    p.add_argument(
        "--only", metavar="NAME[,NAME]", help=f"run only these sections: {', '.join(SECTIONS)}"
    )
    p.add_argument("--json", metavar="FILE", help="also write the results as JSON")
    p.add_argument("--profile", metavar="DIR", help="profile the daemon with py-spy into DIR")
    p.add_argument("--keep", action="store_true", help="keep the temporary dir (logs)")
    p.add_argument("--serve-baseline", metavar="SOCKET", help=argparse.SUPPRESS)
    return p.parse_args(argv)


async def amain(args: argparse.Namespace, names: Sequence[str], opts: Opts) -> int:
    bench = Bench(opts)
    started = time.monotonic()
    load_before = os.getloadavg()[0]
    try:
        await bench.run(names)
    finally:
        await bench.close()
    elapsed = time.monotonic() - started
    print()
    load_after = os.getloadavg()[0]
    print(
        f"atomizerd bench ({'quick' if args.quick else 'full'}, {os.cpu_count()} cores, "
        f"{elapsed:.0f} s, 1-min load average {load_before:.1f} before / {load_after:.1f} after)"
    )
    if max(load_before, load_after) > (os.cpu_count() or 1):
        print("note: other work was running on this machine; CLI timings are noisy under load")
    print_table(bench.rows)
    for title, lines in bench.profiles.items():
        print(f"\nprofile: {title}")
        for line in lines:
            print(f"  {line}")
    if args.json:
        report = {
            "mode": "quick" if args.quick else "full",
            "elapsed_s": elapsed,
            "load_average": [load_before, load_after],
            "rows": [r.__dict__ for r in bench.rows],
            "samples": bench.samples,
            "profiles": bench.profiles,
        }
        write_json(args.json, report)
    return 1 if any(r.verdict == "ERROR" for r in bench.rows) else 0


def write_json(path: str, report: dict[str, Any]) -> None:
    Path(path).write_text(json.dumps(jsonable(report), indent=1, ensure_ascii=False))


def _share_row(label: str, splits: Sequence[Any], note: str = "") -> Row:
    """How the daemon's part of a first text splits: request to turn_started, and the
    delta's way from the daemon to the client (the rest is the agent's)."""
    a = med([t.to_started for t in splits])
    c = med([t.delta_to_client for t in splits])
    return Row(
        label,
        "",
        f"request→turn_started {ms(a)}, delta emit→client {ms(c)}",
        f"agent {ms(med([t.started_to_delta for t in splits]))}{note}",
        "(reported)",
        "INFO",
        {"to_started_s": a, "delta_to_client_s": c},
    )


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.serve_baseline:
        asyncio.run(serve_grpc_baseline(args.serve_baseline))
        return 0

    def on_term(signum: int, frame: object) -> None:
        raise KeyboardInterrupt

    names = list(SECTIONS)
    if args.only:
        names = [n.strip() for n in args.only.split(",") if n.strip()]
        unknown = [n for n in names if n not in SECTIONS]
        if unknown:
            print(f"unknown section(s) {unknown}; known: {', '.join(SECTIONS)}", file=sys.stderr)
            return 2
    workdir = Path(tempfile.mkdtemp(prefix="azb-"))  # short: Unix socket paths
    profile_dir = Path(args.profile).resolve() if args.profile else None
    if profile_dir is not None:
        profile_dir.mkdir(parents=True, exist_ok=True)
    opts = Opts(quick=args.quick, workdir=workdir, profile_dir=profile_dir, keep=args.keep)
    signal.signal(signal.SIGTERM, on_term)
    try:
        return asyncio.run(amain(args, names, opts))
    except KeyboardInterrupt:
        note("interrupted: everything this run started has been stopped")
        return 130
    finally:
        if args.keep:
            note(f"kept {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    raise SystemExit(main())
