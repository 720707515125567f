"""Durable state with peewee: sessions, their messages, and the agent processes we started.

SQLite by default (WAL, foreign keys on, synchronous=NORMAL: a committed turn survives a
daemon crash); any peewee database URL works. The schema carries a version and forward
migrations run at open. Calls are synchronous and short; the registry batches them so no
write happens per text delta.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import time
from collections.abc import Callable, Collection, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import peewee as pw
import structlog

from atomizerd.errors import InvalidArgument
from atomizerd.store import diskfull
from atomizerd.store.diskfull import ReportsFullDisk, reporting_full_disk, without_password
from atomizerd.store.lock import DatabaseLock, _AdvisoryLock, lock_database
from atomizerd.store.outage import ReportsOutage, SqliteOutage

log = structlog.get_logger("atomizerd.store.db")

database_proxy = pw.DatabaseProxy()


class _Model(pw.Model):
    class Meta:
        database = database_proxy
        legacy_table_names = False


class SchemaVersion(_Model):
    version = pw.IntegerField()


class SessionRow(_Model):
    session_id = pw.CharField(primary_key=True, max_length=64)
    mode = pw.CharField(max_length=16)
    study_id = pw.CharField(max_length=64, null=True, index=True)
    agent_session_id = pw.CharField(max_length=64)
    # False until an agent process has been started with --session-id; later spawns --resume.
    agent_started = pw.BooleanField(default=False)
    closed = pw.BooleanField(default=False, index=True)
    created_at = pw.DoubleField()
    last_active_at = pw.DoubleField(index=True)
    message_count = pw.IntegerField(default=0)
    total_cost_usd = pw.DoubleField(default=0.0)
    # The CLI reports a conversation's cost cumulatively (also across --resume); a turn's own
    # cost is the difference from the last report.
    agent_cost_usd = pw.DoubleField(default=0.0)
    # High-water mark of event sequence numbers handed out (reserved in blocks), so numbers
    # stay increasing across daemon restarts and crashes.
    seq_reserved = pw.BigIntegerField(default=0)
    budget_usd = pw.DoubleField(default=0.0)  # 0: no cap
    turn_budget_usd = pw.DoubleField(default=0.0)
    # The study or mode changed after the conversation began: the CLI keeps the first system
    # prompt on --resume, so the next message must carry the new context.
    context_stale = pw.BooleanField(default=False)
    # The daemon that serves the session's turns (`daemon.host_id`): a fleet of daemons,
    # one per host, shares one database; each runs only its own sessions' agents.
    host_id = pw.CharField(max_length=255, default="", index=True)
    # The model the session's agents run (--model / set_model); "": the daemon's default.
    model = pw.CharField(max_length=128, default="")
    # How full the conversation's context was at the last turn's end, and the model's window.
    context_tokens = pw.BigIntegerField(default=0)
    context_window = pw.BigIntegerField(default=0)
    # A fork (ForkSession): the session it was forked from, and until its first agent has
    # started, the conversation to fork (--resume=<fork_of> --fork-session) and where
    # (--resume-session-at=<fork_at>, the CLI's uuid of the last reply it keeps).
    forked_from = pw.CharField(max_length=64, default="")
    fork_of = pw.CharField(max_length=64, default="")
    fork_at = pw.CharField(max_length=64, default="")
    # The session's labels as a JSON object (read with the session); session_labels holds the
    # same pairs one per row, for ListSessions' and SearchMessages' label filters.
    labels = pw.TextField(default="{}")
    # Archived (ArchiveSession): hidden from ListSessions unless asked for, spared by the purge.
    archived = pw.BooleanField(default=False)

    class Meta:
        table_name = "sessions"
        indexes = ((("created_at", "session_id"), False),)


class MessageRow(_Model):
    id = pw.BigAutoField()
    session = pw.ForeignKeyField(SessionRow, on_delete="CASCADE", backref="messages")
    session_id: str  # peewee's accessor for the foreign key's raw value
    turn_id = pw.CharField(max_length=64, index=True)
    role = pw.CharField(max_length=16)
    content = pw.TextField()
    status = pw.CharField(max_length=16)
    request_id = pw.CharField(max_length=128, null=True)
    tool_calls = pw.TextField(default="[]")
    cost_usd = pw.DoubleField(default=0.0)
    usage = pw.TextField(default="{}")
    detail = pw.TextField(default="")
    created_at = pw.DoubleField()
    # The files sent with a user message: [{name, media_type, size, sha256}] (bytes in
    # attachment_blobs).
    attachments = pw.TextField(default="[]")
    # Assistant messages: the CLI's uuid of the reply's last line (ForkSession's at_message_id).
    agent_uuid = pw.CharField(max_length=64, default="")
    # Who started the message's turn: client | task | scheduled | agent (events.TurnOrigin).
    origin = pw.CharField(max_length=16, default="client")

    class Meta:
        table_name = "messages"
        indexes = ((("session", "request_id"), False),)


class AttachmentBlobRow(_Model):
    """The bytes of the files sent in a session, once per content (sha256) and session: purged
    with the session, never shared with another one."""

    session = pw.ForeignKeyField(SessionRow, on_delete="CASCADE", backref="blobs")
    sha256 = pw.CharField(max_length=64)
    name = pw.CharField(max_length=255)  # as first sent
    media_type = pw.CharField(max_length=64)
    size = pw.BigIntegerField()
    data = pw.BlobField()
    created_at = pw.DoubleField()

    class Meta:
        table_name = "attachment_blobs"
        primary_key = pw.CompositeKey("session", "sha256")


class AgentProcessRow(_Model):
    """Agent processes a daemon started and has not yet seen exit (for the crash sweep), by
    host: process group ids are per machine."""

    host_id = pw.CharField(max_length=255, default="")
    pgid = pw.IntegerField()
    session_id = pw.CharField(max_length=64)
    start_time = pw.BigIntegerField()  # /proc/<pid>/stat starttime: tells a reused pid apart
    started_at = pw.DoubleField()

    class Meta:
        table_name = "agent_processes"
        primary_key = pw.CompositeKey("host_id", "pgid")


class AuditRow(_Model):
    """Who allowed what: permission outcomes and mode switches, purged with the session."""

    id = pw.BigAutoField()
    session = pw.ForeignKeyField(SessionRow, on_delete="CASCADE", backref="audit")
    session_id: str
    turn_id = pw.CharField(max_length=64, default="")
    time = pw.DoubleField()
    kind = pw.CharField(max_length=16)  # "permission" | "mode_switch"
    tool_name = pw.CharField(max_length=256, default="")
    input_digest = pw.CharField(max_length=64, default="")
    allow = pw.BooleanField(default=False)
    decider = pw.CharField(max_length=16, default="")  # client|rule|timeout|policy|mode
    detail = pw.TextField(default="")

    class Meta:
        table_name = "audit_events"


class PermissionRuleRow(_Model):
    """A remembered answer: the same tool with the same input, for the rest of the session."""

    session = pw.ForeignKeyField(SessionRow, on_delete="CASCADE", backref="rules")
    tool_name = pw.CharField(max_length=256)
    input_digest = pw.CharField(max_length=64)
    allow = pw.BooleanField()

    class Meta:
        table_name = "permission_rules"
        primary_key = pw.CompositeKey("session", "tool_name", "input_digest")


class PermissionPatternRow(_Model):
    """A rule a client allowed for the rest of the session (Claude Code's syntax, `Tool` or
    `Tool(content)`): every later agent of the session gets it on --allowedTools."""

    session = pw.ForeignKeyField(SessionRow, on_delete="CASCADE", backref="patterns")
    rule = pw.CharField(max_length=256)
    created_at = pw.DoubleField()

    class Meta:
        table_name = "permission_patterns"
        primary_key = pw.CompositeKey("session", "rule")


class TaskRow(_Model):
    """A task an agent runs on its own (sessions/tasks.py) while it runs: a daemon that adopts
    the agent after a restart knows it is busy and with what."""

    session = pw.ForeignKeyField(SessionRow, on_delete="CASCADE", backref="tasks")
    session_id: str  # peewee's accessor for the foreign key's raw value
    task_id = pw.CharField(max_length=64)
    tool_use_id = pw.CharField(max_length=128, default="")
    kind = pw.CharField(max_length=16)
    description = pw.TextField(default="")
    background = pw.BooleanField(default=True)
    started_at = pw.DoubleField()
    output_file = pw.TextField(default="")

    class Meta:
        table_name = "tasks"
        primary_key = pw.CompositeKey("session", "task_id")


class SessionLabelRow(_Model):
    """One label of a session (SessionRow.labels has them all), purged with the session."""

    session = pw.ForeignKeyField(SessionRow, on_delete="CASCADE", backref="label_rows")
    session_id: str
    key = pw.CharField(max_length=320)
    value = pw.CharField(max_length=256)

    class Meta:
        table_name = "session_labels"
        primary_key = pw.CompositeKey("session", "key")


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


class TurnCheckpointRow(_Model):
    """What a running turn's reply has said so far, stored every few hundred milliseconds as
    the text added since the last checkpoint (rows in id order make the reply: a long reply is
    never rewritten whole): a turn cut off by a crash is settled with it instead of nothing."""

    id = pw.BigAutoField()
    session = pw.ForeignKeyField(SessionRow, on_delete="CASCADE", backref="checkpoints")
    turn_id = pw.CharField(max_length=64, index=True)
    content = pw.TextField()
    updated_at = pw.DoubleField()

    class Meta:
        table_name = "turn_checkpoints"


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
]
SCHEMA_VERSION = len(MIGRATIONS)

# Sequence numbers are reserved this many at a time: one write per block, not per event.
SEQ_BLOCK = 1024

# PostgreSQL: the transaction-level advisory lock that serialises migrations between daemons.
MIGRATION_LOCK_KEY = int.from_bytes(
    hashlib.blake2b(b"atomizerd: schema migration", digest_size=8).digest(), "big", signed=True
)
# The URL schemes whose peewee class takes `prefer_psycopg3`.
_PSYCOPG_SCHEMES = frozenset({"postgres", "postgresql", "postgres+pool", "postgresql+pool"})


# --- domain records ---------------------------------------------------------------------------


@dataclass
class SessionRecord:
    session_id: str
    mode: str
    study_id: str | None
    agent_session_id: str
    agent_started: bool
    closed: bool
    created_at: float
    last_active_at: float
    message_count: int
    total_cost_usd: float
    agent_cost_usd: float
    seq_reserved: int
    budget_usd: float = 0.0
    turn_budget_usd: float = 0.0
    context_stale: bool = False
    host_id: str = ""
    model: str = ""
    context_tokens: int = 0
    context_window: int = 0
    forked_from: str = ""
    fork_of: str = ""
    fork_at: str = ""
    labels: str = "{}"  # JSON object: label_map() has it as a dict
    archived: bool = False

    def label_map(self) -> dict[str, str]:
        return dict(json.loads(self.labels or "{}"))

    @classmethod
    def from_row(cls, row: SessionRow) -> SessionRecord:
        return cls(**{name: getattr(row, name) for name in _SESSION_FIELDS})

    @classmethod
    def from_tuple(cls, row: tuple[Any, ...]) -> SessionRecord:
        """From a plain-SQL row of `SESSION_COLUMNS` (SQLite gives booleans as 0/1)."""
        values = dict(zip(_SESSION_FIELDS, row, strict=True))
        for name in _SESSION_BOOLS:
            values[name] = bool(values[name])
        return cls(**values)


# The record's fields are the sessions table's columns: one list, derived, never copied.
_SESSION_FIELDS = tuple(f.name for f in dataclasses.fields(SessionRecord))
_SESSION_BOOLS = tuple(f.name for f in dataclasses.fields(SessionRecord) if f.type == "bool")
SESSION_COLUMNS = ", ".join(_SESSION_FIELDS)


@dataclass
class ToolCallRecord:
    id: str
    name: str
    input_json: str
    result: str = ""
    is_error: bool = False


@dataclass
class MessageRecord:
    message_id: int
    session_id: str
    turn_id: str
    role: str  # "user" | "assistant"
    content: str
    status: str  # "pending" | "complete" | "interrupted" | "failed"
    request_id: str | None
    tool_calls: list[ToolCallRecord]
    cost_usd: float
    usage: dict[str, int]
    detail: str
    created_at: float
    attachments: list[AttachmentRecord] = field(default_factory=list)
    agent_uuid: str = ""
    origin: str = "client"

    @classmethod
    def from_row(cls, row: MessageRow) -> MessageRecord:
        return cls(
            message_id=row.id,
            session_id=row.session_id,
            turn_id=row.turn_id,
            role=row.role,
            content=row.content,
            status=row.status,
            request_id=row.request_id,
            tool_calls=[ToolCallRecord(**tc) for tc in json.loads(row.tool_calls)],
            cost_usd=row.cost_usd,
            usage=json.loads(row.usage),
            detail=row.detail,
            created_at=row.created_at,
            attachments=[AttachmentRecord(**a) for a in json.loads(row.attachments)],
            agent_uuid=row.agent_uuid,
            origin=row.origin,
        )


@dataclass
class AttachmentRecord:
    """A file sent with a user message, as the history keeps it."""

    name: str
    media_type: str
    size: int
    sha256: str


@dataclass
class StoredAttachment:
    """A file to store with a user message: its record and its bytes."""

    record: AttachmentRecord
    data: bytes


@dataclass
class TurnOutcome:
    """Everything written when a turn ends, in one transaction."""

    status: str  # "complete" | "interrupted" | "failed"
    text: str
    tool_calls: list[ToolCallRecord] = field(default_factory=list)
    cost_usd: float = 0.0
    usage: dict[str, int] = field(default_factory=dict)
    detail: str = ""
    # How full the conversation's context is now, and its window (None: not reported).
    context_tokens: int | None = None
    context_window: int | None = None
    agent_uuid: str = ""  # the CLI's uuid of the reply's last line
    origin: str = "client"  # who started the turn (events.TurnOrigin's value)


@dataclass
class AuditRecord:
    session_id: str
    kind: str
    allow: bool
    decider: str
    tool_name: str = ""
    input_digest: str = ""
    detail: str = ""
    turn_id: str = ""
    time: float = field(default_factory=time.time)
    audit_id: int = 0

    @classmethod
    def from_row(cls, row: AuditRow) -> AuditRecord:
        return cls(
            session_id=row.session_id,
            kind=row.kind,
            allow=row.allow,
            decider=row.decider,
            tool_name=row.tool_name,
            input_digest=row.input_digest,
            detail=row.detail,
            turn_id=row.turn_id,
            time=row.time,
            audit_id=row.id,
        )


@dataclass
class AgentProcessRecord:
    pgid: int
    session_id: str
    start_time: int


@dataclass
class SessionFilter:
    """ListSessions' filters beyond study, state and host; every one set must hold."""

    labels: Mapping[str, str] = field(default_factory=dict)
    mode: str | None = None
    archived: bool | None = False  # None: archived or not
    created_after: float | None = None
    created_before: float | None = None
    active_after: float | None = None
    active_before: float | None = None

    def conditions(self) -> list[Any]:
        c: list[Any] = []
        if self.archived is not None:
            c.append(SessionRow.archived == self.archived)
        if self.mode is not None:
            c.append(SessionRow.mode == self.mode)
        if self.created_after is not None:
            c.append(SessionRow.created_at >= self.created_after)
        if self.created_before is not None:
            c.append(SessionRow.created_at < self.created_before)
        if self.active_after is not None:
            c.append(SessionRow.last_active_at >= self.active_after)
        if self.active_before is not None:
            c.append(SessionRow.last_active_at < self.active_before)
        c.extend(SessionRow.session_id.in_(_labelled(k, v)) for k, v in self.labels.items())
        return c


def _labelled(key: str, value: str) -> Any:
    """The ids of the sessions carrying the label (served by the index session_labels_pair)."""
    return SessionLabelRow.select(SessionLabelRow.session).where(
        (SessionLabelRow.key == key) & (SessionLabelRow.value == value)
    )


@dataclass
class SearchHit:
    """A message that matches a search."""

    message_id: int
    session_id: str
    turn_id: str
    role: str
    created_at: float
    snippet: str
    score: float  # higher is better


# --- the store --------------------------------------------------------------------------------


class Store:
    def __init__(self, url: str, *, exclusive: bool = False, host_id: str | None = None) -> None:
        """`exclusive`: the daemon's store. No other daemon may use this database meanwhile
        (`atomizerd.store.lock`; with PostgreSQL: no other daemon of the same `host_id`);
        taken before the database is opened or migrated, and DatabaseInUse if another one has
        it. A full disk makes every write raise StorageFull (`atomizerd.store.diskfull`).

        `host_id`: the daemon's host. Sessions it creates and agents it records carry it; what
        concerns one host's daemon (the crash sweep, unfinished turns, the retention purge,
        the session limit, its status counts) reads only its host's rows, while sessions,
        histories and audit trails of every host stay readable. Rows with no host yet (made
        before hosts were recorded) are taken by the first daemon that opens the database.
        None (tools, tests): no host, every row."""
        self.url = url
        self.host_id = host_id
        self.db: pw.Database = _connect(url)
        self._lock: DatabaseLock | None = None
        try:
            if exclusive:
                self._lock = lock_database(self.db, without_password(url), host_id or "")
                if isinstance(self._lock, _AdvisoryLock) and isinstance(self.db, ReportsOutage):
                    # The lock lives as long as this thread's connection: a new one after
                    # an outage takes it again (atomizerd.store.outage).
                    self.db.keep_lock(self._lock.retake)
            database_proxy.initialize(self.db)
            self.db.connect(reuse_if_open=True)
            self._migrate()
            if host_id:
                self._adopt_unowned(host_id)
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        if not self.db.is_closed():
            self.db.close()
        if self._lock is not None:  # after the close: its final checkpoint is still ours
            self._lock.release()
            self._lock = None

    # availability (atomizerd.store.outage)

    @property
    def outages(self) -> ReportsOutage | None:
        """The database's outage handling (None: a database class without it)."""
        return self.db if isinstance(self.db, ReportsOutage) else None

    @contextmanager
    def atomic(self) -> Iterator[None]:
        with self.db.atomic():
            yield

    # schema

    def schema_version(self) -> int:
        row = SchemaVersion.select().first()
        return int(row.version) if row else 0

    def _migrate(self) -> None:
        with self.db.atomic():
            if isinstance(self.db, pw.PostgresqlDatabase):
                # Daemons of several hosts may start at once: one migrates, the others wait
                # for its commit and then find the schema current (the lock ends with the
                # transaction).
                self._sql("SELECT pg_advisory_xact_lock(?)", (MIGRATION_LOCK_KEY,))
            self.db.create_tables([SchemaVersion])
            current = self.schema_version()
            if current > SCHEMA_VERSION:
                raise RuntimeError(
                    f"the database schema is version {current}, newer than this atomizerd "
                    f"understands ({SCHEMA_VERSION}); upgrade atomizerd"
                )
            if current == SCHEMA_VERSION:
                return  # an ordinary start writes nothing (so a nearly full disk does not stop it)
            for step in MIGRATIONS[current:]:
                step(self.db)
            SchemaVersion.delete().execute()
            SchemaVersion.create(version=SCHEMA_VERSION)

    def _adopt_unowned(self, host_id: str) -> None:
        """Sessions and recorded agents without a host (from before hosts were recorded, or
        from a tool) become this host's: once, at the first open by a daemon. Looked for
        first, so an ordinary start writes nothing. With several hosts starting at once each
        row goes to exactly one of them (the UPDATE re-checks the row it waited for)."""
        unowned = self._sql(
            "SELECT EXISTS (SELECT 1 FROM sessions WHERE host_id = ?) "
            "OR EXISTS (SELECT 1 FROM agent_processes WHERE host_id = ?)",
            ("", ""),
        ).fetchone()[0]
        if not unowned:
            return
        with self.db.atomic():
            taken = self._sql(
                "UPDATE sessions SET host_id = ? WHERE host_id = ?", (host_id, "")
            ).rowcount
            self._sql("UPDATE agent_processes SET host_id = ? WHERE host_id = ?", (host_id, ""))
        log.info("sessions without a host taken by this one", host_id=host_id, sessions=taken)

    def _own(self, column: Any) -> Any:
        """A condition: the row is this host's (always true for a store without a host)."""
        return pw.SQL("1 = 1") if self.host_id is None else (column == self.host_id)

    # sessions

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
        return SessionRecord.from_row(row) if row else None

    def update_session(self, session_id: str, **fields: Any) -> SessionRecord | None:
        """Writes `fields` and returns the session as stored now (None: it does not exist)."""
        with self.db.atomic():
            SessionRow.update(**fields).where(SessionRow.session_id == session_id).execute()
            return self._session_now(session_id)

    def _session_now(self, session_id: str) -> SessionRecord | None:
        """The session's row as a record, read with plain SQL (it follows every turn write)."""
        row = self._sql(
            f"SELECT {SESSION_COLUMNS} FROM sessions WHERE session_id = ?", (session_id,)
        ).fetchone()
        return SessionRecord.from_tuple(tuple(row)) if row else None

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
        conditions = f.conditions()
        if conditions:
            q = q.where(*conditions)
        q = q.order_by(SessionRow.created_at.desc(), SessionRow.session_id.desc()).limit(limit)
        return [SessionRecord.from_row(r) for r in q]

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
            MessageRow.delete().where(MessageRow.session == session_id).execute()
            TurnCheckpointRow.delete().where(TurnCheckpointRow.session == session_id).execute()
            AuditRow.delete().where(AuditRow.session == session_id).execute()
            PermissionRuleRow.delete().where(PermissionRuleRow.session == session_id).execute()
            AttachmentBlobRow.delete().where(AttachmentBlobRow.session == session_id).execute()
            TaskRow.delete().where(TaskRow.session == session_id).execute()
            PermissionPatternRow.delete().where(
                PermissionPatternRow.session == session_id
            ).execute()
            SessionLabelRow.delete().where(SessionLabelRow.session == session_id).execute()
            SessionRow.delete().where(SessionRow.session_id == session_id).execute()

    # messages

    # The two writes of every turn are plain parameterised SQL: they sit on the path to the
    # first text, and building them through peewee's query objects costs more than SQLite.

    def _sql(self, sql: str, params: tuple[Any, ...]) -> Any:
        return self.db.execute_sql(sql.replace("?", self.db.param), params)  # type: ignore[no-untyped-call]

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
        return MessageRecord(
            message_id,
            session_id,
            turn_id,
            "user",
            text,
            "pending",
            request_id,
            [],
            0.0,
            {},
            detail,
            now,
            records,
            origin=origin,
        ), session

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
                "context_window = COALESCE(?, context_window) WHERE session_id = ?",
                (
                    outcome.cost_usd,
                    now,
                    agent_cost_usd,
                    outcome.context_tokens,
                    outcome.context_window,
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

    def history(self, session_id: str, *, after_id: int, limit: int) -> list[MessageRecord]:
        q = (
            MessageRow.select()
            .where((MessageRow.session == session_id) & (MessageRow.id > after_id))
            .order_by(MessageRow.id)
            .limit(limit)
        )
        return [MessageRecord.from_row(r) for r in q]

    def recent_messages(self, session_id: str, limit: int) -> list[MessageRecord]:
        q = (
            MessageRow.select()
            .where(MessageRow.session == session_id)
            .order_by(MessageRow.id.desc())
            .limit(limit)
        )
        return [MessageRecord.from_row(r) for r in reversed(list(q))]

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
            sql = (
                "SELECT m.id, m.session_id, m.turn_id, m.role, m.created_at, "
                "snippet(messages_fts, 0, '[', ']', ' … ', 16), -bm25(messages_fts) AS score "
                "FROM messages_fts JOIN messages m ON m.id = messages_fts.rowid "
                f"WHERE messages_fts MATCH ?{extra} "
                "ORDER BY bm25(messages_fts), m.id DESC LIMIT ? OFFSET ?"
            )
            args = (query, *params, limit, offset)
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
        return MessageRecord.from_row(row) if row else None

    def last_reply(self, session_id: str) -> MessageRecord | None:
        """The newest reply a fork can continue from (one the CLI's uuid is known of)."""
        row = (
            MessageRow.select()
            .where(
                (MessageRow.session == session_id)
                & (MessageRow.role == "assistant")
                & (MessageRow.agent_uuid != "")
            )
            .order_by(MessageRow.id.desc())
            .first()
        )
        return MessageRecord.from_row(row) if row else None

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
        return [MessageRecord.from_row(r) for r in rows.order_by(MessageRow.id)]

    def unfinished_turns(self) -> dict[str, str]:
        """This host's turns whose user message has no reply yet: turn id -> session id."""
        rows = (
            MessageRow.select(MessageRow.turn_id, MessageRow.session)
            .join(SessionRow)
            .where((MessageRow.status == "pending") & self._own(SessionRow.host_id))
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
        return [AuditRecord.from_row(r) for r in q]

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


def _connect(url: str) -> pw.Database:
    if url.startswith("sqlite:///"):
        path = Path(url.removeprefix("sqlite:///"))
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        return _SqliteDatabase(
            str(path),
            pragmas={
                "journal_mode": "wal",
                "foreign_keys": 1,
                "synchronous": "normal",
                "busy_timeout": 5000,
            },
        )
    # Only other databases need the URL parser (it imports much of playhouse: slow start-up).
    from urllib.parse import urlparse

    from playhouse import db_url

    parsed = urlparse(url)
    base = db_url.schemes.get(parsed.scheme)
    if base is None:
        raise RuntimeError(f"unsupported database URL scheme {parsed.scheme!r} in {url!r}")
    params = db_url.parseresult_to_dict(parsed)
    if parsed.scheme in _PSYCOPG_SCHEMES:
        # psycopg 3 (the `postgresql` extra), also where psycopg2 happens to be installed too:
        # peewee would otherwise prefer psycopg2, which the store is not tested with.
        params["prefer_psycopg3"] = True
        # A server cut off must not hold the daemon's loop for long: bounded connects, and
        # TCP keepalives and a user timeout that end a dead connection within ~10 s (libpq
        # ignores them on a Unix socket). The URL's own values win.
        for key, value in _PG_CONNECTION_DEFAULTS.items():
            params.setdefault(key, value)
    # The URL's class with full-disk and outage reporting mixed in, built as such (a peewee
    # database's class cannot be swapped after the fact: the layouts differ).
    full = reporting_full_disk(base)
    cls = full
    if not issubclass(full, ReportsOutage):
        cls = type(base.__name__, (ReportsOutage, full), {})
    db: pw.Database = cls(**params)
    if isinstance(db, ReportsFullDisk):
        db.full_disk_url = without_password(url)
    if isinstance(db, ReportsOutage):
        db.outage_url = without_password(url)
    return db


class _SqliteDatabase(SqliteOutage, diskfull.SqliteDatabase):
    """SQLite that names the disk when it is full, and rides out a disk that fails."""


_PG_CONNECTION_DEFAULTS: dict[str, object] = {
    "connect_timeout": 5,
    "keepalives": 1,
    "keepalives_idle": 5,
    "keepalives_interval": 2,
    "keepalives_count": 3,
    "tcp_user_timeout": 10_000,
}
