"""One daemon per database and host: its crash recovery takes every row of its host for its own.

At start-up the daemon kills the agents its host recorded in `agent_processes` and settles its
host's turns left pending (`Daemon._reconcile`). That is right only if no other live daemon of
the same host uses the same database. The runtime-dir lock protects the socket, not the state:
two daemons with different runtime dirs and one `daemon.database` would both start, and the
second would kill the first one's agents. So the daemon's store also locks what is shared, the
database, before it is opened, migrated or reconciled:

- SQLite: an exclusive `flock` on `<database file>.lock` beside the file (mode 0600, holding
  the owner's pid for the message the next daemon prints). The kernel drops it with the file
  descriptor, at the latest when the process dies, so a crashed daemon never leaves it held.
- PostgreSQL: a session-level advisory lock (`pg_try_advisory_lock`) on the store's
  connection; it lasts as long as that connection, which the daemon keeps open while it runs.
  Its key is derived from `daemon.host_id`: daemons of several hosts share one server (a
  fleet, docs/operations.md), each recovering only what its host recorded, while a second
  daemon with the same host_id is refused. An SQLite file is one machine's: one daemon.
- Other databases: no lock (a warning at start-up).
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import socket
from pathlib import Path
from typing import Any

import peewee as pw
import structlog

log = structlog.get_logger("atomizerd.store.lock")

ADVISORY_LOCK_NAME = b"atomizerd: one daemon per database"


def advisory_lock_key(host_id: str) -> int:
    """The advisory lock's key for one host: a signed 64-bit digest of this name and the
    host_id (a collision of two host ids would only make their daemons refuse each other)."""
    name = ADVISORY_LOCK_NAME + b"\0" + host_id.encode()
    return int.from_bytes(hashlib.blake2b(name, digest_size=8).digest(), "big", signed=True)


class DatabaseInUse(RuntimeError):
    """Another daemon holds the database; the message is worded for the operator."""


class DatabaseLock:
    """Held until `release` (or until the process exits)."""

    def release(self) -> None:
        pass


class _FileLock(DatabaseLock):
    def __init__(self, fd: int) -> None:
        self._fd: int | None = fd

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


class _AdvisoryLock(DatabaseLock):
    """Ends with the connection's session (the store closes it at shutdown, or the server
    ends it: a restart, a lost connection). `retake` takes it again on a new connection."""

    def __init__(self, db: pw.PostgresqlDatabase, shown_as: str, host_id: str) -> None:
        self._db = db
        self._shown_as = shown_as
        self._host_id = host_id

    def retake(self) -> None:
        """On the store's new connection after the old one was lost; DatabaseInUse if another
        daemon of this host took the lock meanwhile."""
        _take_advisory_lock(self._db, self._shown_as, self._host_id)
        log.info("database lock taken again on a new connection", host_id=self._host_id)


def lock_database(db: pw.Database, shown_as: str, host_id: str = "") -> DatabaseLock:
    """Takes the database for this daemon alone (PostgreSQL: alone among the daemons of
    `host_id`), or raises DatabaseInUse. For SQLite this happens before the file is opened;
    for PostgreSQL it opens the store's connection."""
    if isinstance(db, pw.SqliteDatabase):
        if db.database in ("", ":memory:"):
            return DatabaseLock()  # private to this process: nothing shared to protect
        return _lock_sqlite_file(Path(db.database))
    if isinstance(db, pw.PostgresqlDatabase):
        return _lock_postgresql(db, shown_as, host_id)
    log.warning(
        "no single-daemon lock for this kind of database: make sure no other atomizerd uses it",
        database=shown_as,
    )
    return DatabaseLock()


def _lock_sqlite_file(path: Path) -> DatabaseLock:
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    lock_path = path.with_name(path.name + ".lock")
    fd = os.open(lock_path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        try:
            owner = os.pread(fd, 32, 0).decode(errors="replace").strip()
        finally:
            os.close(fd)
        raise DatabaseInUse(
            f"another atomizerd (pid {owner or 'unknown'}) is already using the database "
            f"{path} (it holds {lock_path}); stop it first, or give this daemon its own "
            "daemon.state_dir or daemon.database"
        ) from None
    except BaseException:
        os.close(fd)
        raise
    # Only for the message above: a failed write (a full disk) does not give up the lock.
    # Written over the old pid, then cut to length: that needs no new block on the disk.
    pid = f"{os.getpid()}\n".encode()
    try:
        os.pwrite(fd, pid, 0)
        os.ftruncate(fd, len(pid))
    except OSError as e:
        log.warning("could not write our pid into the lock", path=str(lock_path), error=str(e))
    return _FileLock(fd)


def _sql(db: pw.Database, sql: str, params: tuple[object, ...]) -> Any:
    return db.execute_sql(sql.replace("?", db.param), params)  # type: ignore[no-untyped-call]


def _lock_postgresql(db: pw.PostgresqlDatabase, shown_as: str, host_id: str) -> DatabaseLock:
    db.connect(reuse_if_open=True)
    _take_advisory_lock(db, shown_as, host_id)
    return _AdvisoryLock(db, shown_as, host_id)


def _take_advisory_lock(db: pw.PostgresqlDatabase, shown_as: str, host_id: str) -> None:
    key = advisory_lock_key(host_id)
    (got,) = _sql(db, "SELECT pg_try_advisory_lock(?)", (key,)).fetchone()
    if not got:
        raise DatabaseInUse(
            f"another atomizerd with host_id {host_id!r} ({_advisory_lock_holder(db, key)}) is "
            f"already using the database {shown_as}; stop it first, or give this daemon its "
            "own daemon.host_id (one per machine) or daemon.database"
        )
    # How the next daemon (above) and the server's own views name us.
    name = f"atomizerd {host_id} pid {os.getpid()} on {socket.gethostname()}"[:63]
    _sql(db, "SELECT set_config('application_name', ?, false)", (name,))


def _advisory_lock_holder(db: pw.PostgresqlDatabase, signed_key: int) -> str:
    """Who holds the advisory lock `signed_key`, as far as the server can tell (best effort)."""
    # A bigint advisory key shows in pg_locks as classid (high 32 bits), objid (low 32 bits)
    # and objsubid 1.
    key = signed_key & 0xFFFF_FFFF_FFFF_FFFF
    try:
        row = _sql(
            db,
            "SELECT a.application_name, host(a.client_addr), a.pid FROM pg_locks l "
            "JOIN pg_stat_activity a ON a.pid = l.pid "
            "WHERE l.locktype = 'advisory' AND l.granted AND l.objsubid = 1 "
            "AND l.database = (SELECT oid FROM pg_database WHERE datname = current_database()) "
            "AND l.classid::bigint = ? AND l.objid::bigint = ?",
            (key >> 32, key & 0xFFFF_FFFF),
        ).fetchone()
    except pw.DatabaseError:
        return "holder unknown"
    if row is None:
        return "holder unknown"
    application, client, backend_pid = row
    who = application or "a client"
    return f"{who}, from {client or 'a local socket'}, server backend pid {backend_pid}"
