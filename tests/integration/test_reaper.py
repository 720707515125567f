"""The stale-session reaper through a real daemon with short settings, and one pass in-process.

The reaper runs every `reaper.interval` seconds: an agent process idle longer than
`reaper.idle_timeout` is stopped (its session stays and resumes on its next message), busy and
watched sessions are left alone (unless `reaper.cull_connected`), and sessions inactive longer
than `reaper.retention` are purged with their history and runtime files.
"""

from __future__ import annotations

import asyncio
import sqlite3
import sys
import time
from contextlib import closing
from datetime import datetime
from pathlib import Path
from typing import Any

import grpc
import pytest
from atomizer.v1 import daemon_pb2
from atomizer.v1 import session_pb2 as pb

from atomizerd.agents.procgroup import group_members
from atomizerd.config import Config
from atomizerd.sessions.reaper import Reaper
from tests.conftest import Stubs, stubs_for
from tests.support.daemon import FAKE_AGENT, RunningDaemon
from tests.support.waiting import alive, wait_for

INTERVAL = 0.5
IDLE_TIMEOUT = 1.0


def reaper_config(workdir: Path, **reaper: Any) -> dict[str, dict[str, Any]]:
    """Short reaper settings, and a fake agent that keeps conversations across processes."""
    transcripts = workdir / "transcripts"
    transcripts.mkdir(exist_ok=True)
    return {
        "reaper": {"interval": INTERVAL, "idle_timeout": IDLE_TIMEOUT, "retention": 0, **reaper},
        "agent": {
            "env": {"HOME": str(workdir / "home"), "FAKE_AGENT_TRANSCRIPT_DIR": str(transcripts)},
        },
    }


def state(stubs: Stubs, sid: str) -> int:
    return stubs.sessions.GetSession(pb.GetSessionRequest(session_id=sid), timeout=5).session.state


def turn(stubs: Stubs, sid: str, text: str) -> list[pb.SessionEvent]:
    stream = stubs.sessions.SendMessage(
        pb.SendMessageRequest(session_id=sid, text=text), timeout=60
    )
    return [r.event for r in stream]


def completed_text(events: list[pb.SessionEvent]) -> str:
    last = events[-1]
    assert last.WhichOneof("kind") == "turn_completed", last
    assert not last.turn_completed.interrupted
    return last.turn_completed.text


def records(d: RunningDaemon, event: str, session_id: str | None = None) -> list[dict[str, Any]]:
    return [
        r
        for r in d.log_records()
        if r.get("event") == event and (session_id is None or r.get("session_id") == session_id)
    ]


def reaped(d: RunningDaemon, sid: str) -> bool:
    """The reaper has stopped the session's process (logged once the stop is complete)."""
    return bool(records(d, "agent process reaped", sid))


def agent_pids(d: RunningDaemon, sid: str) -> list[int]:
    """Pids of the agent processes started for the session, oldest first."""
    return [int(r["pid"]) for r in records(d, "agent process started", sid)]


def log_time(record: dict[str, Any]) -> float:
    return datetime.fromisoformat(record["timestamp"]).timestamp()


def passes_between(d: RunningDaemon, start: float, end: float) -> int:
    return sum(1 for r in records(d, "reaper pass") if start < log_time(r) < end)


def test_an_idle_process_is_stopped_and_the_session_resumes_on_its_next_message(
    short_tmp: Path,
) -> None:
    with RunningDaemon(short_tmp, reaper_config(short_tmp)) as d:
        stubs = stubs_for(d.channel())
        stubs.sessions.CreateSession(pb.CreateSessionRequest(session_id="idle"))
        assert "remember the walrus" in completed_text(turn(stubs, "idle", "remember the walrus"))
        [first_pid] = agent_pids(d, "idle")

        wait_for("the idle process to be reaped", lambda: reaped(d, "idle"))
        assert state(stubs, "idle") == pb.SESSION_STATE_IDLE
        assert not alive(first_pid)
        assert [r["reason"] for r in records(d, "agent process reaped", "idle")] == ["idle"]
        session = stubs.sessions.GetSession(pb.GetSessionRequest(session_id="idle")).session
        assert session.message_count == 2  # the session and its history stay

        reply = completed_text(turn(stubs, "idle", "[[history]]"))
        assert "history: remember the walrus" in reply  # the same conversation, resumed
        started = records(d, "agent process started", "idle")
        assert [r["resume"] for r in started] == [False, True]
        assert started[1]["pid"] != first_pid


def test_a_message_while_the_idle_process_is_being_stopped_gets_a_tracked_new_process(
    short_tmp: Path,
) -> None:
    """The agent is a shell that lingers 30 s after the fake agent inside it exits, so the
    reaper's stop of it takes `agent.stop_grace`; a message sent meanwhile starts a new
    process, which must stay the session's (and be stopped with it), not be forgotten."""
    config = reaper_config(short_tmp)
    lingering = f'"{sys.executable}" "{FAKE_AGENT}" "$@"; sleep 30'
    config["agent"].update(command=["sh", "-c", lingering, "sh"], stop_grace=1.5)
    with RunningDaemon(short_tmp, config) as d:
        stubs = stubs_for(d.channel())
        stubs.sessions.CreateSession(pb.CreateSessionRequest(session_id="race"))
        completed_text(turn(stubs, "race", "remember the heron"))
        [old_pid] = agent_pids(d, "race")
        [fake] = [s.pid for s in group_members(old_pid) if s.pid != old_pid and s.ppid == old_pid]
        wait_for("the reaper to start stopping the idle process", lambda: not alive(fake))
        assert alive(old_pid)  # still being stopped

        assert "history: remember the heron" in completed_text(turn(stubs, "race", "[[history]]"))
        wait_for("the old process to be reaped", lambda: reaped(d, "race"))
        assert not alive(old_pid)
        [_, new_pid] = agent_pids(d, "race")
        assert alive(new_pid)
        status = stubs.daemon.GetStatus(daemon_pb2.GetStatusRequest(), timeout=5)
        assert status.live_processes == 1
        assert state(stubs, "race") == pb.SESSION_STATE_READY
        assert (d.runtime_dir / "sessions" / "race.mcp.json").exists()  # the new one's config
        stubs.sessions.TerminateSession(pb.TerminateSessionRequest(session_id="race"))
        assert not alive(new_pid)


def test_a_busy_session_is_not_reaped(short_tmp: Path) -> None:
    with RunningDaemon(short_tmp, reaper_config(short_tmp)) as d:
        stubs = stubs_for(d.channel())
        for sid in ("busy", "bystander"):
            stubs.sessions.CreateSession(pb.CreateSessionRequest(session_id=sid))
        wait_for("both processes to start", lambda: bool(agent_pids(d, "bystander")))
        began = time.time()
        # 8 words, 400 ms before each: the turn outlasts idle_timeout and several passes.
        events = turn(stubs, "busy", "[[slow:400]] one two three four five six seven eight")
        ended = time.time()

        assert completed_text(events).endswith("seven eight")
        # The reaper was at work during the turn: passes after the idle timeout, and the
        # bystander's idle process was reaped meanwhile.
        assert passes_between(d, began + IDLE_TIMEOUT, ended) >= 2
        assert records(d, "agent process reaped", "bystander")
        assert not records(d, "agent process reaped", "busy")
        [busy_pid] = agent_pids(d, "busy")
        assert alive(busy_pid)
        # Once the turn is over, the process is idle like any other and is reaped in turn.
        wait_for("the finished session to be reaped", lambda: reaped(d, "busy"))
        assert not alive(busy_pid)
        assert state(stubs, "busy") == pb.SESSION_STATE_IDLE


@pytest.mark.parametrize("cull_connected", [False, True])
def test_a_watched_session_is_reaped_only_with_cull_connected(
    short_tmp: Path, cull_connected: bool
) -> None:
    config = reaper_config(short_tmp, cull_connected=cull_connected)
    with RunningDaemon(short_tmp, config) as d:
        stubs = stubs_for(d.channel())
        for sid in ("watched", "control"):
            stubs.sessions.CreateSession(pb.CreateSessionRequest(session_id=sid))
        # The watched session goes idle first, so it has been idle at least as long as control.
        completed_text(turn(stubs, "watched", "hello"))
        watch = stubs.sessions.WatchSession(
            pb.WatchSessionRequest(session_id="watched", after_seq=0), timeout=60
        )
        try:
            assert next(watch).event.WhichOneof("kind") == "turn_started"  # attached
            completed_text(turn(stubs, "control", "hello"))
            [watched_pid] = agent_pids(d, "watched")
            [control_pid] = agent_pids(d, "control")

            wait_for("the unwatched process to be reaped", lambda: reaped(d, "control"))
            assert not alive(control_pid)
            if cull_connected:
                wait_for("the watched process to be reaped", lambda: reaped(d, "watched"))
                assert not alive(watched_pid)
                assert state(stubs, "watched") == pb.SESSION_STATE_IDLE
                return
            # The pass that reaped control also saw the (longer idle) watched process.
            [control] = records(d, "agent process reaped", "control")
            wait_for(
                "that pass to finish",
                lambda: any(log_time(r) > log_time(control) for r in records(d, "reaper pass")),
            )
            assert alive(watched_pid)
            assert state(stubs, "watched") == pb.SESSION_STATE_READY
        finally:
            watch.cancel()
        # Nobody watches any more: an idle process like any other.
        wait_for("the no longer watched process to be reaped", lambda: reaped(d, "watched"))
        assert not alive(watched_pid)


def test_sessions_inactive_beyond_retention_are_purged_with_history_and_files(
    short_tmp: Path,
) -> None:
    # A long idle timeout keeps both processes (and their runtime files) until the purge.
    config = reaper_config(short_tmp, idle_timeout=3600.0, retention=3600.0)
    with RunningDaemon(short_tmp, config) as d:
        stubs = stubs_for(d.channel())
        for sid in ("old", "recent"):
            stubs.sessions.CreateSession(pb.CreateSessionRequest(session_id=sid))
            completed_text(turn(stubs, sid, f"hello from {sid}"))
        sessions_dir = d.runtime_dir / "sessions"
        owners = sorted({p.name.split(".", 1)[0] for p in sessions_dir.iterdir()})
        assert owners == ["old", "recent"]  # their MCP config and sandbox settings
        [old_pid] = agent_pids(d, "old")
        db = d.state_dir / "atomizerd.db"
        # Two hours without activity, as far as the store knows.
        with closing(sqlite3.connect(db, timeout=10)) as conn, conn:
            conn.execute(
                "UPDATE sessions SET last_active_at = ? WHERE session_id = 'old'",
                (time.time() - 7200,),
            )

        def purged_pass() -> bool:
            status = stubs.daemon.GetStatus(daemon_pb2.GetStatusRequest(), timeout=5)
            return status.last_reaper_pass.sessions_purged == 1

        wait_for("GetStatus to report the purging pass", purged_pass)
        with pytest.raises(grpc.RpcError) as err:
            stubs.sessions.GetHistory(pb.GetHistoryRequest(session_id="old"))
        assert err.value.code() == grpc.StatusCode.NOT_FOUND
        with closing(sqlite3.connect(db, timeout=10)) as conn, conn:
            rows = conn.execute(
                "SELECT (SELECT COUNT(*) FROM sessions WHERE session_id = 'old'),"
                " (SELECT COUNT(*) FROM messages WHERE session_id = 'old')"
            ).fetchone()
        assert rows == (0, 0)
        assert {p.name.split(".", 1)[0] for p in sessions_dir.iterdir()} == {"recent"}
        assert not alive(old_pid)
        assert records(d, "session purged after retention", "old")

        kept = stubs.sessions.GetHistory(pb.GetHistoryRequest(session_id="recent")).messages
        assert [m.content for m in kept] == ["hello from recent", "echo: hello from recent"]
        assert state(stubs, "recent") == pb.SESSION_STATE_READY


def test_get_status_reports_the_last_reaper_pass(short_tmp: Path) -> None:
    with RunningDaemon(short_tmp, reaper_config(short_tmp)) as d:
        stubs = stubs_for(d.channel())
        stubs.sessions.CreateSession(pb.CreateSessionRequest(session_id="s"))
        wait_for("the prewarmed process", lambda: bool(agent_pids(d, "s")))
        [pid] = agent_pids(d, "s")

        def status() -> daemon_pb2.GetStatusResponse:
            return stubs.daemon.GetStatus(daemon_pb2.GetStatusRequest(), timeout=5)

        wait_for(
            "a pass that stopped the idle process",
            lambda: status().last_reaper_pass.processes_stopped == 1,
        )
        first = status().last_reaper_pass
        assert first.errors == 0 and first.sessions_purged == 0
        assert first.duration_ms >= 0
        assert not alive(pid)
        seen = first.finished_at.ToNanoseconds()
        wait_for(
            "a later pass", lambda: status().last_reaper_pass.finished_at.ToNanoseconds() > seen
        )
        later = status().last_reaper_pass
        assert later.processes_stopped == 0  # nothing left to stop
        assert later.finished_at.ToSeconds() <= time.time() + 1


# --- one pass, in-process -----------------------------------------------------------------------


class _Pool:
    def __init__(self, sessions: list[str], failing: str) -> None:
        self.sessions = sessions
        self.failing = failing
        self.retired: list[str] = []

    def candidates(self) -> list[tuple[str, float, bool]]:
        long_ago = time.monotonic() - 1000
        return [(sid, long_ago, True) for sid in self.sessions]

    async def stop_if_idle(self, session_id: str, why: str) -> bool:
        self.retired.append(session_id)
        if session_id == self.failing:
            raise OSError("cannot signal the process group")
        return True


class _Registry:
    def __init__(self, failing: str) -> None:
        self.failing = failing
        self.purged: list[str] = []

    async def stop_overdue_tasks(self) -> None:
        pass

    def loaded_session(self, session_id: str) -> None:
        return None

    async def terminate_session(self, session_id: str, purge: bool) -> None:
        assert purge
        if session_id == self.failing:
            raise RuntimeError("database is locked")
        self.purged.append(session_id)

    def unload_idle(self, older_than: float) -> int:
        return 0


class _Store:
    def inactive_sessions(
        self, before: float, limit: int, *, include_archived: bool = False
    ) -> list[str]:
        return ["x", "y", "z"]

    def delete_history_batch(self, session_ids: list[str], before: float, limit: int) -> int:
        return 0  # no messages

    def close_thread_connection(self) -> None:
        pass


def test_a_failing_session_does_not_stop_the_pass_and_is_counted() -> None:
    config = Config()
    config.reaper.idle_timeout = 10.0
    config.reaper.retention = 60.0
    pool = _Pool(["a", "b", "c"], failing="b")
    registry = _Registry(failing="y")
    reaper = Reaper(config, _Store(), registry, pool)

    result = asyncio.run(reaper.run_once())

    assert pool.retired == ["a", "b", "c"]  # went on after b failed
    assert registry.purged == ["x", "z"]  # went on after y failed
    assert (result.processes_stopped, result.sessions_purged, result.errors) == (2, 2, 2)
    assert reaper.last_pass is result
