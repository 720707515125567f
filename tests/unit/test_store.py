"""The store on both engines (an SQLite file, a real PostgreSQL server): the turn's writes,
their one transaction, governance rows, the purge, and what each host of a fleet sees."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator

import pytest

from atomizerd.model import AgentProcessRecord, AuditRecord, ToolCallRecord, TurnOutcome
from atomizerd.store.db import Store
from atomizerd.store.lock import DatabaseInUse
from tests.support.daemon import REPO


@pytest.fixture
def store(store_url: str) -> Iterator[Store]:
    s = Store(store_url)
    yield s
    s.close()


def test_a_turn_is_stored_and_read_back(store: Store) -> None:
    store.create_session("s1", "user", None, "agent-1", budget_usd=2.0)
    user, session = store.add_user_message("s1", "t1", "hello", "req-1")
    assert (user.status, session.message_count) == ("pending", 1)
    store.checkpoint_reply("s1", "t1", "par")
    store.checkpoint_reply("s1", "t1", "partial")  # replaces the first
    outcome = TurnOutcome(
        "complete",
        "hi there",
        [ToolCallRecord("tc1", "Read", '{"path": "x"}', "ok")],
        cost_usd=0.25,
        usage={"input_tokens": 3},
    )
    reply, session = store.finish_turn("s1", "t1", outcome, agent_cost_usd=0.25)
    assert (session.message_count, session.total_cost_usd, session.agent_cost_usd) == (
        2,
        0.25,
        0.25,
    )
    history = store.history("s1", after_id=0, limit=10)
    assert [(m.role, m.content, m.status) for m in history] == [
        ("user", "hello", "complete"),
        ("assistant", "hi there", "complete"),
    ]
    assert history[1].message_id == reply.message_id > user.message_id
    assert history[1].tool_calls[0].name == "Read" and history[1].usage == {"input_tokens": 3}
    assert [m.turn_id for m in store.find_turn_by_request("s1", "req-1")] == ["t1", "t1"]
    assert [m.content for m in store.recent_messages("s1", 1)] == ["hi there"]
    # The finished turn's checkpoint is gone: nothing is left to settle after a crash.
    assert store.settle_unfinished_turns() == []
    got = store.get_session("s1")
    assert got is not None and got.budget_usd == 2.0 and got.total_cost_usd == 0.25


def test_the_end_of_a_turn_is_one_transaction(store: Store, monkeypatch) -> None:
    store.create_session("s1", "user", None, "agent-1")
    store.add_user_message("s1", "t1", "hello", None)
    store.checkpoint_reply("s1", "t1", "so far")

    def fail(session_id: str) -> None:
        raise RuntimeError("the connection broke before the commit")

    monkeypatch.setattr(store, "_session_now", fail)
    with pytest.raises(RuntimeError):
        store.finish_turn("s1", "t1", TurnOutcome("complete", "reply", cost_usd=1.0))
    monkeypatch.undo()
    # Nothing of the turn's end was written: not the reply, the status, the cost, the count.
    assert [(m.role, m.status) for m in store.history("s1", after_id=0, limit=10)] == [
        ("user", "pending")
    ]
    session = store.get_session("s1")
    assert session is not None and (session.message_count, session.total_cost_usd) == (1, 0.0)
    # ... and the checkpoint is still there for the crash recovery to settle the turn with.
    assert store.settle_unfinished_turns() == [("s1", "t1")]
    assert store.history("s1", after_id=0, limit=10)[-1].content == "so far"


def test_audit_rules_and_purge(store: Store) -> None:
    store.create_session("s1", "user", None, "agent-1")
    store.create_session("s2", "user", None, "agent-2")
    for sid in ("s1", "s2"):
        store.add_audit(AuditRecord(sid, "permission", True, "client", tool_name="Bash"))
    store.remember_rule("s1", "Bash", "d" * 64, True)
    store.remember_rule("s1", "Bash", "d" * 64, False)  # a second answer replaces the first
    assert store.find_rule("s1", "Bash", "d" * 64) is False
    assert [a.tool_name for a in store.audit_events("s1", after_id=0, limit=10)] == ["Bash"]
    store.add_user_message("s1", "t1", "hello", None)
    store.delete_session("s1")
    assert store.get_session("s1") is None
    assert store.audit_events("s1", after_id=0, limit=10) == []
    assert store.history("s1", after_id=0, limit=10) == []
    assert store.find_rule("s1", "Bash", "d" * 64) is None
    assert len(store.audit_events("s2", after_id=0, limit=10)) == 1


def test_sequence_numbers_are_never_reserved_backwards(store: Store) -> None:
    store.create_session("s1", "user", None, "agent-1")
    record = store.reserve_seq("s1", 2048)
    assert record is not None and record.seq_reserved == 2048
    # A writer with an older view of the session (another daemon, a late retry): no effect.
    record = store.reserve_seq("s1", 1024)
    assert record is not None and record.seq_reserved == 2048
    assert store.reserve_seq("missing", 10) is None


def _at(url: str, host: str) -> Store:
    return Store(url, host_id=host)


def test_each_host_recovers_and_purges_only_its_own(store_url: str) -> None:
    a = _at(store_url, "host-a")
    try:
        a.create_session("sa", "user", None, "agent-a")
        a.add_user_message("sa", "ta", "running on a", None)
        a.record_agent_process(AgentProcessRecord(4242, "sa", 1))
    finally:
        a.close()
    b = _at(store_url, "host-b")
    try:
        b.create_session("sb", "user", None, "agent-b")
        b.add_user_message("sb", "tb", "running on b", None)
        # The same process group id on another machine is another process.
        b.record_agent_process(AgentProcessRecord(4242, "sb", 2))
        assert [(p.session_id, p.start_time) for p in b.agent_processes()] == [("sb", 2)]
        b.forget_agent_process(4242)
        assert b.agent_processes() == []
        assert b.settle_unfinished_turns() == [("sb", "tb")]  # never a's running turn
        assert b.inactive_sessions(before=float("inf"), limit=10) == ["sb"]
        assert (b.count_sessions(), b.count_open_sessions()) == (1, 1)
        # Every host's sessions are listed (one place to audit), or one host's.
        listed = b.list_sessions(limit=10, after=None, study_id=None, closed=None)
        assert sorted((r.session_id, r.host_id) for r in listed) == [
            ("sa", "host-a"),
            ("sb", "host-b"),
        ]
        only_a = b.list_sessions(limit=10, after=None, study_id=None, closed=None, host_id="host-a")
        assert [r.session_id for r in only_a] == ["sa"]
    finally:
        b.close()
    a = _at(store_url, "host-a")
    try:
        assert [(p.session_id, p.start_time) for p in a.agent_processes()] == [("sa", 1)]
        assert a.settle_unfinished_turns() == [("sa", "ta")]
    finally:
        a.close()


def test_rows_without_a_host_go_to_the_first_daemon_that_opens_the_database(
    store_url: str,
) -> None:
    tool = Store(store_url)  # no host: as rows written before hosts were recorded
    try:
        tool.create_session("old", "user", None, "agent-old")
        tool.record_agent_process(AgentProcessRecord(77, "old", 5))
        assert tool.get_session("old").host_id == ""  # type: ignore[union-attr]
    finally:
        tool.close()
    first = _at(store_url, "host-a")
    try:
        assert first.get_session("old").host_id == "host-a"  # type: ignore[union-attr]
        assert [p.pgid for p in first.agent_processes()] == [77]
    finally:
        first.close()
    second = _at(store_url, "host-b")
    try:
        assert second.get_session("old").host_id == "host-a"  # type: ignore[union-attr]
        assert second.agent_processes() == []
    finally:
        second.close()


def test_an_exclusive_store_keeps_out_a_second_daemon_of_its_host_only(store_url: str) -> None:
    first = Store(store_url, exclusive=True, host_id="host-a")
    try:
        with pytest.raises(DatabaseInUse) as err:
            Store(store_url, exclusive=True, host_id="host-a")
        assert "another atomizerd" in str(err.value)
        if store_url.startswith("postgresql"):
            assert "'host-a'" in str(err.value) and f"pid {os.getpid()}" in str(err.value)
            # Another host shares the server.
            Store(store_url, exclusive=True, host_id="host-b").close()
        else:
            # An SQLite file is one machine's: one daemon, whatever its host_id.
            with pytest.raises(DatabaseInUse):
                Store(store_url, exclusive=True, host_id="host-b")
    finally:
        first.close()
    Store(store_url, exclusive=True, host_id="host-a").close()  # free again once closed


# --- two writers at once (PostgreSQL: two processes, as two daemons would be) ----------------

WRITER = """
import sys
from atomizerd.store.db import Store
from atomizerd.model import TurnOutcome

url, host, turns, offset = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
store = Store(url, host_id=host)
print("ready", flush=True)
sys.stdin.readline()  # both start at once
seen = []
for i in range(turns):
    turn = f"{host}-{i}"
    store.add_user_message("shared", turn, "hi", None)
    _, record = store.finish_turn("shared", turn, TurnOutcome("complete", "ok", cost_usd=0.5))
    seen.append(record.total_cost_usd)
    # Reservations from both writers interleave; each also repeats one of its older ones.
    store.reserve_seq("shared", 2 * (i + 1) * 1024 + offset)
    store.reserve_seq("shared", 2 * i * 1024 + offset)
assert seen == sorted(seen), "the cost went down"
print("done", seen[-1], flush=True)
store.close()
"""


def test_two_writers_at_once_lose_no_cost_and_never_lower_the_seq(pg_url: str) -> None:
    setup = Store(pg_url, host_id="host-a")
    setup.create_session("shared", "user", None, "agent", budget_usd=1000.0)
    setup.close()
    turns = 60
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", WRITER, pg_url, host, str(turns), str(offset)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            env=env,
        )
        for host, offset in (("host-a", 0), ("host-b", 1))
    ]
    try:
        for p in procs:
            assert p.stdout is not None and p.stdout.readline().strip() == "ready"
        for p in procs:
            assert p.stdin is not None
            p.stdin.write("go\n")
            p.stdin.flush()
        outputs = [p.communicate(timeout=60)[0] for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    assert [p.returncode for p in procs] == [0, 0], outputs
    store = Store(pg_url)
    try:
        session = store.get_session("shared")
        assert session is not None
        # Every increment counted: the count, the spend (the budget check reads this record).
        assert session.message_count == 2 * 2 * turns
        assert session.total_cost_usd == pytest.approx(0.5 * 2 * turns)
        # The highest reservation of either writer stands.
        assert session.seq_reserved == 2 * turns * 1024 + 1
        # The last writer to finish saw every turn of both.
        assert max(float(o.split()[1]) for o in outputs) == pytest.approx(0.5 * 2 * turns)
        assert all(m.status == "complete" for m in store.history("shared", after_id=0, limit=1000))
    finally:
        store.close()
