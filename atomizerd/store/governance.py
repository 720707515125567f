"""Governance and processes in the store: the audit trail, remembered rules, the agent processes
recorded for the crash sweep, and the tasks agents run."""

from __future__ import annotations

import time
from collections.abc import Collection
from typing import Any

from atomizerd.model import AgentProcessRecord, AuditRecord
from atomizerd.store.base import StoreBase
from atomizerd.store.models import (
    AgentProcessRow,
    AuditRow,
    PermissionPatternRow,
    PermissionRuleRow,
    SessionRow,
    TaskRow,
)
from atomizerd.store.records import audit_record


class GovernanceStore(StoreBase):
    # governance

    def add_audit(self, rec: AuditRecord) -> None:
        AuditRow.create(
            session=rec.session_id,
            turn_id=rec.turn_id,
            time=rec.time,
            kind=rec.kind,
            tool_name=rec.tool_name,
            input_digest=rec.input_digest,
            allow=rec.allow,
            decider=rec.decider,
            detail=rec.detail,
        )

    def audit_events(self, session_id: str, *, after_id: int, limit: int) -> list[AuditRecord]:
        q = (
            AuditRow.select()
            .where((AuditRow.session == session_id) & (AuditRow.id > after_id))
            .order_by(AuditRow.id)
            .limit(limit)
        )
        return [audit_record(r) for r in q]

    def remember_rule(self, session_id: str, tool_name: str, digest: str, allow: bool) -> None:
        # An upsert both engines take (PostgreSQL has no REPLACE).
        PermissionRuleRow.insert(
            session=session_id, tool_name=tool_name, input_digest=digest, allow=allow
        ).on_conflict(
            conflict_target=[
                PermissionRuleRow.session,
                PermissionRuleRow.tool_name,
                PermissionRuleRow.input_digest,
            ],
            update={PermissionRuleRow.allow: allow},
        ).execute()

    def remember_pattern(self, session_id: str, rule: str) -> None:
        PermissionPatternRow.insert(
            session=session_id, rule=rule, created_at=time.time()
        ).on_conflict_ignore().execute()

    def patterns(self, session_id: str) -> list[str]:
        """The rules allowed for the rest of the session, oldest first."""
        q = (
            PermissionPatternRow.select(PermissionPatternRow.rule)
            .where(PermissionPatternRow.session == session_id)
            .order_by(PermissionPatternRow.created_at, PermissionPatternRow.rule)
        )
        return [r.rule for r in q]

    def find_rule(self, session_id: str, tool_name: str, digest: str) -> bool | None:
        row = PermissionRuleRow.get_or_none(
            (PermissionRuleRow.session == session_id)
            & (PermissionRuleRow.tool_name == tool_name)
            & (PermissionRuleRow.input_digest == digest)
        )
        return None if row is None else bool(row.allow)

    # agent processes (crash sweep)

    def record_agent_process(self, rec: AgentProcessRecord) -> None:
        now = time.time()
        AgentProcessRow.insert(
            host_id=self.host_id or "",
            pgid=rec.pgid,
            session_id=rec.session_id,
            start_time=rec.start_time,
            started_at=now,
        ).on_conflict(
            conflict_target=[AgentProcessRow.host_id, AgentProcessRow.pgid],
            update={
                AgentProcessRow.session_id: rec.session_id,
                AgentProcessRow.start_time: rec.start_time,
                AgentProcessRow.started_at: now,
            },
        ).execute()

    def forget_agent_process(self, pgid: int) -> None:
        AgentProcessRow.delete().where(
            (AgentProcessRow.pgid == pgid) & self._own(AgentProcessRow.host_id)
        ).execute()

    def record_task(self, session_id: str, task: dict[str, Any]) -> None:
        """A running task, as sessions/tasks.py describes it (replaced if known)."""
        with self.db.atomic():
            self.forget_task(session_id, task["task_id"])
            TaskRow.insert(session=session_id, **task).execute()

    def forget_task(self, session_id: str, task_id: str) -> None:
        TaskRow.delete().where(
            (TaskRow.session == session_id) & (TaskRow.task_id == task_id)
        ).execute()

    def tasks_of(self, session_id: str) -> list[dict[str, Any]]:
        rows = TaskRow.select().where(TaskRow.session == session_id).order_by(TaskRow.started_at)
        return [
            {
                f: getattr(r, f)
                for f in (
                    "task_id",
                    "tool_use_id",
                    "kind",
                    "description",
                    "background",
                    "started_at",
                    "output_file",
                )
            }
            for r in rows
        ]

    def forget_tasks_except(self, keep: Collection[str]) -> list[tuple[str, str]]:
        """At start-up: the tasks of this host's sessions whose agents were not adopted went
        with their agents; returns (session id, task id) of each."""
        own = SessionRow.select(SessionRow.session_id).where(self._own(SessionRow.host_id))
        query = TaskRow.select(TaskRow.session, TaskRow.task_id).where(TaskRow.session.in_(own))
        gone = [(r.session_id, r.task_id) for r in query if r.session_id not in keep]
        for session_id, task_id in gone:
            self.forget_task(session_id, task_id)
        return gone

    def agent_processes(self) -> list[AgentProcessRecord]:
        """This host's recorded agents (process group ids mean nothing on another machine)."""
        return [
            AgentProcessRecord(pgid=r.pgid, session_id=r.session_id, start_time=r.start_time)
            for r in AgentProcessRow.select().where(self._own(AgentProcessRow.host_id))
        ]
