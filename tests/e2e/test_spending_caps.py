"""Spending caps act mid-turn (issue 25, live usage), with the real daemon and the real pinned
CLI against the fake Messages API: a turn whose first model call already costs more than the
turn's cap is stopped before the agent makes its next call."""

from __future__ import annotations

import grpc
import pytest
from atomizer.v1 import session_pb2 as pb

from tests.e2e.conftest import E2E
from tests.support.turns import send

pytestmark = pytest.mark.e2e


def test_a_turn_that_crosses_its_cap_is_stopped_before_its_next_model_call(e2e: E2E) -> None:
    stubs = e2e.start({"modes.user": {"allowed_tools": ["Read"]}})
    stubs.sessions.CreateSession(pb.CreateSessionRequest(session_id="cap", turn_budget_usd=0.5))
    # 200k input tokens of an Opus model: about 1 USD by list prices, over the 0.5 cap. The
    # call streams its tool input slowly, so the stop lands while it is still under way.
    events = send(
        stubs,
        "cap",
        '[[tool:Read {"file_path": "/etc/hostname"}]] [[usage:200000:10]] [[slow:300]]',
    )
    notices = [e.notice for e in events if e.WhichOneof("kind") == "notice"]
    assert [n.kind for n in notices] == [pb.NOTICE_KIND_BUDGET_EXHAUSTED], notices
    assert "turn_budget_usd" in notices[0].message
    usages = [e.usage for e in events if e.WhichOneof("kind") == "usage"]
    assert usages[0].estimated_turn_cost_usd >= 0.5
    done = events[-1]
    assert done.WhichOneof("kind") == "turn_completed" and done.turn_completed.interrupted
    # The tool's result never went back to the model: the turn made one call only.
    calls = [r for r in e2e.api.requests if "/etc/hostname" in r.prompt_text]
    assert len(calls) == 1, [r.prompt_text for r in e2e.api.requests]


def test_caps_that_are_not_amounts_are_invalid_and_create_nothing(e2e: E2E) -> None:
    stubs = e2e.start({"budget": {"turn_usd": 1.0}})
    for bad in (
        {"turn_budget_usd": -1.0},
        {"turn_budget_usd": float("nan")},
        {"budget_usd": float("inf")},
        {"turn_budget_usd": 2.0},  # above the daemon's cap: it may only be lowered
    ):
        with pytest.raises(grpc.RpcError) as raised:
            stubs.sessions.CreateSession(pb.CreateSessionRequest(session_id="bad", **bad))
        assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT, bad
    assert not stubs.sessions.ListSessions(pb.ListSessionsRequest()).sessions
