"""The stale-session reaper: stops idle agent processes and purges long-inactive sessions.

Modelled on Jupyter's kernel culler: busy sessions and watched sessions are left alone unless
configured otherwise (`reaper.cull_busy`, `reaper.cull_connected`). One failing session never
stops a pass; every action is logged; the last pass is reported by GetStatus.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

import structlog

from atomizerd.daemon.config import Config

if TYPE_CHECKING:
    from atomizerd.agents.pool import AgentPool
    from atomizerd.sessions.registry import Registry
    from atomizerd.store.db import Store

log = structlog.get_logger("atomizerd.sessions.reaper")

PURGE_BATCH = 500


@dataclass
class ReaperPass:
    finished_at: float
    processes_stopped: int
    sessions_purged: int
    errors: int
    duration_ms: float


class Reaper:
    def __init__(self, config: Config, store: Store, registry: Registry, pool: AgentPool) -> None:
        self.config = config
        self.store = store
        self.registry = registry
        self.pool = pool
        self.last_pass: ReaperPass | None = None

    async def run_forever(self) -> None:
        while True:
            await asyncio.sleep(self.config.reaper.interval)
            await self.run_once()

    async def run_once(self) -> ReaperPass:
        started = time.monotonic()
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
        cutoff = time.monotonic() - self.config.reaper.idle_timeout
        stopped = errors = 0
        for session_id, idle_since, alive in self.pool.candidates():
            if alive and (idle_since > cutoff or not self._may_cull(session_id)):
                continue
            try:
                await self.pool.retire(session_id)
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

    async def _purge_inactive_sessions(self) -> tuple[int, int]:
        retention = self.config.reaper.retention
        if retention <= 0:
            return 0, 0
        purged = errors = 0
        for session_id in self.store.inactive_sessions(time.time() - retention, PURGE_BATCH):
            session = self.registry.loaded_session(session_id)
            if session is not None and (session.current is not None or session.watchers):
                continue
            try:
                await self.registry.terminate_session(session_id, purge=True)
                purged += 1
                log.info("session purged after retention", session_id=session_id)
            except Exception:
                errors += 1
                log.exception("could not purge session", session_id=session_id)
        return purged, errors
