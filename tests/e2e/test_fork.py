"""ForkSession with the real CLI: the fork's first request carries the earlier turns (all, or
up to the chosen reply), and the two conversations go on apart; read from what the fake
Messages API received."""

from __future__ import annotations

import grpc
import pytest
from atomizer.v1 import session_pb2 as pb

from tests.conftest import Stubs
from tests.e2e.conftest import E2E
from tests.support.turns import kinds, send

pytestmark = pytest.mark.e2e


def user_texts(e2e: E2E) -> list[str]:
    """The user's own texts the last model request carried (CLI notes left out)."""
    return [t for t in e2e.api.requests[-1].texts("user") if not t.startswith("<")]


def history(stubs: Stubs, sid: str) -> list[pb.Message]:
    return list(stubs.sessions.GetHistory(pb.GetHistoryRequest(session_id=sid)).messages)


def fork(stubs: Stubs, sid: str, **kw: object) -> pb.Session:
    return stubs.sessions.ForkSession(pb.ForkSessionRequest(session_id=sid, **kw)).session


def test_a_fork_carries_the_earlier_turns_and_goes_on_apart(e2e: E2E) -> None:
    stubs = e2e.start()
    stubs.sessions.CreateSession(pb.CreateSessionRequest(session_id="o", model="claude-haiku-4-5"))
    for text in ("turn one", "turn two", "turn three"):
        send(stubs, "o", text)
    replies = [m for m in history(stubs, "o") if m.role == pb.ROLE_ASSISTANT]

    # At the first reply: the fork holds turn one only.
    early = fork(stubs, "o", new_session_id="f1", at_message_id=replies[0].message_id)
    assert (early.session_id, early.forked_from, early.model) == ("f1", "o", "claude-haiku-4-5")
    assert [m.content for m in history(stubs, "f1")] == ["turn one", "echo: turn one"]
    events = send(stubs, "f1", "fork one goes on")
    assert kinds(events)[-1] == "turn_completed"
    assert user_texts(e2e) == ["turn one", "fork one goes on"]
    assert e2e.api.requests[-1].model == "claude-haiku-4-5"

    # At the last reply (the default): all three turns.
    whole = fork(stubs, "o")
    assert whole.forked_from == "o" and whole.message_count == 6
    send(stubs, whole.session_id, "fork two goes on")
    assert user_texts(e2e) == ["turn one", "turn two", "turn three", "fork two goes on"]

    # The original never sees the forks' turns; each fork resumes its own conversation.
    send(stubs, "o", "the original goes on")
    assert user_texts(e2e) == ["turn one", "turn two", "turn three", "the original goes on"]
    e2e.stop()
    stubs = e2e.start()
    send(stubs, "f1", "after a restart")
    assert user_texts(e2e) == ["turn one", "fork one goes on", "after a restart"]


def test_fork_points_are_checked(e2e: E2E) -> None:
    stubs = e2e.start()
    stubs.sessions.CreateSession(pb.CreateSessionRequest(session_id="x"))

    def code(**kw: object) -> grpc.StatusCode:
        with pytest.raises(grpc.RpcError) as err:
            stubs.sessions.ForkSession(pb.ForkSessionRequest(**kw))
        return err.value.code()

    assert code(session_id="x") == grpc.StatusCode.FAILED_PRECONDITION  # nothing to fork yet
    send(stubs, "x", "hello")
    user, reply = history(stubs, "x")
    assert code(session_id="x", at_message_id=user.message_id) == grpc.StatusCode.INVALID_ARGUMENT
    assert code(session_id="x", at_message_id=reply.message_id + 100) == grpc.StatusCode.NOT_FOUND
    assert code(session_id="x", new_session_id="x") == grpc.StatusCode.FAILED_PRECONDITION
    assert code(session_id="nope") == grpc.StatusCode.NOT_FOUND
    assert code(session_id="x", new_session_id="../bad") == grpc.StatusCode.INVALID_ARGUMENT
