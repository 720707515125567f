#!/usr/bin/env python3
"""Soak test: many clients hammering one daemon for a while, then checks that nothing leaked.

    scripts/soak [--seconds 60] [--clients 32] [--agent fake|real] [--seed N] [--keep]
                 [--tracemalloc]
    scripts/soak --autonomy [--minutes 10] [--sessions 4] [--max-live 3] [--seed N] [--keep]

Starts its own daemon on a temporary socket (the scripted fake agent, or the pinned `claude`
CLI against the fake Messages API run in its own process), then runs N concurrent clients, each
on its own connection, doing random creates, sends, interrupts, watches, terminates, reads and
disconnects (a stream cancelled mid-turn, a whole connection dropped mid-turn) until the time
is up. Every RPC carries a deadline. Then it terminates every session, stops the daemon and
checks:

- every RPC ended with an expected status (never INTERNAL, UNKNOWN, UNAVAILABLE; never
  DEADLINE_EXCEEDED except for WatchSession, which follows a session until the deadline) and
  within its deadline; every turn stream read to its end had exactly one terminal event, last;
- the pool's cap holds: the daemon's own agent processes (its children, counted from /proc
  every 10 ms by a sampler process of its own) never exceed `pool.max_live`, with far more
  sessions than that (evictions and resumes all along);
- no agent process (nor anything in its process group) outlives the daemon;
- the daemon's open file descriptors with everything idle: before vs after, within a small
  constant;
- the daemon's RSS, sampled through the run, stays roughly flat after warm-up (printed as a
  table over time, with the live agents of each stretch);
- every committed user message has a terminal assistant record, and the SQLite file passes
  `PRAGMA integrity_check`.

Prints one summary table; exits 1 if a check failed (2 on a usage or set-up error).

--autonomy runs the autonomous agent's soak instead (scripts/soak_autonomy.py): power-mode
sessions whose agent runs background commands and subagents while clients talk to it; counts
replies given to the wrong message and turns lost.

--tracemalloc runs the daemon with tracemalloc on (PYTHONTRACEMALLOC) and has it dump a snapshot
at SIGUSR1 (once the load has warmed up, and at the end): the report then lists where the
Python heap grew in between, by allocating line. For finding a leak; it slows the daemon.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import math
import os
import random
import shutil
import signal
import sqlite3
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import grpc  # noqa: E402
import grpc.aio  # noqa: E402
from atomizer.v1 import daemon_pb2, daemon_pb2_grpc, session_pb2_grpc  # noqa: E402
from atomizer.v1 import session_pb2 as pb  # noqa: E402

from atomizerd.agents.procgroup import group_members, read_stat  # noqa: E402
from atomizerd.config import Config  # noqa: E402
from scripts.soak_children import ChildCount, ChildSampler  # noqa: E402
from tests.support.daemon import RunningDaemon, real_claude  # noqa: E402

T = TypeVar("T")
C = grpc.StatusCode

UNARY_TIMEOUT = 10.0
TURN_TIMEOUT = 90.0
MAX_SESSIONS_PER_CLIENT = 3
DEADLINE_SLACK = 2.0  # a call may return this much after its deadline before it is a hang
FD_ALLOWANCE = 4
RSS_GROWTH_FACTOR = 1.5  # after warm-up, RSS may grow by this factor ...
RSS_GROWTH_MIB = 48.0  # ... plus this much, and still count as flat
TERMINAL = ("turn_completed", "turn_failed")

# What each RPC may answer in this workload besides OK. Anything else is a finding.
EXPECTED: dict[str, set[C]] = {
    "CreateSession": set(),
    "GetSession": {C.NOT_FOUND},  # purged meanwhile
    "ListSessions": set(),
    "GetHistory": {C.NOT_FOUND},
    "TerminateSession": {C.NOT_FOUND},
    # Our own disconnects; the pool's and the session's queue limits under load; a session
    # purged by the same client.
    "SendMessage": {C.CANCELLED, C.RESOURCE_EXHAUSTED, C.FAILED_PRECONDITION, C.NOT_FOUND},
    "Interrupt": {C.FAILED_PRECONDITION, C.NOT_FOUND},  # the turn ended first
    # A watch follows the session until its deadline (or our disconnect).
    "WatchSession": {C.DEADLINE_EXCEEDED, C.CANCELLED, C.NOT_FOUND},
    "GetStatus": set(),
}


# --- measurements --------------------------------------------------------------------------


@dataclass
class Stats:
    rpcs: Counter[str] = field(default_factory=Counter)  # "RPC CODE"
    codes: Counter[str] = field(default_factory=Counter)
    first_event_ms: list[float] = field(default_factory=list)
    first_text_ms: list[float] = field(default_factory=list)
    turns: Counter[str] = field(default_factory=Counter)  # completed / interrupted / failed
    disconnects: Counter[str] = field(default_factory=Counter)  # stream / connection
    findings: list[str] = field(default_factory=list)

    def record(self, rpc: str, code: C, elapsed: float, timeout: float, detail: str = "") -> None:
        self.rpcs[f"{rpc} {code.name}"] += 1
        self.codes[code.name] += 1
        if code != C.OK and code not in EXPECTED[rpc]:
            self.finding(f"{rpc}: unexpected {code.name}: {detail[:200]}")
        if elapsed > timeout + DEADLINE_SLACK:
            self.finding(f"{rpc}: returned {elapsed:.1f} s after a {timeout:g} s deadline")

    def finding(self, what: str) -> None:
        if len(self.findings) < 200:
            self.findings.append(what)


def percentile(values: list[float], p: float) -> float:
    if not values:
        return math.nan
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, math.ceil(p / 100 * len(ordered)) - 1))]


def rss_mib(pid: int) -> float | None:
    parts = rss_parts_mib(pid)
    return None if parts is None else parts["VmRSS"]


def rss_parts_mib(pid: int) -> dict[str, float] | None:
    """VmRSS and its parts (RssAnon: the heaps; RssFile: mapped files, the code of Python and
    its libraries among them; RssShmem: shared memory, SQLite's WAL index), in MiB."""
    try:
        lines = Path(f"/proc/{pid}/status").read_text().splitlines()
    except OSError:
        return None
    out: dict[str, float] = {}
    for line in lines:
        key, _, rest = line.partition(":")
        if key in ("VmRSS", "RssAnon", "RssFile", "RssShmem"):
            out[key] = int(rest.split()[0]) / 1024
    return out if "VmRSS" in out else None


def fd_count(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def alive(pid: int) -> bool:
    stat = read_stat(pid)
    return stat is not None and stat.state not in ("Z", "X")


async def timed(
    stats: Stats, rpc: str, timeout: float, call: Callable[[], Awaitable[T]]
) -> T | None:
    """Runs one unary call; records its status and duration. None if it failed."""
    started = time.monotonic()
    try:
        result = await call()
    except grpc.aio.AioRpcError as e:
        stats.record(rpc, e.code(), time.monotonic() - started, timeout, e.details() or "")
        return None
    stats.record(rpc, C.OK, time.monotonic() - started, timeout)
    return result


# --- one client ----------------------------------------------------------------------------


class Client:
    def __init__(
        self, index: int, target: str, rng: random.Random, stats: Stats, texts: list[str]
    ) -> None:
        self.index = index
        self.target = target
        self.rng = rng
        self.stats = stats
        self.texts = texts
        self.sessions: list[str] = []
        self.created = 0
        self.sent = 0
        self.channel = grpc.aio.insecure_channel(target)
        self.stub = session_pb2_grpc.SessionServiceStub(self.channel)

    async def reconnect(self) -> None:
        await self.channel.close(None)
        self.channel = grpc.aio.insecure_channel(self.target)
        self.stub = session_pb2_grpc.SessionServiceStub(self.channel)

    def text(self) -> str:
        self.sent += 1
        return self.rng.choice(self.texts).format(n=f"{self.index}-{self.sent}")

    async def run(self, until: float) -> None:
        actions: list[tuple[Callable[[], Awaitable[None]], int]] = [
            (self.create, 8),
            (self.send, 40),
            (self.send_and_interrupt, 12),
            (self.send_and_drop, 6),
            (self.watch, 12),
            (self.read, 14),
            (self.terminate, 5),
        ]
        funcs, weights = zip(*actions, strict=True)
        try:
            while time.monotonic() < until:
                if not self.sessions:
                    await self.create()
                    continue
                await self.rng.choices(funcs, weights)[0]()
        finally:
            await self.channel.close(None)

    def session(self) -> str:
        return self.rng.choice(self.sessions)

    async def create(self) -> None:
        if len(self.sessions) >= MAX_SESSIONS_PER_CLIENT:
            return await self.read()
        resp = await timed(
            self.stats,
            "CreateSession",
            UNARY_TIMEOUT,
            lambda: self.stub.CreateSession(pb.CreateSessionRequest(), timeout=UNARY_TIMEOUT),
        )
        if resp is not None:
            self.sessions.append(resp.session.session_id)
            self.created += 1

    async def _turn(self, sid: str, text: str, disconnect_after: int | None = None) -> None:
        """One SendMessage stream read to its end (or cancelled after some events)."""
        started = time.monotonic()
        call = self.stub.SendMessage(
            pb.SendMessageRequest(session_id=sid, text=text), timeout=TURN_TIMEOUT
        )
        kinds: list[str] = []
        code = C.OK
        detail = ""
        try:
            async for resp in call:
                kind = resp.event.WhichOneof("kind") or ""
                now_ms = (time.monotonic() - started) * 1000
                if not kinds:
                    self.stats.first_event_ms.append(now_ms)
                if kind == "text_delta" and "text_delta" not in kinds:
                    self.stats.first_text_ms.append(now_ms)
                kinds.append(kind)
                if kind == "turn_completed":
                    interrupted = resp.event.turn_completed.interrupted
                    self.stats.turns["interrupted" if interrupted else "completed"] += 1
                elif kind == "turn_failed":
                    self.stats.turns["failed"] += 1
                if disconnect_after is not None and len(kinds) >= disconnect_after:
                    call.cancel()
                    self.stats.disconnects["stream"] += 1
                    code = C.CANCELLED
                    break
        except grpc.aio.AioRpcError as e:
            code, detail = e.code(), e.details() or ""
        except asyncio.CancelledError:
            code = C.CANCELLED  # our own connection was closed under the stream
        self.stats.record("SendMessage", code, time.monotonic() - started, TURN_TIMEOUT, detail)
        ends = [k for k in kinds if k in TERMINAL]
        if code == C.OK and (len(ends) != 1 or kinds[-1] not in TERMINAL):
            self.stats.finding(f"SendMessage: a finished stream had terminal events {ends}")

    async def send(self) -> None:
        disconnect = self.rng.randint(1, 6) if self.rng.random() < 0.15 else None
        await self._turn(self.session(), self.text(), disconnect)

    async def send_and_interrupt(self) -> None:
        sid = self.session()
        turn = asyncio.ensure_future(self._turn(sid, self.slow_text()))
        await asyncio.sleep(self.rng.uniform(0.05, 0.5))
        await timed(
            self.stats,
            "Interrupt",
            UNARY_TIMEOUT,
            lambda: self.stub.Interrupt(pb.InterruptRequest(session_id=sid), timeout=UNARY_TIMEOUT),
        )
        await turn

    def slow_text(self) -> str:
        words = " ".join(f"w{i}" for i in range(self.rng.randint(5, 30)))
        return f"[[slow:30]] {words}"

    async def send_and_drop(self) -> None:
        """The whole connection goes away mid-turn; the turn runs on in the daemon."""
        turn = asyncio.ensure_future(self._turn(self.session(), self.slow_text()))
        await asyncio.sleep(self.rng.uniform(0.0, 0.4))
        self.stats.disconnects["connection"] += 1
        await self.reconnect()
        with contextlib.suppress(asyncio.CancelledError):
            await turn

    async def watch(self) -> None:
        sid = self.session()
        timeout = self.rng.uniform(0.3, 1.5)
        started = time.monotonic()
        call = self.stub.WatchSession(pb.WatchSessionRequest(session_id=sid), timeout=timeout)
        code, detail = C.OK, ""
        try:
            async for _ in call:
                if self.rng.random() < 0.05:
                    call.cancel()
                    self.stats.disconnects["stream"] += 1
                    code = C.CANCELLED
                    break
        except grpc.aio.AioRpcError as e:
            code, detail = e.code(), e.details() or ""
        self.stats.record("WatchSession", code, time.monotonic() - started, timeout, detail)

    async def read(self) -> None:
        sid = self.session()
        which = self.rng.randrange(3)
        if which == 0:
            await timed(
                self.stats,
                "GetSession",
                UNARY_TIMEOUT,
                lambda: self.stub.GetSession(
                    pb.GetSessionRequest(session_id=sid), timeout=UNARY_TIMEOUT
                ),
            )
        elif which == 1:
            await timed(
                self.stats,
                "GetHistory",
                UNARY_TIMEOUT,
                lambda: self.stub.GetHistory(
                    pb.GetHistoryRequest(session_id=sid), timeout=UNARY_TIMEOUT
                ),
            )
        else:
            await timed(
                self.stats,
                "ListSessions",
                UNARY_TIMEOUT,
                lambda: self.stub.ListSessions(
                    pb.ListSessionsRequest(page_size=50), timeout=UNARY_TIMEOUT
                ),
            )

    async def terminate(self) -> None:
        sid = self.session()
        self.sessions.remove(sid)
        purge = self.rng.random() < 0.5
        await timed(
            self.stats,
            "TerminateSession",
            UNARY_TIMEOUT,
            lambda: self.stub.TerminateSession(
                pb.TerminateSessionRequest(session_id=sid, purge=purge), timeout=UNARY_TIMEOUT
            ),
        )


# --- the run -------------------------------------------------------------------------------


FAKE_TEXTS = [
    "hello {n}",
    "a question about study {n}, please answer briefly",
    "[[slow:20]] slow reply {n} one two three four",
    "[[deltas:300]] many deltas {n}",
    "[[tool:Read]] read something {n}",
    "[[thinking]] think about {n}",
    "[[api-retry:2]] overloaded {n}",
]
REAL_TEXTS = [
    "hello {n}",
    "a question about study {n}, please answer briefly",
    "[[slow:20]] slow reply {n} one two three four",
    "[[chunks:40]] forty little deltas for {n}",
    "[[thinking:pondering]] think about {n}",
]


@dataclass
class Outcome:
    rss: list[tuple[float, float]] = field(default_factory=list)  # (seconds, MiB)
    rss_parts: list[dict[str, float]] = field(default_factory=list)  # beside each sample
    fds_before: int = 0
    fds_after: int = 0
    agents_started: int = 0
    resumed: int = 0  # agents started with --resume (a session's conversation continued)
    evictions: int = 0
    max_live: int = 0
    children: ChildCount = field(default_factory=ChildCount)
    sessions: int = 0  # sessions created
    leaked: list[int] = field(default_factory=list)
    exit_code: int | None = None
    messages: int = 0
    store_problems: list[str] = field(default_factory=list)
    daemon_died: bool = False
    heap_growth: list[str] = field(default_factory=list)  # --tracemalloc
    children_offset: float = 0.0  # seconds from the child sampler's start to the run's t0


async def sample_rss(pid: int, out: Outcome, stop: asyncio.Event, t0: float) -> None:
    while not stop.is_set():
        parts = rss_parts_mib(pid)
        if parts is None:
            out.daemon_died = True
            return
        out.rss.append((time.monotonic() - t0, parts["VmRSS"]))
        out.rss_parts.append(parts)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), 0.5)


async def all_sessions(
    stub: session_pb2_grpc.SessionServiceAsyncStub,
) -> AsyncIterator[pb.Session]:
    token = ""
    while True:
        page = await stub.ListSessions(
            pb.ListSessionsRequest(page_size=1000, page_token=token), timeout=UNARY_TIMEOUT
        )
        for s in page.sessions:
            yield s
        token = page.next_page_token
        if not token:
            return


async def settle(target: str, stats: Stats) -> None:
    """Everything idle: every open session terminated (its agent stopped; spares stay), no
    connection."""
    async with grpc.aio.insecure_channel(target) as channel:
        stub = session_pb2_grpc.SessionServiceStub(channel)
        status = daemon_pb2_grpc.DaemonServiceStub(channel)
        async for s in all_sessions(stub):
            if s.state != pb.SESSION_STATE_CLOSED:
                await stub.TerminateSession(
                    pb.TerminateSessionRequest(session_id=s.session_id), timeout=UNARY_TIMEOUT
                )
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            resp = await status.GetStatus(daemon_pb2.GetStatusRequest(), timeout=UNARY_TIMEOUT)
            # Spare agents (pool.spares) belong to no session: they stay.
            spares = int(getattr(resp, "spare_agents", 0))
            if resp.live_processes - spares == 0 and resp.busy_sessions == 0:
                return
            await asyncio.sleep(0.2)
        stats.finding(f"agents still live 30 s after terminating every session: {resp}")


async def drive(
    d: RunningDaemon, args: argparse.Namespace, stats: Stats, out: Outcome, texts: list[str]
) -> None:
    assert d.proc is not None
    pid = d.proc.pid
    children = ChildSampler(pid).start()
    try:
        await _drive(d, args, stats, out, texts, children)
    finally:
        children.stop()  # a no-op once stopped


async def _drive(
    d: RunningDaemon,
    args: argparse.Namespace,
    stats: Stats,
    out: Outcome,
    texts: list[str],
    children: ChildSampler,
) -> None:
    assert d.proc is not None
    pid = d.proc.pid
    sampling_since = time.monotonic()
    await asyncio.sleep(1.0)  # the start-up `--version` probe is done
    out.fds_before = fd_count(pid)
    t0 = time.monotonic()
    out.children_offset = t0 - sampling_since
    stop = asyncio.Event()
    sampler = asyncio.ensure_future(sample_rss(pid, out, stop, t0))
    if args.tracemalloc:
        asyncio.get_running_loop().call_later(0.2 * args.seconds, d.signal, signal.SIGUSR1)
    master = random.Random(args.seed)
    clients = [
        Client(i, d.target, random.Random(master.random()), stats, texts)
        for i in range(args.clients)
    ]
    until = t0 + args.seconds
    runs = [asyncio.ensure_future(c.run(until)) for c in clients]
    done, pending = await asyncio.wait(runs, timeout=args.seconds + TURN_TIMEOUT + 30)
    for task in pending:
        stats.finding("a client did not finish its last action in time")
        task.cancel()
    for task in done:
        if task.exception() is not None:
            stats.finding(f"a client crashed: {task.exception()!r}")
    out.sessions = sum(c.created for c in clients)
    try:
        await settle(d.target, stats)
    except grpc.aio.AioRpcError as e:
        stats.finding(f"could not terminate the sessions at the end: {e.code().name}")
    out.children = children.stop()
    stop.set()
    await sampler
    if args.tracemalloc:
        d.signal(signal.SIGUSR1)
    await asyncio.sleep(1.0)  # the daemon notices the closed connections
    try:
        out.fds_after = fd_count(pid)
    except FileNotFoundError:
        out.daemon_died = True
        out.fds_after = -1


def agent_pids(d: RunningDaemon) -> list[int]:
    return [int(r["pid"]) for r in d.log_records() if r.get("event") == "agent process started"]


def pool_churn(d: RunningDaemon) -> tuple[int, int]:
    """(agents started with --resume, evictions) from the daemon's log."""
    records = d.log_records()
    resumed = sum(
        1 for r in records if r.get("event") == "agent process started" and r.get("resume")
    )
    evicted = sum(1 for r in records if r.get("event") == "evicting least-recently-used agent")
    return resumed, evicted


# Loaded into the daemon with --tracemalloc (a sitecustomize on its PYTHONPATH): SIGUSR1
# dumps a tracemalloc snapshot into SOAK_SNAPSHOT_DIR.
SITECUSTOMIZE = """
import os, signal, tracemalloc

def _dump(signum, frame):
    where = os.environ["SOAK_SNAPSHOT_DIR"]
    n = len(os.listdir(where))
    tracemalloc.take_snapshot().dump(os.path.join(where, f"{n}.snapshot.tmp"))
    os.rename(os.path.join(where, f"{n}.snapshot.tmp"), os.path.join(where, f"{n}.snapshot"))

if os.environ.get("SOAK_SNAPSHOT_DIR"):
    signal.signal(signal.SIGUSR1, _dump)
"""


def tracemalloc_env(workdir: Path) -> dict[str, str]:
    site = workdir / "tracemalloc-site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(SITECUSTOMIZE)
    snapshots = workdir / "snapshots"
    snapshots.mkdir()
    return {
        "PYTHONPATH": str(site),
        "PYTHONTRACEMALLOC": "1",  # the allocating line only: cheaper
        "SOAK_SNAPSHOT_DIR": str(snapshots),
    }


def heap_growth(snapshots: Path, top: int = 12) -> list[str]:
    """Where the Python heap grew between the first and the last snapshot, by line."""
    import tracemalloc

    deadline = time.monotonic() + 60
    while len(list(snapshots.glob("*.snapshot"))) < 2 and time.monotonic() < deadline:
        time.sleep(0.2)
    files = sorted(snapshots.glob("*.snapshot"), key=lambda f: int(f.name.split(".")[0]))
    if len(files) < 2:
        return [f"(only {len(files)} snapshot(s) written)"]
    first, last = (tracemalloc.Snapshot.load(str(f)) for f in (files[0], files[-1]))
    skip = [tracemalloc.Filter(False, tracemalloc.__file__)]
    first, last = first.filter_traces(skip), last.filter_traces(skip)
    total = sum(st.size for st in last.statistics("filename")) / 2**20
    before = sum(st.size for st in first.statistics("filename")) / 2**20
    lines = [f"Python heap (traced) {before:.1f} MiB after warm-up -> {total:.1f} MiB at the end"]
    for st in last.compare_to(first, "lineno")[:top]:
        frame = st.traceback[0]
        where = "/".join(frame.filename.split("/")[-3:])
        lines.append(
            f"{st.size_diff / 1024:+9.0f} KiB {st.count_diff:+8d} blocks  {where}:{frame.lineno}"
        )
    return lines


def store_problems(db: Path) -> tuple[int, list[str]]:
    problems: list[str] = []
    with contextlib.closing(sqlite3.connect(f"file:{db}?mode=ro", uri=True)) as conn:
        check = [row[0] for row in conn.execute("PRAGMA integrity_check")]
        if check != ["ok"]:
            problems.append(f"integrity_check: {check[:5]}")
        rows = conn.execute("SELECT session_id, turn_id, role, status FROM messages").fetchall()
    turns: dict[tuple[str, str], dict[str, list[str]]] = {}
    for session_id, turn_id, role, status in rows:
        turns.setdefault((session_id, turn_id), {}).setdefault(role, []).append(status)
    users = 0
    for key, roles in turns.items():
        users += len(roles.get("user", []))
        replies = roles.get("assistant", [])
        if roles.get("user") and (
            len(replies) != 1 or replies[0] not in ("complete", "interrupted", "failed")
        ):
            problems.append(f"turn {key[1]} of {key[0]}: assistant records {replies}")
    return users, problems


def daemon_config(args: argparse.Namespace, workdir: Path, api_env: dict[str, str]) -> Any:
    home = workdir / "home"
    agent: dict[str, Any] = {"env": {"HOME": str(home)}, "stop_grace": 1.0}
    pool: dict[str, Any] = {"max_queued": 256, "queue_timeout": 60.0}
    if args.agent == "real":
        agent.update(
            command=[real_claude()],
            env={**api_env, "HOME": str(home), "CLAUDE_CONFIG_DIR": str(home / ".claude")},
            first_event_timeout=60.0,
            stop_grace=3.0,
        )
        pool["max_live"] = 4
    else:
        pool["max_live"] = 8
    # Spare agents (pool.spares) as shipped: they count inside max_live too.
    spares = getattr(Config().pool, "spares", None)
    if spares is not None:
        pool["spares"] = spares
    return {
        "agent": agent,
        "pool": pool,
        "reaper": {"interval": 5.0, "idle_timeout": 10.0, "retention": 0},
        "logging": {"level": "info", "format": "json"},
    }


def max_live(args: argparse.Namespace) -> int:
    return int(daemon_config(args, Path("."), {})["pool"]["max_live"])


@contextlib.contextmanager
def fake_api() -> Any:
    """The fake Messages API in its own process, so it never competes with the clients."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "tests.support.fake_messages_api", "--port", "0", "--quiet"],
        cwd=REPO,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None
        base_url = proc.stdout.readline().strip()
        if not base_url.startswith("http://127.0.0.1:"):
            raise RuntimeError(f"the fake Messages API did not start ({base_url!r})")
        yield {
            "ANTHROPIC_BASE_URL": base_url,
            "ANTHROPIC_API_KEY": "sk-ant-fake-key",
            "CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC": "1",
            "CLAUDE_CODE_MAX_RETRIES": "1",
        }
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def run(args: argparse.Namespace, workdir: Path) -> tuple[Stats, Outcome, RunningDaemon]:
    stats, out = Stats(), Outcome()
    with contextlib.ExitStack() as stack:
        api_env: dict[str, str] = stack.enter_context(fake_api()) if args.agent == "real" else {}
        env = tracemalloc_env(workdir) if args.tracemalloc else {}
        d = RunningDaemon(workdir, daemon_config(args, workdir, api_env), env=env)
        out.max_live = max_live(args)
        try:
            d.start(wait=False)  # inside the try: a daemon that never serves is stopped too
            d.wait_serving(timeout=120 if args.tracemalloc else 30)
            texts = REAL_TEXTS if args.agent == "real" else FAKE_TEXTS
            asyncio.run(drive(d, args, stats, out, texts))
            if args.tracemalloc:
                out.heap_growth = heap_growth(workdir / "snapshots")
        finally:
            out.exit_code = d.stop(timeout=60)
        pids = agent_pids(d)
        out.agents_started = len(pids)
        out.resumed, out.evictions = pool_churn(d)
        deadline = time.monotonic() + 10
        while True:
            out.leaked = [p for p in pids if alive(p) or group_members(p)]
            if not out.leaked or time.monotonic() > deadline:
                break
            time.sleep(0.1)
    out.messages, out.store_problems = store_problems(d.state_dir / "atomizerd.db")
    return stats, out, d


# --- the report ----------------------------------------------------------------------------


def checks(stats: Stats, out: Outcome) -> list[tuple[bool, str]]:
    """(passed, what) for every check."""
    span = out.rss[-1][0] if out.rss else 0.0
    warm = [mib for t, mib in out.rss if t >= 0.2 * span]  # after warm-up
    flat = bool(warm) and warm[-1] <= warm[0] * RSS_GROWTH_FACTOR + RSS_GROWTH_MIB
    rss = f"{warm[0]:.1f} -> {warm[-1]:.1f} MiB" if warm else "not sampled"
    fds = f"{out.fds_before} / {out.fds_after} (allowance {FD_ALLOWANCE})"
    leaked = f"{len(out.leaked)} of {out.agents_started} left"
    c = out.children
    cap = (
        f"most live agents sampled {c.most_agents} ≤ pool.max_live {out.max_live}"
        if c.ok
        else "live agents: the sampler reported nothing"
    )
    return [
        (not stats.findings, f"RPCs ended as expected, in time ({len(stats.findings)} findings)"),
        (
            not out.daemon_died and out.exit_code == 0,
            f"the daemon ran throughout and stopped cleanly (exit {out.exit_code})",
        ),
        (c.ok and c.most_agents <= out.max_live, f"the pool's cap held: {cap}"),
        (not out.leaked, f"no agent process outlived the daemon ({leaked})"),
        (out.fds_after - out.fds_before <= FD_ALLOWANCE, f"daemon fds idle before / after: {fds}"),
        (flat, f"daemon RSS flat after warm-up: {rss}"),
        (
            not out.store_problems,
            "every user message has a terminal reply, integrity ok "
            f"({len(out.store_problems)} problems)",
        ),
    ]


def _p50_p99(values: list[float]) -> str:
    return f"{percentile(values, 50):.1f} / {percentile(values, 99):.1f} ms (n={len(values)})"


def _counts(counter: Counter[str]) -> str:
    return ", ".join(f"{k} {v}" for k, v in counter.most_common()) or "0"


SPARK = "▁▂▃▄▅▆▇█"


def sparkline(values: list[float], width: int = 60) -> str:
    if not values:
        return ""
    step = max(1, math.ceil(len(values) / width))
    points = [max(values[i : i + step]) for i in range(0, len(values), step)]
    lo, hi = min(points), max(points)
    scale = (len(SPARK) - 1) / (hi - lo) if hi > lo else 0.0
    return "".join(SPARK[round((v - lo) * scale)] for v in points)


def rss_table(out: Outcome) -> list[str]:
    """The RSS samples by stretch of the run (a minute each in a long run, so no more than
    a dozen lines), with the most live agents of each stretch."""
    if not out.rss:
        return []
    span = out.rss[-1][0]
    step = next((b for b in (10, 15, 20, 30, 60, 120, 300, 600) if span / b <= 12), 1200)
    agents = out.children.per_second
    lines = [
        f"{'seconds':>11}  {'RSS min':>8}  {'max':>7}  {'last':>7}  "
        f"{'(anon':>6} {'file':>6} {'shmem)':>7}  most live agents"
    ]
    for start in range(0, math.ceil(span) or 1, step):
        chunk = [i for i, (t, _) in enumerate(out.rss) if start <= t < start + step]
        if not chunk:
            continue
        values = [out.rss[i][1] for i in chunk]
        last = out.rss_parts[chunk[-1]] if len(out.rss_parts) > chunk[-1] else {}
        # The sampler's seconds count from its own start, `children_offset` before t0.
        lo = int(start + out.children_offset)
        live = agents[lo : lo + step]
        lines.append(
            f"{start:>5}-{start + step:<5}  {min(values):>8.1f}  {max(values):>7.1f}  "
            f"{values[-1]:>7.1f}  {last.get('RssAnon', math.nan):>6.1f} "
            f"{last.get('RssFile', math.nan):>6.1f} {last.get('RssShmem', math.nan):>7.1f}  "
            f"{max(live) if live else '-'}"
        )
    rss = [mib for _, mib in out.rss]
    lines.append(f"RSS {min(rss):.1f}-{max(rss):.1f} MiB  {sparkline(rss)}")
    return lines


def report(args: argparse.Namespace, stats: Stats, out: Outcome) -> bool:
    rpcs = sum(stats.codes.values())
    rss = [mib for _, mib in out.rss]
    c = out.children
    rows = [
        ("agent", f"{args.agent}, {args.clients} clients, {args.seconds:g} s, seed {args.seed}"),
        ("turns", f"{sum(stats.turns.values())} ({_counts(stats.turns)})"),
        ("RPCs", f"{rpcs} ({rpcs / max(args.seconds, 1):.0f}/s)"),
        (
            "errors by status code",
            _counts(Counter({k: v for k, v in stats.codes.items() if k != "OK"})),
        ),
        ("disconnects", _counts(stats.disconnects)),
        ("time to first event p50 / p99", _p50_p99(stats.first_event_ms)),
        ("time to first text p50 / p99", _p50_p99(stats.first_text_ms)),
        (
            "most live agents / pool.max_live",
            f"{c.most_agents} / {out.max_live} (at {c.most_agents_at_s:.1f} s; "
            f"other children at most {c.most_other_children})",
        ),
        ("  sampled from /proc", c.describe()),
        (
            "pool churn",
            f"{out.sessions} sessions for {out.max_live} slots: {out.agents_started} agents "
            f"started ({out.resumed} resumed), {out.evictions} evictions",
        ),
        (
            "daemon RSS first / peak / last",
            f"{rss[0]:.1f} / {max(rss):.1f} / {rss[-1]:.1f} MiB" if rss else "n/a",
        ),
        ("daemon fds idle before / after", f"{out.fds_before} / {out.fds_after}"),
        ("user messages stored", str(out.messages)),
    ]
    width = max(len(k) for k, _ in rows)
    rule = "-" * (width + 50)
    print(f"\natomizerd soak\n{rule}")
    for key, value in rows:
        print(f"{key:<{width}}  {value}")
    print(rule)
    print("daemon RSS (MiB) over the run")
    for line in rss_table(out):
        print(f"  {line}")
    if out.heap_growth:
        print("Python heap growth, warm-up (20% of the run) -> end, by allocating line")
        for line in out.heap_growth:
            print(f"  {line}")
    print(rule)
    if out.evictions == 0:
        print("note: no agent was evicted: the pool never filled, so its cap was not tested")
    results = checks(stats, out)
    for ok, what in results:
        print(f"[{'ok' if ok else 'FAIL'}] {what}")
    for finding in stats.findings[:20]:
        print(f"  finding: {finding}")
    for problem in out.store_problems[:20]:
        print(f"  store: {problem}")
    if out.leaked:
        print(f"  leaked agent pids: {out.leaked[:20]}")
    return all(ok for ok, _ in results)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if "--autonomy" in argv:  # the autonomous agent's soak: scripts/soak_autonomy.py
        from scripts.soak_autonomy import main as autonomy

        return autonomy([a for a in argv if a != "--autonomy"])
    parser = argparse.ArgumentParser(prog="scripts/soak", description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=60.0, help="how long the load runs")
    parser.add_argument("--clients", type=int, default=32, help="concurrent clients")
    parser.add_argument("--agent", choices=("fake", "real"), default="fake")
    parser.add_argument("--seed", type=int, default=None, help="random seed (default: random)")
    parser.add_argument("--keep", action="store_true", help="keep the temporary dir (printed)")
    parser.add_argument(
        "--tracemalloc",
        action="store_true",
        help="trace the daemon's Python heap; report where it grew after warm-up",
    )
    args = parser.parse_args(argv)
    if args.seconds <= 0 or args.clients <= 0:
        parser.error("--seconds and --clients must be positive")
    if args.seed is None:
        args.seed = random.randrange(2**31)
    if args.agent == "real" and not Path(real_claude()).exists():
        print(f"soak: the pinned claude CLI is not at {real_claude()}", file=sys.stderr)
        return 2
    workdir = Path(tempfile.mkdtemp(prefix="azd-soak-"))  # short: socket paths are limited
    try:
        stats, out, d = run(args, workdir)
        ok = report(args, stats, out)
        if not ok:
            print(f"daemon log: {d.log_path}" if args.keep else "(--keep keeps the daemon log)")
        return 0 if ok else 1
    finally:
        if args.keep:
            print(f"kept {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    raise SystemExit(main())
