"""What a change in the agent's MCP servers means for watchers: a server that turned failed.

The CLI reports its servers' status in each turn's `system/init` (and when asked, in
`mcp_status`; docs/agent-protocol.md). A server that is failed now but was not in the agent's
last report (or is new to it) is a notice, so whoever watches the turn knows it runs without
that server's tools; one that stays failed is not repeated.

A server that dies in the middle of a turn shows nowhere else (measured: the CLI answers the
call's tool result with the error "Connection closed" and starts the server again at its next
use, `connected` in `mcp_status` after): that tool result is the notice.
"""

from __future__ import annotations

from collections.abc import Iterable

from atomizerd.sessions import events as ev

FAILED = "failed"


def mcp_failures(
    before: Iterable[tuple[str, str]], now: Iterable[tuple[str, str]]
) -> list[ev.Notice]:
    """Notices for each server failed in `now` and not in `before` ((name, status) pairs)."""
    was_failed = {name for name, status in before if status == FAILED}
    return [
        ev.Notice(
            ev.MCP_SERVER_FAILED,
            f"MCP server {name!r} failed: the agent goes on without its tools",
        )
        for name, status in now
        if status == FAILED and name not in was_failed
    ]


CLOSED = "connection closed"


def mcp_call_failure(tool_name: str, content: str, is_error: bool) -> ev.Notice | None:
    """A notice when an MCP tool's call failed because its server went away mid-call."""
    if not is_error or not tool_name.startswith("mcp__") or CLOSED not in content.lower():
        return None
    server, _, tool = tool_name.removeprefix("mcp__").partition("__")
    return ev.Notice(
        ev.MCP_SERVER_FAILED,
        f"MCP server {server!r} failed during the call of {tool or tool_name!r} "
        f"({content.strip()[:200]}): the agent starts it again at its next use",
    )
