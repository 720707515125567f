"""The error table: each bad request gets its status code and a message a person understands,
and the daemon keeps serving."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import grpc
import pytest
from atomizer.v1 import session_pb2 as pb

from tests.conftest import Stubs

C = grpc.StatusCode

CASES: list[tuple[str, Callable[[Stubs], Any], grpc.StatusCode, str]] = [
    (
        "unknown session",
        lambda s: s.sessions.GetSession(pb.GetSessionRequest(session_id="nope")),
        C.NOT_FOUND,
        "does not exist",
    ),
    (
        "id with a slash",
        lambda s: s.sessions.GetSession(pb.GetSessionRequest(session_id="a/b")),
        C.INVALID_ARGUMENT,
        "not valid",
    ),
    (
        "id with dot-dot",
        lambda s: s.sessions.CreateSession(pb.CreateSessionRequest(session_id="..")),
        C.INVALID_ARGUMENT,
        "not valid",
    ),
    (
        "id with NUL",
        lambda s: s.sessions.GetSession(pb.GetSessionRequest(session_id="a\0b")),
        C.INVALID_ARGUMENT,
        "not valid",
    ),
    (
        "10 KB id",
        lambda s: s.sessions.GetSession(pb.GetSessionRequest(session_id="a" * 10_000)),
        C.INVALID_ARGUMENT,
        "not valid",
    ),
    (
        "empty id",
        lambda s: s.sessions.GetSession(pb.GetSessionRequest()),
        C.INVALID_ARGUMENT,
        "required",
    ),
    (
        "unknown mode",
        lambda s: s.sessions.CreateSession(pb.CreateSessionRequest(mode=7)),  # type: ignore[arg-type]
        C.INVALID_ARGUMENT,
        "unknown mode",
    ),
    (
        "unspecified mode switch",
        lambda s: s.sessions.SwitchMode(pb.SwitchModeRequest(session_id="known")),
        C.INVALID_ARGUMENT,
        "unknown mode",
    ),
    (
        "power mode disabled",
        lambda s: s.sessions.CreateSession(pb.CreateSessionRequest(mode=pb.MODE_POWER)),
        C.PERMISSION_DENIED,
        "power mode",
    ),
    (
        "study id that is a path",
        lambda s: s.sessions.CreateSession(pb.CreateSessionRequest(study_id="../etc")),
        C.INVALID_ARGUMENT,
        "plain study name",
    ),
    (
        "absolute study path",
        lambda s: s.sessions.SetStudyContext(
            pb.SetStudyContextRequest(session_id="known", study_id="/etc")
        ),
        C.INVALID_ARGUMENT,
        "plain study name",
    ),
    (
        "study that does not exist",
        lambda s: s.sessions.CreateSession(pb.CreateSessionRequest(study_id="missing")),
        C.INVALID_ARGUMENT,
        "does not exist",
    ),
    (
        "empty text",
        lambda s: list(
            s.sessions.SendMessage(pb.SendMessageRequest(session_id="known", text="  "))
        ),
        C.INVALID_ARGUMENT,
        "empty",
    ),
    (
        "oversized text",
        lambda s: list(
            s.sessions.SendMessage(
                pb.SendMessageRequest(session_id="known", text="x" * (2 * 1024 * 1024))
            )
        ),
        C.INVALID_ARGUMENT,
        "daemon.max_message_bytes",
    ),
    (
        "send to unknown session",
        lambda s: list(s.sessions.SendMessage(pb.SendMessageRequest(session_id="nope", text="hi"))),
        C.NOT_FOUND,
        "does not exist",
    ),
    (
        "bad request id",
        lambda s: list(
            s.sessions.SendMessage(
                pb.SendMessageRequest(session_id="known", text="hi", request_id="a b")
            )
        ),
        C.INVALID_ARGUMENT,
        "request_id",
    ),
    (
        "interrupt with no turn",
        lambda s: s.sessions.Interrupt(pb.InterruptRequest(session_id="known")),
        C.FAILED_PRECONDITION,
        "no turn running",
    ),
    (
        "watch from a future seq",
        lambda s: list(
            s.sessions.WatchSession(pb.WatchSessionRequest(session_id="known", after_seq=10**9))
        ),
        C.INVALID_ARGUMENT,
        "in the future",
    ),
    (
        "bad page token",
        lambda s: s.sessions.ListSessions(pb.ListSessionsRequest(page_token="garbage!")),
        C.INVALID_ARGUMENT,
        "page_token",
    ),
    (
        "negative page size",
        lambda s: s.sessions.GetHistory(pb.GetHistoryRequest(session_id="known", page_size=-1)),
        C.INVALID_ARGUMENT,
        "page_size",
    ),
    (
        "unknown state filter",
        lambda s: s.sessions.ListSessions(pb.ListSessionsRequest(state=42)),
        C.INVALID_ARGUMENT,
        "state",
    ),  # type: ignore[arg-type]
]


@pytest.mark.parametrize(("case", "call", "code", "words"), CASES, ids=[c[0] for c in CASES])
def test_bad_request_gets_its_status_and_the_daemon_keeps_serving(
    shared_stubs: Stubs, case: str, call: Callable[[Stubs], Any], code: grpc.StatusCode, words: str
) -> None:
    shared_stubs.sessions.CreateSession(pb.CreateSessionRequest(session_id="known"))
    with pytest.raises(grpc.RpcError) as err:
        call(shared_stubs)
    assert err.value.code() == code, err.value.details()
    assert words in (err.value.details() or ""), err.value.details()
    assert "Traceback" not in (err.value.details() or "")
    still = shared_stubs.sessions.GetSession(pb.GetSessionRequest(session_id="known"), timeout=5)
    assert still.session.session_id == "known"


def test_sending_to_a_closed_session_says_how_to_reopen(shared_stubs: Stubs) -> None:
    shared_stubs.sessions.CreateSession(pb.CreateSessionRequest(session_id="shut"))
    shared_stubs.sessions.TerminateSession(pb.TerminateSessionRequest(session_id="shut"))
    with pytest.raises(grpc.RpcError) as err:
        list(shared_stubs.sessions.SendMessage(pb.SendMessageRequest(session_id="shut", text="hi")))
    assert err.value.code() == C.FAILED_PRECONDITION
    assert "reopens" in (err.value.details() or "")


def test_session_limit_is_resource_exhausted(short_tmp) -> None:
    from tests.conftest import stubs_for
    from tests.support.daemon import RunningDaemon

    with RunningDaemon(
        short_tmp, {"daemon": {"max_sessions": 2}, "agent": {"prewarm": False}}
    ) as d:
        stubs = stubs_for(d.channel())
        for _ in range(2):
            stubs.sessions.CreateSession(pb.CreateSessionRequest())
        with pytest.raises(grpc.RpcError) as err:
            stubs.sessions.CreateSession(pb.CreateSessionRequest())
        assert err.value.code() == C.RESOURCE_EXHAUSTED
        assert "daemon.max_sessions" in (err.value.details() or "")
