"""A daemon killed with SIGKILL: no agent outlives its orphan timeout, and the next start
recovers.

docs/architecture.md "Durability and safety invariants": a user message is committed before
the agent sees it; turns left running by a dead daemon that no daemon adopts are settled as
interrupted at the next start, with an assistant record; an agent under its shim stops by
itself once no daemon has come back within `agent.orphan_timeout` (without a shim it dies with
the daemon, by its parent-death signal); leftovers recorded in the store are killed at the next
start, but only while their pid still names the same process. (Adoption by a daemon that does
come back: tests/e2e/test_restart.py, and the random kills below.)
"""

from __future__ import annotations

import os
import random
import signal
import sqlite3
import subprocess
import time
from contextlib import closing
from functools import partial
from pathlib import Path
from typing import Any

import grpc
import pytest
from atomizer.v1 import session_pb2 as pb

from atomizerd.agents.procgroup import group_members, process_start_time
from atomizerd.model import AgentProcessRecord
from atomizerd.store.db import Store
from tests.conftest import Stubs, stubs_for
from tests.support.daemon import RunningDaemon
from tests.support.waiting import alive, wait_for

TERMINAL_STATUSES = {"complete", "interrupted", "failed"}


# Agents under shims (the default) and on the daemon's own pipes.
SHIMS = pytest.mark.parametrize("shim", [True, False], ids=["shim", "pipes"])
ORPHAN_TIMEOUT = 2.0


def crash_config(workdir: Path, shim: bool) -> dict[str, dict[str, Any]]:
    transcripts = workdir / "transcripts"
    transcripts.mkdir(exist_ok=True)
    return {
        "agent": {
            "env": {"HOME": str(workdir / "home"), "FAKE_AGENT_TRANSCRIPT_DIR": str(transcripts)},
            "survive_restart": shim,
            "orphan_timeout": ORPHAN_TIMEOUT,
        },
    }


def daemon(workdir: Path, name: str, shim: bool = True) -> RunningDaemon:
    """A daemon on the shared workdir, with its own log (so pids are per incarnation)."""
    d = RunningDaemon(workdir, crash_config(workdir, shim))
    d.log_path = workdir / f"{name}.log"
    return d


def agent_pids(d: RunningDaemon) -> list[int]:
    return [int(r["pid"]) for r in d.log_records() if r.get("event") == "agent process started"]


def agents_gone(pids: list[int]) -> bool:
    """No agent alive, and nothing left in their process groups (grandchildren included)."""
    return not any(alive(pid) or group_members(pid) for pid in pids)


def turn(stubs: Stubs, sid: str, text: str) -> list[pb.SessionEvent]:
    stream = stubs.sessions.SendMessage(
        pb.SendMessageRequest(session_id=sid, text=text), timeout=60
    )
    return [r.event for r in stream]


def consistency_problems(db: Path) -> list[str]:
    """What is wrong with the store: integrity, and user messages without a terminal reply."""
    problems: list[str] = []
    with closing(sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=10)) as conn, conn:
        [(check,)] = conn.execute("PRAGMA integrity_check").fetchall()
        if check != "ok":
            problems.append(f"integrity_check: {check}")
        rows = conn.execute(
            "SELECT session_id, turn_id, role, status FROM messages ORDER BY id"
        ).fetchall()
        counts = conn.execute(
            "SELECT s.session_id, s.message_count, COUNT(m.id) FROM sessions s"
            " LEFT JOIN messages m ON m.session_id = s.session_id GROUP BY s.session_id"
        ).fetchall()
    turns: dict[tuple[str, str], dict[str, list[str]]] = {}
    for session_id, turn_id, role, status in rows:
        turns.setdefault((session_id, turn_id), {}).setdefault(role, []).append(status)
    for (session_id, turn_id), roles in turns.items():
        users, replies = roles.get("user", []), roles.get("assistant", [])
        if len(users) != 1:
            problems.append(f"{session_id}/{turn_id}: {len(users)} user messages")
        if len(replies) != 1 or replies[0] not in TERMINAL_STATUSES:
            problems.append(f"{session_id}/{turn_id}: assistant records {replies}")
        if users and users[0] not in TERMINAL_STATUSES:
            problems.append(f"{session_id}/{turn_id}: user message still {users[0]}")
    problems += [
        f"{sid}: message_count {count} but {actual} messages"
        for sid, count, actual in counts
        if count != actual
    ]
    return problems


@SHIMS
def test_after_a_sigkill_mid_turn_no_agent_outlives_its_orphan_timeout_and_the_turn_is_settled(
    short_tmp: Path, shim: bool
) -> None:
    first = daemon(short_tmp, "first", shim).start()
    try:
        stubs = stubs_for(first.channel())
        stubs.sessions.CreateSession(pb.CreateSessionRequest(session_id="crash"))
        stubs.sessions.CreateSession(pb.CreateSessionRequest(session_id="bystander"))
        assert turn(stubs, "crash", "remember the otter")[-1].HasField("turn_completed")
        words = " ".join(f"w{i}" for i in range(200))
        stream = stubs.sessions.SendMessage(
            pb.SendMessageRequest(session_id="crash", text=f"[[slow:100]] {words}"), timeout=60
        )
        seen: list[pb.SessionEvent] = []
        for resp in stream:
            seen.append(resp.event)
            if resp.event.HasField("text_delta"):
                break
        pids = agent_pids(first)
        assert len(pids) == 2 and all(alive(p) for p in pids)
    finally:
        first.kill()
    wait_for(
        "every agent of the killed daemon to be gone",
        lambda: agents_gone(pids),
        timeout=ORPHAN_TIMEOUT + 15,
    )
    try:
        list(stream)
        raise AssertionError("the stream of a killed daemon ended without an error")
    except grpc.RpcError as e:
        assert e.code() == grpc.StatusCode.UNAVAILABLE

    with daemon(short_tmp, "second", shim) as second:
        stubs = stubs_for(second.channel())
        history = stubs.sessions.GetHistory(pb.GetHistoryRequest(session_id="crash")).messages
        assert [(m.role, m.status) for m in history] == [
            (pb.ROLE_USER, pb.MESSAGE_STATUS_COMPLETE),
            (pb.ROLE_ASSISTANT, pb.MESSAGE_STATUS_COMPLETE),
            (pb.ROLE_USER, pb.MESSAGE_STATUS_INTERRUPTED),
            (pb.ROLE_ASSISTANT, pb.MESSAGE_STATUS_INTERRUPTED),
        ]
        assert history[2].content.endswith(words)  # the user's message was kept
        assert history[3].turn_id == history[2].turn_id == seen[0].turn_id
        assert "stopped mid-turn" in history[3].detail
        settled = [
            r
            for r in second.log_records()
            if r.get("event") == "turn left running by a previous daemon marked interrupted"
        ]
        assert [r["turn_id"] for r in settled] == [seen[0].turn_id]

        events = turn(stubs, "crash", "[[history]]")
        reply = events[-1].turn_completed.text
        assert "history: remember the otter" in reply  # the conversation resumed
        # Sequence numbers keep increasing across the crash: a watcher misses nothing.
        assert min(e.seq for e in events) > max(e.seq for e in seen)
        assert [
            r["resume"]
            for r in second.log_records()
            if r.get("session_id") == "crash" and r.get("event") == "agent process started"
        ] == [True]


def _sleeper_group() -> subprocess.Popen[bytes]:
    """An agent-like process group: a leader and a grandchild, in their own session."""
    return subprocess.Popen(
        ["sh", "-c", "sleep 300 & exec sleep 300"],
        start_new_session=True,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )


def test_a_leftover_agent_recorded_in_the_store_is_killed_at_start_unless_its_pid_was_reused(
    short_tmp: Path,
) -> None:
    leftover = _sleeper_group()
    imposter = _sleeper_group()  # holds a recorded pid, but is another process
    try:
        wait_for(
            "both groups to have two members",
            lambda: all(len(group_members(p.pid)) == 2 for p in (leftover, imposter)),
        )
        d = daemon(short_tmp, "daemon")
        db = d.state_dir / "atomizerd.db"
        store = Store(f"sqlite:///{db}")
        try:
            for proc, skew in ((leftover, 0), (imposter, 1)):
                start = process_start_time(proc.pid)
                assert start is not None
                store.record_agent_process(
                    AgentProcessRecord(pgid=proc.pid, session_id="gone", start_time=start - skew)
                )
        finally:
            store.close()

        with d:
            # Reconciling happens before the socket is served.
            assert leftover.wait(timeout=5) == -signal.SIGKILL
            wait_for(
                "the leftover's grandchild to die too", lambda: not group_members(leftover.pid)
            )
            assert imposter.poll() is None
            assert len(group_members(imposter.pid)) == 2
            killed = [
                r["pgid"]
                for r in d.log_records()
                if r.get("event") == "killed agent left by a previous daemon"
            ]
            assert killed == [leftover.pid]
            with closing(sqlite3.connect(db, timeout=10)) as conn, conn:
                assert conn.execute("SELECT COUNT(*) FROM agent_processes").fetchone() == (0,)
    finally:
        for proc in (leftover, imposter):
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()


def settled(db: Path, shim: bool, when: str) -> None:
    """The store is consistent; with shims, once the turns the daemon adopted have ended."""
    if shim:
        wait_for(f"adopted turns to end {when}", lambda: consistency_problems(db) == [], 30)
    assert consistency_problems(db) == [], when


@SHIMS
def test_repeated_sigkills_during_turns_leave_a_consistent_store(
    short_tmp: Path, shim: bool
) -> None:
    """Without shims each kill takes its agents along; with them the next daemon adopts
    whatever was running (a turn killed at any moment, its records half written or not)."""
    rng = random.Random(20261127)
    sessions = ["k0", "k1", "k2"]
    db = short_tmp / "state" / "atomizerd.db"
    words = " ".join(f"w{i}" for i in range(60))
    every_pid: list[int] = []
    for round_no in range(5):
        d = daemon(short_tmp, f"round{round_no}", shim).start()
        streams = []
        try:
            settled(db, shim, f"after restart {round_no}")
            stubs = stubs_for(d.channel())
            for sid in sessions:
                stubs.sessions.CreateSession(pb.CreateSessionRequest(session_id=sid), timeout=10)
            for sid in sessions:
                streams.append(
                    stubs.sessions.SendMessage(
                        pb.SendMessageRequest(session_id=sid, text=f"[[slow:20]] {words}"),
                        timeout=60,
                    )
                )
            # Kill at a different moment each round: before, during or between commits.
            time.sleep(rng.uniform(0.0, 0.8))
        finally:
            d.kill()
        for stream in streams:
            stream.cancel()
        pids = agent_pids(d)
        every_pid += pids
        if not shim:
            wait_for(f"the agents of round {round_no} to be gone", partial(agents_gone, pids))
    with daemon(short_tmp, "final", shim) as d:
        settled(db, shim, "at the final start")
        stubs = stubs_for(d.channel())
        for sid in sessions:
            history = stubs.sessions.GetHistory(pb.GetHistoryRequest(session_id=sid)).messages
            assert all(m.status != pb.MESSAGE_STATUS_PENDING for m in history)
            assert turn(stubs, sid, "still there?")[-1].HasField("turn_completed")
    assert consistency_problems(db) == []
    # The final daemon stopped what it adopted; the shims of the others timed out.
    wait_for("every agent to be gone", partial(agents_gone, every_pid), ORPHAN_TIMEOUT + 15)
