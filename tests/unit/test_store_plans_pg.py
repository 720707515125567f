"""PostgreSQL's query plans: full-text search is served from the GIN index of the content's
tsvector (the query repeats the index's expression exactly), ListSessions' filters from their
indexes. The tables are small, so sequential scans are turned off for the plan: what is
checked is that the index applies to the query, which is what a changed expression breaks."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from atomizerd.model import SessionFilter, TurnOutcome
from atomizerd.store.db import SessionRow, Store
from atomizerd.store.records import filter_conditions


def explain(store: Store, sql: str, params: Any) -> str:
    rows = store.db.execute_sql("EXPLAIN " + sql, params).fetchall()  # type: ignore[no-untyped-call]
    return "\n".join(r[0] for r in rows)


def captured(store: Store, call: Callable[[], object]) -> tuple[str, Any]:
    """The last statement `call` ran (and its parameters)."""
    seen: list[tuple[str, Any]] = []
    real = store.db.execute_sql

    def spy(sql: str, params: Any = None, *a: Any, **kw: Any) -> Any:
        seen.append((sql, params))
        return real(sql, params, *a, **kw)

    store.db.execute_sql = spy  # type: ignore[method-assign]
    try:
        call()
    finally:
        del store.db.execute_sql
    return seen[-1]


def test_postgresql_serves_search_and_the_list_filters_from_indexes(pg_url: str) -> None:
    store = Store(pg_url)
    try:
        for i in range(60):
            sid = f"s{i}"
            store.create_session(sid, "user", None, f"ag-{i}", labels={"n": str(i % 7)})
            store.add_user_message(sid, "t1", f"how did run {i} of the beam study go", None)
            store.finish_turn(sid, "t1", TurnOutcome("complete", "it converged", agent_uuid=sid))
        store.db.execute_sql("ANALYZE")  # type: ignore[no-untyped-call]
        store.db.execute_sql("SET enable_seqscan = off")  # type: ignore[no-untyped-call]
        sql, params = captured(store, lambda: store.search_messages("beam", limit=10))
        assert "Bitmap Index Scan on messages_fts" in explain(store, sql, params)

        def plan(**filters: Any) -> str:
            q = (
                SessionRow.select()
                .where(*filter_conditions(SessionFilter(**filters)))
                .order_by(SessionRow.created_at.desc(), SessionRow.session_id.desc())
                .limit(100)
            )
            return explain(store, *q.sql())

        assert "sessions_archived_created" in plan()
        assert "session_labels_pair" in plan(labels={"n": "3"})
        assert "sessions_mode_created" in plan(mode="power", archived=None)
    finally:
        store.db.execute_sql("RESET enable_seqscan")  # type: ignore[no-untyped-call]
        store.close()
