"""The tables, as peewee models (one row class each); `database_proxy` is bound to the store's
database when it opens."""

from __future__ import annotations

from typing import Any

import peewee as pw

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


# The rows that belong to one session: purging a session deletes them, in this order, before its
# own row. (Typed loosely: each has a `session` key, which their common base does not declare.)
SESSION_CHILDREN: tuple[Any, ...] = (
    MessageRow,
    TurnCheckpointRow,
    AuditRow,
    PermissionRuleRow,
    AttachmentBlobRow,
    TaskRow,
    PermissionPatternRow,
    SessionLabelRow,
)
