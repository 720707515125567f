#!/usr/bin/env python3
"""atomizerd benchmarks, each measured side by side with its baseline in the same run.

    scripts/bench [--quick] [--only NAME[,NAME...]] [--json FILE] [--profile DIR] [--keep]

Sections (--only): warm, first, followup, pressure, getsession, events, concurrent, scale,
startup, purge, restart, socket. Prints one table: what, model, baseline, ours, ratio, target,
verdict. Medians over repeated runs, p99 where the tail matters. Everything runs on loopback and
Unix sockets in a temporary dir; every process started here is stopped before exit.

The model. Where the real pinned `claude` CLI is involved (warm, first, followup, pressure) it
talks to the fake Messages API (tests/support/fake_messages_api.py, in its own process). With
an instant model every ratio of first texts compares the CLI's and the daemon's own work
only, which a real model's first token (about a second) dwarfs; so the headline rows are
measured twice, side by side: `instant` (the fake answers at once) and `800 ms + 60 tok/s` (its
latency model: 800 ms to the first token, then 60 tokens a second). Each model has its own
fake API and its own daemon. --quick runs fewer repetitions, and the real model's latency only
for a new session's first message (warm turns and the pool under pressure: instant only).

- warm: a warm turn's first text (SendMessage sent -> first text_delta received) through the
  daemon vs the same CLI, same argv, same environment, same `initialize` (built by the daemon's
  own Launcher), driven directly over stdin by this script; and the bare CLI (the stream-json
  flags and a session id only: none of the daemon's permission, MCP, sandbox and prompt
  settings), to show what the daemon's flags cost.
- first: a new session's first message. "Create + send at once": CreateSession, then
  SendMessage at once, timed from the CreateSession call to the first text. Against it: the
  direct CLI spawned for that message (spawn, `initialize`, the message), the CLI's own floor
  (a direct process pre-warmed 2 s with `initialize`, then its first turn; also the bare CLI),
  and the original's one-shot `claude -p` (prompt over stdin; its first text delta, read with
  stream-json output, and its exit). Also the first turn of a daemon session created 2 s before.
- followup: the second and third message of those sessions vs the original's one-shot with
  the history replayed in the prompt, and vs the direct process's own follow-ups.
- pressure: more sessions than `pool.max_live` sending at once, round after round: turns wait
  for slots, idle agents are evicted and resumed. First event and first text p50/p99, and the
  most agents the daemon had at once, counted from /proc every 10 ms
  (scripts/soak_children.py), against the cap.
- getsession / events: the daemon with the scripted fake agent vs a bare grpc.aio server on a
  Unix socket (a separate process), called by the same raw-bytes client.
- concurrent: 64 sessions streaming at once (pool.max_live 64), and the event loop's worst
  stall meanwhile.
- restart: a planned restart under 8 running turns (real CLI under shims): signal -> each
  turn's next event at a client re-attached from its last seq, against the same daemon's
  restart with no agent.
- socket: planned restarts in place while a client calls GetSession in a loop and new clients
  connect every 2 ms: connections refused (none: the socket's name always has a listener),
  the longest call meanwhile.
- scale / startup / purge: 10,000 sessions of 50 messages and 5 audit events each (1,000 of
  them inactive for two days), written straight into the SQLite file: the store (Store) creates
  and migrates it and writes one template session through its own API, whose rows are then
  copied with executemany in one transaction, so the rows are what the daemon writes. exec ->
  READY=1 on a NOTIFY_SOCKET datagram socket bound here (and with an empty database, started
  alternately; with the CPU time the daemon had used by then); ListSessions and GetHistory
  pages; the
  daemon's RSS with 1,000 sessions resident (loaded by GetSession, no live agent, the reaper
  idle: `reaper.interval` an hour, so nothing unloads them while measured); a retention purge
  of the 1,000 (`reaper.retention` one day), the event loop's worst stall meanwhile, and the
  reaper's passes once there is nothing left to purge.

The daemon's modules are byte-compiled first, as an install leaves them (a development shell's
PYTHONDONTWRITEBYTECODE would otherwise have every start compile them again).

Loop stalls are the daemon's own account: its lag probe (atomizerd/daemon/loopprobe.py) wakes
every 2 ms here and logs every lag of 5 ms or more; a row reports the worst logged inside the
workload's wall-clock window, beside the worst of an idle stretch of the same daemon.

Rows marked INFO help read a miss: for warm turns, the time each driver spends outside the
CLI's own account of the turn (whole turn minus the `duration_ms` of its `result` line), and the
daemon's share of its first text from its own event timestamps (request -> turn_started, first
text_delta emitted -> received). Timings of the real CLI are noisy on a busy 2-core machine: the
1-minute load average is printed with the table.

--profile DIR: after the measured runs of warm (instant model), getsession, events and
concurrent, repeats the daemon's workload (and the bare grpc.aio baselines') under `py-spy
record --native` (py-spy must be installed; it is not a project requirement) and prints where
the busy samples go: atomizerd code (by innermost atomizerd function), grpc core, the asyncio
loop; raw collapsed stacks are kept in DIR.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import errno
import json
import math
import os
import random
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import tempfile
import time
import traceback
import uuid
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any, TypeVar

BENCH = Path(__file__).resolve()
REPO = BENCH.parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import grpc  # noqa: E402
import grpc.aio  # noqa: E402
from atomizer.v1 import daemon_pb2, daemon_pb2_grpc, session_pb2, session_pb2_grpc  # noqa: E402

from scripts.bench_baselines import (  # noqa: E402
    ECHO_METHOD,
    ONE_SHOT_FLAGS,
    STREAM_METHOD,
    DirectAgent,
    TurnTiming,
    jsonable,
    one_shot,
    original_prompt,
    serve_grpc_baseline,
    stream_request,
)
from scripts.soak_children import ChildCount, ChildSampler  # noqa: E402
from tests.support.daemon import RunningDaemon, real_claude  # noqa: E402

pb = session_pb2
N = TypeVar("N", int, float)
SECTIONS = (
    "warm",
    "first",
    "followup",
    "pressure",
    "getsession",
    "events",
    "concurrent",
    "scale",
    "startup",
    "purge",
    "restart",
    "notify",
    "search",
    "socket",
)
CLI_SECTIONS = {"warm", "first", "followup"}
# Restart rows: live agents with a running turn each, and the restart target (turns go on
# within this of the daemon being back), the extra warm-turn cost allowed for the shim.
RESTART_AGENTS = 8
SHIM_WARM_TARGET_S = 0.0005
SHIM_RSS_TARGET_KIB = 20 * 1024
REPLY = "Here is a short answer for the benchmark."
GET_SESSION = "/atomizer.v1.SessionService/GetSession"
SEND_MESSAGE = "/atomizer.v1.SessionService/SendMessage"
PREWARM_WAIT = 2.0
TURN_GAP = 0.15  # think time between turns, for both sides alike
SECTION_TIMEOUT = 240  # seconds per section (a third of it with --quick)
# Sections that need longer: search builds its 10,000 sessions on PostgreSQL too.
SECTION_TIMEOUTS = {"search": 900}
# The daemon's loop-lag probe, as the stall rows run it: a wake-up every 2 ms (so any stall
# longer than that is seen, measured to within 2 ms) and a log line for every lag of 5 ms or
# more. The target of those rows: no stall longer than 20 ms.
STALL_PROBE = {"loop_probe_interval": 0.002, "loop_stall_log_ms": 5.0}
STALL_TARGET_MS = 20.0
# Concurrent streams, and the loop's worst stall meanwhile.
CONCURRENT_SESSIONS = 64
CONCURRENT_STALL_TARGET_MS = 10.0
GETSESSION_P50_TARGET = 1.15
# exec -> READY=1: an empty database, and the stored sessions of the scale rows.
STARTUP_EMPTY_TARGET_S = 0.300
STARTUP_SCALE_TARGET_S = 0.350
# A planned restart under running turns, against the same daemon's restart with no agent.
RESTART_RATIO_TARGET = 1.2
RESTART_FLOOR_TARGET_S = 0.400
# The stored sessions of scale / startup / purge.
SCALE_SESSIONS = 10_000
SCALE_MESSAGES = 50
SCALE_AUDIT = 5
SCALE_STALE = 1_000  # inactive for two days: what the purge removes
SCALE_RESIDENT = 1_000
DAY = 86400.0


@dataclass(frozen=True)
class Model:
    """The fake Messages API's latency model for one run of the CLI sections."""

    key: str
    ttft_ms: float
    tokens_per_s: float

    @property
    def label(self) -> str:
        if not self.ttft_ms and not self.tokens_per_s:
            return "instant"
        return f"{self.ttft_ms:g} ms + {self.tokens_per_s:g} tok/s"


INSTANT = Model("instant", 0.0, 0.0)
REALISTIC = Model("realistic", 800.0, 60.0)
MODELS = (INSTANT, REALISTIC)


# --- statistics and the table --------------------------------------------------------------


def compile_bytecode() -> None:
    """The daemon's modules compiled, as an install leaves them (pip compiles them): without
    bytecode every start compiles them again (PYTHONDONTWRITEBYTECODE, as in a development
    shell), which is no start-up of the daemon's."""
    import compileall

    for directory in (REPO / "atomizerd", REPO / "client" / "src"):
        compileall.compile_dir(directory, quiet=1)


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
    model: str = ""  # the fake Messages API's latency model, for rows of the real CLI


def verdict(ok: bool) -> str:
    return "PASS" if ok else "MISS"


def times(ours: float, base: float) -> str:
    """ours / baseline, and how many times faster when below 1."""
    r = ours / base
    return f"{r:.2f}×" + (f" ({1 / r:.1f}× faster)" if r < 0.95 else "")


def print_table(rows: Sequence[Row]) -> None:
    headers = ("what", "model", "baseline", "ours", "ratio", "target", "verdict")
    cells = [headers] + [
        (r.what, r.model, r.baseline, r.ours, r.ratio, r.target, r.verdict) for r in rows
    ]
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


def shim_pids(under: Path) -> list[int]:
    """The agent shims whose socket is under `under` (a bench daemon's dir)."""
    found = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        with contextlib.suppress(OSError):
            argv = (proc / "cmdline").read_bytes().split(b"\0")
            if any(a.endswith(b"shim.py") for a in argv) and str(under).encode() in b" ".join(argv):
                found.append(int(proc.name))
    return found


def cpu_seconds(pid: int) -> float:
    """The CPU time (user + system) process `pid` has used so far."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


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


def stall_text(stalls: Sequence[Stall], target: float = STALL_TARGET_MS) -> str:
    floor = STALL_PROBE["loop_stall_log_ms"]
    if not stalls:
        return f"< {floor:g} ms"
    worst = max(stalls, key=lambda s: s.lag_ms)
    over = sum(1 for s in stalls if s.lag_ms > target)
    return (
        f"{worst.lag_ms:.1f} ms (CPU {worst.cpu_ms:.1f}); {len(stalls)} ≥ {floor:g} ms, "
        f"{over} > {target:g} ms"
    )


def stall_row(
    what: str,
    idle: Sequence[Stall],
    busy: Sequence[Stall],
    detail: str,
    target: float = STALL_TARGET_MS,
) -> Row:
    """The worst lag against the target; beside it the most CPU the loop spent in one stall
    (a loaded machine makes lags of waiting for a CPU, which is not the daemon's doing)."""
    worst = max((s.lag_ms for s in busy), default=0.0)
    worst_cpu = max((s.cpu_ms for s in busy), default=0.0)
    return Row(
        what,
        f"{stall_text(idle, target)} idle",
        stall_text(busy, target),
        f"{detail}; most CPU in one stall {worst_cpu:.1f} ms",
        f"≤ {target:g} ms",
        verdict(worst <= target),
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
    """The daemon as shipped (RunningDaemon's test defaults aside: spare agents at their
    default), with `extra` on top."""
    cfg: dict[str, dict[str, Any]] = {
        "logging": {"level": "info", "format": "json"},
        "pool": shipped_spares(),
    }
    for section, values in (extra or {}).items():
        cfg.setdefault(section, {}).update(values)
    return cfg


def config_default(section: str, key: str) -> Any:
    """A configuration key's default; None if this daemon does not know the key."""
    from atomizerd.config import Config

    return getattr(getattr(Config(), section, None), key, None)


def shipped_spares() -> dict[str, Any]:
    """`pool.spares` at its default, where the daemon has spare agents."""
    spares = config_default("pool", "spares")
    return {} if spares is None else {"spares": spares}


def no_spares() -> dict[str, Any]:
    """`pool.spares = 0` where the daemon has spare agents: for rows that need no live agent."""
    return {} if config_default("pool", "spares") is None else {"spares": 0}


def reaper_passes_logged(d: RunningDaemon) -> int:
    """Reaper passes the daemon logged (each may unload idle sessions)."""
    return sum(1 for r in d.log_records() if r.get("event") == "reaper pass")


# A client that re-connects within milliseconds of a restarted daemon being back (gRPC's
# default backoff waits a second or more): the restart rows time the daemon, not the backoff.
FAST_RECONNECT = [
    ("grpc.initial_reconnect_backoff_ms", 20),
    ("grpc.min_reconnect_backoff_ms", 20),
    ("grpc.max_reconnect_backoff_ms", 50),
]


async def aio_channel(d: RunningDaemon) -> grpc.aio.Channel:
    ch = grpc.aio.insecure_channel(d.target, options=FAST_RECONNECT)
    await asyncio.wait_for(ch.channel_ready(), 10)
    return ch


class CliEnv:
    """The fake Messages API (own process, with one latency model), a daemon running the real
    CLI against it, and what the direct baselines need to start the very same CLI themselves."""

    def __init__(
        self,
        opts: Opts,
        children: Children,
        model: Model,
        name: str,
        pool: dict[str, Any] | None = None,
        agent: dict[str, Any] | None = None,
    ) -> None:
        self.opts = opts
        self.agent_extra = agent or {}
        self.children = children
        self.model = model
        self.dir = opts.workdir / name
        self.dir.mkdir(parents=True, exist_ok=True)
        self.home = self.dir / "home"
        self.tmp = self.dir / "tmp"
        self.tmp.mkdir(parents=True, exist_ok=True)
        self.pool = {"max_live": 8, **(pool or {})}
        self.api: subprocess.Popen[bytes] | None = None
        self.base_url = ""
        self.daemon: RunningDaemon | None = None
        self.channel: grpc.aio.Channel | None = None
        self.stub: session_pb2_grpc.SessionServiceAsyncStub | None = None
        self.status_stub: daemon_pb2_grpc.DaemonServiceAsyncStub | None = None
        self.agent_env: dict[str, str] = {}
        self.launch_env: dict[str, str] = {}
        self.cwd = ""
        self.context = ""
        self.allowed_tools_arg = ""
        self._launcher: Any = None

    def _start_api(self) -> subprocess.Popen[bytes]:
        argv = [sys.executable, "-m", "tests.support.fake_messages_api", "--port", "0", "-q"]
        argv += ["--ttft-ms", str(self.model.ttft_ms)]
        argv += ["--tokens-per-s", str(self.model.tokens_per_s)]
        with open(self.dir / "fake_api.log", "wb") as api_log:
            return self.children.popen(argv, stdout=subprocess.PIPE, stderr=api_log, cwd=REPO)

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
                    **self.agent_extra,
                },
                "pool": self.pool,
            }
        )
        self.daemon = self.children.daemon(RunningDaemon(self.dir, cfg))
        self.daemon.start()
        self.channel = await aio_channel(self.daemon)
        self.stub = session_pb2_grpc.SessionServiceStub(self.channel)
        self.status_stub = daemon_pb2_grpc.DaemonServiceStub(self.channel)
        self._prepare_direct()
        # The first CLI run in a fresh config dir sets it up; keep that out of the numbers.
        await self.one_shot("warm-up", [])

    def _prepare_direct(self) -> None:
        """The daemon's own Launcher, on a copy of its config with another runtime dir, builds
        the direct processes' argv, env and `initialize`: what the daemon starts them with."""
        import atomizerd.config as config_mod
        from atomizerd.atomizer.launcher import Launcher
        from atomizerd.atomizer.prompt import ContextBuilder
        from atomizerd.atomizer.studies import Studies

        assert self.daemon is not None
        cfg = config_mod.load(
            self.daemon.config_path,
            environ={},
            overrides={"daemon.runtime_dir": str(self.dir / "direct-run")},
        )
        self._launcher = Launcher(cfg, Studies(cfg), ContextBuilder())
        self.cwd = str(cfg.atomizer_root)
        spec = self._spec()
        self.launch_env = spec.env
        self.allowed_tools_arg = next(
            (a for a in spec.argv if a.startswith("--allowedTools=")), "--allowedTools="
        )
        self.context = self._launcher.context_text(self._record())

    def _record(self) -> Any:
        from atomizerd.model import Mode, SessionRecord

        now = time.time()
        return SessionRecord(
            session_id="bench" + uuid.uuid4().hex[:12],
            mode=Mode.USER,
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

    async def spawn_direct(self, *, bare: bool = False) -> DirectAgent:
        """A new conversation's CLI, driven by this script: the daemon's argv, env and
        `initialize`; or `bare`, the stream-json flags and a session id only (same env)."""
        from atomizerd.agents.argv import STREAM_JSON_FLAGS

        spec = self._spec()
        if bare:
            argv = [real_claude(), *STREAM_JSON_FLAGS, f"--session-id={uuid.uuid4()}"]
            return await DirectAgent.spawn(argv, spec.env, spec.cwd)
        return await DirectAgent.spawn(spec.argv, spec.env, spec.cwd, spec.initialize)

    async def one_shot(
        self, message: str, history: Sequence[tuple[str, str]]
    ) -> tuple[float, float]:
        """The original: `claude --print --allowedTools ...`, the prompt (context, the last
        messages replayed, the message) over stdin; streamed, so its first text shows.
        Returns (first text, exit)."""
        argv = [real_claude(), "--print", *ONE_SHOT_FLAGS, self.allowed_tools_arg]
        prompt = original_prompt(self.context, history, message)
        first, total, _ = await one_shot(argv, self.launch_env, self.cwd, prompt)
        return first, total

    async def create_session(self) -> str:
        assert self.stub is not None
        resp = await self.stub.CreateSession(pb.CreateSessionRequest(mode=pb.MODE_USER), timeout=10)
        return resp.session.session_id

    async def spares_adopted(self) -> int | None:
        """New sessions that took a spare agent so far (None: this daemon has no spares)."""
        assert self.status_stub is not None
        st = await self.status_stub.GetStatus(daemon_pb2.GetStatusRequest(), timeout=10)
        value = getattr(st, "spares_adopted", None)
        return None if value is None else int(value)

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
        first_event = math.nan
        started_at = delta_at = delta_seen = math.nan
        call = self.stub.SendMessage(pb.SendMessageRequest(session_id=sid, text=text), timeout=60)
        async for resp in call:
            kind = resp.event.WhichOneof("kind")
            if math.isnan(first_event):
                first_event = time.perf_counter() - t0
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
                    first_event=first_event,
                )
        raise RuntimeError("stream ended without a terminal event")

    async def create_and_send(self, text: str) -> tuple[float, float, DaemonTurn]:
        """CreateSession, then SendMessage at once: (seconds from the CreateSession call to
        the first text, the CreateSession call's own, the turn)."""
        t0 = time.perf_counter()
        sid = await self.create_session()
        created = time.perf_counter() - t0
        try:
            turn = await self.daemon_turn(sid, text)
        finally:
            await self.terminate(sid)
        return created + turn.first_text, created, turn

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
    first_event: float = math.nan  # SendMessage sent -> its first event received


def prompt(i: int) -> str:
    return f"benchmark message {i} [[reply:{REPLY}]]"


class FakeDaemon:
    """A daemon with the scripted fake agent, and a raw-bytes client for it."""

    def __init__(
        self,
        opts: Opts,
        children: Children,
        name: str,
        extra: dict[str, dict[str, Any]],
        directory: Path | None = None,
    ) -> None:
        self.dir = directory or opts.workdir / name
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


@dataclass
class WarmRun:
    """The warm turns of one model: the daemon, the same-argv direct CLI, the bare CLI."""

    daemon: list[DaemonTurn] = field(default_factory=list)
    direct: list[TurnTiming] = field(default_factory=list)
    bare: list[TurnTiming] = field(default_factory=list)


@dataclass
class FirstRun:
    """A new session's first message, and its follow-ups, for one model."""

    create_send: list[float] = field(default_factory=list)  # CreateSession call -> first text
    create_rpc: list[float] = field(default_factory=list)
    create_split: list[DaemonTurn] = field(default_factory=list)
    spawned: list[float] = field(default_factory=list)  # direct: spawn -> first text
    spawned_init: list[float] = field(default_factory=list)  # direct: spawn -> initialized
    floor: list[TurnTiming] = field(default_factory=list)  # direct, pre-warmed 2 s
    floor_bare: list[TurnTiming] = field(default_factory=list)
    prewarmed: list[DaemonTurn] = field(default_factory=list)  # daemon session created 2 s before
    ready_after: list[float] = field(default_factory=list)  # CreateSession -> READY
    one_shot: list[float] = field(default_factory=list)  # first text
    one_shot_exit: list[float] = field(default_factory=list)
    one_shot_history: list[float] = field(default_factory=list)
    one_shot_history_exit: list[float] = field(default_factory=list)
    followups: list[float] = field(default_factory=list)  # daemon
    direct_followups: list[float] = field(default_factory=list)
    spares_adopted: int | None = None  # by the create + send sessions


class Bench:
    def __init__(self, opts: Opts) -> None:
        self.opts = opts
        self.children = Children()
        self.rows: list[Row] = []
        self.samples: dict[str, Any] = {}
        self.profiles: dict[str, list[str]] = {}
        self._cli: dict[str, CliEnv] = {}
        self._fake: FakeDaemon | None = None
        self._baseline: BaselineServer | None = None
        self._first_runs: dict[str, FirstRun] = {}
        self._scale_db: Path | None = None

    def n(self, full: N, quick: N) -> N:
        return quick if self.opts.quick else full

    async def cli(self, model: Model) -> CliEnv:
        env = self._cli.get(model.key)
        if env is None:
            note(f"starting a fake Messages API ({model.label}) and a daemon running the real CLI")
            env = CliEnv(self.opts, self.children, model, f"cli-{model.key}")
            self._cli[model.key] = env
            await env.start()
        return env

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
        for thing in (*self._cli.values(), self._fake, self._baseline):
            if thing is not None:
                with contextlib.suppress(Exception):
                    await thing.close()
        self.children.close()

    async def run(self, names: Sequence[str]) -> None:
        limit = self.n(SECTION_TIMEOUT, SECTION_TIMEOUT // 3)
        compile_bytecode()
        for i, name in enumerate(names):
            started = time.monotonic()
            note(f"section {name}")
            bound = self.n(SECTION_TIMEOUTS.get(name, limit), limit)
            try:
                await asyncio.wait_for(getattr(self, f"sec_{name}")(), bound)
            except Exception as e:
                traceback.print_exc()
                what = f"{name}: timed out after {bound} s" if isinstance(e, TimeoutError) else name
                self.rows.append(Row(what, "", "", "", "", "ERROR", {"error": repr(e)}))
            note(f"section {name} took {time.monotonic() - started:.1f} s")
            await self._release_unneeded(set(names[i + 1 :]))

    async def _release_unneeded(self, later: set[str]) -> None:
        """Stops the shared daemons no later section needs, so they are not in the way."""
        if not later & CLI_SECTIONS:
            for env in self._cli.values():
                await env.close()
            self._cli.clear()
        if not later & {"getsession", "events"}:
            for thing in (self._fake, self._baseline):
                if thing is not None:
                    await thing.close()
            self._fake = self._baseline = None

    # warm turns -------------------------------------------------------------------------------

    async def _warm(self, model: Model) -> WarmRun:
        env = await self.cli(model)
        instant = model is INSTANT
        warmups = self.n(3, 2) if instant else self.n(2, 0)
        n = self.n(25, 4) if instant else self.n(8, 2)
        run = WarmRun()
        sid = await env.create_session()
        direct = await env.spawn_direct()
        bare = await env.spawn_direct(bare=True)
        try:
            await asyncio.gather(direct.initialize(), bare.initialize())
            await env.wait_prewarmed(sid, time.perf_counter(), 30)
            await asyncio.sleep(PREWARM_WAIT)
            for i in range(warmups + n):
                # Rotate who goes first, so drift and neighbours' noise hit all alike.
                got: dict[str, Any] = {}
                for who in (("daemon", "direct", "bare") * 2)[i % 3 : i % 3 + 3]:
                    if who == "daemon":
                        got[who] = await env.daemon_turn(sid, prompt(i))
                    else:
                        got[who] = await (direct if who == "direct" else bare).turn(prompt(i))
                    await asyncio.sleep(TURN_GAP)
                if i >= warmups:
                    run.daemon.append(got["daemon"])
                    run.direct.append(got["direct"])
                    run.bare.append(got["bare"])
            if instant and self.opts.profile_dir is not None:
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
            await bare.close()
            await env.terminate(sid)
        return run

    async def sec_warm(self) -> None:
        # --quick: the instant model only (a real model's warm turn is a second each).
        models = MODELS if not self.opts.quick else (INSTANT,)
        runs = {m.key: await self._warm(m) for m in models}
        self.samples["warm"] = {k: dataclasses.asdict(r) for k, r in runs.items()}
        for m in models:
            r = runs[m.key]
            ours = [t.first_text for t in r.daemon]
            b, o = med([t.first_text for t in r.direct]), med(ours)
            # Each round's two turns ran back to back: their difference is free of most drift.
            pairs = zip(r.daemon, r.direct, strict=True)
            paired = med([d.first_text - x.first_text for d, x in pairs])
            self.rows.append(
                Row(
                    f"first text, warm turn (median of {len(ours)})",
                    f"{ms(b)} direct CLI, same argv",
                    f"{ms(o)} (p90 {ms(pct(ours, 90))})",
                    f"{o / b:.3f}× ({(o - b) * 1000:+.1f} ms; paired {paired * 1000:+.1f} ms)",
                    "≤ baseline + 2 ms",
                    verdict(o <= b + 0.002),
                    {"baseline_s": b, "ours_s": o, "paired_difference_s": paired},
                    model=m.label,
                )
            )
        for m in models:
            r = runs[m.key]
            bare = med([t.first_text for t in r.bare])
            same = med([t.first_text for t in r.direct])
            o = med([t.first_text for t in r.daemon])
            self.rows.append(
                Row(
                    "  same, bare CLI (no daemon flags)",
                    f"{ms(bare)} bare CLI",
                    f"{ms(same)} same argv, {ms(o)} daemon",
                    f"flags {(same - bare) * 1000:+.1f} ms, daemon {(o - same) * 1000:+.1f} ms",
                    "(reported)",
                    "INFO",
                    {"bare_s": bare, "same_argv_s": same, "ours_s": o},
                    model=m.label,
                )
            )
        r = runs[INSTANT.key]
        bo = med([t.total - t.cli_duration for t in r.direct])
        oo = med([t.total - t.cli_duration for t in r.daemon])
        self.rows.append(
            Row(
                "  warm turn time outside the CLI (turn − its duration_ms)",
                f"{ms(bo)} direct",
                ms(oo),
                f"{(oo - bo) * 1000:+.1f} ms",
                "(reported)",
                "INFO",
                {"baseline_s": bo, "ours_s": oo},
                model=INSTANT.label,
            )
        )
        self.rows.append(
            _share_row("  daemon's share of its warm first text", r.daemon, model=INSTANT.label)
        )

    # agents under shims: their cost, and a restart under 8 running turns -----------------------

    async def sec_restart(self) -> None:
        if config_default("agent", "survive_restart") is None:
            note("this daemon has no agent shims: restart rows skipped")
            return
        shim = CliEnv(self.opts, self.children, INSTANT, "restart-shim", pool=no_spares())
        pipes = CliEnv(
            self.opts,
            self.children,
            INSTANT,
            "restart-pipes",
            pool=no_spares(),
            agent={"survive_restart": False},
        )
        try:
            await asyncio.gather(shim.start(), pipes.start())
            await self._shim_warm(shim, pipes)
            await pipes.close()
            await self._restart_under_turns(shim)
        finally:
            await shim.close()
            await pipes.close()

    async def _shim_warm(self, shim: CliEnv, pipes: CliEnv) -> None:
        """Warm turns of the same daemon with agents under shims and on its own pipes,
        alternating, and the shims' memory."""
        warmups, n = self.n(3, 1), self.n(30, 6)
        sids = {env: await env.create_session() for env in (shim, pipes)}
        for env, sid in sids.items():
            await env.wait_prewarmed(sid, time.perf_counter(), 30)
        await asyncio.sleep(PREWARM_WAIT)
        got: dict[CliEnv, list[float]] = {shim: [], pipes: []}
        for i in range(warmups + n):
            for env in (shim, pipes) if i % 2 else (pipes, shim):
                turn = await env.daemon_turn(sids[env], prompt(i))
                if i >= warmups:
                    got[env].append(turn.first_text)
                await asyncio.sleep(TURN_GAP)
        b, o = med(got[pipes]), med(got[shim])
        paired = med([x - y for x, y in zip(got[shim], got[pipes], strict=True)])
        self.rows.append(
            Row(
                f"first text, warm turn, agent under its shim (median of {n})",
                f"{ms(b)} agent on the daemon's pipes",
                f"{ms(o)} (p90 {ms(pct(got[shim], 90))})",
                f"{o / b:.3f}× ({(o - b) * 1000:+.2f} ms; paired {paired * 1000:+.2f} ms)",
                "≤ baseline + 0.5 ms",
                verdict(o <= b + SHIM_WARM_TARGET_S),
                {"baseline_s": b, "ours_s": o, "paired_difference_s": paired},
                model=INSTANT.label,
            )
        )
        rss = [rss_kib(pid)[0] for pid in shim_pids(shim.dir)]
        self.rows.append(
            Row(
                "memory of an agent's shim (VmRSS)",
                "(none without a shim)",
                f"{med(rss) / 1024:.1f} MiB ({len(rss)} shims)" if rss else "-",
                "-",
                "≤ 20 MiB per live agent",
                verdict(bool(rss) and max(rss) <= SHIM_RSS_TARGET_KIB),
                {"rss_kib": rss},
            )
        )
        for env, sid in sids.items():
            await env.terminate(sid)

    async def _restart_under_turns(self, env: CliEnv) -> None:
        """A planned restart while RESTART_AGENTS turns stream: from the signal to the first
        event of each turn seen by a client re-attached from its last seq, against the same
        daemon's restart with no agent at all (its floor: a process start and a bound socket)."""
        assert env.daemon is not None and env.stub is not None
        text = " ".join(f"w{i}" for i in range(400))
        sids = [await env.create_session() for _ in range(RESTART_AGENTS)]
        last: dict[str, int] = {}
        calls = []
        streaming = asyncio.Event()

        async def stream(sid: str, call: Any) -> None:
            with contextlib.suppress(grpc.aio.AioRpcError):
                async for resp in call:
                    last[sid] = resp.event.seq
                    if resp.event.WhichOneof("kind") == "text_delta" and len(last) == len(sids):
                        streaming.set()

        for sid in sids:
            call = env.stub.SendMessage(
                pb.SendMessageRequest(session_id=sid, text=f"[[slow:40]] {text}"), timeout=120
            )
            calls.append(asyncio.ensure_future(stream(sid, call)))
        await asyncio.wait_for(streaming.wait(), 60)
        before = await self._started_at(env)
        t0 = time.perf_counter()
        env.daemon.signal(signal.SIGUSR2)
        await asyncio.gather(*calls)
        serving = asyncio.ensure_future(self._serving_after(env, t0, before))
        firsts = await asyncio.gather(*(self._first_after(env, sid, last[sid], t0) for sid in sids))
        served = await serving
        status = await env.status_stub.GetStatus(daemon_pb2.GetStatusRequest(), timeout=10)  # type: ignore[union-attr]
        for sid in sids:
            await env.terminate(sid)
        floors = []
        for _ in range(self.n(3, 1)):
            before = await self._started_at(env)
            t1 = time.perf_counter()
            env.daemon.signal(signal.SIGUSR2)
            floors.append(await self._serving_after(env, t1, before))
        floor = med(floors)
        worst = max(firsts)
        self.rows.append(
            Row(
                f"restart under {RESTART_AGENTS} running turns: signal → each turn's next event",
                f"{ms(floor)} restart with no agent",
                f"{ms(med(firsts))} median, {ms(worst)} last ({status.agents_adopted} adopted "
                f"in {status.adoption_seconds * 1000:.0f} ms; serving after {ms(served)})",
                times(worst, floor),
                f"every turn goes on, ≤ {RESTART_RATIO_TARGET:g}×, no-agent restart "
                f"≤ {RESTART_FLOOR_TARGET_S * 1000:.0f} ms",
                verdict(
                    status.turns_resumed == RESTART_AGENTS
                    and worst <= RESTART_RATIO_TARGET * floor
                    and floor <= RESTART_FLOOR_TARGET_S
                ),
                {"floor_s": floor, "first_event_s": firsts, "serving_s": served},
                model=INSTANT.label,
            )
        )

    async def _first_after(self, env: CliEnv, sid: str, after: int, t0: float) -> float:
        """Seconds from t0 to the first event after `after` that a re-attaching client gets."""
        assert env.stub is not None
        deadline = time.perf_counter() + 60
        while time.perf_counter() < deadline:
            call = env.stub.WatchSession(
                pb.WatchSessionRequest(session_id=sid, after_seq=after), timeout=60
            )
            try:
                async for _ in call:
                    call.cancel()
                    return time.perf_counter() - t0
            except grpc.aio.AioRpcError as e:
                # CANCELLED: a call that reached the stopping server (gRPC's own stop).
                if e.code() not in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED):
                    raise
            await asyncio.sleep(0.01)
        raise TimeoutError("no event after the restart")

    async def _started_at(self, env: CliEnv) -> int:
        assert env.status_stub is not None
        status = await env.status_stub.GetStatus(daemon_pb2.GetStatusRequest(), timeout=5)
        return int(status.started_at.ToNanoseconds())

    async def _serving_after(self, env: CliEnv, t0: float, before: int) -> float:
        """Seconds from t0 until a daemon started after `before` answers."""
        deadline = time.perf_counter() + 60
        while time.perf_counter() < deadline:
            with contextlib.suppress(grpc.aio.AioRpcError):
                if await self._started_at(env) != before:
                    return time.perf_counter() - t0
            await asyncio.sleep(0.005)
        raise TimeoutError("the daemon did not come back")

    async def sec_socket(self) -> None:
        """Planned restarts while a client calls GetSession in a loop on one channel and new
        clients connect all the time: the connections refused (the socket's name without a
        listener under it), and the longest a call waited meanwhile."""
        fake = FakeDaemon(self.opts, self.children, "socket", {})
        restarts = self.n(5, 2)
        refused: Counter[str] = Counter()
        ended: Counter[str] = Counter()
        counts = Counter[str]()
        waits: list[float] = []
        spans: list[float] = []
        done = asyncio.Event()
        try:
            await fake.start()
            created = await fake.stub.CreateSession(pb.CreateSessionRequest(), timeout=30)
            sid = created.session.session_id
            path = str(fake.daemon.socket)

            async def caller() -> None:
                async with grpc.aio.insecure_channel(fake.daemon.target) as ch:
                    stub = session_pb2_grpc.SessionServiceStub(ch)
                    while not done.is_set():
                        t = time.perf_counter()
                        try:
                            await stub.GetSession(pb.GetSessionRequest(session_id=sid), timeout=30)
                            waits.append(time.perf_counter() - t)
                            counts["calls"] += 1
                        except grpc.aio.AioRpcError as e:
                            details = e.details() or ""
                            if "refused" in details or "No such file" in details:
                                refused[f"GetSession {e.code().name}"] += 1
                            else:
                                ended[e.code().name] += 1

            async def connector() -> None:
                loop = asyncio.get_running_loop()
                while not done.is_set():
                    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
                        s.setblocking(False)
                        try:
                            await loop.sock_connect(s, path)
                            counts["connects"] += 1
                        except OSError as e:
                            refused[f"connect {errno.errorcode.get(e.errno or 0, e)}"] += 1
                    await asyncio.sleep(0.002)

            workers = [asyncio.ensure_future(caller()), asyncio.ensure_future(connector())]
            await asyncio.sleep(0.5)
            for _ in range(restarts):
                before = await self._started_at_fake(fake)
                t0 = time.perf_counter()
                await fake.status_stub.RestartDaemon(daemon_pb2.RestartDaemonRequest(), timeout=30)
                spans.append(await self._restarted_fake(fake, before, t0))
                await asyncio.sleep(0.5)
            done.set()
            await asyncio.gather(*workers)
        finally:
            done.set()
            await fake.close()
        total = sum(refused.values())
        self.samples["socket"] = {
            "refused": dict(refused),
            "ended": dict(ended),
            "counts": dict(counts),
            "restart_s": spans,
        }
        self.rows.append(
            Row(
                f"connections refused during a planned restart ({restarts} restarts)",
                "GetSession in a loop + a new connection every 2 ms",
                f"{total} refused ({counts['calls']:,} calls, {counts['connects']:,} connects)",
                f"longest call {ms(max(waits))}; restart {ms(med(spans))}; calls ended by the "
                f"stopping server: {sum(ended.values())}",
                "0",
                verdict(total == 0),
                {"refused": total, "longest_call_s": max(waits), "ended": dict(ended)},
            )
        )

    async def _restarted_fake(self, fake: FakeDaemon, before: int | None, t0: float) -> float:
        """Seconds from t0 until a daemon started after `before` answers."""
        deadline = time.perf_counter() + 60
        while time.perf_counter() < deadline:
            if await self._started_at_fake(fake) not in (before, None):
                return time.perf_counter() - t0
            await asyncio.sleep(0.005)
        raise TimeoutError("the daemon did not come back")

    async def _started_at_fake(self, fake: FakeDaemon) -> int | None:
        try:
            status = await fake.status_stub.GetStatus(daemon_pb2.GetStatusRequest(), timeout=30)
        except grpc.aio.AioRpcError:
            return None
        return int(status.started_at.ToNanoseconds())

    # a new session's first message, and follow-ups --------------------------------------------

    async def _first(self, model: Model) -> FirstRun:
        env = await self.cli(model)
        instant = model is INSTANT
        reps = self.n(6, 1) if instant else self.n(4, 1)
        # --quick with the real model: the headline only (no bare CLI, no follow-ups).
        full = not (self.opts.quick and not instant)
        run = FirstRun()
        history = [(f"benchmark message {k}", REPLY) for k in range(2)]

        async def cold_one_shot(rep: int) -> None:
            first, total = await env.one_shot(prompt(rep), [])
            run.one_shot.append(first)
            run.one_shot_exit.append(total)

        async def history_one_shot(rep: int) -> None:
            first, total = await env.one_shot(prompt(200 + rep), history)
            run.one_shot_history.append(first)
            run.one_shot_history_exit.append(total)

        async def create_send(rep: int) -> None:
            before = await env.spares_adopted()
            first, created, turn = await env.create_and_send(prompt(rep))
            after = await env.spares_adopted()
            run.create_send.append(first)
            run.create_rpc.append(created)
            run.create_split.append(turn)
            if before is not None and after is not None:
                run.spares_adopted = (run.spares_adopted or 0) + (after - before)

        async def spawned(rep: int) -> None:
            t0 = time.perf_counter()
            direct = await env.spawn_direct()
            try:
                run.spawned_init.append(await direct.initialize())
                t = await direct.turn(prompt(rep))
                run.spawned.append(time.perf_counter() - t0 - t.total + t.first_text)
            finally:
                await direct.close()

        async def prewarmed(rep: int) -> None:
            """The floor: direct processes (same argv; bare) and a daemon session, all started
            together, 2 s to get ready, then their first turns one after another."""
            created = time.perf_counter()
            sid = await env.create_session()
            direct = await env.spawn_direct()
            bare = await env.spawn_direct(bare=True) if full else None
            try:
                await asyncio.gather(
                    direct.initialize(), *([bare.initialize()] if bare is not None else [])
                )
                run.ready_after.append(await env.wait_prewarmed(sid, created, PREWARM_WAIT + 5))
                await asyncio.sleep(max(0.0, PREWARM_WAIT - (time.perf_counter() - created)))
                order = ["daemon", "direct", "bare"] if bare is not None else ["daemon", "direct"]
                order = order[rep % len(order) :] + order[: rep % len(order)]
                for who in order:
                    if who == "daemon":
                        run.prewarmed.append(await env.daemon_turn(sid, prompt(rep)))
                    elif who == "direct":
                        run.floor.append(await direct.turn(prompt(rep)))
                    elif bare is not None:
                        run.floor_bare.append(await bare.turn(prompt(rep)))
                    await asyncio.sleep(TURN_GAP)
                for k in range(2 if full else 0):  # the follow-ups, alike
                    run.followups.append((await env.daemon_turn(sid, prompt(100 + k))).first_text)
                    await asyncio.sleep(TURN_GAP)
                    run.direct_followups.append((await direct.turn(prompt(100 + k))).first_text)
                    await asyncio.sleep(TURN_GAP)
            finally:
                await direct.close()
                if bare is not None:
                    await bare.close()
                await env.terminate(sid)

        # create + send comes right before the pre-warmed processes: a spare agent it took is
        # replaced while they get ready (2 s), so nothing measured shares the CPU with that.
        steps = [spawned] + ([cold_one_shot, history_one_shot] if full else [])
        for rep in range(reps):
            for step in [*steps[rep % len(steps) :], *steps[: rep % len(steps)], create_send]:
                await step(rep)
                await asyncio.sleep(TURN_GAP)
            await prewarmed(rep)
            await asyncio.sleep(TURN_GAP)
        return run

    async def sec_first(self) -> None:
        runs = {m.key: await self._first(m) for m in MODELS}
        self._first_runs.update(runs)
        self.samples["first"] = {k: dataclasses.asdict(r) for k, r in runs.items()}
        for m in MODELS:
            r = runs[m.key]
            note(
                f"{m.label}: daemon session READY {ms(med(r.ready_after))} after CreateSession; "
                f"direct initialize answered {ms(med(r.spawned_init))} after spawn; "
                f"spares adopted {r.spares_adopted}"
            )
        for m in MODELS:
            r = runs[m.key]
            o, b = med(r.create_send), med(r.spawned)
            spares = (
                ""
                if r.spares_adopted is None
                else f"; took a spare {r.spares_adopted}/{len(r.create_send)}"
            )
            self.rows.append(
                Row(
                    f"first text, create + send at once ({len(r.create_send)} runs)",
                    f"{ms(b)} direct CLI spawned for it (init {ms(med(r.spawned_init))})",
                    f"{ms(o)} (CreateSession {ms(med(r.create_rpc))}{spares})",
                    times(o, b),
                    "(reported)",
                    "INFO",
                    {"baseline_s": b, "ours_s": o},
                    model=m.label,
                )
            )
        for m in MODELS:
            r = runs[m.key]
            o, p = med(r.create_send), med([t.first_text for t in r.floor])
            self.rows.append(
                Row(
                    "  same, vs the CLI's floor: pre-warmed 2 s with initialize",
                    f"{ms(p)} direct, same argv, 1st turn",
                    ms(o),
                    f"{o / p:.2f}×",
                    "≤ 1.3×",
                    verdict(o / p <= 1.3),
                    {"baseline_s": p, "ours_s": o},
                    model=m.label,
                )
            )
        for m in MODELS:
            r = runs[m.key]
            if not r.one_shot:  # --quick with the real model
                continue
            o, b = med(r.create_send), med(r.one_shot)
            self.rows.append(
                Row(
                    "  same, vs one-shot claude -p (the original)",
                    f"{ms(b)} first text delta (exit {ms(med(r.one_shot_exit))})",
                    ms(o),
                    times(o, b),
                    "(reported)",
                    "INFO",
                    {"baseline_s": b, "exit_s": med(r.one_shot_exit), "ours_s": o},
                    model=m.label,
                )
            )
        for m in MODELS:
            r = runs[m.key]
            o = med([t.first_text for t in r.prewarmed])
            p = med([t.first_text for t in r.floor])
            bare = f"; {ms(med([t.first_text for t in r.floor_bare]))} bare" if r.floor_bare else ""
            self.rows.append(
                Row(
                    "first text, 1st turn of a session created 2 s before",
                    f"{ms(p)} direct pre-warmed, same argv{bare}",
                    ms(o),
                    f"{o / p:.2f}× ({(o - p) * 1000:+.1f} ms)",
                    "(reported)",
                    "INFO",
                    {"baseline_s": p, "ours_s": o},
                    model=m.label,
                )
            )
        r = runs[INSTANT.key]
        self.rows.append(
            _share_row(
                "  daemon's share of that first text",
                r.prewarmed,
                f"; CLI's own duration {ms(med([t.cli_duration for t in r.prewarmed]))} vs "
                f"{ms(med([t.cli_duration for t in r.floor]))} direct",
                model=INSTANT.label,
            )
        )

    async def sec_followup(self) -> None:
        for m in MODELS:
            r = self._first_runs.get(m.key)
            if r is None:  # `first` did not run
                r = await self._followups_only(m)
            if not r.followups:  # --quick with the real model
                continue
            o = med(r.followups)
            b = med(r.one_shot_history)
            d = med(r.direct_followups)
            self.samples.setdefault("followup", {})[m.key] = {
                "one_shot_history_s": r.one_shot_history,
                "daemon_s": r.followups,
                "direct_s": r.direct_followups,
            }
            self.rows.append(
                Row(
                    f"first text, follow-up message ({len(r.followups)} vs "
                    f"{len(r.one_shot_history)})",
                    f"{ms(b)} one-shot + history replay (exit {ms(med(r.one_shot_history_exit))})",
                    f"{ms(o)} (direct CLI {ms(d)})",
                    f"{times(o, b)}; daemon {(o - d) * 1000:+.1f} ms",
                    "(reported)",
                    "INFO",
                    {"baseline_s": b, "ours_s": o, "direct_s": d},
                    model=m.label,
                )
            )

    async def _followups_only(self, model: Model) -> FirstRun:
        env = await self.cli(model)
        run = FirstRun()
        history = [(f"benchmark message {k}", REPLY) for k in range(2)]
        for rep in range(self.n(4, 1)):
            sid = await env.create_session()
            direct = await env.spawn_direct()
            try:
                await direct.initialize()
                await asyncio.sleep(PREWARM_WAIT)
                await env.daemon_turn(sid, prompt(rep))
                await direct.turn(prompt(rep))
                for k in range(2):
                    await asyncio.sleep(TURN_GAP)
                    run.followups.append((await env.daemon_turn(sid, prompt(100 + k))).first_text)
                    await asyncio.sleep(TURN_GAP)
                    run.direct_followups.append((await direct.turn(prompt(100 + k))).first_text)
            finally:
                await direct.close()
                await env.terminate(sid)
            first, total = await env.one_shot(prompt(200 + rep), history)
            run.one_shot_history.append(first)
            run.one_shot_history_exit.append(total)
        return run

    # a pool under pressure --------------------------------------------------------------------

    async def sec_pressure(self) -> None:
        model = REALISTIC if not self.opts.quick else INSTANT  # --quick: shorter turns
        sessions, cap = self.n(12, 4), self.n(4, 2)
        rounds = self.n(3, 1)
        env = CliEnv(
            self.opts,
            self.children,
            model,
            "pressure",
            {"max_live": cap, "max_queued": 64, "queue_timeout": 120.0},
        )
        first_event: list[float] = []
        first_text: list[float] = []
        completed = 0
        errors: list[str] = []
        count = ChildCount()
        try:
            await env.start()
            assert env.daemon is not None and env.daemon.proc is not None
            sids = [await env.create_session() for _ in range(sessions)]
            await asyncio.sleep(self.n(PREWARM_WAIT, 1.0))
            sampler = ChildSampler(env.daemon.proc.pid).start()
            try:
                for rnd in range(rounds):
                    results = await asyncio.gather(
                        *(env.daemon_turn(s, prompt(rnd * 100 + i)) for i, s in enumerate(sids)),
                        return_exceptions=True,
                    )
                    for res in results:
                        if isinstance(res, BaseException):
                            errors.append(repr(res))
                            continue
                        completed += 1
                        first_event.append(res.first_event)
                        first_text.append(res.first_text)
                    await asyncio.sleep(0.5)
            finally:
                count = sampler.stop()
            records = env.daemon.log_records()
        finally:
            await env.close()
        evictions = sum(
            1 for r in records if r.get("event") == "evicting least-recently-used agent"
        )
        started = [r for r in records if r.get("event") == "agent process started"]
        resumed = sum(1 for r in started if r.get("resume"))
        total = sessions * rounds
        self.samples["pressure"] = {
            "sessions": sessions,
            "max_live": cap,
            "first_event_s": first_event,
            "first_text_s": first_text,
            "evictions": evictions,
            "agents_started": len(started),
            "resumed": resumed,
            "live_agents": dataclasses.asdict(count),
            "errors": errors[:5],
        }
        ok = completed == total and count.ok and count.most_agents <= cap
        self.rows.append(
            Row(
                f"pool under pressure: {sessions} sessions, max_live {cap}, "
                f"{rounds}×{sessions} turns at once",
                "—",
                f"{completed}/{total} done; 1st event p50 {ms(med(first_event))} "
                f"p99 {ms(pct(first_event, 99))}",
                f"1st text p50 {ms(med(first_text))} p99 {ms(pct(first_text, 99))}; "
                f"{evictions} evictions, {resumed} resumes; most live agents {count.most_agents}",
                f"all complete, live ≤ {cap}",
                verdict(ok),
                {
                    "completed": completed,
                    "turns": total,
                    "first_event_p50_s": med(first_event),
                    "first_event_p99_s": pct(first_event, 99),
                    "most_live_agents": count.most_agents,
                },
                model=model.label,
            )
        )

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
        for label, p, limit in (("p50", 50, GETSESSION_P50_TARGET), ("p99", 99, 1.5)):
            b, o = pct(base, p), pct(ours, p)
            self.rows.append(
                Row(
                    f"GetSession round trip {label} ({len(ours)} calls)",
                    f"{ms(b)} bare grpc.aio echo",
                    ms(o),
                    f"{o / b:.2f}×",
                    f"≤ {limit:g}×",
                    verdict(o / b <= limit),
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
        sessions = CONCURRENT_SESSIONS
        rounds, deltas = self.n(3, 1), self.n(500, 200)
        fake = FakeDaemon(
            self.opts,
            self.children,
            "concurrent",
            {"pool": {"max_live": sessions, "max_queued": 2 * sessions}, "daemon": STALL_PROBE},
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
            await fake.wait_ready(sids, timeout=60.0 + 2 * sessions)
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
                CONCURRENT_STALL_TARGET_MS,
            )
        )

    # notifications ---------------------------------------------------------------------------

    async def sec_notify(self) -> None:
        from scripts.bench_notify import SLOW_RECEIVER_S, measure

        turns = self.n(200, 40)
        got = await asyncio.to_thread(measure, self.opts.workdir, turns)
        self.samples["notify"] = got
        for label, p in (("p50", "p50"), ("p99", "p99")):
            base, ours = got[f"floor_{p}_s"], got[f"ours_{p}_s"]
            self.rows.append(
                Row(
                    f"notification: event → POST received {label} ({turns} turns)",
                    f"{ms(base)} bare POST, loopback",
                    ms(ours),
                    f"{ours / base:.1f}×",
                    "≤ 50 ms",
                    verdict(ours <= 0.05),
                    {"baseline_s": base, "ours_s": ours},
                )
            )
        plain, slow = got["plain_turn_p50_s"], got["slow_receiver_turn_p50_s"]
        self.rows.append(
            Row(
                f"  turn p50 with a receiver taking {SLOW_RECEIVER_S:g} s per POST",
                f"{ms(plain)} no webhooks",
                ms(slow),
                f"{slow / plain:.2f}×",
                "≤ 1.2×",
                verdict(slow / plain <= 1.2),
                {"baseline_s": plain, "ours_s": slow},
            )
        )

    async def sec_search(self) -> None:
        from scripts.bench_search import measure

        n = self.n(100, 30)
        got = await asyncio.to_thread(measure, self.scale_dir("search"), self.opts.workdir, n)
        self.samples["search"] = got
        lite, pg = got["sqlite"], got["postgresql"]
        shown = "PostgreSQL: not installed" if pg is None else f"{ms(pg['p50_s'])} PostgreSQL"
        for label, key in (("p50", "p50_s"), ("p99", "p99_s")):
            ours = lite[key]
            beside = "—" if pg is None else f"{ms(pg[key])} PostgreSQL"
            self.rows.append(
                Row(
                    f"SearchMessages {label}, one word ({self.scale_label()}, SQLite)",
                    beside if label == "p99" else shown,
                    ms(ours),
                    "" if pg is None else f"{ours / pg[key]:.2f}×",
                    "≤ 20 ms" if label == "p50" else "",
                    verdict(ours <= 0.020) if label == "p50" else "INFO",
                    {"ours_s": ours, "postgresql_s": None if pg is None else pg[key]},
                )
            )
        common = lite["common_p50_s"]
        self.rows.append(
            Row(
                f"  SearchMessages p50, a word in every user message "
                f"(ranks {self.n(SCALE_SESSIONS, 2_000) * SCALE_MESSAGES // 2:,})",
                "—" if pg is None else f"{ms(pg['common_p50_s'])} PostgreSQL",
                ms(common),
                "",
                "",
                "INFO",
                {"ours_s": common},
            )
        )

    # 10,000 stored sessions of 50 messages -------------------------------------------------

    def scale_db(self) -> Path:
        """The stored sessions of scale / startup / purge, built once per run (then copied)."""
        if self._scale_db is None:
            count = self.n(SCALE_SESSIONS, 2_000)
            stale = self.n(SCALE_STALE, 200)
            db = self.opts.workdir / "scale-data" / "atomizerd.db"
            t = time.perf_counter()
            rows = build_sessions_db(db, count, SCALE_MESSAGES, SCALE_AUDIT, stale)
            note(
                f"{count:,} sessions, {rows['messages']:,} messages, {rows['audit']:,} audit "
                f"events written in {time.perf_counter() - t:.1f} s "
                f"({db.stat().st_size / 2**20:.0f} MiB)"
            )
            self._scale_db = db
        return self._scale_db

    def scale_dir(self, name: str) -> Path:
        """A daemon dir whose database is a copy of the stored sessions."""
        directory = self.opts.workdir / name
        target = directory / "state" / "atomizerd.db"
        if not target.exists():
            target.parent.mkdir(parents=True, exist_ok=True)
            with (
                contextlib.closing(sqlite3.connect(self.scale_db())) as src,
                contextlib.closing(sqlite3.connect(target)) as dst,
            ):
                src.backup(dst)
        return directory

    def scale_label(self) -> str:
        count = self.n(SCALE_SESSIONS, 2_000)
        return f"{count:,} sessions × {SCALE_MESSAGES} messages"

    async def sec_scale(self) -> None:
        count = self.n(SCALE_SESSIONS, 2_000)
        resident = self.n(SCALE_RESIDENT, 200)
        directory = self.scale_dir("scale")
        # The reaper idle for the whole measurement (its first pass an hour away), so nothing
        # unloads the resident sessions; no spare agents: no live agent at all.
        fake = FakeDaemon(
            self.opts,
            self.children,
            "scale",
            {"reaper": {"interval": 3600.0, "retention": 0}, "pool": no_spares()},
            directory=directory,
        )
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
            rss_listed, _ = rss_kib(fake.pid)
            chosen = random.Random(7).sample(sids, resident)
            history_times: list[float] = []
            messages_seen = 0
            for sid in chosen[: self.n(200, 50)]:
                token = ""
                while True:
                    t0 = time.perf_counter()
                    h = await stub.GetHistory(
                        pb.GetHistoryRequest(session_id=sid, page_size=20, page_token=token),
                        timeout=10,
                    )
                    history_times.append(time.perf_counter() - t0)
                    messages_seen += len(h.messages)
                    token = h.next_page_token
                    if not token:
                        break
            sem = asyncio.Semaphore(32)

            async def get(sid: str) -> None:
                async with sem:
                    await stub.GetSession(pb.GetSessionRequest(session_id=sid), timeout=10)

            t0 = time.perf_counter()
            await asyncio.gather(*(get(s) for s in chosen))
            loading = time.perf_counter() - t0
            await asyncio.sleep(1.0)  # settled
            rss_resident, hwm = rss_kib(fake.pid)
            st = await fake.status_stub.GetStatus(daemon_pb2.GetStatusRequest(), timeout=10)
            live = st.live_processes
            passes = reaper_passes_logged(fake.daemon)
        finally:
            await fake.close()
        self.samples["scale"] = {
            "sessions": count,
            "rss_kib_at_start": rss_start,
            "rss_kib_after_listing": rss_listed,
            "rss_kib_resident": rss_resident,
            "hwm_kib": hwm,
            "resident": resident,
            "live_agents": live,
            "reaper_passes_meanwhile": passes,
            "list_page_s": page_times,
            "history_page_s": history_times,
        }
        p50 = med(page_times)
        self.rows.append(
            Row(
                f"ListSessions page of 100, {self.scale_label()} ({len(page_times)} pages)",
                "—",
                f"p50 {ms(p50)}, p99 {ms(pct(page_times, 99))}",
                "",
                "p50 ≤ 10 ms",
                verdict(p50 <= 0.010),
                {"p50_s": p50, "p99_s": pct(page_times, 99)},
            )
        )
        h50 = med(history_times)
        self.rows.append(
            Row(
                f"GetHistory page of 20, {self.scale_label()} ({len(history_times)} pages)",
                "—",
                f"p50 {ms(h50)}, p99 {ms(pct(history_times, 99))}",
                f"{messages_seen:,} messages read",
                "(reported)",
                "INFO",
                {"p50_s": h50, "p99_s": pct(history_times, 99)},
            )
        )
        mib = rss_resident / 1024
        ok = mib <= 120 and live == 0 and passes == 0
        self.rows.append(
            Row(
                f"daemon RSS, {resident:,} sessions resident, {self.scale_label()}",
                "—",
                f"{mib:.0f} MiB (start {rss_start / 1024:.0f}, after listing "
                f"{rss_listed / 1024:.0f}, peak {hwm / 1024:.0f})",
                f"loaded by GetSession in {loading:.1f} s; live agents {live}; "
                f"reaper passes meanwhile {passes}",
                "≤ 120 MiB",
                verdict(ok),
                {"rss_mib": mib, "peak_mib": hwm / 1024, "live_agents": live, "passes": passes},
            )
        )

    # start to READY ---------------------------------------------------------------------------

    async def sec_startup(self) -> None:
        """exec -> READY=1 with an empty database (its schema made by a start before) and with
        the stored sessions, started alternately."""
        directories = {
            "empty": self.opts.workdir / "startup-empty",
            "scale": self.scale_dir("startup"),
        }
        await self._ready_after_exec(directories["empty"])  # creates the empty database
        reps = self.n(5, 2)
        got: dict[str, list[float]] = {name: [] for name in directories}
        cpu: dict[str, list[float]] = {name: [] for name in directories}
        for _ in range(reps):
            for name, directory in directories.items():
                ready, used = await self._ready_after_exec(directory)
                got[name].append(ready)
                cpu[name].append(used)
        self.samples["startup"] = {
            **{f"{name}_ready_s": xs for name, xs in got.items()},
            **{f"{name}_cpu_s": xs for name, xs in cpu.items()},
        }
        for name, what, target in (
            ("empty", "an empty database", STARTUP_EMPTY_TARGET_S),
            ("scale", f"{self.scale_label()} + audit", STARTUP_SCALE_TARGET_S),
        ):
            o = med(got[name])
            self.rows.append(
                Row(
                    f"exec → READY=1, {what} ({reps} starts)",
                    f"{ms(med(got['empty']))} empty database" if name == "scale" else "—",
                    f"{ms(o)} (max {ms(max(got[name]))}; CPU {ms(med(cpu[name]))})",
                    f"+{(o - med(got['empty'])) * 1000:.0f} ms" if name == "scale" else "",
                    f"≤ {target * 1000:.0f} ms",
                    verdict(o <= target),
                    {"median_s": o, "max_s": max(got[name])},
                )
            )

    async def _ready_after_exec(self, directory: Path) -> tuple[float, float]:
        """Seconds from the daemon's start to its READY=1 (on a NOTIFY_SOCKET bound here), and
        the CPU seconds it had used by then (what a busy machine does not inflate)."""
        notify_path = self.opts.workdir / "notify.sock"
        notify_path.unlink(missing_ok=True)
        loop = asyncio.get_running_loop()
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        sock.bind(str(notify_path))
        sock.setblocking(False)
        d = self.children.daemon(
            RunningDaemon(
                directory,
                daemon_config({"reaper": {"interval": 3600.0, "retention": 0}}),
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
                    ready = time.perf_counter() - t0
                    cpu = cpu_seconds(d.proc.pid) if d.proc is not None else math.nan
                    break
            d.wait_serving(timeout=10)
        finally:
            self.children.stop_daemon(d)
            sock.close()
            notify_path.unlink(missing_ok=True)
        return ready, cpu

    # the retention purge ---------------------------------------------------------------------

    async def sec_purge(self) -> None:
        count = self.n(SCALE_SESSIONS, 2_000)
        stale = self.n(SCALE_STALE, 200)
        directory = self.scale_dir("purge")
        interval = 0.25
        fake = FakeDaemon(
            self.opts,
            self.children,
            "purge",
            {"reaper": {"interval": interval, "retention": DAY}, "daemon": STALL_PROBE},
            directory=directory,
        )
        try:
            await fake.start()
            ready = time.time()
            deadline = time.monotonic() + self.n(SECTION_TIMEOUT, SECTION_TIMEOUT // 3) - 20
            known = count
            while known > count - stale:
                if time.monotonic() > deadline:
                    raise TimeoutError(f"{known - (count - stale)} sessions still to purge")
                await asyncio.sleep(0.25)
                st = await fake.status_stub.GetStatus(daemon_pb2.GetStatusRequest(), timeout=30)
                known = st.sessions_known
            await asyncio.sleep(self.n(3.0, 1.0))  # passes with nothing left to purge
        finally:
            await fake.close()
        records = [r for r in fake.daemon.log_records() if r.get("event") == "reaper pass"]
        passes = [r for r in records if int(r.get("purged", 0)) > 0]
        idle_passes = [float(r["duration_ms"]) for r in records if int(r.get("purged", 0)) == 0]
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
        purged = sum(int(r["purged"]) for r in passes)
        pass_ms = [float(r["duration_ms"]) for r in passes]
        self.samples["purge"] = {
            "sessions": count,
            "stale": stale,
            "messages_each": SCALE_MESSAGES,
            "purged": purged,
            "passes": len(passes),
            "pass_ms": pass_ms,
            "idle_pass_ms": idle_passes,
            "loop_stalls": [x.__dict__ for x in stalls],
        }
        self.rows.append(
            Row(
                f"retention purge of {stale:,} sessions ({SCALE_MESSAGES} messages, "
                f"{SCALE_AUDIT} audit events each), {count:,} stored",
                "—",
                f"{purged:,} purged in {len(passes)} passes, {purging:.2f} s in all",
                f"longest pass {max(pass_ms):.0f} ms",
                "(reported)",
                "INFO",
                {"purged": purged, "seconds": purging, "longest_pass_ms": max(pass_ms)},
            )
        )
        self.rows.append(
            stall_row(
                "  loop worst stall during that purge",
                idle_stalls,
                stalls,
                f"{len(passes)} passes, {purging:.1f} s purging",
            )
        )
        worst = max(idle_passes) if idle_passes else math.nan
        self.rows.append(
            Row(
                f"reaper pass, nothing to purge, {count - stale:,} stored ({len(idle_passes)})",
                "—",
                f"median {med(idle_passes):.2f} ms, max {worst:.2f} ms",
                "",
                "≤ 50 ms",
                verdict(bool(idle_passes) and worst <= 50),
                {"median_ms": med(idle_passes), "max_ms": worst},
            )
        )


def build_sessions_db(
    db: Path, count: int, messages: int, audit: int, stale: int
) -> dict[str, int]:
    """`count` sessions of `messages` messages and `audit` audit events each, the first
    `stale` of them last active two days ago, the others within the last half day.

    The store opens the file (creating and migrating the schema) and writes one session with
    one turn and one audit event through its own API; those rows, read back as stored, are the
    templates: every column the store writes (whatever its version) is copied, only ids,
    texts and times change. Then plain SQL, executemany in one transaction, and the templates
    are deleted."""
    from atomizerd import ids
    from atomizerd.model import AuditRecord, TurnOutcome
    from atomizerd.store.db import Store

    db.parent.mkdir(parents=True, exist_ok=True)
    store = Store(f"sqlite:///{db}")
    template = ids.new_session_id()
    try:
        store.create_session(template, "user", None, ids.new_agent_session_id())
        store.add_user_message(template, "template-turn", "benchmark message", "template-req")
        outcome = TurnOutcome(
            status="complete",
            text=REPLY,
            cost_usd=0.0012,
            usage={"input_tokens": 1200, "output_tokens": 40},
        )
        store.finish_turn(template, "template-turn", outcome)
        store.add_audit(
            AuditRecord(
                session_id=template,
                kind="permission",
                allow=True,
                decider="client",
                tool_name="Bash",
                input_digest="0" * 64,
                detail="python analyse.py",
                turn_id="template-turn",
            )
        )
    finally:
        store.close()

    now = time.time()
    with contextlib.closing(sqlite3.connect(db)) as conn:

        def rows_of(table: str) -> tuple[list[str], list[dict[str, Any]]]:
            cur = conn.execute(f"SELECT * FROM {table} WHERE session_id = ?", (template,))
            columns = [d[0] for d in cur.description]
            return columns, [dict(zip(columns, row, strict=True)) for row in cur.fetchall()]

        s_cols, (s_row,) = rows_of("sessions")
        m_cols, m_rows = rows_of("messages")
        a_cols, (a_row,) = rows_of("audit_events")
        m_cols = [c for c in m_cols if c != "id"]
        a_cols = [c for c in a_cols if c != "id"]
        user = next(r for r in m_rows if r["role"] == "user")
        reply = next(r for r in m_rows if r["role"] == "assistant")

        def filler(columns: list[str], row: dict[str, Any], *changed: str) -> Any:
            """A function of the changed columns' values that gives the template row with
            them in place, as a tuple in `columns` order."""
            base = [row[c] for c in columns]
            at = [columns.index(c) for c in changed]

            def fill(*values: Any) -> tuple[Any, ...]:
                out = list(base)
                for i, v in zip(at, values, strict=True):
                    out[i] = v
                return tuple(out)

            return fill

        rng = random.Random(11)
        sessions: list[tuple[str, float, float]] = []  # id, created, last active
        for i in range(count):
            if i < stale:
                created = now - 3 * DAY + i
                active = now - 2 * DAY
            else:
                created = now - DAY / 2 + (i - stale) * (DAY / 4) / max(count - stale, 1)
                active = created + rng.uniform(60, 3600)
            sessions.append((ids.new_session_id(), created, active))
        # In id order, so that every index on the session id is appended to, not split.
        sessions.sort()

        session_row = filler(
            s_cols,
            s_row,
            "session_id",
            "agent_session_id",
            "agent_started",
            "created_at",
            "last_active_at",
            "message_count",
        )
        changed = ("session_id", "turn_id", "content", "request_id", "created_at")
        user_row, reply_row = (filler(m_cols, r, *changed) for r in (user, reply))
        audit_row = filler(a_cols, a_row, "session_id", "turn_id", "time")
        answer = f"{REPLY} The results of the run are in. " * 3

        def message_rows() -> Iterator[tuple[Any, ...]]:
            for sid, created, active in sessions:
                step = (active - created) / (messages + 1)
                for k in range(messages):
                    turn, at = f"{sid}-t{k // 2}", created + (k + 1) * step
                    if k % 2 == 0:
                        text = f"benchmark message {k // 2}: how did the study run go?"
                        yield user_row(sid, turn, text, f"req-{k // 2}", at)
                    else:
                        yield reply_row(sid, turn, answer, None, at)

        def insert(table: str, columns: list[str], rows: Iterator[tuple[Any, ...]]) -> None:
            marks = ", ".join("?" for _ in columns)
            sql = f"INSERT INTO {table} ({', '.join(columns)}) VALUES ({marks})"
            conn.executemany(sql, rows)

        # A bulk load: no journal, no syncs, a large cache; WAL again after it (the store
        # opens the file in WAL mode anyway).
        for pragma in ("journal_mode = OFF", "synchronous = OFF", "cache_size = -262144"):
            conn.execute(f"PRAGMA {pragma}").fetchall()
        # The history tables' indexes are dropped for the load and made again after it (the
        # store's own statements): building an index from all rows is faster than growing it.
        indexes = conn.execute(
            "SELECT name, sql FROM sqlite_master WHERE type = 'index' AND sql IS NOT NULL "
            "AND tbl_name IN ('messages', 'audit_events')"
        ).fetchall()
        with conn:
            for name, _ in indexes:
                conn.execute(f'DROP INDEX "{name}"')
            insert(
                "sessions",
                s_cols,
                (
                    session_row(sid, ids.new_agent_session_id(), 1, c, a, messages)
                    for sid, c, a in sessions
                ),
            )
            insert("messages", m_cols, message_rows())
            insert(
                "audit_events",
                a_cols,
                (
                    audit_row(sid, f"{sid}-t{k}", c + k)
                    for sid, c, _ in sessions
                    for k in range(audit)
                ),
            )
            for table in ("audit_events", "messages", "sessions"):
                conn.execute(f"DELETE FROM {table} WHERE session_id = ?", (template,))
            for _, sql in indexes:
                conn.execute(sql)
        conn.execute("PRAGMA journal_mode = WAL").fetchall()
    return {"sessions": count, "messages": count * messages, "audit": count * audit}


# --- entry point -----------------------------------------------------------------------------


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="scripts/bench", description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="fewer repetitions (under a minute)")
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


def _share_row(label: str, splits: Sequence[Any], note: str = "", model: str = "") -> Row:
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
        model=model,
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
