"""Labels, the archive, ListSessions' filters and full-text search in the store, on SQLite and
the real PostgreSQL server; the SQLite query plans show the filters served from indexes."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest

from atomizerd.errors import InvalidArgument
from atomizerd.model import SessionFilter, TurnOutcome
from atomizerd.store.db import SessionRow, Store
from atomizerd.store.records import filter_conditions


@pytest.fixture
def store(store_url: str) -> Iterator[Store]:
    s = Store(store_url)
    yield s
    s.close()


def ids(records: list[Any]) -> list[str]:
    return [r.session_id for r in records]


def listed(store: Store, **filters: Any) -> list[str]:
    return ids(
        store.list_sessions(
            limit=100, after=None, study_id=None, closed=None, filters=SessionFilter(**filters)
        )
    )


def turn(store: Store, sid: str, turn_id: str, text: str, reply: str) -> None:
    store.add_user_message(sid, turn_id, text, None)
    store.finish_turn(sid, turn_id, TurnOutcome("complete", reply, agent_uuid=f"u-{turn_id}"))


def test_labels_are_stored_replaced_and_filtered_on_all_together(store: Store) -> None:
    a = store.create_session("a", "user", None, "ag-a", labels={"team": "cfd", "env": "prod"})
    assert a.label_map() == {"env": "prod", "team": "cfd"}
    store.create_session("b", "power", None, "ag-b", labels={"team": "cfd"})
    store.create_session("c", "user", None, "ag-c")
    assert listed(store, labels={"team": "cfd"}) == ["b", "a"]
    assert listed(store, labels={"team": "cfd", "env": "prod"}) == ["a"]
    assert listed(store, labels={"team": "other"}) == []
    assert listed(store, mode="power") == ["b"]
    b = store.set_labels("b", {"env": "prod", "team": "fem"})
    assert b is not None and b.label_map() == {"env": "prod", "team": "fem"}
    assert store.get_session("b").label_map() == b.label_map()  # type: ignore[union-attr]
    assert listed(store, labels={"env": "prod"}) == ["b", "a"]
    assert listed(store, labels={"team": "cfd"}) == ["a"]
    store.delete_session("a")  # its labels go with it
    assert listed(store, labels={"env": "prod"}) == ["b"]


def test_archived_sessions_are_hidden_unless_asked_for_and_spared_by_the_purge(
    store: Store,
) -> None:
    for sid in ("a", "b"):
        store.create_session(sid, "user", None, f"ag-{sid}")
    store.update_session("a", archived=True, last_active_at=1.0)
    store.update_session("b", last_active_at=1.0)
    assert listed(store) == ["b"]
    assert listed(store, archived=None) == ["b", "a"]
    assert listed(store, archived=True) == ["a"]
    assert store.inactive_sessions(10.0, 10) == ["b"]
    assert sorted(store.inactive_sessions(10.0, 10, include_archived=True)) == ["a", "b"]


def test_time_ranges_bound_created_and_active(store: Store) -> None:
    for i, sid in enumerate(("a", "b", "c")):
        store.create_session(sid, "user", None, f"ag-{sid}")
        store.update_session(sid, created_at=100.0 + i, last_active_at=200.0 + i)
    assert listed(store, created_after=101.0) == ["c", "b"]
    assert listed(store, created_before=101.0) == ["a"]
    assert listed(store, created_after=100.0, created_before=102.0) == ["b", "a"]
    assert listed(store, active_after=202.0) == ["c"]
    assert listed(store, active_before=201.5) == ["b", "a"]


def test_search_ranks_matches_with_snippets_and_filters_by_session_and_labels(
    store: Store,
) -> None:
    store.create_session("a", "user", None, "ag-a", labels={"team": "cfd"})
    store.create_session("b", "user", None, "ag-b")
    turn(store, "a", "t1", "How do I mesh the turbine blade?", "Use the hex mesher.")
    turn(store, "b", "t2", "turbine turbine turbine efficiency", "It is 40 percent.")
    turn(store, "b", "t3", "unrelated question", "an unrelated answer")
    hits = store.search_messages("turbine", limit=10)
    assert [(h.session_id, h.role) for h in hits] == [("b", "user"), ("a", "user")]
    assert hits[0].score >= hits[1].score
    assert "[turbine]" in hits[1].snippet and hits[1].turn_id == "t1"
    # English stems: "meshing" finds "mesh" and "mesher"'s message by its stem.
    assert {h.turn_id for h in store.search_messages("meshing", limit=10)} == {"t1"}
    assert ids(store.search_messages("turbine", session_id="a", limit=10)) == ["a"]
    assert ids(store.search_messages("turbine", labels={"team": "cfd"}, limit=10)) == ["a"]
    assert store.search_messages("turbine", labels={"team": "x"}, limit=10) == []
    # Pages: offset and limit over the same ranking.
    assert ids(store.search_messages("turbine", limit=1, offset=1)) == ["a"]
    # A phrase.
    assert [h.turn_id for h in store.search_messages('"turbine blade"', limit=10)] == ["t1"]


def test_search_follows_writes_forks_and_purges(store: Store) -> None:
    store.create_session("a", "user", None, "ag-a")
    turn(store, "a", "t1", "the airfoil question", "the airfoil answer")
    # Written in the turn's own transaction: found at once.
    assert len(store.search_messages("airfoil", limit=10)) == 2
    reply = store.last_reply("a")
    assert reply is not None
    store.fork_session(store.get_session("a"), "f", "ag-f", reply.message_id)  # type: ignore[arg-type]
    assert sorted(ids(store.search_messages("airfoil", limit=10))) == ["a", "a", "f", "f"]
    store.update_session("a", last_active_at=1.0)
    while store.delete_history_batch(["a"], 10.0, 1):  # the purge's batches
        pass
    store.delete_session("a")
    assert ids(store.search_messages("airfoil", limit=10)) == ["f", "f"]


@pytest.mark.parametrize("query", ['"unclosed', "AND", "(", "nosuchcolumn:word", "*"])
def test_a_malformed_query_is_an_invalid_argument(store_url: str, query: str) -> None:
    store = Store(store_url)
    try:
        store.create_session("a", "user", None, "ag-a")
        turn(store, "a", "t1", "some words", "more words")
        if store_url.startswith("sqlite"):
            with pytest.raises(InvalidArgument, match="malformed"):
                store.search_messages(query, limit=10)
        else:  # PostgreSQL's web-search syntax takes any text
            store.search_messages(query, limit=10)
        # The connection is fine afterwards.
        assert len(store.search_messages("words", limit=10)) == 2
    finally:
        store.close()


def _plan(store: Store, query: Any) -> str:
    sql, params = query.sql()
    rows = store.db.execute_sql("EXPLAIN QUERY PLAN " + sql, params).fetchall()  # type: ignore[no-untyped-call]
    return "\n".join(str(r[-1]) for r in rows)


def test_sqlite_serves_the_list_filters_from_indexes(tmp_path: Any) -> None:
    store = Store(f"sqlite:///{tmp_path}/plan.db")
    try:
        for i in range(200):
            store.create_session(f"s{i}", "user", None, f"ag-{i}", labels={"n": str(i % 7)})
        store.db.execute_sql("ANALYZE")  # type: ignore[no-untyped-call]

        def plan(**filters: Any) -> str:
            q = (
                SessionRow.select()
                .where(*filter_conditions(SessionFilter(**filters)))
                .order_by(SessionRow.created_at.desc(), SessionRow.session_id.desc())
                .limit(100)
            )
            return _plan(store, q)

        default = plan()
        assert "sessions_archived_created" in default and "SCAN sessions" not in default
        assert "session_labels_pair" in plan(labels={"n": "3"})
        assert "sessions_mode_created" in plan(mode="power", archived=None)
        assert "sessions_created_at_session_id" in plan(created_after=5.0, archived=None)
        assert "sessions_last_active_at" in plan(active_after=5.0, active_before=6.0, archived=None)
        study = (
            SessionRow.select()
            .where(SessionRow.study_id == "beam")
            .order_by(SessionRow.created_at.desc(), SessionRow.session_id.desc())
        )
        assert "sessions_study" in _plan(store, study)
        host = (
            SessionRow.select()
            .where(SessionRow.host_id == "h")
            .order_by(SessionRow.created_at.desc(), SessionRow.session_id.desc())
        )
        assert "USING INDEX sessions_host" in _plan(store, host)
        search = store.db.execute_sql(  # type: ignore[no-untyped-call]
            "EXPLAIN QUERY PLAN SELECT rowid FROM messages_fts WHERE messages_fts MATCH 'x'"
        ).fetchall()
        assert "VIRTUAL TABLE INDEX" in " ".join(str(r[-1]) for r in search)
    finally:
        store.close()
