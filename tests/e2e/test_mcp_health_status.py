"""MCP health end to end (issue 25): GetStatus counts the live agents' failing MCP servers and
a server seen failing during a turn is a notice, with the real daemon and the real pinned CLI
against the fake Messages API."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
from atomizer.v1 import daemon_pb2
from atomizer.v1 import session_pb2 as pb

from tests.e2e.conftest import E2E
from tests.integration.test_ctl import ctl
from tests.support.turns import send

pytestmark = pytest.mark.e2e

FAKE_MCP = [sys.executable, str(Path(__file__).parents[1] / "support" / "fake_mcp_server.py")]


def test_a_failing_server_is_counted_by_get_status_and_noticed_once(e2e: E2E) -> None:
    extra = json.dumps({"command": FAKE_MCP[0], "args": FAKE_MCP[1:]})
    broken = json.dumps({"command": "/nonexistent/mcp-server"})
    stubs = e2e.start({"mcp": {"servers": {"extra": extra, "broken": broken}}})
    assert e2e.daemon is not None
    status = stubs.daemon.GetStatus(daemon_pb2.GetStatusRequest())
    assert status.failing_mcp_servers == 0  # no live agent yet
    stubs.sessions.CreateSession(pb.CreateSessionRequest(session_id="mh"))
    first = send(stubs, "mh", "hello")
    notices = [e.notice for e in first if e.WhichOneof("kind") == "notice"]
    # Counted from the turn's init already, before anyone asks the agent (GetMcpStatus).
    status = stubs.daemon.GetStatus(daemon_pb2.GetStatusRequest())
    assert status.failing_mcp_servers == 1
    failed = [n for n in notices if n.kind == pb.NOTICE_KIND_MCP_SERVER_FAILED]
    assert len(failed) == 1 and "'broken'" in failed[0].message, notices
    second = send(stubs, "mh", "again")  # still failed: not told again
    assert not [
        e
        for e in second
        if e.WhichOneof("kind") == "notice" and e.notice.kind == pb.NOTICE_KIND_MCP_SERVER_FAILED
    ]
    shown = ctl(e2e.daemon, "status")
    assert shown.returncode == 0, shown.stderr
    [line] = [x for x in shown.stdout.splitlines() if "failing MCP servers" in x]
    assert line.split()[-1] == "1", shown.stdout


def test_a_server_that_dies_during_a_turn_is_a_notice(e2e: E2E) -> None:
    dying = json.dumps({"command": FAKE_MCP[0], "args": [*FAKE_MCP[1:], "--die-on-call"]})
    stubs = e2e.start(
        {
            "mcp": {"servers": {"dying": dying}},
            "modes.user": {"allowed_tools": ["mcp__dying__study_info"]},
        }
    )
    stubs.sessions.CreateSession(pb.CreateSessionRequest(session_id="md"))
    events = send(stubs, "md", "[[tool:mcp__dying__study_info {}]]")
    kinds = [e.WhichOneof("kind") for e in events]
    notices = [e.notice for e in events if e.WhichOneof("kind") == "notice"]
    assert [n.kind for n in notices] == [pb.NOTICE_KIND_MCP_SERVER_FAILED], notices
    assert "'dying' failed during the call of 'study_info'" in notices[0].message
    assert "Connection closed" in notices[0].message
    assert kinds.index("notice") == kinds.index("tool_result") + 1  # told as it happened
    assert events[-1].WhichOneof("kind") == "turn_completed"  # the turn itself goes on
    # The CLI starts the server again at its next use: healthy again, not counted.
    servers = stubs.sessions.GetMcpStatus(pb.GetMcpStatusRequest(session_id="md")).servers
    assert [(m.name, m.status) for m in servers] == [("dying", "connected")]
    assert stubs.daemon.GetStatus(daemon_pb2.GetStatusRequest()).failing_mcp_servers == 0
