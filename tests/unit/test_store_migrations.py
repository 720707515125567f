"""The store migrates databases of earlier schema versions forward without losing anything,
on SQLite and on PostgreSQL, from the same migration definitions."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import peewee as pw
import pytest

from atomizerd.model import AgentProcessRecord, TurnOutcome
from atomizerd.store.db import (
    MIGRATIONS,
    SCHEMA_VERSION,
    SchemaVersion,
    Store,
    _connect,
    _migrate_attachments,
    _migrate_checkpoint_pieces,
    _migrate_conversation_control,
    _migrate_forks,
    _migrate_labels_archive,
    _migrate_origin,
    _migrate_search,
    _migrate_session_context,
    _migrate_session_model,
    database_proxy,
)

V1_SCHEMA = """
CREATE TABLE schema_version (id INTEGER NOT NULL PRIMARY KEY, version INTEGER NOT NULL);
INSERT INTO schema_version (version) VALUES (1);
CREATE TABLE sessions (session_id VARCHAR(64) NOT NULL PRIMARY KEY, mode VARCHAR(16) NOT NULL,
  study_id VARCHAR(64), agent_session_id VARCHAR(64) NOT NULL, agent_started INTEGER NOT NULL,
  closed INTEGER NOT NULL, created_at REAL NOT NULL, last_active_at REAL NOT NULL,
  message_count INTEGER NOT NULL, total_cost_usd REAL NOT NULL, agent_cost_usd REAL NOT NULL,
  seq_reserved INTEGER NOT NULL);
CREATE TABLE messages (id INTEGER NOT NULL PRIMARY KEY, session_id VARCHAR(64) NOT NULL
  REFERENCES sessions (session_id) ON DELETE CASCADE, turn_id VARCHAR(64) NOT NULL,
  role VARCHAR(16) NOT NULL, content TEXT NOT NULL, status VARCHAR(16) NOT NULL,
  request_id VARCHAR(128), tool_calls TEXT NOT NULL, cost_usd REAL NOT NULL, usage TEXT NOT NULL,
  detail TEXT NOT NULL, created_at REAL NOT NULL);
CREATE TABLE agent_processes (pgid INTEGER NOT NULL PRIMARY KEY, session_id VARCHAR(64) NOT NULL,
  start_time INTEGER NOT NULL, started_at REAL NOT NULL);
INSERT INTO sessions VALUES ('old', 'user', NULL, '0b8f1c9e-7d5e-4b8a-9a53-1f0c7f6c2d11', 1, 0,
  1.0, 2.0, 2, 0.5, 0.5, 1024);
INSERT INTO messages VALUES (1, 'old', 't1', 'user', 'hello', 'complete', NULL, '[]', 0, '{}',
  '', 1.0);
"""


def test_a_version_1_database_is_migrated_forward(tmp_path: Path) -> None:
    path = tmp_path / "v1.db"
    with sqlite3.connect(path) as conn:
        conn.executescript(V1_SCHEMA)
    store = Store(f"sqlite:///{path}")
    try:
        assert store.schema_version() == SCHEMA_VERSION
        old = store.get_session("old")
        assert old is not None and old.message_count == 2 and old.budget_usd == 0.0
        assert [m.content for m in store.history("old", after_id=0, limit=10)] == ["hello"]
        store.remember_rule("old", "Bash", "d" * 64, True)
        assert store.find_rule("old", "Bash", "d" * 64) is True
    finally:
        store.close()


def test_a_database_from_a_newer_daemon_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "future.db"
    Store(f"sqlite:///{path}").close()
    with sqlite3.connect(path) as conn:
        conn.execute("UPDATE schema_version SET version = 99")
    with pytest.raises(RuntimeError, match="newer than this atomizerd"):
        Store(f"sqlite:///{path}")


# --- the previous schema versions, on both engines ----------------------------------------------


# What later migrations add, undone to recreate the shape a database of an earlier version
# really has (MIGRATIONS[0] creates today's tables, so running MIGRATIONS[:n] alone leaves them
# newer than version n).
def _undo_5(db: pw.Database) -> None:
    db.execute_sql("DROP INDEX IF EXISTS sessions_host_id")
    db.execute_sql("ALTER TABLE sessions DROP COLUMN host_id")
    db.execute_sql("DROP TABLE agent_processes")
    db.execute_sql(
        "CREATE TABLE agent_processes (pgid INTEGER NOT NULL PRIMARY KEY, "
        "session_id VARCHAR(64) NOT NULL, start_time BIGINT NOT NULL, "
        "started_at DOUBLE PRECISION NOT NULL)"
    )


def _undo_checkpoint_pieces(db: pw.Database) -> None:
    if "turn_checkpoints" not in db.get_tables():  # a version before the table existed
        return
    db.execute_sql("DROP TABLE turn_checkpoints")
    db.execute_sql(
        "CREATE TABLE turn_checkpoints (session_id VARCHAR(64) NOT NULL REFERENCES sessions "
        "(session_id) ON DELETE CASCADE, turn_id VARCHAR(64) NOT NULL PRIMARY KEY, "
        "content TEXT NOT NULL, updated_at DOUBLE PRECISION NOT NULL)"
    )


# By the migration that added it (versions 3 and 4 added nothing to the first three tables).
UNDO = {
    5: _undo_5,
    MIGRATIONS.index(_migrate_checkpoint_pieces) + 1: _undo_checkpoint_pieces,
}


def _undo_session_model(db: pw.Database) -> None:
    db.execute_sql("ALTER TABLE sessions DROP COLUMN model")


UNDO[MIGRATIONS.index(_migrate_session_model) + 1] = _undo_session_model


def _undo_session_context(db: pw.Database) -> None:
    db.execute_sql("ALTER TABLE sessions DROP COLUMN context_tokens")
    db.execute_sql("ALTER TABLE sessions DROP COLUMN context_window")


UNDO[MIGRATIONS.index(_migrate_session_context) + 1] = _undo_session_context


def _undo_attachments(db: pw.Database) -> None:
    db.execute_sql("ALTER TABLE messages DROP COLUMN attachments")


UNDO[MIGRATIONS.index(_migrate_attachments) + 1] = _undo_attachments


def _undo_forks(db: pw.Database) -> None:
    for column in ("forked_from", "fork_of", "fork_at"):
        db.execute_sql(f"ALTER TABLE sessions DROP COLUMN {column}")
    db.execute_sql("ALTER TABLE messages DROP COLUMN agent_uuid")


UNDO[MIGRATIONS.index(_migrate_forks) + 1] = _undo_forks


def _undo_origin(db: pw.Database) -> None:
    db.execute_sql("ALTER TABLE messages DROP COLUMN origin")


UNDO[MIGRATIONS.index(_migrate_origin) + 1] = _undo_origin


def _undo_labels_archive(db: pw.Database) -> None:
    for index in (
        "sessions_archived_created",
        "sessions_study_created",
        "sessions_mode_created",
        "sessions_host_created",
    ):
        db.execute_sql(f"DROP INDEX IF EXISTS {index}")
    db.execute_sql("DROP TABLE IF EXISTS session_labels")
    db.execute_sql("ALTER TABLE sessions DROP COLUMN labels")
    db.execute_sql("ALTER TABLE sessions DROP COLUMN archived")


UNDO[MIGRATIONS.index(_migrate_labels_archive) + 1] = _undo_labels_archive


def _undo_search(db: pw.Database) -> None:
    if isinstance(db, pw.PostgresqlDatabase):
        db.execute_sql("DROP INDEX IF EXISTS messages_fts")
        return
    for trigger in ("insert", "delete", "update"):
        db.execute_sql(f"DROP TRIGGER IF EXISTS messages_fts_{trigger}")
    db.execute_sql("DROP TABLE IF EXISTS messages_fts")


UNDO[MIGRATIONS.index(_migrate_search) + 1] = _undo_search


def _undo_conversation_control(db: pw.Database) -> None:
    for column in ("title", "last_usage", "agent_files", "rollback_state"):
        db.execute_sql(f"ALTER TABLE sessions DROP COLUMN {column}")
    for column in ("structured_output", "rolled_back_at"):
        db.execute_sql(f"ALTER TABLE messages DROP COLUMN {column}")


UNDO[MIGRATIONS.index(_migrate_conversation_control) + 1] = _undo_conversation_control


def make_version(url: str, version: int) -> None:
    """A database as a daemon of schema `version` left it, holding a session with a finished
    turn, a turn cut off by a crash and a recorded agent."""
    db = _connect(url)
    database_proxy.initialize(db)
    db.connect()
    try:
        with db.atomic():
            db.create_tables([SchemaVersion])
            for step in MIGRATIONS[:version]:
                step(db)
            for later in sorted(UNDO, reverse=True):
                if later > version:
                    UNDO[later](db)
            SchemaVersion.create(version=version)
            # A daemon of version 5 or later names the host of every session and agent.
            host_col, host_val = (", host_id", ", ''") if version >= 5 else ("", "")
            # And later ones the session's model (a column without a default in today's table).
            session_col, session_val = host_col, host_val
            if version > MIGRATIONS.index(_migrate_session_model):
                session_col, session_val = session_col + ", model", session_val + ", ''"
            if version > MIGRATIONS.index(_migrate_session_context):
                session_col += ", context_tokens, context_window"
                session_val += ", 0, 0"
            if version > MIGRATIONS.index(_migrate_forks):
                session_col += ", forked_from, fork_of, fork_at"
                session_val += ", '', '', ''"
            if version > MIGRATIONS.index(_migrate_labels_archive):
                session_col += ", labels, archived"
                session_val += ", '{}', FALSE"
            message_col = message_val = ""
            if version > MIGRATIONS.index(_migrate_attachments):
                message_col, message_val = ", attachments", ", '[]'"
            if version > MIGRATIONS.index(_migrate_forks):
                message_col, message_val = message_col + ", agent_uuid", message_val + ", ''"
            if version > MIGRATIONS.index(_migrate_origin):
                message_col, message_val = message_col + ", origin", message_val + ", 'client'"
            for sql, params in [
                (
                    "INSERT INTO sessions (session_id, mode, study_id, agent_session_id, "
                    "agent_started, closed, created_at, last_active_at, message_count, "
                    "total_cost_usd, agent_cost_usd, seq_reserved, budget_usd, turn_budget_usd, "
                    f"context_stale{session_col}) VALUES (?, 'user', NULL, 'agent-old', ?, ?, "
                    f"1.0, 2.0, 3, 0.5, 0.5, 1024, 0, 0, ?{session_val})",
                    ("old", True, False, False),
                ),
                (
                    "INSERT INTO messages (session_id, turn_id, role, content, status, "
                    f"request_id, tool_calls, cost_usd, usage, detail, created_at{message_col}) "
                    f"VALUES ('old', ?, ?, ?, ?, NULL, '[]', 0, '{{}}', '', 1.0{message_val})",
                    ("t1", "user", "hello", "complete"),
                ),
                (
                    "INSERT INTO messages (session_id, turn_id, role, content, status, "
                    f"request_id, tool_calls, cost_usd, usage, detail, created_at{message_col}) "
                    f"VALUES ('old', ?, ?, ?, ?, NULL, '[]', 0, '{{}}', '', 1.0{message_val})",
                    ("t1", "assistant", "hi", "complete"),
                ),
                (
                    "INSERT INTO messages (session_id, turn_id, role, content, status, "
                    f"request_id, tool_calls, cost_usd, usage, detail, created_at{message_col}) "
                    f"VALUES ('old', ?, ?, ?, ?, NULL, '[]', 0, '{{}}', '', 1.0{message_val})",
                    ("t2", "user", "cut off", "pending"),
                ),
                (
                    f"INSERT INTO agent_processes (pgid, session_id, start_time, started_at"
                    f"{host_col}) VALUES (?, 'old', ?, 1.0{host_val})",
                    (4242, 99),
                ),
            ]:
                db.execute_sql(sql.replace("?", db.param), params)
        columns = {c.name for c in db.get_columns("sessions")}
        assert ("host_id" in columns) == (version >= 5)
    finally:
        db.close()


@pytest.mark.parametrize("version", sorted({3, 4, SCHEMA_VERSION - 1}))
def test_a_database_of_an_earlier_version_is_migrated_on_each_engine(
    store_url: str, version: int
) -> None:
    make_version(store_url, version)
    store = Store(store_url, host_id="host-a")
    try:
        assert store.schema_version() == SCHEMA_VERSION
        old = store.get_session("old")
        assert old is not None
        assert (old.message_count, old.total_cost_usd, old.seq_reserved) == (3, 0.5, 1024)
        assert old.agent_started and not old.closed
        # Rows from before hosts were recorded: taken by the first daemon that opens them.
        assert old.host_id == "host-a"
        assert [(p.pgid, p.start_time) for p in store.agent_processes()] == [(4242, 99)]
        assert [m.content for m in store.history("old", after_id=0, limit=10)] == [
            "hello",
            "hi",
            "cut off",
        ]
        # Messages stored before search existed are found (the migration indexed them).
        assert [h.message_id for h in store.search_messages("hello", limit=5)] == [
            store.history("old", after_id=0, limit=1)[0].message_id
        ]
        assert not store.get_session("old").archived  # type: ignore[union-attr]
        # The crash recovery works on what was migrated; new writes take the new columns.
        assert store.settle_unfinished_turns() == [("old", "t2")]
        store.checkpoint_reply("old", "t3", "partial")
        store.add_user_message("old", "t3", "again", "r3")
        _, session = store.finish_turn("old", "t3", TurnOutcome("complete", "ok", cost_usd=0.25))
        assert session.message_count == 6 and session.total_cost_usd == 0.75
        store.remember_rule("old", "Bash", "d" * 64, True)
        assert store.find_rule("old", "Bash", "d" * 64) is True
        store.record_agent_process(AgentProcessRecord(4242, "old", 100))
        assert [p.start_time for p in store.agent_processes()] == [100]
    finally:
        store.close()
    # Opened again: nothing left to migrate, nothing changed.
    again = Store(store_url, host_id="host-b")
    try:
        assert again.schema_version() == SCHEMA_VERSION
        assert again.get_session("old").host_id == "host-a"  # type: ignore[union-attr]
    finally:
        again.close()
