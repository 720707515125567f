"""Opening a database by URL: SQLite (WAL, foreign keys on, synchronous=NORMAL), or any peewee
URL, with full-disk and outage reporting mixed into its class."""

from __future__ import annotations

from pathlib import Path

import peewee as pw

from atomizerd.store import diskfull
from atomizerd.store.diskfull import ReportsFullDisk, reporting_full_disk, without_password
from atomizerd.store.outage import ReportsOutage, SqliteOutage

# The URL schemes whose peewee class takes `prefer_psycopg3`.
_PSYCOPG_SCHEMES = frozenset({"postgres", "postgresql", "postgres+pool", "postgresql+pool"})


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
