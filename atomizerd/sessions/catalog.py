"""Finding sessions and putting them away: listing with filters, labels, the archive, and
full-text search over their messages (served from the store's indexes).
"""

from __future__ import annotations

from collections.abc import Mapping

import structlog

from atomizerd import ids
from atomizerd.errors import FailedPrecondition, NotFound
from atomizerd.model import SearchHit, SessionFilter
from atomizerd.sessions import checks
from atomizerd.sessions.session import Session, SessionState
from atomizerd.sessions.table import SessionTable, SessionView

log = structlog.get_logger("atomizerd.sessions.catalog")


class Catalog:
    def __init__(self, table: SessionTable) -> None:
        self.table = table
        self.config = table.config
        self.store = table.store
        self.pool = table.pool

    def list_sessions(
        self,
        page_size: int,
        page_token: str,
        study_id: str | None,
        state: str | None,
        host_id: str | None = None,
        filters: SessionFilter | None = None,
    ) -> tuple[list[SessionView], str]:
        limit = checks.page_size(page_size)
        after = checks.decode_token(page_token)
        if study_id:
            ids.check_study_id(study_id)
        if filters is not None:
            checks.check_label_filter(dict(filters.labels))
            if filters.mode is not None:
                checks.check_mode(self.config, filters.mode)
        only: set[str] | None = None
        exclude: set[str] | None = None
        closed: bool | None = None
        if state == "closed":
            closed = True
        elif state == "idle":
            closed = False
            exclude = {sid for sid, s in self.table.sessions.items() if self._state(s) != "idle"}
        elif state is not None:
            closed = False
            only = {sid for sid, s in self.table.sessions.items() if self._state(s) == state}
        records = self.store.list_sessions(
            limit=limit + 1,
            after=after,
            study_id=study_id or None,
            closed=closed,
            only_ids=only,
            exclude_ids=exclude,
            host_id=host_id,
            filters=filters,
        )
        page = records[:limit]
        token = ""
        if len(records) > limit:
            last = page[-1]
            token = checks.encode_token(last.created_at, last.session_id)
        return [self.table.view_record(r) for r in page], token

    def _state(self, s: Session) -> str:
        return self.table.state_of(s)

    def set_labels(self, session_id: str, labels: Mapping[str, str], replace: bool) -> SessionView:
        """With `replace` the session's labels become `labels`; else they are merged in, and a
        key given an empty value is removed."""
        s = self.table.serving(session_id)
        for key in labels:
            checks.check_label_key(key)
        if replace:
            merged = dict(labels)
        else:
            merged = s.record.label_map()
            for key, value in labels.items():
                if value:
                    merged[key] = value
                else:
                    merged.pop(key, None)
        checks.check_labels(merged)
        record = self.store.set_labels(s.id, merged)
        if record is None:
            raise NotFound(f"session {s.id!r} does not exist")
        s.record = record
        return self.table.view(s)

    async def archive_session(self, session_id: str) -> SessionView:
        """Puts the session away: its history stays, its agent is stopped (never while the
        agent runs a task or a turn runs: FAILED_PRECONDITION saying which)."""
        s = self.table.serving(session_id)
        if s.record.archived:
            return self.table.view(s)
        if s.state is SessionState.CLOSING:
            raise FailedPrecondition(f"session {s.id!r} is being terminated")
        running = s.tasks.running()
        if running:
            task = running[0]
            raise FailedPrecondition(
                f"session {s.id!r} cannot be archived while its agent runs task "
                f"{task.task_id!r} ({task.description[:100]!r}"
                + (f", and {len(running) - 1} more" if len(running) > 1 else "")
                + "): wait for it to end, or stop it (StopTask)"
            )
        if s.tasks.scheduled:
            raise FailedPrecondition(
                f"session {s.id!r} cannot be archived while its agent has {s.tasks.scheduled} "
                "scheduled prompt(s) pending: stopping the agent would drop them"
            )
        if not s.idle:
            raise FailedPrecondition(
                f"session {s.id!r} cannot be archived while a turn runs or waits; retry when "
                "it has ended (or Interrupt it)"
            )
        s.record = self.table.write(s, archived=True)
        try:
            await self.pool.retire(s.id)
        except RuntimeError:
            # A message came meanwhile, took the session out of the archive and leased its
            # agent: the session is in use again, which is what the sender wanted.
            log.info("session in use again while archived", session_id=s.id)
            return self.table.view(s)
        log.info("session archived", session_id=s.id)
        return self.table.view(s)

    def unarchive_session(self, session_id: str) -> SessionView:
        s = self.table.serving(session_id)
        if s.record.archived:
            s.record = self.table.write(s, archived=False)
            log.info("session unarchived", session_id=s.id)
        return self.table.view(s)

    def take_out_of_archive(self, s: Session) -> None:
        """A message to an archived session: daemon.archived_send decides."""
        if not s.record.archived:
            return
        if self.config.daemon.archived_send == "refuse":
            raise FailedPrecondition(
                f"session {s.id!r} is archived and this daemon refuses messages to archived "
                'sessions (daemon.archived_send = "refuse"): UnarchiveSession first'
            )
        s.record = self.table.write(s, archived=False)
        log.info("session unarchived by a message", session_id=s.id)

    def search_messages(
        self,
        query: str,
        session_id: str | None,
        labels: Mapping[str, str],
        page_size: int,
        page_token: str,
    ) -> tuple[list[SearchHit], str]:
        """Stored messages matching `query`, best first, a page at a time."""
        checks.check_query(query)
        limit = checks.search_page_size(page_size)
        offset = checks.decode_offset_token(page_token)
        if session_id:
            self.table.load(session_id)  # NOT_FOUND for a session that does not exist
        checks.check_label_filter(dict(labels))
        hits = self.store.search_messages(
            query, session_id=session_id or None, labels=labels, limit=limit + 1, offset=offset
        )
        token = ""
        if len(hits) > limit and offset + limit <= checks.MAX_SEARCH_OFFSET:
            token = checks.encode_id_token(offset + limit)
        return hits[:limit], token
