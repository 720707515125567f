"""The stale-session reaper: stops idle agent processes and purges long-inactive sessions.

Busy sessions and watched sessions are left alone unless configured otherwise
(`reaper.cull_busy`, `reaper.cull_connected`). One failing session never stops a pass; every
action is logged; the last pass is reported by GetStatus.

The purge never holds the event loop for long: deleting a session of thousands of messages in
one transaction is slow, and a pass deletes up to `PURGE_BATCH` sessions. Their history
(messages, audit events) goes first, `HISTORY_ROWS` rows per transaction, on a thread of the
pass's own with its own database connection; the loop only awaits it. Then each session is
terminated through the registry (its in-memory state, runtime files and the few rows left), one
at a time, yielding to other work in between.

SQLite has one writer at a time. The thread is handed one transaction at a time and none while
the loop terminates sessions, so a write the loop makes meanwhile (another session's turn) waits
at most one history transaction, milliseconds, far below the 5 s busy timeout: never `database
is locked`. Each transaction deletes only rows of sessions still inactive, so a session written
to meanwhile keeps its new messages (those gone were older than the retention anyway); one that
got busy or watched meanwhile is not terminated, as at the start of the pass.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import TYPE_CHECKING, TypeVar

import structlog

from atomizerd.config import Config
from atomizerd.errors import StoreDown
from atomizerd.telemetry import NULL, Telemetry

if TYPE_CHECKING:
    from atomizerd.agents.pool import AgentPool
    from atomizerd.sessions.registry import Registry
    from atomizerd.store.db import Store

log = structlog.get_logger("atomizerd.sessions.reaper")

PURGE_BATCH = 500  # sessions per pass
# Rows per history transaction: small enough that a transaction stays short, since it is also
# the longest a write of the loop waits meanwhile; large enough that a purge takes few of them.
HISTORY_ROWS = 1000
SESSIONS_PER_GROUP = 50  # sessions whose history one series of transactions deletes

T = TypeVar("T")


@dataclass
class ReaperPass:
    finished_at: float
    processes_stopped: int
    sessions_purged: int
    errors: int
    duration_ms: float


class Reaper:
    def __init__(
        self,
        config: Config,
        store: Store,
        registry: Registry,
        pool: AgentPool,
        telemetry: Telemetry = NULL,
    ) -> None:
        self.config = config
        self.store = store
        self.telemetry = telemetry
        self.registry = registry
        self.pool = pool
        self.last_pass: ReaperPass | None = None

    async def run_forever(self) -> None:
        while True:
            await asyncio.sleep(self.config.reaper.interval)
            try:
                await self.run_once()
            except StoreDown as e:  # a full disk, the database unreachable: the next pass
                log.warning("reaper pass skipped: the store is unavailable", error=str(e))

    async def run_once(self) -> ReaperPass:
        started = time.monotonic()
        await self.registry.stop_overdue_tasks()
        stopped, errors = await self._stop_idle_processes()
        purged, purge_errors = await self._purge_inactive_sessions()
        self.registry.unload_idle(older_than=time.time() - self.config.reaper.interval)
        result = ReaperPass(
            finished_at=time.time(),
            processes_stopped=stopped,
            sessions_purged=purged,
            errors=errors + purge_errors,
            duration_ms=(time.monotonic() - started) * 1000,
        )
        self.last_pass = result
        self.telemetry.reaper_pass(stopped, purged, result.errors)
        log.info(
            "reaper pass",
            stopped=stopped,
            purged=purged,
            errors=result.errors,
            duration_ms=round(result.duration_ms, 1),
        )
        return result

    def _may_cull(self, session_id: str) -> bool:
        session = self.registry.loaded_session(session_id)
        if session is None:
            return True
        if session.current is not None and not self.config.reaper.cull_busy:
            return False
        return not (session.watchers and not self.config.reaper.cull_connected)

    async def _stop_idle_processes(self) -> tuple[int, int]:
        # The pool's idle times are on the loop's clock.
        cutoff = asyncio.get_running_loop().time() - self.config.reaper.idle_timeout
        stopped = errors = 0
        for session_id, idle_since, alive in self.pool.candidates():
            if alive and (idle_since > cutoff or not self._may_cull(session_id)):
                continue
            try:
                # Only while it is still idle: a turn may have leased it since the list was made.
                if not await self.pool.stop_if_idle(session_id, "reaped" if alive else "dead"):
                    continue
                stopped += 1
                log.info(
                    "agent process reaped",
                    session_id=session_id,
                    reason="idle" if alive else "dead",
                )
            except Exception:
                errors += 1
                log.exception("could not reap agent process", session_id=session_id)
        return stopped, errors

    def _in_use(self, session_id: str) -> bool:
        """Busy, watched or running tasks: never purged, whatever its age."""
        session = self.registry.loaded_session(session_id)
        return session is not None and (
            session.current is not None or bool(session.watchers) or bool(session.tasks)
        )

    async def _purge_inactive_sessions(self) -> tuple[int, int]:
        retention = self.config.reaper.retention
        if retention <= 0:
            return 0, 0
        before = time.time() - retention
        candidates = [
            sid
            for sid in self.store.inactive_sessions(
                before, PURGE_BATCH, include_archived=self.config.reaper.purge_archived
            )
            if not self._in_use(sid)
        ]
        if not candidates:
            return 0, 0
        purged = errors = 0
        worker = _StoreThread(self.store)
        try:
            for start in range(0, len(candidates), SESSIONS_PER_GROUP):
                group = [
                    sid
                    for sid in candidates[start : start + SESSIONS_PER_GROUP]
                    if not self._in_use(sid)
                ]
                try:
                    await self._delete_history(worker, group, before)
                except Exception:
                    errors += 1
                    log.exception("could not purge the history of sessions", sessions=group)
                    continue
                for session_id in group:
                    if self._in_use(session_id):
                        continue
                    try:
                        await self.registry.terminate_session(session_id, purge=True)
                        purged += 1
                        log.info("session purged after retention", session_id=session_id)
                    except Exception:
                        errors += 1
                        log.exception("could not purge session", session_id=session_id)
                    await asyncio.sleep(0)  # let everything else run between two sessions
        finally:
            worker.close()
        return purged, errors

    async def _delete_history(
        self, worker: _StoreThread, group: Sequence[str], before: float
    ) -> None:
        """The group's messages and audit events, `HISTORY_ROWS` per transaction."""
        while group:
            deleted = await worker.run(self.store.delete_history_batch, group, before, HISTORY_ROWS)
            if deleted < HISTORY_ROWS:
                return


class _StoreThread:
    """One thread for a purge pass's store calls, started on first use. peewee gives each
    thread its own connection; it is closed with the thread at the end of the pass.

    An in-memory SQLite database exists only on its own connection: there the calls run on
    the loop (still in bounded transactions), with a yield after each."""

    def __init__(self, store: Store) -> None:
        self.store = store
        self.inline = getattr(store, "url", "").endswith(":memory:")
        self._pool: ThreadPoolExecutor | None = None

    async def run(self, fn: Callable[..., T], *args: object) -> T:
        if self.inline:
            result = fn(*args)
            await asyncio.sleep(0)
            return result
        if self._pool is None:
            self._pool = ThreadPoolExecutor(1, thread_name_prefix="atomizerd-purge")
        return await asyncio.get_running_loop().run_in_executor(self._pool, fn, *args)

    def close(self) -> None:
        """Never waits: a call still running (the pass was cancelled) finishes first."""
        if self._pool is not None:
            self._pool.submit(self.store.close_thread_connection)
            self._pool.shutdown(wait=False)
            self._pool = None
