"""The search rows of scripts/bench: SearchMessages p50/p99 of one-word queries over the
stored sessions of the scale sections (10,000 sessions × 50 messages), on SQLite (FTS5) and
on PostgreSQL (the GIN index of the content's tsvector) with the same rows, each through a
real daemon and its gRPC API.

A selective word (the number in "benchmark message 7: …", in one message of every session:
10,000 matches) is the row with the target; a word in every user message (250,000 matches)
is shown beside it, as what ranking every match costs.

Synchronous (the bench runs it in a thread).
"""

from __future__ import annotations

import contextlib
import sqlite3
import statistics
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from atomizer.v1 import session_pb2 as pb

from atomizerd.store.db import Store
from tests.conftest import stubs_for
from tests.support.daemon import RunningDaemon
from tests.support.postgres import SUPERUSER, PostgresServer, find_bindir

SELECTIVE = [str(n) for n in range(25)]  # "benchmark message N: …"
COMMON = "study"
PAGE = 20


def _pct(xs: list[float], p: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, max(0, round(p / 100 * (len(xs) - 1))))]


def _queries(d: RunningDaemon, words: list[str], n: int) -> tuple[list[float], int]:
    stubs = stubs_for(d.channel())
    times: list[float] = []
    hits = 0
    for i in range(n):
        req = pb.SearchMessagesRequest(query=words[i % len(words)], page_size=PAGE)
        t0 = time.perf_counter()
        r = stubs.sessions.SearchMessages(req, timeout=60)
        times.append(time.perf_counter() - t0)
        hits = max(hits, len(r.hits))
    return times, hits


def _figures(d: RunningDaemon, n: int) -> dict[str, float]:
    _queries(d, SELECTIVE, 5)  # warm: the first queries read the index from disk
    sel, hits = _queries(d, SELECTIVE, n)
    com, _ = _queries(d, [COMMON], 5)
    if hits != PAGE:
        raise RuntimeError(f"a search found {hits} hits, expected a full page of {PAGE}")
    return {
        "p50_s": statistics.median(sel),
        "p99_s": _pct(sel, 99),
        "common_p50_s": statistics.median(com),
    }


def _daemon(directory: Path, database: str | None = None) -> RunningDaemon:
    config: dict[str, dict[str, Any]] = {
        "reaper": {"interval": 3600.0, "retention": 0},
        "pool": {"spares": 0},
    }
    if database is not None:
        config["daemon"] = {"database": database}
    return RunningDaemon(directory, config)


def _rows(conn: sqlite3.Connection, table: str) -> tuple[list[str], Iterator[tuple[Any, ...]]]:
    cur = conn.execute(f"SELECT * FROM {table}")
    return [c[0] for c in cur.description], iter(cur)


def load_postgres(sqlite_db: Path, url: str, socket_dir: Path, database: str) -> None:
    """The SQLite file's sessions and messages copied into a migrated PostgreSQL database,
    the full-text index built once after the copy (as a migration builds it)."""
    import psycopg

    Store(url).close()  # the schema, by the store's own migrations
    with (
        contextlib.closing(sqlite3.connect(sqlite_db)) as src,
        psycopg.connect(dbname=database, user=SUPERUSER, host=str(socket_dir)) as dst,
    ):
        index = dst.execute(
            "SELECT indexdef FROM pg_indexes WHERE indexname = 'messages_fts'"
        ).fetchone()
        assert index is not None, "the migrations made no messages_fts index"
        dst.execute("DROP INDEX messages_fts")
        for table in ("sessions", "messages"):
            columns, rows = _rows(src, table)
            names = ", ".join(columns)
            with dst.cursor().copy(f"COPY {table} ({names}) FROM STDIN") as copy:
                for row in rows:
                    copy.write_row(row)
        dst.execute("SELECT setval('messages_id_seq', (SELECT max(id) FROM messages))")
        dst.execute(index[0])
        dst.commit()
        dst.autocommit = True
        dst.execute("VACUUM ANALYZE")


def measure(scale_dir: Path, workdir: Path, n: int) -> dict[str, Any]:
    out: dict[str, Any] = {"queries": n}
    with _daemon(scale_dir) as d:
        out["sqlite"] = _figures(d, n)
    bindir = find_bindir()
    if bindir is None:
        out["postgresql"] = None  # no server binaries here: the row says so
        return out
    server = PostgresServer(bindir).start()
    try:
        url = server.new_database()
        database = url.split("?")[0].rsplit("/", 1)[1]
        t0 = time.perf_counter()
        load_postgres(scale_dir / "state" / "atomizerd.db", url, server.socket_dir, database)
        out["postgresql_load_s"] = time.perf_counter() - t0
        with _daemon(workdir / "search-pg", url) as d:
            out["postgresql"] = _figures(d, n)
    finally:
        server.stop()
    return out
