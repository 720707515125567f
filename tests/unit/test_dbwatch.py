"""DatabaseWatch: health follows the database, and reconnecting backs off within a bound.
Deterministic: the watch's sleep is recorded, never waited for."""

from __future__ import annotations

import asyncio
import sqlite3
from collections.abc import Callable

from atomizerd.daemon.dbwatch import FIRST_RETRY, MAX_RETRY, DatabaseWatch
from atomizerd.store.outage import is_connection_lost, is_disk_failing


class FakeDb:
    fail_fast = True

    def __init__(self, reachable_at: int) -> None:
        self.down = False
        self.reachable_at = reachable_at
        self.probes = 0
        self.recovered = 0
        self.listeners: list[Callable[[bool], None]] = []

    def on_availability(self, listener: Callable[[bool], None]) -> None:
        self.listeners.append(listener)

    def reachable(self) -> bool:
        self.probes += 1
        return self.probes >= self.reachable_at

    def recover(self) -> bool:
        self.recovered += 1
        self.down = False
        return True

    def check(self) -> bool:
        return not self.down


def test_an_outage_is_ridden_out_with_a_bounded_backoff_and_health_follows() -> None:
    async def main() -> tuple[list[bool], list[float], FakeDb, DatabaseWatch]:
        db = FakeDb(reachable_at=9)
        serving: list[bool] = []
        delays: list[float] = []

        async def set_serving(up: bool) -> None:
            serving.append(up)

        async def sleep(seconds: float) -> None:
            delays.append(seconds)

        watch = DatabaseWatch(db, set_serving, sleep=sleep)  # type: ignore[arg-type]
        db.down = True
        await watch._ride_out()
        return serving, delays, db, watch

    serving, delays, db, watch = asyncio.run(main())
    assert serving == [False, True]
    assert delays[0] == FIRST_RETRY and max(delays) == MAX_RETRY
    assert delays == sorted(delays) and delays.count(MAX_RETRY) == len(delays) - 5
    assert db.probes == 9 and db.recovered == 1 and not db.down
    assert (watch.outages, watch.reconnects) == (1, 1)


def test_what_counts_as_an_outage() -> None:
    import psycopg

    class Conn:
        closed = False
        broken = True

    gone = psycopg.OperationalError("server closed the connection unexpectedly")
    assert is_connection_lost(gone)
    assert is_connection_lost(ValueError("anything"), Conn())
    # A query's own error (a syntax error, a constraint) is not an outage.
    assert not is_connection_lost(psycopg.errors.SyntaxError("nope"))
    assert not is_connection_lost(psycopg.errors.UniqueViolation("dup"))
    io = sqlite3.OperationalError("disk I/O error")
    io.sqlite_errorcode = 10 | (3 << 8)  # SQLITE_IOERR_WRITE
    assert is_disk_failing(io)
    readonly = sqlite3.OperationalError("attempt to write a readonly database")
    readonly.sqlite_errorcode = 8
    assert is_disk_failing(readonly)
    locked = sqlite3.OperationalError("database is locked")
    locked.sqlite_errorcode = 5
    assert not is_disk_failing(locked)
