"""A full disk is the operator's to fix, not a bug: every write says so as `StorageFull`.

The classification sits in the peewee database class itself (`connect`, `execute_sql`,
`commit`, `rollback`), so every write path of the store (its methods, `Store.atomic()` blocks,
methods added later) raises `StorageFull` (RESOURCE_EXHAUSTED, with the database's path in the
message) instead of an unexpected error. Nothing else changes: reads keep working and, once
space is freed, the next write succeeds on the same connection (no restart, no reconnect).

What SQLite 3.40 does on a full disk, in WAL mode (measured on a small tmpfs):
- A write that needs the WAL file to grow fails with SQLITE_FULL ("database or disk is full"),
  at the statement or at COMMIT, and SQLite rolls the whole transaction back itself (peewee's
  ROLLBACK would then fail with "no transaction is active": skipped, see `rollback`).
- A write that fits in WAL space already allocated (the WAL restarts from its beginning after a
  complete checkpoint) succeeds even on a full disk. It is durable; nothing to report.
- A checkpoint that cannot grow the database file fails quietly; the frames stay in the WAL,
  which then has to grow, and writes fail as above until space is freed.
- When the WAL index (the -shm file, one 32 KiB block per ~4k frames) must grow and cannot,
  SQLite says SQLITE_IOERR_SHMSIZE, "disk I/O error": an I/O error while the database's
  filesystem has (almost) no space left is classified as a full disk too.
PostgreSQL reports its own full disk as SQLSTATE 53100 (disk_full).
"""

from __future__ import annotations

import errno
import os
import sqlite3
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar
from urllib.parse import urlsplit, urlunsplit

import peewee as pw

from atomizerd.errors import StorageFull

SQLITE_IOERR = 10
SQLITE_FULL = 13
PG_DISK_FULL = "53100"
_FULL_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT})
_FULL_TEXT = "database or disk is full"
# Below this much free space, an I/O error of SQLite is taken for a full disk.
LOW_SPACE_BYTES = 1 << 20


def _chain(exc: BaseException) -> Iterator[BaseException]:
    """The exception, what it was raised from or while handling, and what it wraps (peewee
    re-raises the driver's error with that error as its first argument)."""
    seen: set[int] = set()
    todo = [exc]
    while todo:
        e = todo.pop()
        if id(e) in seen:
            continue
        seen.add(id(e))
        yield e
        todo += [c for c in (e.__cause__, e.__context__) if c is not None]
        todo += [a for a in e.args if isinstance(a, BaseException)]


def _low_on_space(directory: Path | None) -> bool:
    if directory is None:
        return False
    try:
        st = os.statvfs(directory)
    except OSError:
        return False
    # root may write into the blocks reserved for it; everyone else only into the available.
    blocks = st.f_bfree if os.geteuid() == 0 else st.f_bavail
    return blocks * st.f_frsize < LOW_SPACE_BYTES


def is_full_disk(exc: BaseException, directory: Path | None = None) -> bool:
    """Whether the error (or one it came from) says the disk is full. `directory` is where an
    SQLite database lives: its free space tells a full disk from other I/O errors."""
    for e in _chain(exc):
        if isinstance(e, StorageFull):
            return True
        if isinstance(e, OSError) and e.errno in _FULL_ERRNOS:
            return True
        if isinstance(e, sqlite3.Error):
            code = getattr(e, "sqlite_errorcode", None)
            if code is not None:
                if code & 0xFF == SQLITE_FULL:
                    return True
                if code & 0xFF == SQLITE_IOERR and _low_on_space(directory):
                    return True
        # psycopg2 names it pgcode, psycopg 3 sqlstate.
        if PG_DISK_FULL in (getattr(e, "pgcode", None), getattr(e, "sqlstate", None)):
            return True
        if _FULL_TEXT in str(e):
            return True
    return False


def without_password(url: str) -> str:
    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = parts.netloc.rpartition("@")[2]
    user = parts.username or ""
    return urlunsplit(parts._replace(netloc=f"{user}:***@{netloc}" if user else netloc))


if TYPE_CHECKING:
    _Base = pw.Database
else:
    _Base = object


class ReportsFullDisk(_Base):
    """Mixed into a peewee database class (before it): a full disk raises StorageFull."""

    # Set by the store when it builds the database; names the database in the message.
    full_disk_url: str = ""

    def _full_disk_dir(self) -> Path | None:
        return None

    def full_disk_error(self) -> StorageFull:
        where = self.full_disk_url or str(self.database)
        return StorageFull(
            f"the disk is full: atomizerd cannot write to its database {where}; free some "
            "space on the disk holding it and try again"
        )

    def _raise_if_full(self, exc: BaseException) -> None:
        if is_full_disk(exc, self._full_disk_dir()):
            raise self.full_disk_error() from exc

    def connect(self, reuse_if_open: bool = False) -> bool:
        # Opening SQLite in WAL mode creates the -wal and -shm files: a full disk fails here.
        try:
            return super().connect(reuse_if_open)
        except Exception as e:
            self._raise_if_full(e)
            raise

    def execute_sql(self, sql: str, params: Any = None, *args: Any, **kwargs: Any) -> Any:
        try:
            return super().execute_sql(sql, params, *args, **kwargs)  # type: ignore[no-untyped-call]
        except Exception as e:
            self._raise_if_full(e)
            raise

    def commit(self) -> None:
        try:
            super().commit()
        except Exception as e:
            self._raise_if_full(e)
            raise

    def rollback(self) -> None:
        try:
            super().rollback()
        except Exception as e:
            self._raise_if_full(e)
            raise


class SqliteDatabase(ReportsFullDisk, pw.SqliteDatabase):
    """SQLite that names the file and the disk when the disk is full."""

    def _full_disk_dir(self) -> Path | None:
        return Path(self.database).parent if self.database != ":memory:" else None

    def full_disk_error(self) -> StorageFull:
        path = Path(self.database)
        return StorageFull(
            f"the disk is full: atomizerd cannot write to its database {path} (on the disk "
            f"holding {path.parent}); free some space there and try again"
        )

    def rollback(self) -> None:
        # After SQLITE_FULL (and other I/O errors) SQLite has already rolled the transaction
        # back: a ROLLBACK would fail and hide the error that ended it.
        if not self.is_closed() and not self.connection().in_transaction:  # type: ignore[no-untyped-call]
            return
        super().rollback()


D = TypeVar("D", bound=pw.Database)


def reporting_full_disk(base: type[D]) -> type[D]:
    """`base` (a peewee database class from a URL scheme) with ReportsFullDisk mixed in."""
    if issubclass(base, ReportsFullDisk):
        return base
    cls: type[D] = type(base.__name__, (ReportsFullDisk, base), {})
    return cls
