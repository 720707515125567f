"""The daemon's store holds its database alone, and names a full disk as such."""

from __future__ import annotations

import errno
import os
import sqlite3
from pathlib import Path

import peewee as pw
import psycopg
import pytest

from atomizerd.errors import ResourceExhausted, StorageFull
from atomizerd.store.db import Store
from atomizerd.store.diskfull import is_full_disk, without_password
from atomizerd.store.lock import DatabaseInUse


def test_an_exclusive_store_keeps_a_second_one_out_until_it_closes(tmp_path: Path) -> None:
    path = tmp_path / "db" / "atomizerd.db"
    first = Store(f"sqlite:///{path}", exclusive=True)
    lock = path.with_name("atomizerd.db.lock")
    assert lock.stat().st_mode & 0o777 == 0o600
    assert lock.read_text().strip() == str(os.getpid())
    with pytest.raises(DatabaseInUse) as err:
        Store(f"sqlite:///{path}", exclusive=True)
    assert f"pid {os.getpid()}" in str(err.value) and str(path) in str(err.value)
    # Tools that only read or repair (not exclusive) are not kept out.
    Store(f"sqlite:///{path}").close()
    first.close()
    Store(f"sqlite:///{path}", exclusive=True).close()


def sqlite_error(message: str, code: int) -> sqlite3.OperationalError:
    e = sqlite3.OperationalError(message)
    e.sqlite_errorcode = code  # type: ignore[attr-defined]
    return e


class FakePgError(Exception):
    pgcode = "53100"


def wrapped(inner: BaseException) -> pw.OperationalError:
    """As peewee re-raises a driver's error."""
    try:
        try:
            raise inner
        except BaseException as e:
            raise pw.OperationalError(e, *e.args) from None
    except pw.OperationalError as outer:
        return outer


def test_full_disk_errors_are_recognised(tmp_path: Path) -> None:
    assert is_full_disk(wrapped(sqlite_error("database or disk is full", 13)))
    assert is_full_disk(OSError(errno.ENOSPC, "No space left on device"))
    assert is_full_disk(wrapped(FakePgError("could not extend file")))
    # The driver of the `postgresql` extra (psycopg 3) names it sqlstate.
    assert is_full_disk(wrapped(psycopg.errors.DiskFull("could not extend file")))
    assert not is_full_disk(wrapped(psycopg.errors.UniqueViolation("duplicate key")))
    # An I/O error is only a full disk where the disk has no space left.
    assert not is_full_disk(sqlite_error("disk I/O error", 4874), tmp_path)
    # SQLite rolled back on its own: the failed ROLLBACK carries the full disk as its context.
    try:
        try:
            raise wrapped(sqlite_error("database or disk is full", 13))
        except pw.OperationalError:
            raise wrapped(sqlite_error("cannot rollback - no transaction is active", 1))  # noqa: B904
    except pw.OperationalError as e:
        assert is_full_disk(e)
    assert not is_full_disk(wrapped(sqlite_error("UNIQUE constraint failed", 2067)))
    assert issubclass(StorageFull, ResourceExhausted)


def test_urls_in_messages_carry_no_password() -> None:
    assert without_password("postgresql://u:secret@db.example/atomizer") == (
        "postgresql://u:***@db.example/atomizer"
    )
    assert without_password("sqlite:////var/lib/atomizerd/atomizerd.db") == (
        "sqlite:////var/lib/atomizerd/atomizerd.db"
    )
