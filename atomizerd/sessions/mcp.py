"""The MCP servers of a session's live agent: their health, a reconnect, enabling and disabling.

Over the CLI's `mcp_status`, `mcp_reconnect` and `mcp_toggle` control requests (measured:
docs/agent-protocol.md). They act on the live agent only: a restarted agent starts with every
server the daemon configured again. Governed by the session's mode: a server the daemon did
not configure for the session (one the CLI found elsewhere, without `mcp.strict`) can be
disabled but never enabled or reconnected from user or plan mode; in power mode, as the power
mode's agent could run it anyway, it can.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import structlog

from atomizerd.agents.vocabulary import ControlError
from atomizerd.atomizer.launcher import configured_mcp_servers
from atomizerd.config import Config
from atomizerd.errors import FailedPrecondition, InvalidArgument, NotFound, PermissionDenied
from atomizerd.sessions.agentcalls import AgentCalls
from atomizerd.sessions.session import Session
from atomizerd.sessions.table import SessionTable

log = structlog.get_logger("atomizerd.sessions.mcp")

MAX_NAME_CHARS = 128


@dataclass(frozen=True)
class McpServer:
    name: str
    status: str  # connected | failed | pending | disabled | needs-auth, as the CLI says
    tools_count: int = 0
    error: str = ""
    configured: bool = False  # given to the agent by the daemon


def _not_found(e: ControlError) -> Exception:
    if str(e).startswith("Server not found"):
        return NotFound(f"the agent has no MCP server of that name ({e})")
    return FailedPrecondition(f"the agent could not do it: {e}")


class McpServers:
    def __init__(self, config: Config, table: SessionTable, calls: AgentCalls) -> None:
        self.config = config
        self.table = table
        self.calls = calls
        self.configured = configured_mcp_servers(config)

    async def status(self, session_id: str) -> list[McpServer]:
        s = self._session(session_id)
        return await self._status(s)

    async def reconnect(self, session_id: str, name: str) -> McpServer:
        s = self._session(session_id)
        self._check_may_start(s, _check_name(name), "reconnect")
        await self._call(s, "mcp_reconnect", serverName=name)
        log.info("MCP server reconnected", session_id=s.id, server=name)
        return await self._one(s, name)

    async def set_enabled(self, session_id: str, name: str, enabled: bool) -> McpServer:
        s = self._session(session_id)
        if enabled:
            self._check_may_start(s, _check_name(name), "enable")
        await self._call(s, "mcp_toggle", serverName=_check_name(name), enabled=enabled)
        log.info("MCP server toggled", session_id=s.id, server=name, enabled=enabled)
        return await self._one(s, name)

    def _session(self, session_id: str) -> Session:
        self.table.check_open()
        s = self.table.serving(session_id)
        self.table.require_open(s)
        return s

    def _check_may_start(self, s: Session, name: str, what: str) -> None:
        if name not in self.configured and s.record.mode != "power":
            raise PermissionDenied(
                f"cannot {what} MCP server {name!r} in {s.record.mode} mode: the daemon did not "
                "configure it for the session"
            )

    async def _call(self, s: Session, subtype: str, **fields: Any) -> dict[str, Any]:
        return await self.calls.call(
            s,
            subtype,
            timeout=self.config.agent.first_event_timeout,
            start=False,
            error_of=_not_found,
            **fields,
        )

    async def _status(self, s: Session) -> list[McpServer]:
        answer = await self._call(s, "mcp_status")
        servers = answer.get("mcpServers")
        found = [self._server(e) for e in servers if isinstance(e, dict)] if servers else []
        agent = self.calls.pool.agent(s.id)
        if agent is not None:  # the freshest report: GetStatus counts failing servers from it
            agent.mcp_servers = [(m.name, m.status) for m in found]
        return found

    async def _one(self, s: Session, name: str) -> McpServer:
        for server in await self._status(s):
            if server.name == name:
                return server
        raise NotFound(f"the agent has no MCP server {name!r}")

    def _server(self, entry: dict[str, Any]) -> McpServer:
        # Only these fields: the entry's `config` holds the server's command line and
        # environment, which clients are not shown.
        name = str(entry.get("name", ""))
        tools = entry.get("tools")
        return McpServer(
            name=name,
            status=str(entry.get("status", "")),
            tools_count=len(tools) if isinstance(tools, list) else 0,
            error=str(entry.get("error") or ""),
            configured=name in self.configured,
        )


def _check_name(name: str) -> str:
    if not name or len(name) > MAX_NAME_CHARS or not name.isprintable():
        raise InvalidArgument(f"not an MCP server name: {name[:MAX_NAME_CHARS]!r}")
    return name
