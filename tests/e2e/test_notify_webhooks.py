"""Webhooks with the real CLI: its permission request and its turn's end reach a real
receiver on loopback, signed; the person told answers with the request id the notification
carries."""

from __future__ import annotations

import pytest
from atomizer.v1 import session_pb2 as pb

from tests.e2e.conftest import E2E
from tests.e2e.test_approval_edits import write
from tests.e2e.test_governance import decided, send_answering
from tests.support.webhook_receiver import Receiver

pytestmark = pytest.mark.e2e

SECRET = "e2e-secret"


def test_permission_request_and_turn_completed_are_delivered_signed(e2e: E2E) -> None:
    target = e2e.workdir / "told.txt"
    with Receiver(SECRET) as r:
        hook = {"url": r.url, "secret": SECRET, "name": "ops", "labels": {"team": "cfd"}}
        stubs = e2e.start({"notify": {"webhooks": [hook]}})
        stubs.sessions.CreateSession(
            pb.CreateSessionRequest(session_id="w", labels={"team": "cfd", "title": "Beam"})
        )

        def answer(req: pb.PermissionRequest) -> None:
            (told,) = r.wait_for(1, event="permission_request")
            assert told.doc["data"]["request_id"] == req.request_id
            assert told.doc["data"]["tool_name"] == "Write"
            stubs.sessions.RespondToPermission(
                pb.RespondToPermissionRequest(
                    session_id="w", request_id=told.doc["data"]["request_id"], allow=True
                ),
                timeout=10,
            )

        events = send_answering(stubs, "w", write(target, "hello"), answer)
        (decision,) = decided(events)
        assert decision.allow and target.read_text() == "hello"
        (done,) = r.wait_for(1, event="turn_completed")
        assert done.verified and done.doc["session"] == {
            "id": "w",
            "title": "Beam",
            "labels": {"team": "cfd", "title": "Beam"},
            "study": "",
            "mode": "user",
        }
        assert done.doc["turn_id"] == events[0].turn_id
        assert "hello" not in done.body.decode()  # no bodies without include_text
        # Each one verified by the receiver, in the order of the events.
        assert [g.doc["event"] for g in r.accepted()] == ["permission_request", "turn_completed"]
        assert all(g.verified for g in r.received)
