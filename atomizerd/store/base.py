"""The store's own state: its database, its lock, its schema and its host (the parts every
concern of the store shares)."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import peewee as pw
import structlog

from atomizerd.model import SessionRecord
from atomizerd.store.connect import _connect
from atomizerd.store.diskfull import without_password
from atomizerd.store.lock import DatabaseLock, _AdvisoryLock, lock_database
from atomizerd.store.migrations import (
    MIGRATION_LOCK_KEY,
    MIGRATIONS,
    SCHEMA_VERSION,
)
from atomizerd.store.models import (
    SchemaVersion,
    database_proxy,
)
from atomizerd.store.outage import ReportsOutage
from atomizerd.store.records import SESSION_COLUMNS, session_from_tuple

log = structlog.get_logger("atomizerd.store")


class StoreBase:
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

    def _sql(self, sql: str, params: tuple[Any, ...]) -> Any:
        return self.db.execute_sql(sql.replace("?", self.db.param), params)  # type: ignore[no-untyped-call]

    def _session_now(self, session_id: str) -> SessionRecord | None:
        """The session's row as a record, read with plain SQL (it follows every turn write)."""
        row = self._sql(
            f"SELECT {SESSION_COLUMNS} FROM sessions WHERE session_id = ?", (session_id,)
        ).fetchone()
        return session_from_tuple(tuple(row)) if row else None
