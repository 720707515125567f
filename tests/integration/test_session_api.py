"""The unary SessionService RPCs through the real daemon on a real Unix socket."""

from __future__ import annotations

import grpc
import pytest
from atomizer.v1 import daemon_pb2
from atomizer.v1 import session_pb2 as pb

from tests.conftest import Stubs, stubs_for
from tests.support.daemon import RunningDaemon


def create(stubs: Stubs, **kw: object) -> pb.Session:
    return stubs.sessions.CreateSession(pb.CreateSessionRequest(**kw), timeout=10).session


def test_create_generates_a_collision_safe_id_and_defaults_to_user_mode(
    shared_stubs: Stubs,
) -> None:
    a, b = create(shared_stubs), create(shared_stubs)
    assert a.session_id != b.session_id
    assert len(a.session_id) >= 20
    assert a.mode == pb.MODE_USER
    assert a.state != pb.SESSION_STATE_CLOSED
    assert a.agent_session_id and a.agent_session_id != b.agent_session_id
    assert a.created_at.seconds > 0 and a.last_active_at.seconds > 0


def test_get_returns_what_create_made(shared_stubs: Stubs) -> None:
    made = create(shared_stubs, session_id="study-chat_1")
    got = shared_stubs.sessions.GetSession(pb.GetSessionRequest(session_id="study-chat_1")).session
    assert got.session_id == "study-chat_1"
    assert got.agent_session_id == made.agent_session_id
    assert got.message_count == 0 and got.total_cost_usd == 0


def test_create_with_an_existing_id_reopens_it(shared_stubs: Stubs) -> None:
    first = create(shared_stubs, session_id="again")
    shared_stubs.sessions.TerminateSession(pb.TerminateSessionRequest(session_id="again"))
    closed = shared_stubs.sessions.GetSession(pb.GetSessionRequest(session_id="again")).session
    assert closed.state == pb.SESSION_STATE_CLOSED
    reopened = create(shared_stubs, session_id="again")
    assert reopened.state != pb.SESSION_STATE_CLOSED
    assert reopened.agent_session_id == first.agent_session_id  # same conversation


def test_list_pages_newest_first_and_filters(daemon: RunningDaemon, stubs: Stubs) -> None:
    (daemon.root / "studies" / "beam").mkdir()
    ids = [create(stubs, session_id=f"p{i}").session_id for i in range(5)]
    create(stubs, session_id="withstudy", study_id="beam")
    seen: list[str] = []
    token = ""
    while True:
        resp = stubs.sessions.ListSessions(pb.ListSessionsRequest(page_size=2, page_token=token))
        assert len(resp.sessions) <= 2
        seen += [s.session_id for s in resp.sessions]
        token = resp.next_page_token
        if not token:
            break
    assert seen == ["withstudy", *reversed(ids)]
    by_study = stubs.sessions.ListSessions(pb.ListSessionsRequest(study_id="beam")).sessions
    assert [s.session_id for s in by_study] == ["withstudy"]
    stubs.sessions.TerminateSession(pb.TerminateSessionRequest(session_id="p0"))
    closed = stubs.sessions.ListSessions(
        pb.ListSessionsRequest(state=pb.SESSION_STATE_CLOSED)
    ).sessions
    assert [s.session_id for s in closed] == ["p0"]


def test_terminate_with_purge_deletes_the_session(shared_stubs: Stubs) -> None:
    create(shared_stubs, session_id="gone")
    resp = shared_stubs.sessions.TerminateSession(
        pb.TerminateSessionRequest(session_id="gone", purge=True)
    )
    assert not resp.HasField("session")
    with pytest.raises(grpc.RpcError) as err:
        shared_stubs.sessions.GetSession(pb.GetSessionRequest(session_id="gone"))
    assert err.value.code() == grpc.StatusCode.NOT_FOUND


def test_set_study_context_attaches_and_detaches(
    shared_daemon: RunningDaemon, shared_stubs: Stubs
) -> None:
    (shared_daemon.root / "studies" / "wing").mkdir()
    create(shared_stubs, session_id="s1")
    s = shared_stubs.sessions.SetStudyContext(
        pb.SetStudyContextRequest(session_id="s1", study_id="wing")
    ).session
    assert s.study_id == "wing"
    s = shared_stubs.sessions.SetStudyContext(pb.SetStudyContextRequest(session_id="s1")).session
    assert s.study_id == ""


def test_switch_mode_to_power_is_refused_unless_enabled(shared_stubs: Stubs) -> None:
    create(shared_stubs, session_id="m1")
    with pytest.raises(grpc.RpcError) as err:
        shared_stubs.sessions.SwitchMode(pb.SwitchModeRequest(session_id="m1", mode=pb.MODE_POWER))
    assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED
    assert "modes.power.enabled" in (err.value.details() or "")


def test_switch_mode_when_power_is_enabled(short_tmp) -> None:
    with RunningDaemon(short_tmp, {"modes.power": {"enabled": True}}) as d:
        stubs = stubs_for(d.channel())
        create(stubs, session_id="m2")
        s = stubs.sessions.SwitchMode(pb.SwitchModeRequest(session_id="m2", mode=pb.MODE_POWER))
        assert s.session.mode == pb.MODE_POWER
        assert create(stubs, mode=pb.MODE_POWER).mode == pb.MODE_POWER


def test_history_pages_oldest_first(shared_stubs: Stubs) -> None:
    create(shared_stubs, session_id="h1")
    for text in ("one", "two"):
        events = list(
            shared_stubs.sessions.SendMessage(
                pb.SendMessageRequest(session_id="h1", text=text), timeout=60
            )
        )
        assert events[-1].event.WhichOneof("kind") == "turn_completed"
    page1 = shared_stubs.sessions.GetHistory(pb.GetHistoryRequest(session_id="h1", page_size=3))
    page2 = shared_stubs.sessions.GetHistory(
        pb.GetHistoryRequest(session_id="h1", page_size=3, page_token=page1.next_page_token)
    )
    assert not page2.next_page_token
    messages = [*page1.messages, *page2.messages]
    assert [(m.role, m.status) for m in messages] == [
        (pb.ROLE_USER, pb.MESSAGE_STATUS_COMPLETE),
        (pb.ROLE_ASSISTANT, pb.MESSAGE_STATUS_COMPLETE),
    ] * 2
    assert messages[0].content == "one" and "one" in messages[1].content
    assert messages[1].turn_id == messages[0].turn_id
    session = shared_stubs.sessions.GetSession(pb.GetSessionRequest(session_id="h1")).session
    assert session.message_count == 4


def test_get_status_reports_the_daemon(stubs: Stubs) -> None:
    create(stubs)
    status = stubs.daemon.GetStatus(daemon_pb2.GetStatusRequest())
    assert status.version
    assert status.sessions_known == 1
    assert status.pool_capacity == 8
    assert "fake_agent.py" in status.agent_command
    assert status.uptime_seconds >= 0
