"""The database unreachable for a while is an outage to ride out, not a bug.

PostgreSQL restarted, stopped or cut off (fleet mode), or an SQLite file on a disk that fails
(I/O errors, a file system turned read-only): every call of the store then raises
`DatabaseUnavailable` (UNAVAILABLE, "the database is unreachable ..."), never a driver error,
and the daemon reconnects by itself. Like the full-disk classification (`diskfull.py`), it
sits in the peewee database class (`connect`, `execute_sql`, `begin`, `commit`, `rollback`):
every path of the store is covered.

What happens, in order:

1. A call fails because the connection is gone (psycopg: the connection closed or broken, a
   connection-class SQLSTATE 08xxx, the server shutting down or starting, 57P01-57P03; a
   connect that fails), or because SQLite reports an I/O error or a read-only database. The
   database is marked *down* (`on_availability(False)`, once) and the call raises
   `DatabaseUnavailable`. A broken connection is dropped as soon as no transaction holds it
   (a ROLLBACK on it is skipped: the server has ended the transaction already).
2. While down, PostgreSQL calls fail at once without touching the network (a circuit
   breaker: a request never waits for a dead server, the event loop never blocks on it).
   SQLite calls go on being tried (reads often still work).
3. The daemon probes (`reachable`, on a thread of its own: a new connection and `SELECT 1`,
   never the store's) with a bounded backoff, then `recover` on the store's own thread: a new
   connection, the host's advisory lock taken again on it (`lock.py`; it ended with the old
   session), and for SQLite a write that must reach the disk. Then the database is *up*
   (`on_availability(True)`): what waited for it (turn outcomes, `TurnRunner._settle_later`)
   is stored.

The advisory lock: if another daemon of the same host_id took it while the connection was
gone, the database stays down (and says so) until it is free again: two daemons of one host
must never write together.
"""

from __future__ import annotations

import contextlib
import sqlite3
import threading
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import peewee as pw
import structlog

from atomizerd.errors import DatabaseUnavailable, StoreDown
from atomizerd.store.diskfull import _chain

log = structlog.get_logger("atomizerd.store.outage")

SQLITE_IOERR = 10
SQLITE_READONLY = 8
SQLITE_CANTOPEN = 14
# Connection exceptions (class 08), and the server shutting down or not yet up.
_PG_GONE_PREFIXES = ("08",)
_PG_GONE_STATES = frozenset({"57P01", "57P02", "57P03"})

if TYPE_CHECKING:
    _Base = pw.Database
else:
    _Base = object


def _driver_errors() -> tuple[type[BaseException], ...]:
    try:
        import psycopg
    except ImportError:
        return ()
    return (psycopg.OperationalError, psycopg.InterfaceError)


def is_connection_lost(exc: BaseException, conn: Any = None) -> bool:
    """Whether a PostgreSQL error says the server cannot be reached (or `conn` is dead)."""
    if conn is not None and (getattr(conn, "closed", False) or getattr(conn, "broken", False)):
        return True
    driver = _driver_errors()
    for e in _chain(exc):
        if not isinstance(e, driver):
            continue
        state = getattr(e, "sqlstate", None)
        # No SQLSTATE: the client library's own (the socket closed, connect failed).
        if state is None or state.startswith(_PG_GONE_PREFIXES) or state in _PG_GONE_STATES:
            return True
    return False


def is_disk_failing(exc: BaseException) -> bool:
    """Whether an SQLite error says its file cannot be written (I/O error, read-only)."""
    for e in _chain(exc):
        if isinstance(e, sqlite3.Error):
            code = getattr(e, "sqlite_errorcode", None)
            if code is not None and code & 0xFF in (SQLITE_IOERR, SQLITE_READONLY, SQLITE_CANTOPEN):
                return True
    return False


class ReportsOutage(_Base):
    """Mixed into a peewee database class (before ReportsFullDisk): an unreachable database
    raises DatabaseUnavailable, and the store reconnects once it is back (module docs)."""

    if TYPE_CHECKING:  # peewee's own, untyped
        _state: Any

        def _connect(self) -> Any: ...
        def _close(self, conn: Any) -> None: ...

    # Set by the store when it builds the database: names it in the message.
    outage_url: str = ""
    # While down, calls fail at once (PostgreSQL) instead of trying the dead connection.
    fail_fast: bool = True

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._outage_init()

    def _outage_init(self) -> None:
        if "_outage_lock" in self.__dict__:
            return
        self._outage_lock = threading.Lock()
        self._down = False
        self._recovering: int | None = None  # the thread that may bypass the breaker
        self._relock: Callable[[], None] | None = None
        self._lock_thread: int | None = None
        self._listeners: list[Callable[[bool], None]] = []

    # --- what the store and the daemon use ---------------------------------------------------

    @property
    def down(self) -> bool:
        self._outage_init()
        return self._down

    def on_availability(self, listener: Callable[[bool], None]) -> None:
        """`listener(False)` when the database goes down, `listener(True)` when it is back;
        called on the thread that noticed (the daemon hands it to its loop)."""
        self._outage_init()
        self._listeners.append(listener)

    def keep_lock(self, relock: Callable[[], None]) -> None:
        """The calling thread's connection holds a session lock: `relock` takes it again on
        each new connection of this thread (raises if it cannot)."""
        self._outage_init()
        self._relock = relock
        self._lock_thread = threading.get_ident()

    def unavailable(self, cause: BaseException | None = None) -> DatabaseUnavailable:
        where = self.outage_url or str(self.database)
        why = f" ({_first_line(cause)})" if cause is not None else ""
        return DatabaseUnavailable(
            f"the database is unreachable: atomizerd cannot reach its database {where}{why}; "
            "it reconnects by itself, retry in a moment"
        )

    def reachable(self) -> bool:
        """Whether a new connection works (its own: any thread may ask, nothing shared)."""
        try:
            conn = self._connect()
        except Exception:
            return False
        try:
            conn.cursor().execute("SELECT 1")
            return True
        except Exception:
            return False
        finally:
            with contextlib.suppress(Exception):
                conn.close()

    def recover(self) -> bool:
        """On the store's thread: a new connection (the lock taken again), a probe; True and
        the database up if it works."""
        self._outage_init()
        self._recovering = threading.get_ident()
        try:
            self._drop_connection()
            self.connect(reuse_if_open=True)
            self._probe()
        except Exception as e:
            log.debug("database still unreachable", error=_first_line(e))
            return False
        finally:
            self._recovering = None
        self._set_down(False, None)
        return True

    def _probe(self) -> None:
        self.execute_sql("SELECT 1")

    def check(self) -> bool:
        """A cheap look at the store's own connection while up (PostgreSQL: `SELECT 1`), so
        that a server restarted while nothing was written is noticed; False: now down."""
        self._outage_init()
        if self._down:
            return False
        try:
            self.execute_sql("SELECT 1")
        except DatabaseUnavailable:
            return False
        return True

    # --- the classification ------------------------------------------------------------------

    def _is_outage(self, exc: BaseException) -> bool:
        return is_connection_lost(exc, self._state.conn)

    def _set_down(self, down: bool, cause: BaseException | None) -> None:
        with self._outage_lock:
            if self._down == down:
                return
            self._down = down
            listeners = list(self._listeners)
        if down:
            log.error(
                "database unreachable; reconnecting",
                database=self.outage_url,
                error=_first_line(cause) if cause else "",
            )
        else:
            log.info("database reachable again", database=self.outage_url)
        for listener in listeners:
            try:
                listener(not down)
            except Exception:
                log.exception("a database availability listener failed")

    def _guard(self) -> None:
        self._outage_init()
        if (
            self._down
            and self.fail_fast
            and self._recovering != threading.get_ident()
            and not self.in_transaction()
        ):
            raise self.unavailable()
        self._drop_if_broken()

    def _drop_if_broken(self) -> None:
        conn = self._state.conn
        if conn is None or self.in_transaction():
            return
        if getattr(conn, "closed", False) or getattr(conn, "broken", False):
            self._drop_connection()

    def _drop_connection(self) -> None:
        if self.in_transaction():
            return
        conn = self._state.conn
        if conn is not None:
            with contextlib.suppress(Exception):
                self._close(conn)
        self._state.reset()

    def _failed(self, exc: BaseException) -> None:
        """Raises DatabaseUnavailable (the database marked down) if `exc` is an outage."""
        if self._is_outage(exc):
            self._set_down(True, exc)
            self._drop_if_broken()
            raise self.unavailable(exc) from exc

    # --- peewee's entry points -----------------------------------------------------------------

    def connect(self, reuse_if_open: bool = False) -> bool:
        self._outage_init()
        try:
            opened = super().connect(reuse_if_open)
        except StoreDown:
            raise
        except Exception as e:
            if self._is_connect_failure(e):
                self._set_down(True, e)
                raise self.unavailable(e) from e
            raise
        if opened and self._relock is not None and threading.get_ident() == self._lock_thread:
            try:
                self._relock()
            except Exception as e:
                self._drop_connection()
                if isinstance(e, DatabaseUnavailable):
                    raise
                self._set_down(True, e)
                raise self.unavailable(e) from e
        return opened

    def _is_connect_failure(self, exc: BaseException) -> bool:
        return self._is_outage(exc)

    def execute_sql(self, sql: str, params: Any = None, *args: Any, **kwargs: Any) -> Any:
        self._guard()
        try:
            return super().execute_sql(sql, params, *args, **kwargs)  # type: ignore[no-untyped-call]
        except StoreDown:
            raise
        except Exception as e:
            self._failed(e)
            raise

    def begin(self, *args: Any, **kwargs: Any) -> None:
        self._guard()
        try:
            super().begin(*args, **kwargs)
        except StoreDown:
            raise
        except Exception as e:
            self._failed(e)
            raise

    def commit(self) -> None:
        try:
            super().commit()
        except StoreDown:
            raise
        except Exception as e:
            self._failed(e)
            raise

    def rollback(self) -> None:
        conn = self._state.conn
        if conn is None or getattr(conn, "closed", False) or getattr(conn, "broken", False):
            return  # the server ended the transaction with the connection
        try:
            super().rollback()
        except StoreDown:
            raise
        except Exception as e:
            if self._is_outage(e):
                self._set_down(True, e)
                return  # nothing left to roll back; the error that ended the block stands
            raise


class SqliteOutage(ReportsOutage):
    """SQLite: I/O errors and a read-only file are the outage; there is no connection to
    lose, and reads may still work, so calls are always tried."""

    fail_fast = False

    def _is_outage(self, exc: BaseException) -> bool:
        return is_disk_failing(exc)

    def _is_connect_failure(self, exc: BaseException) -> bool:
        return is_disk_failing(exc)

    def reachable(self) -> bool:
        return True

    def _probe(self) -> None:
        # A write that must reach the file (its WAL): rewrites the schema version as it is.
        with self.atomic():
            self.execute_sql("UPDATE schema_version SET version = version")

    def check(self) -> bool:
        return not self.down

    def unavailable(self, cause: BaseException | None = None) -> DatabaseUnavailable:
        why = f" ({_first_line(cause)})" if cause is not None else ""
        return DatabaseUnavailable(
            f"the database is unavailable: atomizerd cannot write to its database "
            f"{self.database} (the disk holding it fails{why}); it retries by itself, retry "
            "in a moment"
        )


def _first_line(exc: BaseException | None) -> str:
    if exc is None:
        return ""
    text = str(exc).strip().splitlines()
    return text[0][:300] if text else type(exc).__name__
