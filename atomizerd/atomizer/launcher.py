"""What an agent process is started with, for one session: the mode's permission policy, the
study folder, the system-prompt context, and the command line built from them."""

from __future__ import annotations

import json
import os
from pathlib import Path

from atomizerd.agents.argv import AgentSpec, build_argv, build_env
from atomizerd.agents.transport import LaunchSpec
from atomizerd.atomizer.prompt import ContextBuilder
from atomizerd.atomizer.studies import Studies
from atomizerd.daemon.config import Config, mcp_server_entry
from atomizerd.store.db import SessionRecord


class Launcher:
    def __init__(self, config: Config, studies: Studies, context: ContextBuilder) -> None:
        self.config = config
        self.studies = studies
        self.context = context

    def context_text(self, record: SessionRecord) -> str:
        study_dir = self.studies.resolve(record.study_id) if record.study_id else None
        return self.context.build(record.mode, record.study_id, study_dir)

    def spec_for(self, record: SessionRecord, *, resume: bool, seed: str = "") -> LaunchSpec:
        study_dir = self.studies.resolve(record.study_id) if record.study_id else None
        prompt = self.context_text(record)
        if seed:
            prompt += "\n\n" + seed
        spec = AgentSpec(
            command=tuple(self.config.agent.command),
            conversation_id=record.agent_session_id,
            resume=resume,
            allowed_tools=self._allowed_tools(record.mode),
            skip_permissions=record.mode == "power",
            # Power mode too: there only tools that need a person (AskUserQuestion) ask.
            permission_prompt_tool="stdio" if self.config.approvals.enabled else None,
            max_budget_usd=_allowance(record),
            mcp_config=str(self._write_mcp_config(record)),
            strict_mcp_config=self.config.mcp.strict,
            append_system_prompt=prompt,
            add_dirs=(str(study_dir),) if study_dir else (),
            model=self.config.agent.model or None,
            extra_args=tuple(self.config.agent.args),
        )
        return LaunchSpec(
            argv=build_argv(spec),
            env=build_env(os.environ, self.config.agent.env),
            cwd=str(self.config.atomizer_root),
        )

    def cleanup(self, session_id: str) -> None:
        """Removes the session's runtime files (its process is gone)."""
        self.studies.remove_session_files(session_id)

    def _write_mcp_config(self, record: SessionRecord) -> Path:
        """The session's own MCP config (0600 in the runtime dir); written even when empty so
        that --strict-mcp-config shuts out every other MCP configuration."""
        servers: dict[str, object] = {}
        command = self._atomizer_mcp_command()
        if command:
            servers["atomizer"] = {
                "command": command[0],
                "args": command[1:],
                "env": {
                    "ATOMIZER_MODE": record.mode,
                    "ATOMIZER_ROOT": str(self.config.atomizer_root),
                    "ATOMIZER_STUDY": record.study_id or "",
                },
            }
        for name, spec in self.config.mcp.servers.items():
            servers[name] = mcp_server_entry(name, spec)
        content = json.dumps({"mcpServers": servers}, indent=2)
        return self.studies.write_session_file(record.session_id, ".mcp.json", content)

    def _atomizer_mcp_command(self) -> list[str]:
        if self.config.mcp.atomizer_command:
            return list(self.config.mcp.atomizer_command)
        default = self.config.atomizer_root / "mcp-server" / "atomizer-tools" / "dist" / "index.js"
        return ["node", str(default)] if default.is_file() else []

    def _allowed_tools(self, mode: str) -> tuple[str, ...]:
        return () if mode == "power" else tuple(self.config.modes.user.allowed_tools)


def _allowance(record: SessionRecord) -> float | None:
    """--max-budget-usd for a new agent process: what the session may still spend (and at
    most one turn's cap), on the CLI's own scale, which counts the conversation's cost so far."""
    limits = []
    if record.budget_usd > 0:
        limits.append(max(record.budget_usd - record.total_cost_usd, 0.0))
    if record.turn_budget_usd > 0:
        limits.append(record.turn_budget_usd)
    if not limits:
        return None
    # Never 0 (the CLI wants a positive cap): a session at its cap is refused before a turn.
    return record.agent_cost_usd + max(min(limits), 1e-6)
