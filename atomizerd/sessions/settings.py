"""Changing a session's settings: its mode, study and model.

A change is a job in the session's queue (`Change`): it runs after the turn before it, so a
running turn finishes under the settings it started with; then the record is written and the
agent restarted with the new settings (or, for a model, switched live where the CLI can).
Agents are started ahead of need (`prewarm`) when a session opens or changes.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

import structlog

from atomizerd.agents.pool import AgentState
from atomizerd.agents.vocabulary import AgentError
from atomizerd.atomizer.studies import Studies
from atomizerd.model import AuditRecord
from atomizerd.sessions import checks
from atomizerd.sessions.approvals import CLIENT
from atomizerd.sessions.queue import WorkQueue
from atomizerd.sessions.session import Change, Session, SessionState
from atomizerd.sessions.table import SessionTable, SessionView

log = structlog.get_logger("atomizerd.sessions.settings")


class SettingChanges:
    def __init__(self, studies: Studies, table: SessionTable, queue: WorkQueue) -> None:
        self.table = table
        self.config = table.config
        self.store = table.store
        self.pool = table.pool
        self.studies = studies
        self.queue = queue
        self._background: set[asyncio.Task[None]] = set()

    def _changeable(self, session_id: str) -> Session:
        self.table.check_open()
        s = self.table.serving(session_id)
        self.table.require_open(s)
        return s

    async def switch_mode(self, session_id: str, mode: str) -> SessionView:
        mode = checks.check_mode(self.config, mode)
        s = self._changeable(session_id)
        await self.reconfigure(s, mode, None, audit=True)
        return self.table.view(s)

    async def set_study(self, session_id: str, study_id: str) -> SessionView:
        if study_id:
            self.studies.resolve(study_id)
        s = self._changeable(session_id)
        await self.reconfigure(s, None, study_id if study_id else "", audit=False)
        return self.table.view(s)

    async def set_model(self, session_id: str, model: str) -> SessionView:
        """The session's model ("": the daemon's default), after the work queued before it."""
        model = checks.check_model(self.config, model) if model else ""
        s = self._changeable(session_id)
        await self.change_model(s, model)
        return self.table.view(s)

    async def change_model(self, s: Session, model: str) -> None:
        """A job in the session's queue: the record first (every later spawn or resume runs
        `--model`), then the live agent, which switches with the CLI's `set_model`; an agent
        that cannot (starting, or refusing) is restarted instead."""

        async def apply() -> None:
            if model == s.record.model:
                return
            s.record = self.table.write(s, model=model)
            agent = self.pool.agent(s.id)
            if agent is not None and agent.state is AgentState.READY and agent.alive:
                try:
                    await agent.transport_or_fail().request(
                        "set_model",
                        timeout=self.config.agent.stop_grace,
                        model=model or self.config.agent.model or "default",
                    )
                    log.info("model changed on the live agent", session_id=s.id, model=model)
                    return
                except AgentError as e:
                    log.warning("the agent refused set_model; restarting it", error=str(e))
            await self.pool.retire(s.id)
            log.info("model changed", session_id=s.id, model=model)
            self.prewarm(s)

        await self._run(s, apply)

    async def reconfigure(
        self, s: Session, mode: str | None, study_id: str | None, *, audit: bool
    ) -> None:
        """Changes the session's mode and/or study (None: unchanged; "" clears the study)
        after the work queued before it; the agent is restarted with the new settings."""

        def wanted() -> dict[str, object]:
            changes: dict[str, object] = {}
            if mode and mode != s.record.mode:
                changes["mode"] = mode
            if study_id is not None and (study_id or None) != s.record.study_id:
                changes["study_id"] = study_id or None
            return changes

        if not wanted() and s.idle:
            return

        async def apply() -> None:
            changes = wanted()
            if not changes:
                return
            previous = s.record.mode
            with self.store.atomic():
                s.record = self.table.write(s, **changes, context_stale=s.record.agent_started)
                if audit and "mode" in changes:
                    self.store.add_audit(
                        AuditRecord(
                            session_id=s.id,
                            kind="mode_switch",
                            allow=True,
                            decider=CLIENT,
                            detail=f"{previous} -> {changes['mode']}",
                        )
                    )
            await self.pool.retire(s.id)
            log.info(
                "session settings changed",
                session_id=s.id,
                **{k: str(v) for k, v in changes.items()},
            )
            self.prewarm(s)

        await self._run(s, apply)

    async def _run(self, s: Session, apply: Callable[[], Awaitable[None]]) -> None:
        change = Change(apply)
        self.queue.submit(s, change)
        await asyncio.shield(change.done)

    def prewarm(self, s: Session) -> None:
        """Starts the session's agent now if a slot is free (never evicts or waits)."""
        if not self.config.agent.prewarm or s.state is not SessionState.OPEN:
            return
        self._spawn(
            self.pool.prewarm(lambda: s.record, lambda: s.state is SessionState.OPEN and s.idle)
        )

    def _spawn(self, coro: Awaitable[None]) -> None:
        task: asyncio.Task[None] = asyncio.ensure_future(coro)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    def cancel_background(self) -> None:
        for task in list(self._background):
            task.cancel()
