"""Messages in the store: a turn's two writes (plain SQL: they sit on the path to the first
text), checkpoints, history, search, and turns left unfinished."""

from __future__ import annotations

import json
import secrets
import time
from collections.abc import Collection, Mapping, Sequence
from typing import Any

import peewee as pw

from atomizerd.errors import InvalidArgument
from atomizerd.model import (
    ASIDE,
    AttachmentRecord,
    MessageRecord,
    SearchHit,
    SessionRecord,
    StoredAttachment,
    TurnOutcome,
)
from atomizerd.store.base import StoreBase
from atomizerd.store.migrations import (
    _FTS_QUERY_ERRORS,
    FTS_PG_CHARS,
    FTS_PG_VECTOR,
)
from atomizerd.store.models import (
    AttachmentBlobRow,
    MessageRow,
    SessionRow,
)
from atomizerd.store.records import message_record

# The origin of AskAside's rows: kept in history, never part of the conversation.


class MessagesStore(StoreBase):
    # messages

    # The two writes of every turn are plain parameterised SQL: they sit on the path to the
    # first text, and building them through peewee's query objects costs more than SQLite.

    def _insert_message(self, values: dict[str, Any]) -> int:
        columns = ", ".join(values)
        marks = ", ".join("?" for _ in values)
        sql = f"INSERT INTO messages ({columns}) VALUES ({marks})"
        if isinstance(self.db, pw.PostgresqlDatabase):
            return int(self._sql(sql + " RETURNING id", tuple(values.values())).fetchone()[0])
        return int(self._sql(sql, tuple(values.values())).lastrowid)

    def add_user_message(
        self,
        session_id: str,
        turn_id: str,
        text: str,
        request_id: str | None,
        attachments: Sequence[StoredAttachment] = (),
        *,
        origin: str = "client",
        detail: str = "",
    ) -> tuple[MessageRecord, SessionRecord]:
        """Commits a turn's user message (status pending) and the bytes of its attachments
        (once per content in the session); returns it and the session now. A turn the agent
        started by itself has its `origin` and, as its text, what started it."""
        now = time.time()
        records = [a.record for a in attachments]
        values: dict[str, Any] = {
            "session_id": session_id,
            "turn_id": turn_id,
            "role": "user",
            "content": text,
            "status": "pending",
            "request_id": request_id,
            "tool_calls": "[]",
            "cost_usd": 0.0,
            "usage": "{}",
            "detail": detail,
            "created_at": now,
        }
        values["attachments"] = json.dumps([r.__dict__ for r in records]) if records else "[]"
        values["agent_uuid"] = ""
        values["origin"] = origin
        values["structured_output"] = ""
        values["rolled_back_at"] = 0
        with self.db.atomic():
            message_id = self._insert_message(values)
            for a in attachments:
                self._store_blob(session_id, a, now)
            self._sql(
                "UPDATE sessions SET message_count = message_count + 1, last_active_at = ? "
                "WHERE session_id = ?",
                (now, session_id),
            )
            session = self._session_now(session_id)
        assert session is not None, "a message was stored for a session that does not exist"
        question = _pending_question(message_id, session_id, turn_id, text, now, origin)
        question.request_id, question.detail, question.attachments = request_id, detail, records
        return question, session

    def add_aside_question(self, session_id: str, text: str) -> MessageRecord:
        """A question asked aside (AskAside), committed before the agent gets it: a row of its
        own turn id with origin ASIDE, outside the conversation (message_count is the
        conversation's: not counted)."""
        now = time.time()
        turn_id = f"aside-{secrets.token_hex(8)}"
        values = _aside_values(session_id, turn_id, "user", text, "pending", "", now)
        message_id = self._insert_message(values)
        return _pending_question(message_id, session_id, turn_id, text, now, ASIDE)

    def add_aside_answer(
        self, question: MessageRecord, text: str, status: str, detail: str
    ) -> MessageRecord:
        """The answer to `question` (status complete or failed), and the question settled."""
        now = time.time()
        values = _aside_values(
            question.session_id, question.turn_id, "assistant", text, status, detail, now
        )
        with self.db.atomic():
            self._sql("UPDATE messages SET status = ? WHERE id = ?", (status, question.message_id))
            message_id = self._insert_message(values)
        return MessageRecord(
            message_id,
            question.session_id,
            question.turn_id,
            "assistant",
            text,
            status,
            None,
            [],
            0.0,
            {},
            detail,
            now,
            origin=ASIDE,
        )

    def _store_blob(self, session_id: str, a: StoredAttachment, now: float) -> None:
        r = a.record
        self._sql(
            "INSERT INTO attachment_blobs (session_id, sha256, name, media_type, size, data, "
            "created_at) VALUES (?, ?, ?, ?, ?, ?, ?) ON CONFLICT (session_id, sha256) DO NOTHING",
            (session_id, r.sha256, r.name, r.media_type, r.size, a.data, now),
        )

    def attachment(self, session_id: str, sha256: str) -> tuple[AttachmentRecord, bytes] | None:
        """A file sent in the session, by its sha256 (its name as first sent)."""
        row = AttachmentBlobRow.get_or_none(
            (AttachmentBlobRow.session == session_id) & (AttachmentBlobRow.sha256 == sha256)
        )
        if row is None:
            return None
        return AttachmentRecord(row.name, row.media_type, row.size, row.sha256), bytes(row.data)

    def finish_turn(
        self,
        session_id: str,
        turn_id: str,
        outcome: TurnOutcome,
        agent_cost_usd: float | None = None,
    ) -> tuple[MessageRecord, SessionRecord]:
        """Stores the assistant message, settles the user message and drops the turn's
        checkpoint, atomically; returns the reply and the session now."""
        now = time.time()
        values: dict[str, Any] = {
            "session_id": session_id,
            "turn_id": turn_id,
            "role": "assistant",
            "content": outcome.text,
            "status": outcome.status,
            "request_id": None,
            "tool_calls": json.dumps([tc.__dict__ for tc in outcome.tool_calls]),
            "cost_usd": outcome.cost_usd,
            "usage": json.dumps(outcome.usage),
            "detail": outcome.detail,
            "created_at": now,
            "attachments": "[]",
            "agent_uuid": outcome.agent_uuid,
            "origin": outcome.origin,
            "structured_output": outcome.structured_output,
            "rolled_back_at": 0,
        }
        with self.db.atomic():
            self._sql(
                # A turn's origin can be known only at its end (the CLI's result says it);
                # a client's steer taken into the turn stays the client's.
                "UPDATE messages SET status = ?, origin = CASE WHEN detail = 'steer' THEN origin "
                "ELSE ? END WHERE session_id = ? AND turn_id = ? AND role = 'user'",
                (outcome.status, outcome.origin, session_id, turn_id),
            )
            message_id = self._insert_message(values)
            self._sql(
                "UPDATE sessions SET message_count = message_count + 1, "
                "total_cost_usd = total_cost_usd + ?, last_active_at = ?, "
                "agent_cost_usd = COALESCE(?, agent_cost_usd), "
                "context_tokens = COALESCE(?, context_tokens), "
                "context_window = COALESCE(?, context_window), "
                "last_usage = COALESCE(?, last_usage), "
                "agent_files = COALESCE(?, agent_files), rollback_state = '' WHERE session_id = ?",
                (
                    outcome.cost_usd,
                    now,
                    agent_cost_usd,
                    outcome.context_tokens,
                    outcome.context_window,
                    outcome.last_usage,
                    outcome.agent_files,
                    session_id,
                ),
            )
            self._sql("DELETE FROM turn_checkpoints WHERE turn_id = ?", (turn_id,))
            session = self._session_now(session_id)
        assert session is not None, "a turn ended in a session that does not exist"
        return MessageRecord(
            message_id,
            session_id,
            turn_id,
            "assistant",
            outcome.text,
            outcome.status,
            None,
            list(outcome.tool_calls),
            outcome.cost_usd,
            dict(outcome.usage),
            outcome.detail,
            now,
            agent_uuid=outcome.agent_uuid,
            origin=outcome.origin,
            structured_output=outcome.structured_output,
        ), session

    def checkpoint_reply(
        self, session_id: str, turn_id: str, text: str, *, replace: bool = False
    ) -> None:
        """Adds `text` to what the running turn's reply has said so far (with `replace`, it is
        the whole reply so far: text was withdrawn)."""
        with self.db.atomic():
            if replace:
                self._sql("DELETE FROM turn_checkpoints WHERE turn_id = ?", (turn_id,))
            self._sql(
                "INSERT INTO turn_checkpoints (session_id, turn_id, content, updated_at) "
                "VALUES (?, ?, ?, ?)",
                (session_id, turn_id, text, time.time()),
            )

    def checkpointed_reply(self, turn_id: str) -> str:
        rows = self._sql(
            "SELECT content FROM turn_checkpoints WHERE turn_id = ? ORDER BY id", (turn_id,)
        ).fetchall()
        return "".join(r[0] for r in rows)

    def history(
        self,
        session_id: str,
        *,
        after_id: int,
        limit: int,
        asides: bool = True,
        rolled_back: bool = True,
    ) -> list[MessageRecord]:
        where = (MessageRow.session == session_id) & (MessageRow.id > after_id)
        if not asides:
            where &= MessageRow.origin != ASIDE
        if not rolled_back:
            where &= MessageRow.rolled_back_at == 0
        q = MessageRow.select().where(where).order_by(MessageRow.id).limit(limit)
        return [message_record(r) for r in q]

    def recent_messages(self, session_id: str, limit: int) -> list[MessageRecord]:
        """The conversation's latest messages (a reseed's history): asides are not part of it."""
        q = (
            MessageRow.select()
            .where(
                (MessageRow.session == session_id)
                & (MessageRow.origin != ASIDE)
                & (MessageRow.rolled_back_at == 0)
            )
            .order_by(MessageRow.id.desc())
            .limit(limit)
        )
        return [message_record(r) for r in reversed(list(q))]

    def search_messages(
        self,
        query: str,
        *,
        session_id: str | None = None,
        labels: Mapping[str, str] | None = None,
        limit: int,
        offset: int = 0,
    ) -> list[SearchHit]:
        """Messages matching `query` (the engine's full-text query syntax), best first: SQLite
        FTS5's bm25, PostgreSQL's ts_rank; a malformed query is InvalidArgument."""
        where: list[str] = []
        params: list[Any] = []
        if session_id is not None:
            where.append("m.session_id = ?")
            params.append(session_id)
        for key, value in (labels or {}).items():
            where.append(
                "m.session_id IN (SELECT session_id FROM session_labels "
                "WHERE key = ? AND value = ?)"
            )
            params += [key, value]
        extra = "".join(f" AND {w}" for w in where)
        if isinstance(self.db, pw.PostgresqlDatabase):
            sql = (
                "SELECT m.id, m.session_id, m.turn_id, m.role, m.created_at, "
                "ts_headline('english', left(m.content, ?), q, "
                "'StartSel=[, StopSel=], MaxWords=24, MinWords=8, MaxFragments=2, "
                'FragmentDelimiter=" … "\'), '
                f"ts_rank({FTS_PG_VECTOR.replace('content', 'm.content')}, q) AS score "
                "FROM messages m, websearch_to_tsquery('english', ?) q "
                f"WHERE {FTS_PG_VECTOR.replace('content', 'm.content')} @@ q{extra} "
                "ORDER BY score DESC, m.id DESC LIMIT ? OFFSET ?"
            )
            args = (FTS_PG_CHARS, query, *params, limit, offset)
        else:
            # The page's rows are ranked first without their snippets (a snippet is made only
            # for the rows shown, not for every match: 4× quicker for a word in 2% of the
            # messages); the messages are joined there only when a filter needs them.
            join = " JOIN messages m ON m.id = messages_fts.rowid" if where else ""
            sql = (
                "SELECT m.id, m.session_id, m.turn_id, m.role, m.created_at, "
                "snippet(messages_fts, 0, '[', ']', ' … ', 16), -bm25(messages_fts) AS score "
                "FROM messages_fts JOIN messages m ON m.id = messages_fts.rowid "
                "WHERE messages_fts MATCH ? AND messages_fts.rowid IN ("
                f"SELECT messages_fts.rowid FROM messages_fts{join} "
                f"WHERE messages_fts MATCH ?{extra} "
                "ORDER BY bm25(messages_fts), messages_fts.rowid DESC LIMIT ? OFFSET ?) "
                "ORDER BY bm25(messages_fts), m.id DESC"
            )
            args = (query, query, *params, limit, offset)
        try:
            with self.db.atomic():  # a failed query must not break the connection's state
                rows = self._sql(sql, args).fetchall()
        except (pw.OperationalError, pw.DataError) as exc:
            # Only what the query itself caused; anything else is the database's failure.
            if isinstance(exc, pw.OperationalError) and not any(
                m in str(exc) for m in _FTS_QUERY_ERRORS
            ):
                raise
            raise InvalidArgument(
                f"the search query {query[:100]!r} is malformed: {exc} (use words, "
                '"a phrase", OR, NOT, prefix*)'
            ) from None
        return [
            SearchHit(int(r[0]), r[1], r[2], r[3], float(r[4]), r[5], float(r[6])) for r in rows
        ]

    def message(self, session_id: str, message_id: int) -> MessageRecord | None:
        row = MessageRow.get_or_none(
            (MessageRow.session == session_id) & (MessageRow.id == message_id)
        )
        return message_record(row) if row else None

    def last_reply(self, session_id: str, before: int = 2**62) -> MessageRecord | None:
        """The newest reply (before message `before`) a fork can continue from: one the CLI's
        uuid is known of, still part of the conversation."""
        row = (
            MessageRow.select()
            .where(
                (MessageRow.session == session_id)
                & (MessageRow.role == "assistant")
                & (MessageRow.agent_uuid != "")
                & (MessageRow.rolled_back_at == 0)
                & (MessageRow.id < before)
            )
            .order_by(MessageRow.id.desc())
            .first()
        )
        return message_record(row) if row else None

    def find_turn_by_request(self, session_id: str, request_id: str) -> list[MessageRecord]:
        q = MessageRow.select().where(
            (MessageRow.session == session_id) & (MessageRow.request_id == request_id)
        )
        user = q.first()
        if user is None:
            return []
        rows = MessageRow.select().where(
            (MessageRow.session == session_id) & (MessageRow.turn_id == user.turn_id)
        )
        return [message_record(r) for r in rows.order_by(MessageRow.id)]

    def unfinished_turns(self) -> dict[str, str]:
        """This host's turns whose user message has no reply yet: turn id -> session id."""
        rows = (
            MessageRow.select(MessageRow.turn_id, MessageRow.session)
            .join(SessionRow)
            .where(
                (MessageRow.status == "pending")
                & (MessageRow.origin != ASIDE)
                & self._own(SessionRow.host_id)
            )
        )
        return {row.turn_id: row.session_id for row in rows}

    def settle_unfinished_turns(
        self, keep: Collection[str] = (), replies: Mapping[str, str] | None = None
    ) -> list[tuple[str, str]]:
        """After a crash: user messages whose turn never ended become interrupted, each with an
        interrupted assistant record (its reply from `replies`, else its last checkpoint) so
        every user message has a terminal reply. Only this host's sessions: another host's
        pending turns may be running right now. `keep`: turns this daemon adopted with their
        agents (they go on)."""
        pending = list(
            MessageRow.select(MessageRow)
            .join(SessionRow)
            .where((MessageRow.status == "pending") & self._own(SessionRow.host_id))
            .order_by(MessageRow.id)
        )
        settled = []
        for row in pending:
            if row.turn_id in keep:
                continue
            if row.origin == ASIDE:  # a question aside the agent never answered
                self.add_aside_answer(
                    message_record(row), "", "interrupted", "the daemon stopped first"
                )
                continue
            partial = (replies or {}).get(row.turn_id)
            if partial is None:
                partial = self.checkpointed_reply(row.turn_id)
            self.finish_turn(
                row.session_id,
                row.turn_id,
                TurnOutcome(
                    status="interrupted",
                    text=partial,
                    detail="the daemon stopped mid-turn",
                    origin=row.origin,
                ),
            )
            settled.append((row.session_id, row.turn_id))
        return settled


def _aside_values(
    session_id: str, turn_id: str, role: str, text: str, status: str, detail: str, now: float
) -> dict[str, Any]:
    return {
        "session_id": session_id,
        "turn_id": turn_id,
        "role": role,
        "content": text,
        "status": status,
        "request_id": None,
        "tool_calls": "[]",
        "cost_usd": 0.0,
        "usage": "{}",
        "detail": detail,
        "created_at": now,
        "attachments": "[]",
        "agent_uuid": "",
        "origin": ASIDE,
        "structured_output": "",
        "rolled_back_at": 0,
    }


class RollbackStore(MessagesStore):
    """Messages taken out of the conversation by a rollback, and put back by its undo."""

    def roll_back(self, session_id: str, message_id: int) -> int:
        """Marks `message_id` and every later message of the conversation rolled back (to
        `message_id`); asides are never part of it. Returns how many."""
        return int(
            self._sql(
                "UPDATE messages SET rolled_back_at = ? WHERE session_id = ? AND id >= ? "
                "AND rolled_back_at = 0 AND origin != ?",
                (message_id, session_id, message_id, ASIDE),
            ).rowcount
        )

    def undo_roll_back(self, session_id: str, message_id: int) -> int:
        """Puts back the messages the rollback to `message_id` took out. Returns how many."""
        return int(
            self._sql(
                "UPDATE messages SET rolled_back_at = 0 "
                "WHERE session_id = ? AND rolled_back_at = ?",
                (session_id, message_id),
            ).rowcount
        )

    def add_imported(self, session_id: str, turns: Sequence[tuple[str, str, str]]) -> int:
        """A conversation imported from the CLI's transcript: (user text, reply, the reply's
        uuid) per turn, as finished turns of their own. Returns how many messages."""
        now = time.time()
        with self.db.atomic():
            for user, reply, reply_uuid in turns:
                turn_id = f"import-{secrets.token_hex(8)}"
                for role, text, uuid in (("user", user, ""), ("assistant", reply, reply_uuid)):
                    values = _aside_values(session_id, turn_id, role, text, "complete", "", now)
                    values["origin"] = "client"
                    values["agent_uuid"] = uuid
                    self._insert_message(values)
            self._sql(
                "UPDATE messages SET detail = 'imported' WHERE session_id = ? AND turn_id LIKE ?",
                (session_id, "import-%"),
            )
            self._sql(
                "UPDATE sessions SET message_count = message_count + ? WHERE session_id = ?",
                (2 * len(turns), session_id),
            )
        return 2 * len(turns)


def _pending_question(
    message_id: int, session_id: str, turn_id: str, text: str, now: float, origin: str
) -> MessageRecord:
    """A user message just stored, its turn not ended yet."""
    return MessageRecord(
        message_id, session_id, turn_id, "user", text, "pending", None, [], 0.0, {}, "", now,
        origin=origin,
    )  # fmt: skip
