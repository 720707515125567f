"""The daemon on a real PostgreSQL server: a session's life end to end, and several hosts'
daemons sharing one database (each serves and recovers only its own host's sessions)."""

from __future__ import annotations

import queue
import threading
from pathlib import Path
from typing import Any

import grpc
import psycopg
import pytest
from atomizer.v1 import session_pb2 as pb

from tests.conftest import Stubs, stubs_for
from tests.support.daemon import RunningDaemon
from tests.support.turns import kinds, reply_text, send

# The fake agent asks to use Bash and waits for the answer: a turn that runs until we say so.
ASK = "[[ask:Bash]] then done"
# Which hosts have recorded a live agent of a session.
# (An agent under its shim has two rows: its process group and its shim's.)
AGENT_HOSTS = "SELECT DISTINCT host_id FROM agent_processes WHERE session_id = %s"


def host(workdir: Path, host_id: str, database: str, **extra: Any) -> RunningDaemon:
    """A daemon as one host of a fleet: its own dirs and agents' transcripts, the shared
    database."""
    workdir.mkdir(parents=True, exist_ok=True)
    config: dict[str, dict[str, Any]] = {
        "daemon": {"database": database, "host_id": host_id},
        "agent": {
            "env": {
                "HOME": str(workdir / "home"),
                # The CLI's transcripts are local to a machine.
                "FAKE_AGENT_TRANSCRIPT_DIR": str(workdir / "transcripts"),
            }
        },
        **extra,
    }
    (workdir / "transcripts").mkdir(exist_ok=True)
    return RunningDaemon(workdir, config)


def sql(url: str, query: str, *params: object) -> list[tuple[Any, ...]]:
    """A query straight to the shared database, as an operator would run it."""
    database = url.split("/")[3].split("?")[0]
    socket_dir = url.split("host=")[1]
    with psycopg.connect(dbname=database, user="atomizer", host=socket_dir) as conn:
        cur = conn.execute(query.encode(), params)  # type: ignore[call-overload]
        rows = cur.fetchall() if cur.description else []
        conn.commit()
        return rows


def failed_precondition(call: Any) -> str:
    with pytest.raises(grpc.RpcError) as err:
        call()
    assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION, err.value.details()
    return str(err.value.details())


class Turn:
    """A SendMessage read on a thread, its events handed over as they arrive."""

    def __init__(self, stubs: Stubs, session_id: str, text: str) -> None:
        self.events: queue.Queue[pb.SessionEvent | BaseException | None] = queue.Queue()
        self.seen: list[pb.SessionEvent] = []
        stream = stubs.sessions.SendMessage(
            pb.SendMessageRequest(session_id=session_id, text=text), timeout=60
        )

        def read() -> None:
            try:
                for r in stream:
                    self.events.put(r.event)
            except BaseException as e:
                self.events.put(e)
            self.events.put(None)

        self.thread = threading.Thread(target=read, daemon=True)
        self.thread.start()

    def until(self, kind: str) -> pb.SessionEvent:
        while True:
            item = self.events.get(timeout=30)
            if item is None:
                raise AssertionError(f"the turn ended before {kind}: {kinds(self.seen)}")
            if isinstance(item, BaseException):
                raise item
            self.seen.append(item)
            if item.WhichOneof("kind") == kind:
                return item


def test_a_session_from_creation_to_purge_on_postgresql(pg_url: str, short_tmp: Path) -> None:
    d = host(short_tmp / "a", "host-a", pg_url, **{"modes.power": {"enabled": True}})
    with d:
        stubs = stubs_for(d.channel())
        s = stubs.sessions.CreateSession(pb.CreateSessionRequest(session_id="pg-1")).session
        assert s.host_id == "host-a"
        events = send(stubs, "pg-1", "hello there")
        assert kinds(events)[-1] == "turn_completed" and reply_text(events) == "echo: hello there"
        stubs.sessions.SwitchMode(pb.SwitchModeRequest(session_id="pg-1", mode=pb.MODE_POWER))
        audit = stubs.sessions.ListAuditEvents(pb.ListAuditEventsRequest(session_id="pg-1"))
        assert [e.detail for e in audit.events] == ["user -> power"]
    # A restart: the conversation, its history and its numbering carry on.
    d.start()
    try:
        stubs = stubs_for(d.channel())
        got = stubs.sessions.GetSession(pb.GetSessionRequest(session_id="pg-1")).session
        assert (got.mode, got.message_count, got.host_id) == (pb.MODE_POWER, 2, "host-a")
        second = send(stubs, "pg-1", "again")
        # (The mode changed since the conversation began: the new context leads the message.)
        assert reply_text(second).endswith("again") and second[0].seq > events[-1].seq
        history = stubs.sessions.GetHistory(pb.GetHistoryRequest(session_id="pg-1")).messages
        assert [m.content for m in history][:3] == ["hello there", "echo: hello there", "again"]
        assert len(history) == 4 and history[3].content == reply_text(second)
        assert all(m.status == pb.MESSAGE_STATUS_COMPLETE for m in history)
        stubs.sessions.TerminateSession(pb.TerminateSessionRequest(session_id="pg-1", purge=True))
        with pytest.raises(grpc.RpcError) as err:
            stubs.sessions.GetSession(pb.GetSessionRequest(session_id="pg-1"))
        assert err.value.code() == grpc.StatusCode.NOT_FOUND
    finally:
        d.stop()
    assert sql(pg_url, "SELECT count(*) FROM sessions") == [(0,)]
    assert sql(pg_url, "SELECT count(*) FROM messages") == [(0,)]
    assert sql(pg_url, "SELECT count(*) FROM audit_events") == [(0,)]


def test_hosts_share_the_database_and_serve_only_their_own_sessions(
    pg_url: str, short_tmp: Path
) -> None:
    a = host(short_tmp / "a", "host-a", pg_url).start()
    b = host(short_tmp / "b", "host-b", pg_url).start()
    try:
        on_a, on_b = stubs_for(a.channel()), stubs_for(b.channel())
        on_a.sessions.CreateSession(pb.CreateSessionRequest(session_id="sa"))
        send(on_a, "sa", "from a")
        on_b.sessions.CreateSession(pb.CreateSessionRequest(session_id="sb"))
        # Listed, read and audited anywhere; the owner is named.
        listed = on_b.sessions.ListSessions(pb.ListSessionsRequest()).sessions
        assert sorted((s.session_id, s.host_id) for s in listed) == [
            ("sa", "host-a"),
            ("sb", "host-b"),
        ]
        only_a = on_b.sessions.ListSessions(pb.ListSessionsRequest(host_id="host-a")).sessions
        assert [s.session_id for s in only_a] == ["sa"]
        seen = on_b.sessions.GetSession(pb.GetSessionRequest(session_id="sa")).session
        assert (seen.host_id, seen.message_count) == ("host-a", 2)
        history = on_b.sessions.GetHistory(pb.GetHistoryRequest(session_id="sa")).messages
        assert [m.content for m in history] == ["from a", "echo: from a"]
        on_b.sessions.ListAuditEvents(pb.ListAuditEventsRequest(session_id="sa"))
        # What needs the session's agent or its live events: only on its host.
        refused = [
            lambda: send(on_b, "sa", "from b"),
            lambda: on_b.sessions.Interrupt(pb.InterruptRequest(session_id="sa")),
            lambda: on_b.sessions.SwitchMode(
                pb.SwitchModeRequest(session_id="sa", mode=pb.MODE_USER)
            ),
            lambda: on_b.sessions.SetStudyContext(pb.SetStudyContextRequest(session_id="sa")),
            lambda: on_b.sessions.TerminateSession(
                pb.TerminateSessionRequest(session_id="sa", purge=True)
            ),
            lambda: list(on_b.sessions.WatchSession(pb.WatchSessionRequest(session_id="sa"))),
            lambda: on_b.sessions.RespondToPermission(
                pb.RespondToPermissionRequest(session_id="sa", request_id="x", allow=True)
            ),
            lambda: on_b.sessions.AnswerQuestion(
                pb.AnswerQuestionRequest(session_id="sa", request_id="x")
            ),
            lambda: on_b.sessions.CreateSession(pb.CreateSessionRequest(session_id="sa")),
        ]
        for call in refused:
            assert "host-a" in failed_precondition(call)
        # Nothing of it reached the database: a's session is as a left it.
        stored = sql(pg_url, "SELECT message_count, closed FROM sessions WHERE session_id = 'sa'")
        assert stored == [(2, False)]
        # A second daemon of a host already running is refused, whatever its runtime dir.
        twin = host(short_tmp / "a2", "host-a", pg_url)
        twin.start(wait=False)
        assert twin.proc is not None and twin.proc.wait(30) != 0
        assert "another atomizerd with host_id 'host-a'" in twin.log()
    finally:
        b.stop()
        a.stop()


def test_a_running_turn_on_one_host_survives_another_hosts_start_up(
    pg_url: str, short_tmp: Path
) -> None:
    a = host(short_tmp / "a", "host-a", pg_url).start()
    b = host(short_tmp / "b", "host-b", pg_url)
    try:
        on_a = stubs_for(a.channel())
        on_a.sessions.CreateSession(pb.CreateSessionRequest(session_id="slow"))
        turn = Turn(on_a, "slow", ASK)
        asked = turn.until("permission_request").permission_request
        # Mid-turn: its user message is pending and its agent recorded, in the shared database.
        assert sql(pg_url, "SELECT status FROM messages WHERE session_id = 'slow'") == [
            ("pending",)
        ]
        assert sql(pg_url, AGENT_HOSTS, "slow") == [("host-a",)]
        # Host b starts, recovering what its own previous daemon may have left.
        b.start()
        on_b = stubs_for(b.channel())
        on_b.sessions.CreateSession(pb.CreateSessionRequest(session_id="on-b"))
        # a's turn goes on: it is answered and completes, uninterrupted.
        on_a.sessions.RespondToPermission(
            pb.RespondToPermissionRequest(
                session_id="slow", request_id=asked.request_id, allow=True
            )
        )
        done = turn.until("turn_completed").turn_completed
        assert not done.interrupted
        assert "permission Bash: allow" in done.text
        history = on_b.sessions.GetHistory(pb.GetHistoryRequest(session_id="slow")).messages
        assert [m.status for m in history] == [pb.MESSAGE_STATUS_COMPLETE] * 2
        records = b.log_records()
        assert not [r for r in records if "previous daemon" in str(r.get("event"))]
    finally:
        b.stop()
        a.stop()


@pytest.mark.parametrize("shim", [True, False], ids=["shim", "pipes"])
def test_after_a_crash_only_the_crashed_hosts_daemon_takes_its_turn_up(
    pg_url: str, short_tmp: Path, shim: bool
) -> None:
    """Another host's start-up never touches the turn; the crashed host's next daemon adopts
    it with its agent (under a shim) or settles it as interrupted (without one)."""
    agent = {"agent": {"survive_restart": shim}}
    a = host(short_tmp / "a", "host-a", pg_url, **agent).start()
    b = host(short_tmp / "b", "host-b", pg_url, **agent)
    try:
        on_a = stubs_for(a.channel())
        on_a.sessions.CreateSession(pb.CreateSessionRequest(session_id="cut"))
        asked = Turn(on_a, "cut", ASK).until("permission_request")
        a.kill()  # SIGKILL: no shutdown, the turn is left pending
        b.start()
        # b leaves a's turn alone (a's next daemon may be on its way) ...
        assert sql(pg_url, "SELECT status FROM messages WHERE session_id = 'cut'") == [("pending",)]
        assert sql(pg_url, AGENT_HOSTS, "cut") == [("host-a",)]
        a.start()
        on_a = stubs_for(a.channel())
        if shim:  # ... a's next daemon adopts it: the request is open again, and answered
            watch = on_a.sessions.WatchSession(
                pb.WatchSessionRequest(session_id="cut", after_seq=asked.seq - 1), timeout=30
            )
            again = next(iter(watch)).event
            assert again.permission_request.request_id == asked.permission_request.request_id
            on_a.sessions.RespondToPermission(
                pb.RespondToPermissionRequest(
                    session_id="cut", request_id=asked.permission_request.request_id, allow=True
                )
            )
            for r in watch:
                if r.event.HasField("turn_completed"):
                    watch.cancel()
                    break
            statuses = [pb.MESSAGE_STATUS_COMPLETE] * 2
        else:  # ... or settles it, and forgets its dead agent
            statuses = [pb.MESSAGE_STATUS_INTERRUPTED] * 2
            assert sql(pg_url, AGENT_HOSTS, "cut") == []
        history = on_a.sessions.GetHistory(pb.GetHistoryRequest(session_id="cut"))
        assert [m.status for m in history.messages] == statuses
    finally:
        b.stop()
        a.stop()


def test_a_session_moves_to_another_host_and_is_reseeded_there(
    pg_url: str, short_tmp: Path
) -> None:
    """docs/operations.md: close it on its host, change its host_id, reopen it on the new
    host; the CLI's transcript stayed behind, so the conversation is reseeded from the
    stored history."""
    a = host(short_tmp / "a", "host-a", pg_url).start()
    b = host(short_tmp / "b", "host-b", pg_url).start()
    try:
        on_a, on_b = stubs_for(a.channel()), stubs_for(b.channel())
        on_a.sessions.CreateSession(pb.CreateSessionRequest(session_id="mover"))
        assert reply_text(send(on_a, "mover", "first words")) == "echo: first words"
        on_a.sessions.TerminateSession(pb.TerminateSessionRequest(session_id="mover"))
        sql(pg_url, "UPDATE sessions SET host_id = 'host-b' WHERE session_id = 'mover'")
        # The old host no longer serves it, not even to reopen it.
        assert "host-b" in failed_precondition(
            lambda: on_a.sessions.CreateSession(pb.CreateSessionRequest(session_id="mover"))
        )
        reopened = on_b.sessions.CreateSession(pb.CreateSessionRequest(session_id="mover"))
        assert reopened.session.host_id == "host-b"
        events = send(on_b, "mover", "[[history]]")
        assert kinds(events)[-1] == "turn_completed"
        assert any("reseeded from stored history" in str(r.get("event")) for r in b.log_records())
        history = on_b.sessions.GetHistory(pb.GetHistoryRequest(session_id="mover")).messages
        assert [m.content for m in history][:2] == ["first words", "echo: first words"]
        assert len(history) == 4
    finally:
        b.stop()
        a.stop()
