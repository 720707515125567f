"""The retention purge on a real store, in-process: it deletes what it should, in bounded
transactions run off the event loop, and lets other work run between them.

Nothing here measures time: "does not hold the loop" is shown by a task that counts its turns
while the purge runs, "off the loop" by the thread the history deletes run in.
"""

from __future__ import annotations

import asyncio
import itertools
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from atomizerd.config import Config
from atomizerd.model import AuditRecord
from atomizerd.sessions import reaper as reaper_mod
from atomizerd.sessions.reaper import Reaper
from atomizerd.store.db import Store

OLD = time.time() - 10 * 86400  # well past the retention below
RETENTION = 86400.0


@dataclass
class _Loaded:
    current: object | None = None
    watchers: int = 0
    tasks: tuple[str, ...] = ()  # running tasks (a background solver run)


class _Registry:
    """What the reaper uses of the registry: loaded sessions, and a terminate that deletes
    the session's rows as the real one does."""

    def __init__(self, store: Store, loaded: dict[str, _Loaded], trace: list[str]) -> None:
        self.store = store
        self.loaded = loaded
        self.trace = trace

    async def stop_overdue_tasks(self) -> None:
        pass

    def loaded_session(self, session_id: str) -> _Loaded | None:
        return self.loaded.get(session_id)

    async def terminate_session(self, session_id: str, purge: bool) -> None:
        assert purge
        self.trace.append("terminate")
        self.store.delete_session(session_id)

    def unload_idle(self, older_than: float) -> int:
        return 0


class _Pool:
    def candidates(self) -> list[tuple[str, float, bool]]:
        return []


def make_store(tmp_path: Path) -> Store:
    return Store(f"sqlite:///{tmp_path / 'state' / 'atomizerd.db'}")


def add_session(store: Store, sid: str, messages: int, audits: int, active_at: float) -> None:
    store.create_session(sid, "user", None, f"agent-{sid}")
    with store.atomic():
        for k in range(messages // 2):
            store.add_user_message(sid, f"t{k}", f"question {k}", None)
            store._sql(
                "INSERT INTO messages (session_id, turn_id, role, content, status, tool_calls,"
                " cost_usd, usage, detail, created_at, attachments, agent_uuid, origin)"
                " VALUES (?, ?, 'assistant', ?, 'complete', '[]', 0, '{}', '', ?, '[]', '', "
                "'client')",
                (sid, f"t{k}", f"answer {k}", active_at),
            )
        for k in range(audits):
            store.add_audit(AuditRecord(sid, "permission", True, "rule", tool_name=f"T{k}"))
    store._sql("UPDATE sessions SET last_active_at = ? WHERE session_id = ?", (active_at, sid))


def counts(store: Store, sid: str) -> tuple[int, int, int]:
    row = store._sql(
        "SELECT (SELECT COUNT(*) FROM sessions WHERE session_id = ?),"
        " (SELECT COUNT(*) FROM messages WHERE session_id = ?),"
        " (SELECT COUNT(*) FROM audit_events WHERE session_id = ?)",
        (sid, sid, sid),
    ).fetchone()
    return int(row[0]), int(row[1]), int(row[2])


def config() -> Config:
    cfg = Config()
    cfg.reaper.retention = RETENTION
    return cfg


def test_the_purge_deletes_old_sessions_whole_and_spares_recent_busy_watched_and_working(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(reaper_mod, "HISTORY_ROWS", 40)  # many batches from few rows
    monkeypatch.setattr(reaper_mod, "SESSIONS_PER_GROUP", 3)
    store = make_store(tmp_path)
    old = [f"old{i}" for i in range(7)]
    for sid in old:
        add_session(store, sid, messages=100, audits=30, active_at=OLD)
    for sid in ("recent", "busy", "watched", "working"):
        add_session(
            store, sid, messages=10, audits=2, active_at=time.time() if sid == "recent" else OLD
        )
    loaded = {
        "busy": _Loaded(current=object()),
        "watched": _Loaded(watchers=1),
        "working": _Loaded(tasks=("solver",)),
        old[0]: _Loaded(),
    }
    registry = _Registry(store, loaded, [])
    reaper = Reaper(config(), store, registry, _Pool())  # type: ignore[arg-type]

    result = asyncio.run(reaper.run_once())

    assert (result.sessions_purged, result.errors) == (len(old), 0)
    for sid in old:  # loaded but idle is purged like any other
        assert counts(store, sid) == (0, 0, 0)
    for sid in ("recent", "busy", "watched", "working"):
        assert counts(store, sid) == (1, 10, 2)
    store.close()


def test_the_purge_yields_between_batches_and_deletes_history_off_the_loop(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(reaper_mod, "HISTORY_ROWS", 25)
    monkeypatch.setattr(reaper_mod, "SESSIONS_PER_GROUP", 4)
    store = make_store(tmp_path)
    sessions = [f"s{i}" for i in range(10)]
    for sid in sessions:
        add_session(store, sid, messages=60, audits=5, active_at=OLD)
    trace: list[str] = []
    batches: list[tuple[int, str]] = []
    real_batch = store.delete_history_batch

    def batch(session_ids: Any, before: float, limit: int) -> int:
        deleted = real_batch(session_ids, before, limit)
        assert deleted <= limit
        batches.append((deleted, threading.current_thread().name))
        return deleted

    monkeypatch.setattr(store, "delete_history_batch", batch)
    real_run = reaper_mod._StoreThread.run

    async def run(self: Any, fn: Any, *args: object) -> Any:
        trace.append("batch")  # on the loop, as the reaper hands a transaction to its thread
        return await real_run(self, fn, *args)

    monkeypatch.setattr(reaper_mod._StoreThread, "run", run)
    registry = _Registry(store, {}, trace)
    reaper = Reaper(config(), store, registry, _Pool())  # type: ignore[arg-type]

    async def scenario() -> tuple[int, int]:
        stop = False

        async def other_work() -> None:
            while not stop:
                trace.append("other")
                await asyncio.sleep(0)

        bystander = asyncio.create_task(other_work())
        await asyncio.sleep(0)
        purged, errors = await reaper._purge_inactive_sessions()
        stop = True
        await bystander
        return purged, errors

    assert asyncio.run(scenario()) == (len(sessions), 0)
    # 10 sessions x (60 messages + 5 audit events) in transactions of at most 25 rows.
    assert sum(d for d, _ in batches) == len(sessions) * 65
    assert len(batches) >= len(sessions) * 65 // 25
    assert {name for _, name in batches} == {"atomizerd-purge_0"}  # never the loop's thread
    # Between any two steps of the purge (a history transaction, a session's terminate),
    # other work got to run.
    steps = [i for i, what in enumerate(trace) if what != "other"]
    assert len(steps) == len(batches) + len(sessions)
    assert all(b - a > 1 for a, b in itertools.pairwise(steps))
    for sid in sessions:
        assert counts(store, sid) == (0, 0, 0)
    store.close()


def test_a_history_batch_spares_sessions_active_since_the_cutoff(tmp_path: Path) -> None:
    store = make_store(tmp_path)
    add_session(store, "old", messages=20, audits=3, active_at=OLD)
    add_session(store, "revived", messages=20, audits=3, active_at=time.time())
    before = time.time() - RETENTION

    assert store.delete_history_batch(["old", "revived"], before, 15) == 15
    assert store.delete_history_batch(["old", "revived"], before, 15) == 8  # 5 + 3: done
    assert store.delete_history_batch(["old", "revived"], before, 15) == 0
    assert counts(store, "old") == (1, 0, 0)  # the session row is the registry's to delete
    assert counts(store, "revived") == (1, 20, 3)
    store.close()


def test_a_failing_history_delete_skips_its_group_only(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(reaper_mod, "SESSIONS_PER_GROUP", 2)
    store = make_store(tmp_path)
    for sid in ("a", "b", "c", "d"):
        add_session(store, sid, messages=4, audits=0, active_at=OLD - ord(sid))
    real_batch = store.delete_history_batch

    def batch(session_ids: Any, before: float, limit: int) -> int:
        if "a" in session_ids:
            raise RuntimeError("database is locked")
        return real_batch(session_ids, before, limit)

    monkeypatch.setattr(store, "delete_history_batch", batch)
    reaper = Reaper(config(), store, _Registry(store, {}, []), _Pool())  # type: ignore[arg-type]

    assert asyncio.run(reaper._purge_inactive_sessions()) == (2, 1)
    # The oldest two ("d", "c") form the first group and go; the failing group stays whole.
    assert [counts(store, sid) for sid in ("a", "b", "c", "d")] == [
        (1, 4, 0),
        (1, 4, 0),
        (0, 0, 0),
        (0, 0, 0),
    ]
    store.close()
