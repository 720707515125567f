"""Forward migrations of the schema: index i migrates from version i to i + 1. Append, never
edit."""

from __future__ import annotations

import hashlib
from collections.abc import Callable

import peewee as pw

from atomizerd.store.models import (
    AgentProcessRow,
    AttachmentBlobRow,
    AuditRow,
    MessageRow,
    NotifyDeliveryRow,
    PermissionPatternRow,
    PermissionRuleRow,
    SessionLabelRow,
    SessionRow,
    TaskRow,
    TurnCheckpointRow,
)


def _migrate_1(db: pw.Database) -> None:
    # A fresh database gets the current shape of these tables; later migrations only add
    # what an older database lacks.
    db.create_tables([SessionRow, MessageRow, AgentProcessRow])


def _migrate_2(db: pw.Database) -> None:
    """Governance: spending caps per session, the audit trail, remembered permission rules."""
    have = {c.name for c in db.get_columns("sessions")}
    for name in ("budget_usd", "turn_budget_usd"):
        if name not in have:
            # Plain ADD COLUMN: peewee's SQLite migrator may rebuild the table, and dropping
            # `sessions` would cascade to every message.
            db.execute_sql(  # type: ignore[no-untyped-call]
                f"ALTER TABLE sessions ADD COLUMN {name} DOUBLE PRECISION NOT NULL DEFAULT 0"
            )
    db.create_tables([AuditRow, PermissionRuleRow])


def _migrate_3(db: pw.Database) -> None:
    """A changed context survives a daemon restart until the model has been told."""
    if "context_stale" not in {c.name for c in db.get_columns("sessions")}:
        db.execute_sql(  # type: ignore[no-untyped-call]
            "ALTER TABLE sessions ADD COLUMN context_stale BOOLEAN NOT NULL DEFAULT FALSE"
        )


def _migrate_4(db: pw.Database) -> None:
    """Partial replies survive a crash."""
    db.create_tables([TurnCheckpointRow])


def _migrate_5(db: pw.Database) -> None:
    """Several hosts, one database: sessions and recorded agents name their host. Rows from
    before have none (''); the first daemon to open the database takes them (`Store`)."""
    if "host_id" not in {c.name for c in db.get_columns("sessions")}:
        db.execute_sql(  # type: ignore[no-untyped-call]
            "ALTER TABLE sessions ADD COLUMN host_id VARCHAR(255) NOT NULL DEFAULT ''"
        )
    db.execute_sql("CREATE INDEX IF NOT EXISTS sessions_host_id ON sessions (host_id)")  # type: ignore[no-untyped-call]
    if "host_id" not in {c.name for c in db.get_columns("agent_processes")}:
        # The key becomes (host_id, pgid): two hosts may have process groups of one number.
        # A new table, filled from the old (no other table refers to it), on both engines.
        for sql in (
            "CREATE TABLE agent_processes_v5 (host_id VARCHAR(255) NOT NULL DEFAULT '', "
            "pgid INTEGER NOT NULL, session_id VARCHAR(64) NOT NULL, start_time BIGINT NOT NULL, "
            "started_at DOUBLE PRECISION NOT NULL, PRIMARY KEY (host_id, pgid))",
            "INSERT INTO agent_processes_v5 (host_id, pgid, session_id, start_time, started_at) "
            "SELECT '', pgid, session_id, start_time, started_at FROM agent_processes",
            "DROP TABLE agent_processes",
            "ALTER TABLE agent_processes_v5 RENAME TO agent_processes",
        ):
            db.execute_sql(sql)  # type: ignore[no-untyped-call]


def _migrate_permission_patterns(db: pw.Database) -> None:
    """Rules a client allowed for the rest of a session (RespondToPermission's rule)."""
    db.create_tables([PermissionPatternRow])


def _migrate_session_model(db: pw.Database) -> None:
    """Each session has its model (CreateSession / SetModel)."""
    if "model" not in {c.name for c in db.get_columns("sessions")}:
        db.execute_sql(  # type: ignore[no-untyped-call]
            "ALTER TABLE sessions ADD COLUMN model VARCHAR(128) NOT NULL DEFAULT ''"
        )


def _migrate_session_context(db: pw.Database) -> None:
    """How full each session's context is (Session.context_tokens / context_window)."""
    have = {c.name for c in db.get_columns("sessions")}
    for name in ("context_tokens", "context_window"):
        if name not in have:
            db.execute_sql(  # type: ignore[no-untyped-call]
                f"ALTER TABLE sessions ADD COLUMN {name} BIGINT NOT NULL DEFAULT 0"
            )


def _migrate_attachments(db: pw.Database) -> None:
    """Files sent with messages: their records in the message, their bytes once per session."""
    if "attachments" not in {c.name for c in db.get_columns("messages")}:
        db.execute_sql(  # type: ignore[no-untyped-call]
            "ALTER TABLE messages ADD COLUMN attachments TEXT NOT NULL DEFAULT '[]'"
        )
    db.create_tables([AttachmentBlobRow])


def _migrate_forks(db: pw.Database) -> None:
    """Forked sessions (ForkSession) and the CLI's uuid of every reply."""
    have = {c.name for c in db.get_columns("sessions")}
    for name in ("forked_from", "fork_of", "fork_at"):
        if name not in have:
            db.execute_sql(  # type: ignore[no-untyped-call]
                f"ALTER TABLE sessions ADD COLUMN {name} VARCHAR(64) NOT NULL DEFAULT ''"
            )
    if "agent_uuid" not in {c.name for c in db.get_columns("messages")}:
        db.execute_sql(  # type: ignore[no-untyped-call]
            "ALTER TABLE messages ADD COLUMN agent_uuid VARCHAR(64) NOT NULL DEFAULT ''"
        )


def _migrate_checkpoint_pieces(db: pw.Database) -> None:
    """Reply checkpoints are stored in pieces (one row per checkpoint) instead of one row per
    turn rewritten whole. They only matter while a turn runs: the old table is replaced."""
    if "id" not in {c.name for c in db.get_columns("turn_checkpoints")}:
        db.drop_tables([TurnCheckpointRow])
        db.create_tables([TurnCheckpointRow])


def _migrate_pending_index(db: pw.Database) -> None:
    """Start-up recovery looks for turns left pending; a partial index makes that a lookup of
    the few pending rows instead of a scan of every message (both engines support it)."""
    db.execute_sql(  # type: ignore[no-untyped-call]
        "CREATE INDEX IF NOT EXISTS messages_pending ON messages (status) WHERE status = 'pending'"
    )


def _migrate_origin(db: pw.Database) -> None:
    """Turns the agent starts by itself (a task's end, a scheduled prompt) are stored with
    their origin; every earlier message was a client's."""
    if "origin" not in {c.name for c in db.get_columns("messages")}:
        db.execute_sql(  # type: ignore[no-untyped-call]
            "ALTER TABLE messages ADD COLUMN origin VARCHAR(16) NOT NULL DEFAULT 'client'"
        )
    db.create_tables([TaskRow])


def _migrate_labels_archive(db: pw.Database) -> None:
    """Session labels and the archive, and the indexes ListSessions' filters are served from:
    each filter with the listing's order (created_at, session_id) after it."""
    have = {c.name for c in db.get_columns("sessions")}
    if "labels" not in have:
        db.execute_sql("ALTER TABLE sessions ADD COLUMN labels TEXT NOT NULL DEFAULT '{}'")  # type: ignore[no-untyped-call]
    if "archived" not in have:
        db.execute_sql(  # type: ignore[no-untyped-call]
            "ALTER TABLE sessions ADD COLUMN archived BOOLEAN NOT NULL DEFAULT FALSE"
        )
    db.create_tables([SessionLabelRow])
    for sql in _SESSION_LIST_INDEXES:
        db.execute_sql(sql)  # type: ignore[no-untyped-call]


_SESSION_LIST_INDEXES = (
    "CREATE INDEX IF NOT EXISTS sessions_archived_created "
    "ON sessions (archived, created_at, session_id)",
    "CREATE INDEX IF NOT EXISTS sessions_study_created "
    "ON sessions (study_id, created_at, session_id)",
    "CREATE INDEX IF NOT EXISTS sessions_mode_created ON sessions (mode, created_at, session_id)",
    "CREATE INDEX IF NOT EXISTS sessions_host_created "
    "ON sessions (host_id, created_at, session_id)",
    "CREATE INDEX IF NOT EXISTS session_labels_pair ON session_labels (key, value, session_id)",
)

# Full-text search of messages (SearchMessages). SQLite: an FTS5 table over messages.content
# (external content: the text is stored once), kept in step by triggers, which run inside the
# transaction of the write. PostgreSQL: a GIN index of the content's tsvector (an expression
# index: PostgreSQL keeps it in step itself). Both: English stems. The PostgreSQL expression is
# the one the search query repeats, so it uses the index; it reads the first FTS_PG_CHARS of a
# message (a tsvector holds at most 1 MB).
FTS_PG_CHARS = 100_000
FTS_PG_VECTOR = f"to_tsvector('english'::regconfig, left(content, {FTS_PG_CHARS}))"
_SQLITE_FTS = (
    "CREATE VIRTUAL TABLE IF NOT EXISTS messages_fts USING fts5(content, content='messages', "
    "content_rowid='id', tokenize='porter unicode61')",
    "CREATE TRIGGER IF NOT EXISTS messages_fts_insert AFTER INSERT ON messages BEGIN "
    "INSERT INTO messages_fts (rowid, content) VALUES (new.id, new.content); END",
    "CREATE TRIGGER IF NOT EXISTS messages_fts_delete AFTER DELETE ON messages BEGIN "
    "INSERT INTO messages_fts (messages_fts, rowid, content) "
    "VALUES ('delete', old.id, old.content); END",
    "CREATE TRIGGER IF NOT EXISTS messages_fts_update AFTER UPDATE OF content ON messages BEGIN "
    "INSERT INTO messages_fts (messages_fts, rowid, content) "
    "VALUES ('delete', old.id, old.content); "
    "INSERT INTO messages_fts (rowid, content) VALUES (new.id, new.content); END",
    # Indexes every message stored before.
    "INSERT INTO messages_fts (messages_fts) VALUES ('rebuild')",
)


# SQLite's errors for a malformed FTS5 query (a column filter `word:` is one too).
_FTS_QUERY_ERRORS = (
    "fts5:",
    "no such column",
    "unterminated string",
    "unknown special query",
    "malformed MATCH",
)


def _migrate_search(db: pw.Database) -> None:
    """Full-text search of messages, built for every message already stored."""
    if isinstance(db, pw.PostgresqlDatabase):
        db.execute_sql(  # type: ignore[no-untyped-call]
            f"CREATE INDEX IF NOT EXISTS messages_fts ON messages USING GIN ({FTS_PG_VECTOR})"
        )
        return
    for sql in _SQLITE_FTS:
        db.execute_sql(sql)  # type: ignore[no-untyped-call]


def _migrate_notify_outbox(db: pw.Database) -> None:
    """Webhook deliveries waiting to be made survive a restart (atomizerd/notify/), read per
    host and endpoint in order (the index)."""
    db.create_tables([NotifyDeliveryRow])


def _migrate_conversation_control(db: pw.Database) -> None:
    """Conversation control: session titles, last known usage, the files the agent changed,
    rollbacks; structured answers kept with their reply."""
    have = {c.name for c in db.get_columns("sessions")}
    if "title" not in have:
        db.execute_sql(  # type: ignore[no-untyped-call]
            "ALTER TABLE sessions ADD COLUMN title VARCHAR(256) NOT NULL DEFAULT ''"
        )
    if "last_usage" not in have:
        db.execute_sql(  # type: ignore[no-untyped-call]
            "ALTER TABLE sessions ADD COLUMN last_usage TEXT NOT NULL DEFAULT '{}'"
        )
    if "agent_files" not in have:
        db.execute_sql(  # type: ignore[no-untyped-call]
            "ALTER TABLE sessions ADD COLUMN agent_files TEXT NOT NULL DEFAULT '{}'"
        )
    if "rollback_state" not in have:
        db.execute_sql("ALTER TABLE sessions ADD COLUMN rollback_state TEXT NOT NULL DEFAULT ''")  # type: ignore[no-untyped-call]
    have = {c.name for c in db.get_columns("messages")}
    if "structured_output" not in have:
        db.execute_sql(  # type: ignore[no-untyped-call]
            "ALTER TABLE messages ADD COLUMN structured_output TEXT NOT NULL DEFAULT ''"
        )
    if "rolled_back_at" not in have:
        db.execute_sql(  # type: ignore[no-untyped-call]
            "ALTER TABLE messages ADD COLUMN rolled_back_at BIGINT NOT NULL DEFAULT 0"
        )


def _migrate_session_plan(db: pw.Database) -> None:
    """The plan the agent works to (Session.plan)."""
    if "plan" not in {c.name for c in db.get_columns("sessions")}:
        db.execute_sql("ALTER TABLE sessions ADD COLUMN plan TEXT NOT NULL DEFAULT ''")  # type: ignore[no-untyped-call]


# Forward migrations: index i migrates from version i to i + 1. Append, never edit.
MIGRATIONS: list[Callable[[pw.Database], None]] = [
    _migrate_1,
    _migrate_2,
    _migrate_3,
    _migrate_4,
    _migrate_5,
    _migrate_permission_patterns,
    _migrate_checkpoint_pieces,
    _migrate_session_model,
    _migrate_session_context,
    _migrate_attachments,
    _migrate_forks,
    _migrate_pending_index,
    _migrate_origin,
    _migrate_labels_archive,
    _migrate_search,
    _migrate_notify_outbox,
    _migrate_conversation_control,
    _migrate_session_plan,
]
SCHEMA_VERSION = len(MIGRATIONS)

# Sequence numbers are reserved this many at a time: one write per block, not per event.
SEQ_BLOCK = 1024

# PostgreSQL: the transaction-level advisory lock that serialises migrations between daemons.
MIGRATION_LOCK_KEY = int.from_bytes(
    hashlib.blake2b(b"atomizerd: schema migration", digest_size=8).digest(), "big", signed=True
)
