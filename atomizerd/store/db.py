"""Durable state with peewee: sessions, their messages, and the agent processes we started.

SQLite by default (WAL, foreign keys on, synchronous=NORMAL: a committed turn survives a
daemon crash); any peewee database URL works. The schema carries a version and forward
migrations run at open. Calls are synchronous and short; the registry batches them so no
write happens per text delta.

The store by concern: its models (models.py), migrations (migrations.py), rows read as the
domain's records (records.py; the records themselves are atomizerd/model.py),
connection (connect.py), its own state (base.py), then sessions (sessions.py), messages
(messages.py), governance and processes (governance.py), webhook deliveries (outbox.py).
`Store` is all of them; this module is where the rest of the daemon imports the store from.
"""

from __future__ import annotations

from atomizerd.store.connect import _connect
from atomizerd.store.governance import GovernanceStore
from atomizerd.store.messages import RollbackStore
from atomizerd.store.migrations import (
    MIGRATIONS,
    SCHEMA_VERSION,
    SEQ_BLOCK,
    _migrate_attachments,
    _migrate_checkpoint_pieces,
    _migrate_conversation_control,
    _migrate_forks,
    _migrate_labels_archive,
    _migrate_origin,
    _migrate_search,
    _migrate_session_context,
    _migrate_session_model,
)
from atomizerd.store.models import (
    SchemaVersion,
    SessionRow,
    database_proxy,
)
from atomizerd.store.outbox import OutboxStore, PendingDelivery
from atomizerd.store.sessions import SessionsStore

__all__ = [
    "MIGRATIONS",
    "SCHEMA_VERSION",
    "SEQ_BLOCK",
    "PendingDelivery",
    "SchemaVersion",
    "SessionRow",
    "Store",
    "_connect",
    "_migrate_attachments",
    "_migrate_checkpoint_pieces",
    "_migrate_conversation_control",
    "_migrate_forks",
    "_migrate_labels_archive",
    "_migrate_origin",
    "_migrate_search",
    "_migrate_session_context",
    "_migrate_session_model",
    "database_proxy",
]


class Store(SessionsStore, RollbackStore, GovernanceStore, OutboxStore):
    """The daemon's store: one database, this host's view of it (see `StoreBase`)."""
