#!/usr/bin/env python3
"""Autonomy soak: power-mode sessions whose agent runs background commands and subagents,
while clients keep talking to it; counts replies given to the wrong message.

    scripts/soak --autonomy [--minutes 10] [--sessions 4] [--max-live 3] [--seed N] [--keep]
                            [--restart-every S] [--kill-every S]

Starts its own daemon on a temporary socket with the pinned `claude` CLI against the fake
Messages API (its own process), power mode on, `pool.max_live` below the number of sessions
(so idle agents are evicted and resumed). One worker per session then, until the time is up,
picks at random: an ordinary message; a background Bash command of 0.2-5 s (`sleep`, then an
echo); a subagent (the Task tool); a background command followed by a message timed to land
as it ends, or sent the moment its task_ended is seen; two messages at once. Every client
message carries a token of its own (`tok-<session>-<n>`): an ordinary message's reply must be
exactly `echo: <message>`; the reply of a message that starts a task may name no token but its
own. When a task ends while the session is idle the agent starts a turn by itself; a watcher
per session follows those (WatchSession).

With `--restart-every S` the daemon is restarted in place every S seconds (RestartDaemon and
SIGUSR2 in turn) while all this runs, and with `--kill-every S` SIGKILLed and started again
instead (scripts/soak_churn.py). Every message is then sent with its token as its request_id:
a client whose stream breaks follows its turn to the end through the session's watcher (which
re-attaches after its last seq), or sends the message again if its turn had not begun. Each
restart must be serving again within a minute (else it hung), the daemon's log must hold JSON
lines only, and its RSS and open fds must stay flat (sampled every 2 s across the daemons).

At the end, once every task has ended and every session is idle, the GetHistory of every
session is checked: each client message is followed by its own reply (same turn, same
origin, the reply's text as above), each agent-started turn has origin TASK, and no reply of
one session names a token of another. Then the daemon is stopped and no process it or its
agents started may outlive it.

Counts: client messages sent and answered, failures by status code, turns the agent started
(stream and history), lost turns (a message answered in its stream but missing from the
history or without its reply; a turn seen in the stream but not stored; a turn left pending),
misattributed replies (in the stream, in the history). Prints one table; exits 1 if anything
was misattributed or lost, an origin was wrong, an RPC ended with an unexpected status or a
process outlived the daemon (2 on a usage or set-up error).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
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

from atomizerd.agents.procgroup import group_members  # noqa: E402
from scripts.soak import agent_pids, alive, fake_api, percentile, pool_churn  # noqa: E402
from scripts.soak_children import ChildCount  # noqa: E402
from scripts.soak_churn import Churn, ChurnTally, Vitals, non_json_lines  # noqa: E402
from tests.support import processes  # noqa: E402
from tests.support.daemon import RunningDaemon, real_claude  # noqa: E402

C = grpc.StatusCode
UNARY_TIMEOUT = 15.0
TURN_TIMEOUT = 150.0
SETTLE_TIMEOUT = 120.0  # at the end: every task ended, every session idle
TOKEN = re.compile(r"tok-(\d+)-(\d+)(?!\d)")
WORDS = [
    "alpha", "bravo", "charlie", "delta", "echo", "foxtrot",
    "golf", "hotel", "india", "juliet", "kilo", "lima",
]  # fmt: skip

# What SendMessage may answer besides OK in this workload: every live agent busy with a
# task (agents running one are kept), and our own deadline on a turn stuck behind others.
EXPECTED_SEND = {C.RESOURCE_EXHAUSTED}


def tool(name: str, **tool_input: Any) -> str:
    return f"[[tool:{name} {json.dumps(tool_input)}]]"


def tokens_in(text: str) -> set[str]:
    return {m.group(0) for m in TOKEN.finditer(text)}


@dataclass
class Sent:
    """One client message and what its SendMessage stream said."""

    session: int
    token: str
    text: str
    kind: str  # plain / bash / task
    code: str = ""
    turn_id: str = ""
    reply: str = ""
    terminal: str = ""  # turn_completed / turn_interrupted / turn_failed / ""
    first_text_ms: float | None = None
    task_started_at: float | None = None  # when the stream showed its task_started
    task_id: str = ""
    in_history: bool = False


@dataclass
class Seen:
    """What a message's SendMessage streams showed (across calls sent again)."""

    started: float
    text: str | None = None  # its turn_started's
    origin: int | None = None
    turn_ids: set[str] = field(default_factory=set)
    parts: list[str] = field(default_factory=list)


@dataclass
class Tally:
    sent: list[Sent] = field(default_factory=list)
    actions: Counter[str] = field(default_factory=Counter)
    codes: Counter[str] = field(default_factory=Counter)  # SendMessage and others: "RPC CODE"
    unexpected: list[str] = field(default_factory=list)
    mis_stream: list[str] = field(default_factory=list)
    mis_history: list[str] = field(default_factory=list)
    mis_agent: list[str] = field(default_factory=list)  # agent turns naming another session
    origin_problems: list[str] = field(default_factory=list)
    lost: list[str] = field(default_factory=list)
    # A stored message whose own reply is not the next row (other turns' rows in between).
    interleaved: list[str] = field(default_factory=list)
    agent_prompt_empty: int = 0  # agent-started turns stored with an empty prompt
    # Messages whose reply follows a turn the agent began as the message was being taken
    # (stored in the order they happened: not a fault); a client's message in between is one.
    agent_turns_inside: int = 0
    other: list[str] = field(default_factory=list)
    tasks_started: Counter[str] = field(default_factory=Counter)  # by kind
    tasks_ended: Counter[str] = field(default_factory=Counter)  # by status
    agent_turns_stream: Counter[str] = field(default_factory=Counter)  # by origin
    agent_turns_history: Counter[str] = field(default_factory=Counter)  # by origin
    history_messages: int = 0
    raced: Counter[str] = field(default_factory=Counter)  # messages sent as a task ended
    unsettled: list[str] = field(default_factory=list)
    # With restarts and kills: what a broken stream may end with, and how clients went on.
    churn_codes: set[C] = field(default_factory=set)
    reattached: int = 0  # streams broken mid-turn, followed to the end through the watcher
    resent: int = 0  # messages sent again (same request_id): the stream broke before its turn

    def code(self, rpc: str, code: C, detail: str = "", expected: set[C] | None = None) -> None:
        self.codes[f"{rpc} {code.name}"] += 1
        if code != C.OK and code not in (expected or set()):
            self.unexpected.append(f"{rpc}: {code.name}: {detail[:200]}")


def origin_name(origin: int) -> str:
    return pb.TurnOrigin.Name(origin).removeprefix("TURN_ORIGIN_")  # type: ignore[arg-type]


# --- one session's watcher -------------------------------------------------------------------


class Watcher:
    """Follows one session's events (WatchSession, resumed after its last seq if it drops)."""

    def __init__(self, stub: Any, sid: str, index: int, tally: Tally) -> None:
        self.stub, self.sid, self.index, self.tally = stub, sid, index, tally
        self.last_seq = 0
        self.turns: dict[str, int] = {}  # turn_id -> origin
        self.turn_text: dict[str, list[str]] = {}
        self.turn_ended: dict[str, str] = {}  # turn_id -> completed / interrupted / failed
        self.task_ends: dict[str, float] = {}  # task_id -> when seen
        self.task_of_turn: dict[str, str] = {}  # turn_id -> the task it started
        self.changed = asyncio.Condition()
        self.stop = asyncio.Event()
        self._call: Any = None

    async def run(self) -> None:
        while not self.stop.is_set():
            self._call = self.stub.WatchSession(
                pb.WatchSessionRequest(session_id=self.sid, after_seq=self.last_seq),
                timeout=3600,
            )
            try:
                async for resp in self._call:
                    await self.on_event(resp.event)
            except grpc.aio.AioRpcError as e:
                if e.code() != C.CANCELLED or not self.stop.is_set():
                    expected = {C.CANCELLED, *(self.tally.churn_codes)}
                    self.tally.code("WatchSession", e.code(), e.details() or "", expected)
            except asyncio.CancelledError:
                return
            if not self.stop.is_set():
                await asyncio.sleep(0.2)

    def close(self) -> None:
        self.stop.set()
        if self._call is not None:
            self._call.cancel()

    async def on_event(self, ev: pb.SessionEvent) -> None:
        self.last_seq = max(self.last_seq, ev.seq)
        kind = ev.WhichOneof("kind")
        if kind == "turn_started":
            origin = ev.turn_started.origin
            if ev.turn_id not in self.turns:
                self.turns[ev.turn_id] = origin
                if origin != pb.TURN_ORIGIN_CLIENT:
                    self.tally.agent_turns_stream[origin_name(origin)] += 1
        elif kind == "text_delta":
            self.turn_text.setdefault(ev.turn_id, []).append(ev.text_delta.text)
        elif kind == "turn_completed":
            interrupted = ev.turn_completed.interrupted
            self.turn_ended[ev.turn_id] = "interrupted" if interrupted else "completed"
        elif kind == "turn_failed":
            self.turn_ended[ev.turn_id] = "failed"
        elif kind == "task_started":
            self.tally.tasks_started[pb.TaskKind.Name(ev.task_started.kind)] += 1
            self.task_of_turn.setdefault(ev.turn_id, ev.task_started.task_id)
        elif kind == "task_ended":
            self.tally.tasks_ended[pb.TaskStatus.Name(ev.task_ended.status)] += 1
            self.task_ends[ev.task_ended.task_id] = time.monotonic()
        async with self.changed:
            self.changed.notify_all()

    async def turn_end(self, turn_id: str, timeout: float) -> str:
        """How the turn ended ('' if not within `timeout`)."""
        async with self.changed:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(
                    self.changed.wait_for(lambda: turn_id in self.turn_ended), timeout
                )
        return self.turn_ended.get(turn_id, "")

    async def task_end(self, task_id: str, timeout: float) -> bool:
        async with self.changed:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(
                    self.changed.wait_for(lambda: task_id in self.task_ends), timeout
                )
        return task_id in self.task_ends


# --- one session's worker --------------------------------------------------------------------


class Worker:
    def __init__(
        self,
        index: int,
        stub: Any,
        rng: random.Random,
        tally: Tally,
        watcher: Watcher,
        marker: str,
    ) -> None:
        self.index, self.stub, self.rng, self.tally, self.watcher = index, stub, rng, tally, watcher
        self.sid = f"auto-{index}"
        self.marker = marker
        self.n = 0

    def token(self) -> str:
        self.n += 1
        return f"tok-{self.index}-{self.n}"

    def words(self) -> str:
        return " ".join(self.rng.sample(WORDS, self.rng.randint(1, 4)))

    async def run(self, until: float) -> None:
        actions = [
            (self.plain, 30),
            (self.bash, 14),
            (self.bash_then_timed, 18),
            (self.bash_then_on_end, 14),
            (self.subagent, 14),
            (self.pair, 6),
        ]
        funcs, weights = zip(*actions, strict=True)
        while time.monotonic() < until:
            action = self.rng.choices(funcs, weights)[0]
            self.tally.actions[action.__name__] += 1
            await action()
            await asyncio.sleep(self.rng.uniform(0.0, 1.0))

    async def send(self, text: str, kind: str, token: str) -> Sent:
        s = Sent(self.index, token, text, kind)
        self.tally.sent.append(s)
        seen = Seen(time.monotonic())
        deadline = seen.started + TURN_TIMEOUT
        while True:
            code, detail = await self.stream(s, seen, deadline)
            if code not in self.tally.churn_codes or time.monotonic() > deadline:
                break
            if s.turn_id:  # broken mid-turn by a restart: its watcher follows it to the end
                self.tally.reattached += 1
                s.terminal = await self.watcher.turn_end(s.turn_id, deadline - time.monotonic())
                seen.parts = list(self.watcher.turn_text.get(s.turn_id, []))
                if s.terminal:
                    code = C.OK
                break
            self.tally.resent += 1  # refused before its turn began: the same request again
            await asyncio.sleep(0.3)
        s.code = code.name
        s.reply = "".join(seen.parts)
        self.tally.code("SendMessage", code, detail, EXPECTED_SEND)
        if code == C.OK:
            self.check_stream(s, seen)
        return s

    async def stream(self, s: Sent, seen: Seen, deadline: float) -> tuple[C, str]:
        """One SendMessage call (the message's token is its request_id); its status."""
        call = self.stub.SendMessage(
            pb.SendMessageRequest(session_id=self.sid, text=s.text, request_id=s.token),
            timeout=max(1.0, deadline - time.monotonic()),
        )
        seen.parts = []  # a call sent again replays the turn from its start
        try:
            async for resp in call:
                self.take(s, seen, resp.event)
        except grpc.aio.AioRpcError as e:
            return e.code(), e.details() or ""
        return C.OK, ""

    def take(self, s: Sent, seen: Seen, ev: pb.SessionEvent) -> None:
        k = ev.WhichOneof("kind")
        seen.turn_ids.add(ev.turn_id)
        if k == "turn_started":
            s.turn_id = ev.turn_id
            seen.text = ev.turn_started.text
            seen.origin = ev.turn_started.origin
        elif k == "text_delta":
            if s.first_text_ms is None:
                s.first_text_ms = (time.monotonic() - seen.started) * 1000
            seen.parts.append(ev.text_delta.text)
        elif k == "task_started":
            s.task_started_at = time.monotonic()
            s.task_id = ev.task_started.task_id
        elif k == "turn_completed":
            s.terminal = "interrupted" if ev.turn_completed.interrupted else "completed"
            if ev.seq == 0:  # sent again after its turn ended: the stored outcome, replayed
                seen.parts = [ev.turn_completed.text]
        elif k == "turn_failed":
            s.terminal = "failed"

    def check_stream(self, s: Sent, seen: Seen) -> None:
        where = f"session {self.index} {s.token} ({s.kind})"
        if seen.text is None:
            self.tally.mis_stream.append(f"{where}: the stream had no turn_started")
        elif seen.text != s.text or seen.origin != pb.TURN_ORIGIN_CLIENT:
            self.tally.mis_stream.append(
                f"{where}: stream's turn_started is {origin_name(seen.origin or 0)} "
                f"{seen.text[:80]!r}"
            )
        if len(seen.turn_ids) > 1:
            self.tally.mis_stream.append(f"{where}: the stream carried {len(seen.turn_ids)} turns")
        if s.terminal == "completed":
            problem = reply_problem(s, s.reply)
            if problem:
                self.tally.mis_stream.append(f"{where}: {problem}")
        elif s.terminal != "interrupted":
            self.tally.other.append(f"{where}: the turn ended {s.terminal or 'without an end'}")

    async def plain(self, raced: str = "") -> Sent:
        token = self.token()
        s = await self.send(f"{token} {self.words()}", "plain", token)
        if raced:
            self.tally.raced[raced] += 1
        return s

    def bash_text(self, token: str, seconds: float) -> str:
        command = f"sleep {seconds:.2f}; echo {token} done # {self.marker}"
        call = tool("Bash", command=command, description="bg", run_in_background=True)
        return f"{token} run {call}"

    async def bash(self) -> tuple[Sent, float]:
        token = self.token()
        seconds = self.rng.uniform(0.2, 5.0)
        return await self.send(self.bash_text(token, seconds), "bash", token), seconds

    async def bash_then_timed(self) -> None:
        """A message timed to land as the command ends (a little before or after)."""
        s, seconds = await self.bash()
        if s.code != "OK":
            return
        since = s.task_started_at or time.monotonic()
        await asyncio.sleep(
            max(0.0, since + seconds + self.rng.uniform(-0.3, 0.3) - time.monotonic())
        )
        await self.plain("timed to the end of a command")

    async def bash_then_on_end(self) -> None:
        """A message sent the moment the command's task_ended is seen."""
        s, seconds = await self.bash()
        task_id = s.task_id or self.watcher.task_of_turn.get(s.turn_id, "")
        if s.code != "OK" or not task_id:
            return
        if await self.watcher.task_end(task_id, seconds + 30):
            await self.plain("on task_ended")

    async def subagent(self) -> None:
        token = self.token()
        call = tool(
            "Task",
            description="sub",
            prompt=f"hello sub {token}",
            subagent_type="general-purpose",
        )
        s = await self.send(f"{token} delegate {call}", "task", token)
        if s.code == "OK" and self.rng.random() < 0.5:
            await self.plain("right after a subagent")

    async def pair(self) -> None:
        """Two messages at once: the second waits behind the first."""
        await asyncio.gather(self.plain(), self.plain("queued behind another"))


def reply_problem(s: Sent, reply: str) -> str:
    """Why a reply is not its message's own ('' when it is)."""
    foreign = tokens_in(reply) - {s.token}
    if foreign:
        return f"reply names {sorted(foreign)[:3]}: {reply[:120]!r}"
    if s.kind == "plain" and reply != f"echo: {s.text}":
        return f"reply is not 'echo: <its message>': {reply[:120]!r}"
    return ""


# --- the end: settle, histories --------------------------------------------------------------


async def settle(stub: Any, sids: list[str], tally: Tally) -> float:
    """Waits until no session runs a task or a turn; seconds it took."""
    started = time.monotonic()
    pending = list(sids)
    while time.monotonic() - started < SETTLE_TIMEOUT:
        pending = []
        for sid in sids:
            try:
                s = (
                    await stub.GetSession(
                        pb.GetSessionRequest(session_id=sid), timeout=UNARY_TIMEOUT
                    )
                ).session
            except grpc.aio.AioRpcError as e:
                tally.code("GetSession", e.code(), e.details() or "")
                continue
            if s.tasks or s.state in (pb.SESSION_STATE_BUSY, pb.SESSION_STATE_STARTING):
                tasks = ", ".join(
                    f"{t.task_id} ({pb.TaskKind.Name(t.kind)} {t.description!r} since "
                    f"{t.started_at.ToDatetime():%H:%M:%S.%f})"
                    for t in s.tasks
                )
                pending.append(f"{sid} {pb.SessionState.Name(s.state)} tasks: {tasks}")
        if not pending:
            await asyncio.sleep(2.0)  # a turn the last task's end starts
            return time.monotonic() - started
        await asyncio.sleep(0.5)
    tally.unsettled = pending
    return time.monotonic() - started


async def history(stub: Any, sid: str, tally: Tally) -> list[pb.Message]:
    out: list[pb.Message] = []
    token = ""
    while True:
        try:
            page = await stub.GetHistory(
                pb.GetHistoryRequest(session_id=sid, page_size=1000, page_token=token),
                timeout=UNARY_TIMEOUT,
            )
        except grpc.aio.AioRpcError as e:
            tally.code("GetHistory", e.code(), e.details() or "")
            return out
        tally.code("GetHistory", C.OK)
        out += page.messages
        token = page.next_page_token
        if not token:
            return out


def check_history(
    index: int, msgs: list[pb.Message], sent: dict[str, Sent], watcher: Watcher, tally: Tally
) -> None:
    """Pairs every stored message with its reply by turn; checks order, origins, contents."""
    tally.history_messages += len(msgs)
    stored_turns = {m.turn_id for m in msgs}
    users = {m.turn_id for m in msgs if m.role == pb.ROLE_USER}
    for i, a in enumerate(msgs):
        if a.role == pb.ROLE_ASSISTANT and a.turn_id not in users:
            tally.mis_history.append(
                f"session {index} history #{i}: a reply of no stored message: {a.content[:80]!r}"
            )
    for i, u in enumerate(msgs):
        if u.role != pb.ROLE_USER:
            continue
        where = f"session {index} history #{i}"
        j = next(
            (
                k
                for k in range(i + 1, len(msgs))
                if msgs[k].role == pb.ROLE_ASSISTANT and msgs[k].turn_id == u.turn_id
            ),
            None,
        )
        if j is None:
            tally.lost.append(f"{where}: {u.content[:60]!r} has no reply")
            continue
        reply = msgs[j]
        clients_between = any(m.origin == pb.TURN_ORIGIN_CLIENT for m in msgs[i + 1 : j])
        if j != i + 1:
            tally.agent_turns_inside += not clients_between
        if clients_between:
            between = Counter(
                f"{origin_name(m.origin)} {pb.Role.Name(m.role).removeprefix('ROLE_').lower()}"
                for m in msgs[i + 1 : j]
            )
            tally.interleaved.append(
                f"{where} {origin_name(u.origin)} {u.content[:40]!r}: its reply comes "
                f"{j - i} rows later, after {_counts(between)}"
            )
        if u.status == pb.MESSAGE_STATUS_PENDING or reply.status == pb.MESSAGE_STATUS_PENDING:
            tally.lost.append(f"{where}: {u.content[:60]!r} still pending after the end")
        if reply.origin != u.origin:
            tally.origin_problems.append(
                f"{where}: message {origin_name(u.origin)}, reply {origin_name(reply.origin)}"
            )
        if u.origin == pb.TURN_ORIGIN_CLIENT:
            mine = [sent[t] for t in tokens_in(u.content) if t in sent]
            s = next((x for x in mine if x.text == u.content), None)
            if s is None:
                tally.origin_problems.append(
                    f"{where}: a CLIENT message no client sent: {u.content[:100]!r}"
                )
                continue
            s.in_history = True
            if reply.status != pb.MESSAGE_STATUS_COMPLETE:
                continue  # interrupted or failed: partial
            problem = reply_problem(s, reply.content)
            if problem:
                tally.mis_history.append(f"{where} {s.token} ({s.kind}): {problem}")
            elif s.terminal == "completed" and s.reply != reply.content:
                tally.mis_history.append(
                    f"{where} {s.token}: stream and history differ: "
                    f"{s.reply[:60]!r} vs {reply.content[:60]!r}"
                )
        else:
            tally.agent_turns_history[origin_name(u.origin)] += 1
            if not u.content:
                tally.agent_prompt_empty += 1
            if u.origin != pb.TURN_ORIGIN_TASK:
                tally.origin_problems.append(
                    f"{where}: an agent-started turn with origin {origin_name(u.origin)}: "
                    f"prompt {u.content[:60]!r}, reply {reply.content[:150]!r}"
                )
            other = {
                t for t in tokens_in(u.content + reply.content) if not t.startswith(f"tok-{index}-")
            }
            if other:
                tally.mis_agent.append(f"{where}: agent turn names {sorted(other)[:3]}")
    # Turns the stream showed but the history lacks.
    for turn_id, origin in watcher.turns.items():
        if turn_id not in stored_turns:
            tally.lost.append(f"session {index}: {origin_name(origin)} turn {turn_id} not stored")
    for turn_id, parts in watcher.turn_text.items():
        if watcher.turns.get(turn_id, pb.TURN_ORIGIN_CLIENT) != pb.TURN_ORIGIN_CLIENT:
            other = {t for t in tokens_in("".join(parts)) if not t.startswith(f"tok-{index}-")}
            if other:
                tally.mis_agent.append(
                    f"session {index} stream: agent turn names {sorted(other)[:3]}"
                )


# --- the run ---------------------------------------------------------------------------------


@dataclass
class Outcome:
    agents_started: int = 0
    resumed: int = 0
    evictions: int = 0
    leaked: list[str] = field(default_factory=list)
    exit_code: int | None = None
    children: ChildCount = field(default_factory=ChildCount)
    settle_s: float = 0.0
    seconds: float = 0.0
    churn: ChurnTally | None = None
    vitals: Vitals | None = None
    non_json: list[str] = field(default_factory=list)  # lines of the daemon's log


async def drive(
    d: RunningDaemon,
    args: argparse.Namespace,
    tally: Tally,
    out: Outcome,
    marker: str,
    churn: Churn | None,
) -> None:
    channel = grpc.aio.insecure_channel(d.target)
    stub = session_pb2_grpc.SessionServiceStub(channel)
    master = random.Random(args.seed)
    watchers: list[Watcher] = []
    watch_tasks: list[asyncio.Future[None]] = []
    try:
        workers: list[Worker] = []
        for i in range(args.sessions):
            sid = f"auto-{i}"
            await stub.CreateSession(
                pb.CreateSessionRequest(session_id=sid, mode=pb.MODE_POWER), timeout=UNARY_TIMEOUT
            )
            w = Watcher(stub, sid, i, tally)
            watchers.append(w)
            watch_tasks.append(asyncio.ensure_future(w.run()))
            workers.append(Worker(i, stub, random.Random(master.random()), tally, w, marker))
        t0 = time.monotonic()
        until = t0 + args.minutes * 60
        runs = [asyncio.ensure_future(w.run(until)) for w in workers]
        stop_vitals = asyncio.Event()
        vitals = asyncio.ensure_future(out.vitals.run(stop_vitals)) if out.vitals else None
        if churn is not None:
            await churn.run(until)  # returns with the daemon serving
        done, pending = await asyncio.wait(runs, timeout=args.minutes * 60 + 3 * TURN_TIMEOUT)
        stop_vitals.set()
        if vitals is not None:
            await vitals
        for task in pending:
            tally.other.append("a worker did not finish its last action in time")
            task.cancel()
        for task in done:
            if task.exception() is not None:
                tally.other.append(f"a worker crashed: {task.exception()!r}")
        out.seconds = time.monotonic() - t0
        sids = [w.sid for w in workers]
        out.settle_s = await settle(stub, sids, tally)
        sent = {s.token: s for s in tally.sent}
        for worker in workers:
            msgs = await history(stub, worker.sid, tally)
            check_history(worker.index, msgs, sent, worker.watcher, tally)
        for s in tally.sent:
            if s.code == "OK" and s.terminal == "completed" and not s.in_history:
                tally.lost.append(f"session {s.session} {s.token} ({s.kind}): answered, not stored")
        for sid in sids:
            with contextlib.suppress(grpc.aio.AioRpcError):
                await stub.TerminateSession(
                    pb.TerminateSessionRequest(session_id=sid), timeout=UNARY_TIMEOUT
                )
    finally:
        for w in watchers:
            w.close()
        for t in watch_tasks:
            t.cancel()
        await asyncio.gather(*watch_tasks, return_exceptions=True)
        await channel.close(None)


def marked_processes(marker: str) -> list[int]:
    """Processes whose command line holds this run's marker (the agents' background commands)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes()
        except OSError:
            continue
        if marker.encode() in cmdline:
            found.append(int(entry.name))
    return found


def daemon_config(
    args: argparse.Namespace, workdir: Path, api_env: dict[str, str]
) -> dict[str, Any]:
    home = workdir / "home"
    env = {**api_env, "HOME": str(home), "CLAUDE_CONFIG_DIR": str(home / ".claude")}
    if os.geteuid() == 0:
        env["IS_SANDBOX"] = "1"  # the CLI refuses to skip permissions as root otherwise
    return {
        "agent": {
            "command": [real_claude()],
            "env": env,
            "first_event_timeout": 60.0,
            "stop_grace": 3.0,
        },
        "modes.power": {"enabled": True},
        "pool": {"max_live": args.max_live, "queue_timeout": 60.0, "max_queued": 64, "spares": 0},
        "logging": {"level": "info", "format": "json"},
    }


def run(args: argparse.Namespace, workdir: Path) -> tuple[Tally, Outcome, RunningDaemon]:
    tally, out = Tally(), Outcome()
    marker = f"azdsoak{os.getpid()}x{random.randrange(10**6)}"
    churning = bool(args.restart_every or args.kill_every)
    if churning:
        tally.churn_codes = {C.UNAVAILABLE, C.CANCELLED}
    with fake_api() as api_env:
        d = RunningDaemon(workdir, daemon_config(args, workdir, api_env))
        churn = Churn(d, args.restart_every, args.kill_every)
        out.vitals = Vitals(d)
        try:
            d.start(wait=False)
            d.wait_serving(timeout=30)
            churn.start_sampler()
            asyncio.run(drive(d, args, tally, out, marker, churn if churning else None))
        finally:
            churn.stop_sampler()
            out.churn = churn.tally
            out.children = merged(churn.tally.counts)
            out.exit_code = stop_daemon(d)
            out.leaked = leftovers(d, marker)
            d.stop(timeout=30)  # whatever is still ours, ended by pid
        out.agents_started = len(agent_pids(d))
        out.resumed, out.evictions = pool_churn(d)
        out.non_json = non_json_lines(d.log_path)
    return tally, out, d


def stop_daemon(d: RunningDaemon) -> int | None:
    """SIGTERM and the exit code; None if it did not exit within a minute."""
    if d.proc is None:
        return None
    if d.proc.poll() is None:
        d.proc.send_signal(signal.SIGTERM)
    try:
        return d.proc.wait(60)
    except subprocess.TimeoutExpired:
        return None


def leftovers(d: RunningDaemon, marker: str) -> list[str]:
    """What outlived the daemon's stop: agents (of any daemon of the run), shims, the agents'
    background commands, files in the agents' socket and spool dirs. Waits a little first: a
    shim's own exit takes a moment. What it finds is killed."""
    pids = agent_pids(d)
    deadline = time.monotonic() + 10
    while True:
        leaked = [p for p in pids if alive(p) or group_members(p)]
        shims = [p.pid for p in processes.shims(d.runtime_dir)]
        marked = marked_processes(marker)
        if not (leaked or shims or marked) or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    for p in marked:  # ours, through the agents: never left behind
        with contextlib.suppress(OSError):
            os.kill(p, signal.SIGKILL)
    files = [
        str(f)
        for where in (d.runtime_dir / "agents", d.state_dir / "agent-spool")
        if where.is_dir()
        for f in where.iterdir()
    ]
    return (
        [f"agent {p} (its group: {_described(group_members(p))})" for p in leaked]
        + [f"shim {p}" for p in shims]
        + [f"command {p}" for p in marked]
        + [f"file {f}" for f in files]
    )


def _described(members: list[Any]) -> str:
    cmds = []
    for m in members[:4]:
        try:
            cmd = Path(f"/proc/{m.pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
        except OSError:
            cmd = "?"
        cmds.append(f"{m.pid} {cmd[:100]!r}")
    return "; ".join(cmds) or "gone"


def merged(counts: list[ChildCount]) -> ChildCount:
    """The samplers of each daemon process of the run as one count."""
    if not counts or not all(c.ok for c in counts):
        return ChildCount()
    most = max(counts, key=lambda c: c.most_agents)
    return ChildCount(
        samples=sum(c.samples for c in counts),
        seconds=sum(c.seconds for c in counts),
        gap_ms=max((c.gap_ms for c in counts), key=lambda g: g.get("max", 0)),
        most_agents=most.most_agents,
        most_agents_at_s=most.most_agents_at_s,
        most_other_children=max(c.most_other_children for c in counts),
        changes=most.changes,  # of the daemon process that saw the most
        most_seen=most.most_seen,
    )


# --- the report ------------------------------------------------------------------------------


def most_agents(out: Outcome) -> int:
    return max((s.agents for s in out.vitals.samples), default=0) if out.vitals else 0


def _counts(counter: Counter[str]) -> str:
    return ", ".join(f"{k} {v}" for k, v in sorted(counter.items())) or "0"


def report(args: argparse.Namespace, tally: Tally, out: Outcome) -> bool:
    sent = tally.sent
    ok = [s for s in sent if s.code == "OK"]
    by_kind = Counter(s.kind for s in sent)
    failures = Counter(s.code for s in sent if s.code != "OK")
    ends = Counter(s.terminal or "none" for s in ok)
    first = [s.first_text_ms for s in ok if s.kind == "plain" and s.first_text_ms is not None]
    mis_stream_msgs = {m.split(":")[0] for m in tally.mis_stream}
    rows = [
        (
            "run",
            f"{args.sessions} power sessions, pool.max_live {args.max_live}, "
            f"{out.seconds / 60:.1f} min, seed {args.seed}",
        ),
        ("client messages sent", f"{len(sent)} ({_counts(by_kind)})"),
        ("  answered (stream OK)", f"{len(ok)} ({_counts(ends)})"),
        ("  sent as a task ended", _counts(tally.raced)),
        ("failures by status code", _counts(failures)),
        (
            "other RPCs",
            _counts(
                Counter({k: v for k, v in tally.codes.items() if not k.startswith("SendMessage")})
            ),
        ),
        ("tasks started (watch)", _counts(tally.tasks_started)),
        ("tasks ended (watch)", _counts(tally.tasks_ended)),
        ("agent-started turns, stream", _counts(tally.agent_turns_stream)),
        ("agent-started turns, history", _counts(tally.agent_turns_history)),
        ("history messages checked", str(tally.history_messages)),
        (
            "first text, plain msg p50/p99",
            f"{percentile(first, 50):.0f} / {percentile(first, 99):.0f} ms (n={len(first)})",
        ),
        (
            "pool churn",
            f"{out.agents_started} agents started ({out.resumed} resumed), {out.evictions} "
            f"evictions; most live {out.children.most_agents} / {args.max_live}",
        ),
        ("settled after the load", f"{out.settle_s:.1f} s"),
        (
            "MISATTRIBUTED, stream",
            f"{len(mis_stream_msgs)} messages ({len(tally.mis_stream)} findings)",
        ),
        ("MISATTRIBUTED, history", str(len(tally.mis_history))),
        ("agent turns naming another session", str(len(tally.mis_agent))),
        ("wrong origins", str(len(tally.origin_problems))),
        ("LOST turns", str(len(tally.lost))),
        ("client messages between a message and its reply", str(len(tally.interleaved))),
        ("agent turns between a message and its reply", str(tally.agent_turns_inside)),
        ("agent turns stored with an empty prompt", str(tally.agent_prompt_empty)),
        ("unexpected RPC statuses", str(len(tally.unexpected))),
        ("processes and files outliving the daemon", str(len(out.leaked))),
        ("daemon exit", str(out.exit_code)),
        ("non-JSON lines in the daemon's log", str(len(out.non_json))),
    ]
    churn = out.churn or ChurnTally()
    flat, vitals_text = out.vitals.flat() if out.vitals else (True, "")
    if args.restart_every or args.kill_every:
        after = sorted(churn.serving_after)
        rows += [
            (
                "restarts",
                f"{churn.planned} planned (every {args.restart_every:g} s), {churn.kills} SIGKILLs "
                f"(every {args.kill_every:g} s); daemon pids {len(set(churn.pids))}",
            ),
            (
                "  serving again after",
                f"median {percentile(after, 50):.2f} s, max {max(after, default=0):.2f} s",
            ),
            ("  HUNG restarts", str(len(churn.hung))),
            ("  streams followed / sent again", f"{tally.reattached} / {tally.resent}"),
        ]
    rows.append(("RSS and fds", vitals_text))
    width = max(len(k) for k, _ in rows)
    rule = "-" * (width + 60)
    print(f"\natomizerd autonomy soak\n{rule}")
    for key, value in rows:
        print(f"{key:<{width}}  {value}")
    print(rule)
    checks = [
        (not tally.mis_stream, "every streamed reply answers its own message"),
        (not tally.mis_history, "every stored reply answers its own message"),
        (not tally.mis_agent, "no agent turn names another session's token"),
        (not tally.origin_problems, "agent-started turns have origin TASK; client messages CLIENT"),
        (not tally.lost, "no turn lost"),
        (not tally.interleaved, "no client's message comes between another's and its reply"),
        (not tally.unexpected, "RPCs ended with expected statuses"),
        (not tally.unsettled, "every task ended and every session went idle at the end"),
        (not tally.other, "every turn ended normally, every worker finished"),
        (not out.leaked and out.exit_code == 0, "the daemon stopped cleanly, nothing outlived it"),
        (out.children.ok and out.children.most_agents <= args.max_live, "the pool's cap held"),
        (most_agents(out) <= args.max_live, "the pool's cap held across daemons (every 2 s)"),
        (not churn.hung, "no restart hung"),
        (not out.non_json, "every line of the daemon's log is JSON"),
        (flat, "the daemon's RSS and fds stayed flat"),
    ]
    for passed, what in checks:
        print(f"[{'ok' if passed else 'FAIL'}] {what}")
    for title, items in (
        ("misattributed (stream)", tally.mis_stream),
        ("misattributed (history)", tally.mis_history),
        ("agent turn", tally.mis_agent),
        ("origin", tally.origin_problems),
        ("lost", tally.lost),
        ("order", tally.interleaved),
        ("unexpected", tally.unexpected),
        ("unsettled", tally.unsettled),
        ("other", tally.other),
        ("leaked", out.leaked),
        ("hung", churn.hung),
        ("log", out.non_json),
    ):
        for item in items[:15]:
            print(f"  {title}: {item}")
        if len(items) > 15:
            print(f"  {title}: ... {len(items) - 15} more")
    if out.vitals and (args.restart_every or args.kill_every):
        print("minute  RSS median/max MiB  most fds  most agents")
        for m, med, top, fds, agents in out.vitals.by_minute():
            print(f"{m:>6}  {med:>8.1f} / {top:<7.1f}  {fds:>8}  {agents:>11}")
    if out.children.most_agents > args.max_live:
        faults = ", ".join(f"{t:.1f}" for t in churn.at)
        at = out.children.most_agents_at_s
        around = [f"{t:.3f}: {n}" for t, n in out.children.changes if abs(t - at) < 1.0]
        print(
            f"most agents at {at:.2f} s of a daemon's life (changes around it: "
            f"{', '.join(around)}); faults at {faults or 'none'} s"
        )
        for pid, ppid, argv in out.children.most_seen:
            print(f"  agent then: pid {pid} (parent {ppid}) {argv[:120]}")
    if out.evictions == 0:
        print("note: no agent was evicted: the pool never filled")
    # Misattribution, lost turns and leaks fail the run; so does anything else found.
    return all(passed for passed, _ in checks)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="scripts/soak --autonomy", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("--minutes", type=float, default=10.0, help="how long the load runs")
    parser.add_argument("--sessions", type=int, default=4, help="power-mode sessions")
    parser.add_argument("--max-live", type=int, default=3, help="pool.max_live")
    parser.add_argument("--seed", type=int, default=None, help="random seed (default: random)")
    parser.add_argument("--keep", action="store_true", help="keep the temporary dir (printed)")
    parser.add_argument(
        "--restart-every", type=float, default=0.0, help="a planned restart every S seconds"
    )
    parser.add_argument(
        "--kill-every", type=float, default=0.0, help="a SIGKILL (then a start) every S seconds"
    )
    args = parser.parse_args(argv)
    if args.minutes <= 0 or args.sessions <= 0 or args.max_live <= 0:
        parser.error("--minutes, --sessions and --max-live must be positive")
    if args.restart_every < 0 or args.kill_every < 0:
        parser.error("--restart-every and --kill-every must not be negative")
    if args.restart_every and args.kill_every and args.kill_every % args.restart_every:
        parser.error("--kill-every must be a multiple of --restart-every (a kill replaces one)")
    if args.seed is None:
        args.seed = random.randrange(2**31)
    if not Path(real_claude()).exists():
        print(f"soak: the pinned claude CLI is not at {real_claude()}", file=sys.stderr)
        return 2

    def on_term(signum: int, frame: object) -> None:
        raise SystemExit(128 + signum)  # unwinds: the daemon and the fake API are stopped

    signal.signal(signal.SIGTERM, on_term)
    workdir = Path(tempfile.mkdtemp(prefix="azd-auto-"))  # short: socket paths are limited
    try:
        tally, out, d = run(args, workdir)
        passed = report(args, tally, out)
        if not passed:
            print(f"daemon log: {d.log_path}" if args.keep else "(--keep keeps the daemon log)")
        return 0 if passed else 1
    finally:
        if args.keep:
            print(f"kept {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    raise SystemExit(main())
