"""Sessions in the store: created, forked, listed, changed, purged."""

from __future__ import annotations

import json
import time
from collections.abc import Mapping, Sequence
from typing import Any

import peewee as pw

from atomizerd.model import SessionFilter, SessionRecord
from atomizerd.store.base import StoreBase
from atomizerd.store.models import (
    SESSION_CHILDREN,
    AuditRow,
    MessageRow,
    SessionLabelRow,
    SessionRow,
)
from atomizerd.store.records import filter_conditions, session_record


class SessionsStore(StoreBase):
    # sessions

    def agent_session_used(self, agent_session_id: str) -> bool:
        """Whether a session (of any host) has this conversation."""
        return SessionRow.select().where(SessionRow.agent_session_id == agent_session_id).exists()

    def create_session(
        self,
        session_id: str,
        mode: str,
        study_id: str | None,
        agent_session_id: str,
        budget_usd: float = 0.0,
        turn_budget_usd: float = 0.0,
        model: str = "",
        labels: Mapping[str, str] | None = None,
    ) -> SessionRecord:
        now = time.time()
        with self.db.atomic():
            SessionRow.create(
                model=model,
                session_id=session_id,
                host_id=self.host_id or "",
                mode=mode,
                study_id=study_id,
                agent_session_id=agent_session_id,
                created_at=now,
                last_active_at=now,
                budget_usd=budget_usd,
                turn_budget_usd=turn_budget_usd,
            )
            if labels:
                self._write_labels(session_id, labels)
            record = self._session_now(session_id)
        assert record is not None
        return record

    def set_labels(self, session_id: str, labels: Mapping[str, str]) -> SessionRecord | None:
        """The session's labels become exactly `labels`; returns the session now (None: it
        does not exist)."""
        with self.db.atomic():
            SessionLabelRow.delete().where(SessionLabelRow.session == session_id).execute()
            self._write_labels(session_id, labels)
            return self._session_now(session_id)

    def _write_labels(self, session_id: str, labels: Mapping[str, str]) -> None:
        ordered = dict(sorted(labels.items()))
        SessionRow.update(labels=json.dumps(ordered)).where(
            SessionRow.session_id == session_id
        ).execute()
        if ordered:
            SessionLabelRow.insert_many(
                [{"session": session_id, "key": k, "value": v} for k, v in ordered.items()]
            ).execute()

    def fork_session(
        self, original: SessionRecord, session_id: str, agent_session_id: str, upto: int
    ) -> SessionRecord:
        """A new session forked from `original`: its settings, its stored messages up to
        message `upto` (finished turns only) and the bytes of its files; its first agent forks
        the original's conversation (`fork_of`, at the reply `fork_at`)."""
        now = time.time()
        with self.db.atomic():
            last = MessageRow.get_by_id(upto)
            SessionRow.create(
                session_id=session_id,
                host_id=self.host_id or "",
                mode=original.mode,
                study_id=original.study_id,
                agent_session_id=agent_session_id,
                created_at=now,
                last_active_at=now,
                budget_usd=original.budget_usd,
                turn_budget_usd=original.turn_budget_usd,
                model=original.model,
                agent_cost_usd=original.agent_cost_usd,
                context_window=original.context_window,
                forked_from=original.session_id,
                fork_of=original.agent_session_id,
                fork_at=last.agent_uuid,
            )
            self._write_labels(session_id, original.label_map())
            columns = [
                "turn_id", "role", "content", "status", "request_id", "tool_calls", "cost_usd",
                "usage", "detail", "created_at", "attachments", "agent_uuid", "origin",
                "structured_output", "rolled_back_at",
            ]  # fmt: skip
            names = ", ".join(columns)
            self._sql(
                f"INSERT INTO messages (session_id, {names}) SELECT ?, {names} FROM messages "
                "WHERE session_id = ? AND id <= ? AND status != 'pending' ORDER BY id",
                (session_id, original.session_id, upto),
            )
            self._sql(
                "INSERT INTO attachment_blobs (session_id, sha256, name, media_type, size, data, "
                "created_at) SELECT ?, sha256, name, media_type, size, data, created_at "
                "FROM attachment_blobs WHERE session_id = ?",
                (session_id, original.session_id),
            )
            count = MessageRow.select().where(MessageRow.session == session_id).count()
            SessionRow.update(message_count=count).where(
                SessionRow.session_id == session_id
            ).execute()
            record = self._session_now(session_id)
        assert record is not None
        return record

    def get_session(self, session_id: str) -> SessionRecord | None:
        row = SessionRow.get_or_none(SessionRow.session_id == session_id)
        return session_record(row) if row else None

    def update_session(self, session_id: str, **fields: Any) -> SessionRecord | None:
        """Writes `fields` and returns the session as stored now (None: it does not exist)."""
        with self.db.atomic():
            SessionRow.update(**fields).where(SessionRow.session_id == session_id).execute()
            return self._session_now(session_id)

    def count_open_sessions(self) -> int:
        """This host's open sessions (daemon.max_sessions bounds what one daemon holds)."""
        q = SessionRow.select().where(SessionRow.closed == False)  # noqa: E712
        return int(q.where(self._own(SessionRow.host_id)).count())

    def count_sessions(self) -> int:
        return int(SessionRow.select().where(self._own(SessionRow.host_id)).count())

    def total_cost(self) -> float:
        q = SessionRow.select(pw.fn.SUM(SessionRow.total_cost_usd))
        value = q.where(self._own(SessionRow.host_id)).scalar()
        return float(value or 0.0)

    def list_sessions(
        self,
        *,
        limit: int,
        after: tuple[float, str] | None,
        study_id: str | None,
        closed: bool | None,
        only_ids: set[str] | None = None,
        exclude_ids: set[str] | None = None,
        host_id: str | None = None,
        filters: SessionFilter | None = None,
    ) -> list[SessionRecord]:
        """Newest first, keyset-paginated on (created_at, session_id); every host's sessions
        unless `host_id` names one. `filters`: labels, mode, archive, time ranges (archived
        sessions are left out unless `filters` asks for them)."""
        f = filters or SessionFilter()
        q = SessionRow.select()
        if host_id is not None:
            q = q.where(SessionRow.host_id == host_id)
        if after is not None:
            created, sid = after
            q = q.where(
                (SessionRow.created_at < created)
                | ((SessionRow.created_at == created) & (SessionRow.session_id < sid))
            )
        if study_id is not None:
            q = q.where(SessionRow.study_id == study_id)
        if closed is not None:
            q = q.where(SessionRow.closed == closed)
        if only_ids is not None:
            q = q.where(SessionRow.session_id.in_(list(only_ids)))
        if exclude_ids:
            q = q.where(SessionRow.session_id.not_in(list(exclude_ids)))
        conditions = filter_conditions(f)
        if conditions:
            q = q.where(*conditions)
        q = q.order_by(SessionRow.created_at.desc(), SessionRow.session_id.desc()).limit(limit)
        return [session_record(r) for r in q]

    def inactive_sessions(
        self, before: float, limit: int, *, include_archived: bool = False
    ) -> list[str]:
        """This host's sessions last active before `before` (each host purges its own);
        archived ones only with `include_archived`."""
        spared = pw.SQL("1 = 1") if include_archived else (SessionRow.archived == False)  # noqa: E712
        q = (
            SessionRow.select(SessionRow.session_id)
            .where((SessionRow.last_active_at < before) & self._own(SessionRow.host_id) & spared)
            .order_by(SessionRow.last_active_at)
            .limit(limit)
        )
        return [r.session_id for r in q]

    def reserve_seq(self, session_id: str, upto: int) -> SessionRecord | None:
        """Raises the session's reserved sequence numbers to `upto`, never lowers them (a
        writer with an older view cannot move them back); returns the session now."""
        with self.db.atomic():
            self._sql(
                "UPDATE sessions SET seq_reserved = ? WHERE session_id = ? AND seq_reserved < ?",
                (upto, session_id, upto),
            )
            return self._session_now(session_id)

    def delete_history_batch(self, session_ids: Sequence[str], before: float, limit: int) -> int:
        """Deletes at most `limit` messages and audit events of those of `session_ids` still
        inactive since `before` (last active earlier), in one transaction; returns how many.

        For the retention purge: called until it returns less than `limit`, a long history
        goes in short transactions (the purge runs them on a thread of its own, on that
        thread's connection) and the sessions' own `delete_session` is then quick. With SQLite
        a passive checkpoint follows, so that the checkpoints all this writing calls for run
        on the calling thread, not in some later commit on the event loop."""
        inactive = SessionRow.select(SessionRow.session_id).where(
            SessionRow.session_id.in_(list(session_ids)) & (SessionRow.last_active_at < before)
        )
        with self.db.atomic():
            messages = MessageRow.select(MessageRow.id).where(MessageRow.session.in_(inactive))
            deleted = int(
                MessageRow.delete().where(MessageRow.id.in_(messages.limit(limit))).execute()
            )
            if deleted < limit:
                audit = AuditRow.select(AuditRow.id).where(AuditRow.session.in_(inactive))
                deleted += int(
                    AuditRow.delete().where(AuditRow.id.in_(audit.limit(limit - deleted))).execute()
                )
        if isinstance(self.db, pw.SqliteDatabase):
            self.db.execute_sql("PRAGMA wal_checkpoint(PASSIVE)").fetchall()  # type: ignore[no-untyped-call]
        return deleted

    def close_thread_connection(self) -> None:
        """Closes the calling thread's own connection (peewee keeps one per thread), e.g. when
        a worker thread is done with the store; the store stays open for everyone else."""
        if not self.db.is_closed():
            self.db.close()

    def delete_session(self, session_id: str) -> None:
        with self.db.atomic():
            for row in SESSION_CHILDREN:
                row.delete().where(row.session == session_id).execute()
            SessionRow.delete().where(SessionRow.session_id == session_id).execute()
