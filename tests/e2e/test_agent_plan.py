"""The agent's plan with the real CLI (issue 25): Session.plan and plan_updated, from the
ExitPlanMode request and the CLI's get_plan, shown by atomizerctl show."""

from __future__ import annotations

import pytest
from atomizer.v1 import session_pb2 as pb

from tests.e2e.conftest import E2E
from tests.e2e.test_governance import send_answering
from tests.e2e.test_plan_mode import PLAN, answering, execute
from tests.integration.test_ctl import ctl

pytestmark = pytest.mark.e2e


def test_the_plan_is_kept_and_announced_when_the_agent_presents_it(e2e: E2E) -> None:
    stubs = e2e.start()
    stubs.sessions.CreateSession(pb.CreateSessionRequest(session_id="p", mode=pb.MODE_PLAN))
    assert stubs.sessions.GetSession(pb.GetSessionRequest(session_id="p")).session.plan == ""
    seen: list[pb.PermissionRequest] = []
    target = e2e.workdir / "notes.txt"
    events = send_answering(stubs, "p", execute(target), answering(stubs, "p", seen, allow=True))
    kinds = [e.WhichOneof("kind") for e in events]
    updates = [e.plan_updated.plan for e in events if e.WhichOneof("kind") == "plan_updated"]
    # Once, as the agent asks to carry it out; get_plan at the turn's end finds the same text.
    assert updates == [PLAN], kinds
    assert kinds.index("plan_updated") < kinds.index("permission_request")
    assert kinds[-1] == "turn_completed"
    assert stubs.sessions.GetSession(pb.GetSessionRequest(session_id="p")).session.plan == PLAN
    assert e2e.daemon is not None
    shown = ctl(e2e.daemon, "show", "p")
    assert shown.returncode == 0, shown.stderr
    assert PLAN in shown.stdout, shown.stdout
