"""A server that turns failed is a notice once; one that stays failed is not repeated."""

from __future__ import annotations

from atomizerd.sessions import events as ev
from atomizerd.sessions.mcphealth import mcp_call_failure, mcp_failures


def test_a_server_that_turns_failed_is_a_notice() -> None:
    [notice] = mcp_failures(
        [("a", "connected"), ("b", "pending")], [("a", "failed"), ("b", "connected")]
    )
    assert notice.kind == ev.MCP_SERVER_FAILED and "'a' failed" in notice.message


def test_a_server_failed_at_the_first_report_is_a_notice() -> None:
    assert [n.message for n in mcp_failures([], [("b", "failed")])] == [
        "MCP server 'b' failed: the agent goes on without its tools"
    ]


def test_a_server_that_stays_failed_or_recovers_is_not() -> None:
    assert mcp_failures([("a", "failed")], [("a", "failed")]) == []
    assert mcp_failures([("a", "failed")], [("a", "connected")]) == []
    assert mcp_failures([("a", "connected")], [("a", "disabled"), ("c", "pending")]) == []


def test_an_mcp_call_whose_server_went_away_is_a_notice() -> None:
    notice = mcp_call_failure("mcp__atomizer__run_study", "Connection closed", True)
    assert notice is not None and notice.kind == ev.MCP_SERVER_FAILED
    assert "'atomizer' failed during the call of 'run_study'" in notice.message


def test_other_tool_errors_are_not() -> None:
    assert mcp_call_failure("mcp__atomizer__run_study", "Connection closed", False) is None
    assert mcp_call_failure("mcp__atomizer__run_study", "study not found", True) is None
    assert mcp_call_failure("Bash", "Connection closed", True) is None
