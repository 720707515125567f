"""What an agent process is started with, for one session: the mode's permission policy, the
study folder, the system-prompt context, and the command line built from them.

User mode is least privilege (docs/security.md): the allowlist's rules are scoped to the
Atomizer root and the session's study, and Bash runs in Claude Code's sandbox with the
session's policy (`atomizerd.atomizer.sandbox`), written 0600 to the runtime dir and passed
with `--settings`; when the sandbox cannot run, the agent is not started (FAILED_PRECONDITION).
Power mode is full access by policy, and loads no project instruction or settings files (a
user-mode agent may have written them) unless configured to. In both, nothing secret is in
argv, which every user on the machine sees in `ps`: the system prompt (study summary, seeded
history) goes in the `initialize` request on stdin. Each agent gets a private TMPDIR, the
configured umask, and an environment that does not lead to the daemon's socket.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import structlog

from atomizerd.agents.argv import AgentSpec, build_argv, build_env
from atomizerd.agents.transport import LaunchSpec
from atomizerd.atomizer import components as components_mod
from atomizerd.atomizer import sandbox
from atomizerd.atomizer.planfiles import plans_folder, plans_path
from atomizerd.atomizer.prompt import ContextBuilder
from atomizerd.atomizer.studies import Studies
from atomizerd.config import Config, agent_umask, mcp_server_entry
from atomizerd.errors import FailedPrecondition
from atomizerd.model import Mode, SessionRecord

log = structlog.get_logger("atomizerd.atomizer.launcher")

# The CLI's tools that make the agent prompt itself later (ScheduleWakeup, the cron tools) or
# start a run elsewhere (RemoteTrigger), names as in the pinned CLI: a scheduled prompt runs
# a turn nobody asked for. Off in user and plan mode unless modes.user.scheduled_prompts.
SCHEDULING_TOOLS = ("ScheduleWakeup", "CronCreate", "CronDelete", "CronList", "RemoteTrigger")
# Where a power-mode agent takes its settings and instructions from unless
# modes.power.study_instructions: the daemon user's own (and --settings, always read), not
# the project's, which a user-mode agent may have written (a study's CLAUDE.md, .claude/...).
POWER_SETTING_SOURCES = "user"


class Launcher:
    def __init__(
        self,
        config: Config,
        studies: Studies,
        context: ContextBuilder,
        probe: sandbox.SandboxProbe | None = None,
        remembered_rules: Callable[[str], list[str]] | None = None,
        components: components_mod.Components | None = None,
    ) -> None:
        self.config = config
        # Resolved once, at start-up: nothing an agent can write is probed at spawn time.
        self.components = components or components_mod.resolve(config, create=True)
        self.studies = studies
        self.context = context
        self.probe = probe or sandbox.PROBE
        # Rules a client allowed for the rest of a session (RespondToPermission's rule).
        self.remembered_rules = remembered_rules

    def context_text(self, record: SessionRecord) -> str:
        study_dir = self.studies.resolve(record.study_id) if record.study_id else None
        return self.context.build(record.mode, record.study_id, study_dir)

    def spec_for(self, record: SessionRecord, *, resume: bool, seed: str = "") -> LaunchSpec:
        """Raises FailedPrecondition when a user-mode agent cannot be sandboxed (and the
        sandbox is on): nothing is started or written then."""
        study_dir = self.studies.resolve(record.study_id) if record.study_id else None
        env = build_env(os.environ, self.config.agent.env)
        # Plan mode is user mode's allowlist and sandbox, planning first (sessions/plans.py).
        sandboxed = record.mode in (Mode.USER, Mode.PLAN) and self.config.sandbox.enabled
        if sandboxed:
            status = self.probe.status(True, env.get("PATH") or os.defpath)
            if not status.available:
                log.warning(
                    "user-mode agent not started: no sandbox",
                    session_id=record.session_id,
                    detail=status.detail,
                )
                raise FailedPrecondition(status.refusal())
        tmp = self.studies.session_tmp(record.session_id)
        env["TMPDIR"] = str(tmp)
        # The CLI keeps a copy of each file before the agent's edits of a turn, so RewindFiles
        # can restore them (its rewind_files control request; measured: docs/agent-protocol.md).
        env["CLAUDE_CODE_ENABLE_SDK_FILE_CHECKPOINTING"] = "true"
        settings = None
        document: dict[str, Any] = {}
        plans = plans_folder(self.config, record.session_id) if record.mode == Mode.PLAN else None
        if sandboxed:
            daemon = sandbox.DaemonPaths(
                components=self.components.paths,
                plans_root=self.components.plans_root,
                own_plans=plans_path(self.config, record.session_id) if plans else None,
            )
            policy = sandbox.user_policy(
                self.config, env=env, study=study_dir, tmp=tmp, daemon=daemon
            )
            document = policy.settings
        if plans:
            document = {**document, "plansDirectory": plans}
        if document:
            content = json.dumps(document, indent=2)
            settings = str(
                self.studies.write_session_file(record.session_id, ".settings.json", content)
            )
        prompt = self.context_text(record)
        if seed:
            prompt += "\n\n" + seed
        spec = AgentSpec(
            command=tuple(self.config.agent.command),
            conversation_id=record.agent_session_id,
            resume=resume,
            # A fork's first agent copies the original's conversation (Registry.fork_session).
            fork_of=record.fork_of if record.fork_of and not resume else None,
            fork_at=record.fork_at if record.fork_of and not resume else None,
            allowed_tools=self._allowed_tools(record.mode, study_dir) + self._remembered(record),
            disallowed_tools=self._disallowed_tools(record.mode),
            skip_permissions=record.mode == Mode.POWER,
            permission_mode="plan" if record.mode == Mode.PLAN else None,
            # An approved plan may go on in power mode where the policy allows it.
            allow_skip_permissions=record.mode == Mode.PLAN and self.config.modes.power.enabled,
            # Power mode too: there only tools that need a person (AskUserQuestion) ask.
            permission_prompt_tool="stdio" if self.config.approvals.enabled else None,
            max_budget_usd=_allowance(record),
            mcp_config=str(self._write_mcp_config(record)),
            strict_mcp_config=self.config.mcp.strict,
            settings=settings,
            add_dirs=(str(study_dir),) if study_dir else (),
            model=record.model or self.config.agent.model or None,
            setting_sources=self._setting_sources(record.mode),
            extra_args=tuple(self.config.agent.args),
        )
        return LaunchSpec(
            argv=build_argv(spec),
            env=env,
            cwd=str(self.config.atomizer_root),
            initialize={"appendSystemPrompt": prompt},
            umask=agent_umask(self.config),
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
            servers[ATOMIZER_MCP_NAME] = {
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
        return list(self.components.atomizer_mcp)

    def _disallowed_tools(self, mode: str) -> tuple[str, ...]:
        if mode == Mode.POWER or self.config.modes.user.scheduled_prompts:
            return ()
        return SCHEDULING_TOOLS

    def _setting_sources(self, mode: str) -> str | None:
        """Power mode, and plan mode where an approved plan may go on in it (the same
        process), read no project files unless modes.power.study_instructions."""
        may_be_power = mode == Mode.POWER or (mode == Mode.PLAN and self.config.modes.power.enabled)
        if may_be_power and not self.config.modes.power.study_instructions:
            return POWER_SETTING_SOURCES
        return None

    def _remembered(self, record: SessionRecord) -> tuple[str, ...]:
        if record.mode == Mode.POWER or self.remembered_rules is None:
            return ()
        return tuple(self.remembered_rules(record.session_id))

    def _allowed_tools(self, mode: str, study_dir: Path | None) -> tuple[str, ...]:
        if mode == Mode.POWER:
            return ()
        return tuple(
            expand_rules(self.config.modes.user.allowed_tools, self.config.atomizer_root, study_dir)
        )


def expand_rules(rules: list[str], root: Path, study: Path | None) -> list[str]:
    """`{root}` and `{study}` as absolute rule paths (`//...`), in both spellings when a
    symlink is on the way; rules naming `{study}` are left out without a study."""
    out: list[str] = []
    for rule in rules:
        if "{study}" in rule and study is None:
            continue
        variants = [rule]
        for name, path in (("{root}", root), ("{study}", study)):
            if path is None or not any(name in v for v in variants):
                continue
            spellings = list(dict.fromkeys([path, path.resolve()]))
            variants = [v.replace(name, sandbox.rule_path(p)) for v in variants for p in spellings]
        out += [v for v in variants if v not in out]
    return out


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


# The daemon's own MCP server, as the session's agents know it.
ATOMIZER_MCP_NAME = "atomizer"


def configured_mcp_servers(config: Config) -> frozenset[str]:
    """The MCP servers the daemon gives every session's agent (by name): its own and
    `mcp.servers`. Others an agent has came from elsewhere (without `mcp.strict`)."""
    return frozenset({ATOMIZER_MCP_NAME, *config.mcp.servers})


def cli_projects_dir(config: Config) -> Path:
    """Where the agents' CLI keeps its transcripts, one folder per working directory: its
    config dir (CLAUDE_CONFIG_DIR of the agents' environment, else ~/.claude) / projects."""
    env = build_env(os.environ, config.agent.env)
    if env.get("CLAUDE_CONFIG_DIR"):
        return Path(env["CLAUDE_CONFIG_DIR"]) / "projects"
    return Path(env.get("HOME") or Path.home()) / ".claude" / "projects"
