#!/usr/bin/env python3
"""Chaos: faults injected from outside while sessions stream; counts what clients lost.

    scripts/chaos [--scenarios sigkill,restart,shim-kill,agent-kill,disk-full,db-restart]
                  [--cycles N] [--sessions N] [--agent real|fake] [--seconds-per-scenario S]
                  [--keep]

Each scenario starts its own daemon (temporary dirs; the pinned `claude` CLI against the fake
Messages API, in its own process, or the scripted fake agent with `--agent fake`), runs one
client per session that sends messages in a loop, and injects its fault `--cycles` times:

- sigkill     SIGKILL of the daemon while every session streams; started again at once (the
              next daemon adopts the agents and their turns).
- restart     planned restarts (SIGUSR2) under churn: more sessions than `pool.max_live`
              (evictions, spawns with --resume, leases waiting for a slot), power-mode
              sessions whose agent runs background Bash commands (`run_in_background`).
- shim-kill   SIGKILL of a random agent's shim (the agent dies with it) mid-turn.
- agent-kill  SIGKILL of a random agent process mid-turn (its shim stays).
- disk-full   the state dir on a 32 MiB tmpfs filled to the last byte mid-turn, freed after
              `--outage-seconds` (needs root to mount it; skipped otherwise).
- db-restart  fleet mode: a PostgreSQL server of its own stopped mid-turn for
              `--outage-seconds` (3 s by default; 30 s is the bound the daemon is built to ride
              out and more works too) and started again (needs PostgreSQL's binaries; skipped
              otherwise).

Every message carries a token of its own (`tok-<session>-<n>`) and is sent with it as its
request_id; the fake API's reply is `echo: <text>`. A client whose stream breaks (UNAVAILABLE
in a restart) re-attaches with WatchSession(after_seq=<the last seq it saw>) and follows its
turn to its end; one refused before its turn began sends it again (same request_id). At the
end, every session's stored history is compared with what its client saw:

- lost            a turn the client saw start that is not stored with a reply, or left pending
- differ          a stored reply that differs from the text its client saw stream
- misattributed   a reply (streamed or stored) naming another message's token
- seq faults      event numbers a client saw go backwards or repeat (across re-attaches)
- left behind     after the final stop: shims or agents alive, files in the agents' socket and
                  spool dirs

Bounded: `--cycles` faults per scenario, `--seconds-per-scenario` at most, every RPC with a
deadline; every process it started is ended by its pid. Prints one table; exits 1 on any
fault (2 on a usage or set-up error).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import errno
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import grpc  # noqa: E402
import grpc.aio  # noqa: E402
from atomizer.v1 import session_pb2 as pb  # noqa: E402
from atomizer.v1 import session_pb2_grpc  # noqa: E402

from scripts.soak import fake_api  # noqa: E402
from tests.support import processes  # noqa: E402
from tests.support.daemon import RunningDaemon, health_serving, real_claude  # noqa: E402

C = grpc.StatusCode
UNARY_TIMEOUT = 15.0
TURN_TIMEOUT = 120.0
TOKEN = re.compile(r"tok-\d+-\d+(?!\d)")
TERMINAL = ("turn_completed", "turn_failed")
SCENARIOS = ("sigkill", "restart", "shim-kill", "agent-kill", "disk-full", "db-restart")
BG = '[[tool:Bash {"command": "sleep 2", "description": "bg", "run_in_background": true}]] '


# --- what the clients saw ----------------------------------------------------------------


@dataclass
class Seen:
    """One message as its client saw it."""

    sid: str
    token: str
    text: str
    turn_id: str = ""
    streamed: str = ""
    terminal: str = ""  # turn_completed / turn_failed / "" (never seen)
    refused: str = ""  # the status code of a final refusal


@dataclass
class Tally:
    sent: list[Seen] = field(default_factory=list)
    seq_faults: list[str] = field(default_factory=list)
    reattached: int = 0
    resent: int = 0
    replayed: int = 0
    faults_injected: int = 0
    serving_again: list[float] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


class Client:
    """One session's client: sends, follows its turn across restarts, never gives up early."""

    def __init__(self, target: str, sid: str, index: int, tally: Tally, background: bool):
        self.target = target
        self.sid = sid
        self.index = index
        self.tally = tally
        self.background = background
        self.n = 0
        self.last_seq = 0
        self.rng = random.Random(index)
        self.current: Seen | None = None  # the message it is on

    def stub(self, channel: grpc.aio.Channel) -> Any:
        return session_pb2_grpc.SessionServiceStub(channel)  # used with the aio channel

    def seq(self, event: pb.SessionEvent) -> None:
        if event.seq == 0:
            return  # a stored turn replayed (a request_id sent again after its turn ended)
        if event.seq <= self.last_seq:
            self.tally.seq_faults.append(f"{self.sid}: seq {event.seq} after {self.last_seq}")
        self.last_seq = event.seq

    async def run(self, until: float) -> None:
        while time.monotonic() < until:
            self.n += 1
            token = f"tok-{self.index}-{self.n}"
            words = " ".join(f"w{i}" for i in range(self.rng.randint(8, 20)))
            prefix = BG if self.background and self.rng.random() < 0.3 else ""
            text = f"{prefix}[[slow:60]] [[chunks:12]] {token} {words}"
            seen = Seen(self.sid, token, text)
            self.current = seen
            self.tally.sent.append(seen)
            await self.turn(seen, until + TURN_TIMEOUT)

    async def turn(self, seen: Seen, deadline: float) -> None:
        while time.monotonic() < deadline:
            try:
                async with grpc.aio.insecure_channel(self.target) as channel:
                    if not seen.turn_id:
                        await self.send(self.stub(channel), seen)
                    else:
                        await self.follow(self.stub(channel), seen)
                if seen.terminal or seen.refused:
                    return
            except grpc.aio.AioRpcError as e:
                code = e.code()
                if code in (C.UNAVAILABLE, C.CANCELLED, C.DEADLINE_EXCEEDED):
                    pass  # a restart, a full disk or the database down: again in a moment
                elif code == C.RESOURCE_EXHAUSTED and "disk is full" in (e.details() or ""):
                    pass
                elif code == C.RESOURCE_EXHAUSTED:
                    pass  # every slot busy with tasks: try again
                else:
                    seen.refused = code.name
                    self.tally.notes.append(f"{seen.token}: {code.name} {e.details()}")
                    return
            if seen.turn_id:
                self.tally.reattached += 1
            else:
                self.tally.resent += 1
            await asyncio.sleep(0.3)
        seen.refused = seen.refused or "GAVE_UP"

    def take(self, seen: Seen, event: pb.SessionEvent) -> None:
        kind = event.WhichOneof("kind")
        if event.turn_id != seen.turn_id:
            return
        if kind == "text_delta":
            seen.streamed += event.text_delta.text
        elif kind in TERMINAL:
            seen.terminal = str(kind)
            if event.seq == 0:
                # A request_id sent again after its turn ended: the stored outcome, replayed
                # (turn_started, then the end with the whole reply); what the client sees.
                self.tally.replayed += 1
                seen.streamed = event.turn_completed.text if kind == "turn_completed" else ""

    async def send(self, stub: Any, seen: Seen) -> None:
        call = stub.SendMessage(
            pb.SendMessageRequest(session_id=self.sid, text=seen.text, request_id=seen.token),
            timeout=TURN_TIMEOUT,
        )
        async for resp in call:
            ev = resp.event
            self.seq(ev)
            if not seen.turn_id and ev.turn_id:
                seen.turn_id = ev.turn_id
                if ev.WhichOneof("kind") != "turn_started":
                    # A retried request_id replayed: what streamed before is in the replay.
                    seen.streamed = ""
            self.take(seen, ev)
            if seen.terminal:
                return

    async def follow(self, stub: Any, seen: Seen) -> None:
        call = stub.WatchSession(
            pb.WatchSessionRequest(session_id=self.sid, after_seq=self.last_seq),
            timeout=TURN_TIMEOUT,
        )
        async for resp in call:
            ev = resp.event
            if ev.WhichOneof("kind") == "notice" and ev.seq <= self.last_seq:
                continue
            self.seq(ev)
            self.take(seen, ev)
            if seen.terminal:
                call.cancel()
                return


# --- the checks ------------------------------------------------------------------------------


@dataclass
class Row:
    scenario: str
    cycles: int = 0
    turns: int = 0
    lost: int = 0
    differ: int = 0
    misattributed: int = 0
    seq_faults: int = 0
    left_procs: int = 0
    left_files: int = 0
    note: str = ""
    skipped: str = ""
    problems: list[str] = field(default_factory=list)

    @property
    def faults(self) -> int:
        return (
            self.lost
            + self.differ
            + self.misattributed
            + self.seq_faults
            + self.left_procs
            + self.left_files
        )


async def history(target: str, sid: str) -> list[pb.Message]:
    async with grpc.aio.insecure_channel(target) as channel:
        stub = session_pb2_grpc.SessionServiceStub(channel)
        out: list[pb.Message] = []
        token = ""
        while True:
            page = await stub.GetHistory(
                pb.GetHistoryRequest(session_id=sid, page_size=1000, page_token=token),
                timeout=UNARY_TIMEOUT,
            )
            out += page.messages
            token = page.next_page_token
            if not token:
                return out


def check(row: Row, tally: Tally, stored: dict[str, list[pb.Message]]) -> None:
    by_turn: dict[str, list[pb.Message]] = {}
    for messages in stored.values():
        for m in messages:
            by_turn.setdefault(m.turn_id, []).append(m)
            if m.status == pb.MESSAGE_STATUS_PENDING:
                row.lost += 1
                row.problems.append(f"{m.turn_id}: left pending")
    for s in tally.sent:
        if s.refused:
            row.problems.append(f"{s.token}: refused {s.refused}")
            if s.refused == "GAVE_UP":
                row.lost += 1
            continue
        row.turns += 1
        own = [t for t in TOKEN.findall(s.streamed) if t != s.token]
        if own:
            row.misattributed += 1
            row.problems.append(f"{s.token}: streamed a reply naming {own}")
        rows = by_turn.get(s.turn_id, [])
        user = [m for m in rows if m.role == pb.ROLE_USER]
        reply = [m for m in rows if m.role == pb.ROLE_ASSISTANT]
        if not user or not reply:
            row.lost += 1
            row.problems.append(f"{s.token}: turn {s.turn_id} not stored ({len(rows)} rows)")
            continue
        if s.token not in user[0].content:
            row.misattributed += 1
            row.problems.append(f"{s.token}: turn {s.turn_id} stores another message")
        if [t for t in TOKEN.findall(reply[-1].content) if t != s.token]:
            row.misattributed += 1
            row.problems.append(f"{s.token}: stored reply names another token")
        if s.terminal and reply[-1].content != s.streamed:
            row.differ += 1
            row.problems.append(
                f"{s.token}: stored {reply[-1].content[-60:]!r}, streamed {s.streamed[-60:]!r}"
            )
    row.seq_faults = len(tally.seq_faults)
    row.problems += tally.seq_faults[:5]


def leftovers(d: RunningDaemon, before: set[int]) -> tuple[list[str], list[str]]:
    """Processes of this run still alive after the daemon's stop, and files in its agents'
    dirs. Waits a little: a shim's own exit takes a moment."""
    started = [p for p in processes.suite_processes() if p.pid not in before]
    alive = processes.wait_gone(started, 10.0)
    procs = [p.describe() for p in alive]
    files = []
    for where in (d.runtime_dir / "agents", d.state_dir / "agent-spool"):
        if where.is_dir():
            files += [str(p) for p in where.iterdir()]
    return procs, files


# --- the faults --------------------------------------------------------------------------------


async def wait_serving(d: RunningDaemon, tally: Tally, since: float, bound: float = 60) -> None:
    while time.monotonic() - since < bound:
        if await asyncio.to_thread(health_serving, d.target):
            tally.serving_again.append(time.monotonic() - since)
            return
        assert d.proc is not None
        if d.proc.poll() is not None:
            raise RuntimeError(f"the daemon exited with {d.proc.returncode}")
        await asyncio.sleep(0.05)
    raise RuntimeError(f"the daemon was not serving {bound} s after a fault")


def agent_processes(d: RunningDaemon) -> tuple[list[processes.Proc], list[processes.Proc]]:
    """(shims, agents under them) of this daemon."""
    shims = processes.shims(d.runtime_dir)
    ids = {s.pid for s in shims}
    return shims, [p for p in processes.processes() if p.ppid in ids]


def kill_one(procs: list[processes.Proc], rng: random.Random) -> bool:
    if not procs:
        return False
    with contextlib.suppress(ProcessLookupError):
        os.kill(rng.choice(procs).pid, signal.SIGKILL)
    return True


@contextlib.contextmanager
def small_disk(base: Path) -> Iterator[Path | None]:
    if os.geteuid() != 0:
        yield None
        return
    mount = base / "disk"
    mount.mkdir()
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=32m,mode=0700", "tmpfs", str(mount)],
        capture_output=True,
        check=False,
    )
    if done.returncode != 0:
        yield None
        return
    try:
        yield mount
    finally:
        if subprocess.run(["umount", str(mount)], check=False).returncode != 0:
            subprocess.run(["umount", "-l", str(mount)], check=False)


def fill(path: Path) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    try:
        for chunk in (b"\0" * 65536, b"\0" * 4096, b"\0"):
            try:
                while True:
                    os.write(fd, chunk)
            except OSError as e:
                if e.errno != errno.ENOSPC:
                    raise
    finally:
        os.close(fd)


# --- one scenario --------------------------------------------------------------------------------


def daemon_config(
    args: argparse.Namespace, workdir: Path, api_env: dict[str, str]
) -> dict[str, Any]:
    home = workdir / "home"
    cfg: dict[str, Any] = {
        "agent": {"stop_grace": 2.0, "orphan_timeout": 60.0},
        "logging": {"level": "info", "format": "json"},
        "pool": {"spares": 0},
    }
    if args.agent == "real":
        env = {**api_env, "HOME": str(home), "CLAUDE_CONFIG_DIR": str(home / ".claude")}
        if os.geteuid() == 0:
            env["IS_SANDBOX"] = "1"  # the CLI refuses to skip permissions as root otherwise
        cfg["agent"].update(command=[real_claude()], env=env, first_event_timeout=60.0)
        cfg["modes.power"] = {"enabled": True}
    return cfg


async def drive(
    scenario: str,
    d: RunningDaemon,
    args: argparse.Namespace,
    tally: Tally,
    row: Row,
    disk: Path | None,
    pg: Any,
) -> dict[str, list[pb.Message]]:
    rng = random.Random(args.seed)
    power = args.agent == "real" and scenario == "restart"
    sessions = args.sessions + (2 if scenario == "restart" else 0)
    sids = [f"{scenario}-{i}" for i in range(sessions)]
    async with grpc.aio.insecure_channel(d.target) as channel:
        stub = session_pb2_grpc.SessionServiceStub(channel)
        for sid in sids:
            mode = pb.MODE_POWER if power else pb.MODE_USER
            if args.agent == "fake":
                mode = pb.MODE_USER
            await stub.CreateSession(
                pb.CreateSessionRequest(session_id=sid, mode=mode), timeout=UNARY_TIMEOUT
            )
    started = time.monotonic()
    until = started + args.seconds_per_scenario
    clients = [Client(d.target, sid, i, tally, power) for i, sid in enumerate(sids)]
    runs = [asyncio.ensure_future(c.run(until)) for c in clients]
    try:
        for _ in range(args.cycles):
            if time.monotonic() > until - 2:
                break
            await asyncio.sleep(rng.uniform(1.0, 2.5))  # into the turns
            since = time.monotonic()
            if scenario == "sigkill":
                d.kill()
                d.start(wait=False)
                await wait_serving(d, tally, since)
            elif scenario == "restart":
                d.signal(signal.SIGUSR2)
                await asyncio.sleep(0.2)
                await wait_serving(d, tally, since)
            elif scenario in ("shim-kill", "agent-kill"):
                shims, agents = agent_processes(d)
                if not kill_one(shims if scenario == "shim-kill" else agents, rng):
                    continue
            elif scenario == "disk-full":
                assert disk is not None
                filler = disk / "filler"
                fill(filler)
                await asyncio.sleep(args.outage_seconds)
                filler.unlink()
            elif scenario == "db-restart":
                await asyncio.to_thread(pg.pause, "fast")
                await asyncio.sleep(args.outage_seconds)
                await asyncio.to_thread(pg.resume)
                await wait_serving(d, tally, time.monotonic())  # from the server's return
            tally.faults_injected += 1
        done, pending = await asyncio.wait(runs, timeout=args.seconds_per_scenario + TURN_TIMEOUT)
        for client, task in zip(clients, runs, strict=True):
            if task in pending:
                task.cancel()
                on = client.current
                row.problems.append(
                    f"a client did not finish in time: {client.sid}, "
                    + (
                        f"{on.token} (turn {on.turn_id or 'not begun'}, last seq {client.last_seq})"
                        if on is not None
                        else "before its first message"
                    )
                )
                row.lost += 1
        for task in done:
            if task.exception() is not None:
                row.problems.append(f"a client crashed: {task.exception()!r}")
                row.lost += 1
    finally:
        for task in runs:
            task.cancel()
        await asyncio.gather(*runs, return_exceptions=True)
    # Every turn ended and stored (an outcome the store refused is stored on its own retry).
    await asyncio.sleep(3.0)
    return {sid: await history(d.target, sid) for sid in sids}


def run_scenario(scenario: str, args: argparse.Namespace) -> Row:
    row = Row(scenario)
    base = Path(tempfile.mkdtemp(prefix="azd-chaos-"))
    tally = Tally()
    before = {p.pid for p in processes.suite_processes()}
    pg = None
    d: RunningDaemon | None = None
    try:
        with contextlib.ExitStack() as stack:
            api_env = stack.enter_context(fake_api()) if args.agent == "real" else {}
            cfg = daemon_config(args, base, api_env)
            disk = None
            if scenario == "disk-full":
                disk = stack.enter_context(small_disk(base))
                if disk is None:
                    row.skipped = "needs root to mount a small tmpfs"
                    return row
                cfg.setdefault("daemon", {})["state_dir"] = str(disk / "state")
            if scenario == "db-restart":
                from tests.support.postgres import PostgresServer, find_bindir

                bindir = find_bindir()
                if bindir is None:
                    row.skipped = "PostgreSQL's binaries not found"
                    return row
                pg = PostgresServer(bindir, durable=True).start()
                stack.callback(pg.stop)
                cfg.setdefault("daemon", {}).update(
                    database=pg.new_database(), host_id="chaos-host"
                )
            if scenario == "restart":
                cfg["pool"].update(max_live=max(2, args.sessions - 1), queue_timeout=60.0)
            d = RunningDaemon(base, cfg)
            d.start()
            stored = asyncio.run(drive(scenario, d, args, tally, row, disk, pg))
            row.cycles = tally.faults_injected
            check(row, tally, stored)
            assert d.proc is not None
            d.proc.send_signal(signal.SIGTERM)
            try:
                d.proc.wait(60)
            except subprocess.TimeoutExpired:
                row.problems.append("the daemon did not stop within 60 s")
                row.left_procs += 1
            procs, files = leftovers(d, before)
            row.left_procs += len(procs)
            row.left_files += len(files)
            row.problems += [f"left: {p}" for p in procs + files][:10]
            serving = sorted(tally.serving_again)
            if serving:
                row.note = f"serving again in {serving[len(serving) // 2]:.1f} s (median)"
            row.note += (
                f"; {tally.reattached} re-attached, {tally.resent} re-sent, "
                f"{tally.replayed} replayed from the store"
            )
    except Exception as e:
        row.problems.append(f"scenario failed: {e!r}")
        row.lost += 1
    finally:
        if d is not None:
            d.stop(timeout=30)  # ends by pid whatever is still ours (shims of its runtime dir)
        if not args.keep and not row.faults:
            shutil.rmtree(base, ignore_errors=True)
        elif not args.keep:
            row.problems.append(f"kept {base} (its daemon log) to look into")
    return row


# --- the report -------------------------------------------------------------------------------


def report(rows: list[Row], args: argparse.Namespace, seconds: float) -> bool:
    header = (
        "scenario",
        "faults",
        "turns",
        "lost",
        "differ",
        "misattr.",
        "seq faults",
        "left (procs/files)",
        "notes",
    )
    lines = []
    for r in rows:
        if r.skipped:
            lines.append((r.scenario, "-", "-", "-", "-", "-", "-", "-", f"skipped: {r.skipped}"))
            continue
        lines.append(
            (
                r.scenario,
                str(r.cycles),
                str(r.turns),
                str(r.lost),
                str(r.differ),
                str(r.misattributed),
                str(r.seq_faults),
                f"{r.left_procs}/{r.left_files}",
                r.note.strip("; "),
            )
        )
    print(
        f"\nchaos: {args.agent} agent, {args.sessions} sessions, up to {args.cycles} faults "
        f"per scenario, outages of {args.outage_seconds:g} s, {seconds:.0f} s in all\n"
    )
    print("| " + " | ".join(header) + " |")
    print("|" + "|".join("---" for _ in header) + "|")
    for line in lines:
        print("| " + " | ".join(line) + " |")
    ok = all(r.faults == 0 for r in rows)
    for r in rows:
        for p in r.problems[:15]:
            print(f"  {r.scenario}: {p}")
    print("\nresult:", "PASS" if ok else "FAIL")
    return ok


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--scenarios", default=",".join(SCENARIOS))
    parser.add_argument("--cycles", type=int, default=10, help="faults per scenario")
    parser.add_argument("--sessions", type=int, default=4)
    parser.add_argument("--agent", choices=("real", "fake"), default="real")
    parser.add_argument("--seconds-per-scenario", type=float, default=60.0)
    parser.add_argument(
        "--outage-seconds",
        type=float,
        default=3.0,
        help="how long the disk stays full and the database server stopped",
    )
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--keep", action="store_true", help="keep the temporary dirs")
    args = parser.parse_args(argv)
    chosen = [s.strip() for s in args.scenarios.split(",") if s.strip()]
    unknown = [s for s in chosen if s not in SCENARIOS]
    if unknown or args.cycles < 1 or args.sessions < 1:
        parser.error(f"unknown scenarios {unknown}" if unknown else "cycles and sessions >= 1")
    if args.agent == "real" and not Path(real_claude()).exists():
        print(f"no claude CLI at {real_claude()}: use --agent fake", file=sys.stderr)
        return 2

    def on_term(signum: int, frame: object) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, on_term)
    started = time.monotonic()
    rows = []
    for scenario in chosen:
        print(f"chaos: {scenario} ...", file=sys.stderr, flush=True)
        rows.append(run_scenario(scenario, args))
    return 0 if report(rows, args, time.monotonic() - started) else 1


if __name__ == "__main__":
    sys.exit(main())
