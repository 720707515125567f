"""The Atomizer sections: the checkout and its studies, the modes, the sandbox, MCP servers."""

from __future__ import annotations

from dataclasses import dataclass, field

from atomizerd.config.fields import _doc


@dataclass
class AtomizerConfig:
    root: str = _doc(
        "The Atomizer checkout. Every agent runs with it as working directory, which is how "
        "the CLI keys its transcripts, so a session can always be resumed. Empty: the "
        "daemon's working directory at start.",
        default="",
    )
    studies_root: str = _doc(
        "Where study folders live. Empty: `<root>/studies`. A study id is a plain folder name "
        "resolved inside it.",
        default="",
    )


@dataclass
class UserModeConfig:
    allowed_tools: list[str] = _doc(
        "Tools the agent may use in user mode without asking (Claude Code permission-rule "
        "syntax); anything else asks the session's clients (or is denied, see `approvals`). "
        "`{root}` and `{study}` stand for the Atomizer root and the session's study folder as "
        "absolute rule paths (`//...`); a rule naming `{study}` is left out when the session "
        "has no study. Default: read the root and the study, write the study's report and "
        "its Markdown results (`Edit` rules cover the Write tool too; `Write(...)` rules "
        "match nothing), run Python.",
        default_factory=lambda: [
            "Read({root}/**)",
            "Read({study}/**)",
            "Edit({study}/STUDY_REPORT.md)",
            "Edit({study}/3_results/*.md)",
            "Bash(python:*)",
        ],
    )
    scheduled_prompts: bool = _doc(
        "Give user- and plan-mode agents the CLI's scheduling tools (ScheduleWakeup, "
        "CronCreate, CronDelete, CronList, RemoteTrigger). Off by default: a scheduled prompt "
        "later runs a turn nobody asked for, with nobody there to watch or approve it.",
        default=False,
    )


@dataclass
class PowerModeConfig:
    enabled: bool = _doc(
        "Allow MODE_POWER (full tool access, --dangerously-skip-permissions). Off by default: "
        "it is a policy decision for whoever runs the daemon.",
        default=False,
    )
    study_instructions: bool = _doc(
        "Let power-mode agents load the project's instruction and settings files (CLAUDE.md, "
        "CLAUDE.local.md, AGENTS.md, `.claude/`: settings, commands, skills, agents, rules) "
        "from the Atomizer root and the study. Off by default: a study is written by "
        "user-mode agents, and a file planted there would steer a power-mode agent (full "
        "access) later; off, power-mode agents (and plan-mode agents that may go on in power "
        "mode) read only the daemon user's own settings (`--setting-sources=user`).",
        default=False,
    )


@dataclass
class PlanModeConfig:
    plans_dir: str = _doc(
        "Where plan-mode agents write their plans, relative to the Atomizer root (each "
        "session its own folder in it, removed when the session is purged). Inside the root "
        "because the CLI takes a plans folder only there (`plansDirectory`), and not the CLI's "
        "own `~/.claude/plans`, which the sandbox closes to user-mode tools with the rest of "
        "the CLI's config dir (every session's transcripts). The daemon makes it at start-up "
        "(0700) and refuses to start when a part of it is a symlink, another user's, or "
        "writable by group or others; no user-mode agent may write in it, and Bash reads only "
        "its own session's folder.",
        default=".atomizerd/plans",
    )


@dataclass
class ModesConfig:
    user: UserModeConfig = field(default_factory=UserModeConfig)
    power: PowerModeConfig = field(default_factory=PowerModeConfig)
    plan: PlanModeConfig = field(default_factory=PlanModeConfig)


@dataclass
class SandboxConfig:
    enabled: bool = _doc(
        "Run user-mode agents' Bash commands inside Claude Code's sandbox (bubblewrap and "
        "seccomp on Linux: install the Debian packages `bubblewrap` and `socat`). It fails "
        "closed: when the sandbox cannot run, a user-mode session does not start its agent "
        "and the client gets FAILED_PRECONDITION; `--check-config` and GetStatus say whether "
        "it is available. Off: user mode is then advisory only (the allowlist and approvals "
        "steer the agent, but `python -c` in Bash is arbitrary code as the daemon's user). "
        "Power mode is never sandboxed.",
        default=True,
    )
    auto_allow_bash: bool = _doc(
        "Sandboxed Bash commands run without asking (the CLI's autoAllowBashIfSandboxed): the "
        "sandbox bounds what they can touch, and the allowlist's `Bash(python:*)` already "
        "runs arbitrary code. Off: a command outside the allowlist still asks the session's "
        "clients first, and then runs sandboxed.",
        default=True,
    )
    allowed_domains: list[str] = _doc(
        "Hosts Bash commands may reach (through the sandbox's proxy; `*.example.com` "
        "wildcards), e.g. a package index. Empty: no network from tools at all, and nobody "
        "is asked for more: a study's scripts compute on local files. The CLI's own calls to "
        "the model API are not affected.",
        default_factory=list,
    )
    allow_write: list[str] = _doc(
        "Paths Bash may write besides the session's study folder and its private "
        "temporary dir (e.g. a shared scratch volume); `~` is the agent's HOME. Everything "
        "else, the rest of the Atomizer root included, is read-only to Bash.",
        default_factory=list,
        check="paths",
    )
    deny_read: list[str] = _doc(
        "Paths user-mode tools may not read; `~` is the agent's HOME, where credentials "
        "and the CLI's transcripts live. The Atomizer root and the session's study stay "
        "readable inside them. Always denied on top: the daemon's state and runtime dirs, "
        "the CLI's config dir (every session's transcripts) and other sessions' temporary "
        "dirs.",
        default_factory=lambda: ["~"],
        check="paths",
    )
    allow_read: list[str] = _doc(
        "Paths readable again inside `deny_read` (e.g. a Python installed under HOME); "
        "never the always-denied ones.",
        default_factory=list,
        check="paths",
    )
    tmp_dir: str = _doc(
        "Where each agent gets its private temporary dir (TMPDIR, created 0700, removed "
        "when the agent stops): the only place besides its study where a user-mode agent's "
        "Bash may write. Empty: `<state_dir>/agent-tmp` (on disk, private to this daemon; "
        "not /run, whose small tmpfs a big temporary file would fill).",
        default="",
    )


@dataclass
class McpConfig:
    atomizer_command: list[str] = _doc(
        "Command of the `atomizer` MCP server given to every session (with ATOMIZER_MODE, "
        "ATOMIZER_ROOT, ATOMIZER_STUDY in its env). Empty: `node <root>/mcp-server/"
        "atomizer-tools/dist/index.js` when that file exists at start-up, otherwise no "
        "atomizer server until the next start. Resolved once, at start-up: the daemon refuses "
        "to start when the server's file (or, for the default, any folder from the root down "
        "to it) is a symlink, another user's, or writable by group or others. It runs "
        "unsandboxed as the daemon's user in every session.",
        default_factory=list,
    )
    servers: dict[str, str] = _doc(
        "Extra MCP servers for every session: name = JSON of the server's entry as in a "
        'Claude Code MCP config, e.g. `docs = \'{"command": "node", "args": ["docs.js"]}\'`. '
        "The name `atomizer` is reserved.",
        default_factory=dict,
    )
    strict: bool = _doc(
        "Pass --strict-mcp-config so a user's own MCP servers never leak into sessions.",
        default=True,
    )
