"""The one place that builds an agent's command line and environment.

Every value goes in as a single `--flag=value` token. The CLI's option parser (commander) takes
`--flag value` apart differently per flag: `--resume [value]` does not take a value that looks
like an option, and variadic flags (`--allowedTools <tools...>`, `--add-dir`, `--mcp-config`)
keep swallowing the tokens that follow them. In the `=` form a value can start with `-` and a
variadic flag takes exactly that one token. Checked against Claude Code 2.1.332 for every flag
used here. The prompt never goes in argv: turns are written to stdin, and the launcher sends
the system prompt in the `initialize` request (argv is visible to every user in `ps`).
"""

from __future__ import annotations

import math
import re
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

# Fixed for every agent: one persistent process fed turns on stdin, JSON lines out, text deltas.
STREAM_JSON_FLAGS: tuple[str, ...] = (
    "-p",
    "--input-format=stream-json",
    "--output-format=stream-json",
    "--verbose",
    "--include-partial-messages",
    # Each user line the CLI takes into a turn is echoed with its uuid: how a turn is matched
    # to the line it answers (sessions/conversation.py).
    "--replay-user-messages",
)

# Linux refuses an execve argument longer than this (MAX_ARG_STRLEN).
_MAX_ARG_BYTES = 128 * 1024 - 1

# Environment passed through from the daemon: the basics a CLI and its tools need, and the
# CLI's own configuration. Anything else (secrets of other services...) stays out.
_ENV_NAMES = frozenset({"PATH", "HOME", "LANG", "TERM", "TMPDIR", "USER", "LOGNAME", "SHELL"})
_ENV_PREFIXES = ("LC_", "XDG_", "ANTHROPIC_", "CLAUDE_")
# Passed only when the config's agent env sets them: XDG_RUNTIME_DIR leads to the daemon's
# own socket (`$XDG_RUNTIME_DIR/atomizerd/`), which an agent has no business finding.
_ENV_NOT_PASSED = frozenset({"XDG_RUNTIME_DIR"})
# A nested-session guard: a CLI that sees it believes it runs inside another Claude Code.
_ENV_REMOVED = frozenset({"CLAUDECODE"})
_ENV_NAME_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


class ArgvError(ValueError):
    """An agent spec value that cannot be passed safely on a command line."""


@dataclass(frozen=True, slots=True)
class AgentSpec:
    """Everything that decides an agent's command line.

    `resume` False: the first spawn of a conversation (`--session-id`); True: every later
    spawn of it (`--resume`), which continues the CLI's transcript for the same working dir.
    """

    command: tuple[str, ...]
    conversation_id: str
    resume: bool = False
    allowed_tools: tuple[str, ...] = ()
    disallowed_tools: tuple[str, ...] = ()
    permission_mode: str | None = None
    permission_prompt_tool: str | None = None  # "stdio": ask us with control requests
    skip_permissions: bool = False  # --dangerously-skip-permissions (refused as root)
    # --allow-dangerously-skip-permissions: may switch to bypassPermissions later (setMode)
    allow_skip_permissions: bool = False
    mcp_config: str | None = None  # a file path
    settings: str | None = None  # --settings: a file path (or JSON), e.g. the sandbox policy
    strict_mcp_config: bool = True  # with mcp_config: ignore every other MCP configuration
    setting_sources: str | None = None  # --setting-sources: e.g. "user" (no project files)
    append_system_prompt: str | None = None
    append_system_prompt_file: str | None = None  # for prompts too long for one argument
    add_dirs: tuple[str, ...] = ()
    model: str | None = None
    max_budget_usd: float | None = None
    extra_args: tuple[str, ...] = field(default=())
    # A fork's first spawn: the conversation it copies (--resume=<fork_of> --fork-session,
    # the fork's own id on --session-id) and the last message it keeps (--resume-session-at).
    fork_of: str | None = None
    fork_at: str | None = None

    def __post_init__(self) -> None:
        # Accept lists from callers but keep the spec immutable and hashable.
        for name in ("command", "allowed_tools", "disallowed_tools", "add_dirs", "extra_args"):
            object.__setattr__(self, name, tuple(getattr(self, name)))


def build_argv(spec: AgentSpec) -> list[str]:
    """The agent's argv: command, fixed stream-json flags, conversation, options, extra args."""
    if not spec.command or not spec.command[0]:
        raise ArgvError("agent command is empty")
    argv = [*spec.command, *STREAM_JSON_FLAGS, _conversation_flag(spec), *_fork_flags(spec)]
    argv += _permission_flags(spec)
    argv += _context_flags(spec)
    argv += _model_flags(spec)
    # Last, so a config flag missing its value errors out instead of eating one of ours.
    argv += spec.extra_args
    for arg in argv:
        _check_arg(arg)
    return argv


def _conversation_flag(spec: AgentSpec) -> str:
    try:
        parsed = uuid.UUID(spec.conversation_id)
    except (ValueError, TypeError, AttributeError):
        raise ArgvError(f"conversation id is not a UUID: {spec.conversation_id!r}") from None
    if str(parsed) != spec.conversation_id.lower():
        raise ArgvError(f"conversation id is not a canonical UUID: {spec.conversation_id!r}")
    flag = "--resume" if spec.resume else "--session-id"
    return f"{flag}={parsed}"


def _fork_flags(spec: AgentSpec) -> list[str]:
    if not spec.fork_of:
        return []
    if spec.resume:
        raise ArgvError("a fork starts once, with --session-id: it cannot also --resume")
    out = [f"--resume={_uuid(spec.fork_of, 'fork_of')}", "--fork-session"]
    if spec.fork_at:
        out.append(f"--resume-session-at={_uuid(spec.fork_at, 'fork_at')}")
    return out


def _uuid(value: str, what: str) -> str:
    try:
        parsed = uuid.UUID(value)
    except (ValueError, TypeError, AttributeError):
        raise ArgvError(f"{what} is not a UUID: {value!r}") from None
    if str(parsed) != value.lower():
        raise ArgvError(f"{what} is not a canonical UUID: {value!r}")
    return str(parsed)


def _permission_flags(spec: AgentSpec) -> list[str]:
    out: list[str] = []
    if spec.allowed_tools:
        out.append("--allowedTools=" + _tool_rules(spec.allowed_tools))
    if spec.disallowed_tools:
        out.append("--disallowedTools=" + _tool_rules(spec.disallowed_tools))
    if spec.permission_mode:
        out.append(f"--permission-mode={spec.permission_mode}")
    if spec.permission_prompt_tool:
        out.append(f"--permission-prompt-tool={spec.permission_prompt_tool}")
    if spec.allow_skip_permissions:
        out.append("--allow-dangerously-skip-permissions")
    if spec.skip_permissions:
        out.append("--dangerously-skip-permissions")
    return out


def _tool_rules(rules: Sequence[str]) -> str:
    """Rules joined for one token. The CLI splits the value on commas and whitespace outside
    parentheses, so a rule with either outside its parentheses would turn into other rules."""
    for rule in rules:
        if not rule or _has_top_level_separator(rule):
            raise ArgvError(f"invalid tool rule: {rule!r}")
    return ",".join(rules)


def _has_top_level_separator(rule: str) -> bool:
    depth = 0
    for ch in rule:
        if ch == "(":
            depth += 1
        elif ch == ")":
            depth -= 1
            if depth < 0:
                return True
        elif depth == 0 and (ch == "," or ch.isspace()):
            return True
    return depth != 0


def _context_flags(spec: AgentSpec) -> list[str]:
    out: list[str] = []
    if spec.mcp_config:
        out.append(f"--mcp-config={spec.mcp_config}")
        if spec.strict_mcp_config:
            out.append("--strict-mcp-config")
    if spec.settings:
        out.append(f"--settings={spec.settings}")
    if spec.setting_sources is not None:
        out.append(f"--setting-sources={spec.setting_sources}")
    if spec.append_system_prompt is not None:
        out.append(f"--append-system-prompt={spec.append_system_prompt}")
    if spec.append_system_prompt_file:
        out.append(f"--append-system-prompt-file={spec.append_system_prompt_file}")
    for directory in spec.add_dirs:
        if not directory:
            raise ArgvError("empty --add-dir path")
        out.append(f"--add-dir={directory}")
    return out


def _model_flags(spec: AgentSpec) -> list[str]:
    out: list[str] = []
    if spec.model:
        out.append(f"--model={spec.model}")
    if spec.max_budget_usd is not None:
        budget = spec.max_budget_usd
        if not math.isfinite(budget) or budget <= 0:
            raise ArgvError(f"max budget must be a positive number: {budget!r}")
        out.append(f"--max-budget-usd={budget!r}")
    return out


def _check_arg(arg: str) -> None:
    if "\x00" in arg:
        raise ArgvError(f"argument contains NUL: {arg[:60]!r}")
    if len(arg.encode("utf-8", "surrogatepass")) > _MAX_ARG_BYTES:
        raise ArgvError(
            f"argument longer than {_MAX_ARG_BYTES} bytes ({arg[:40]!r}...); "
            "use append_system_prompt_file for long prompts"
        )


def build_env(
    base_env: Mapping[str, str], extra: Mapping[str, str] | None = None
) -> dict[str, str]:
    """The agent's environment: the allowlisted part of `base_env` (normally the daemon's),
    then `extra` (the config's agent env) on top; `CLAUDECODE` is always removed.
    `XDG_RUNTIME_DIR` only comes from `extra`."""
    env = {k: v for k, v in base_env.items() if _env_allowed(k)}
    for key, value in (extra or {}).items():
        if not _ENV_NAME_RE.fullmatch(key) or "\x00" in value:
            raise ArgvError(f"invalid environment variable: {key!r}")
        env[key] = value
    for key in _ENV_REMOVED:
        env.pop(key, None)
    return env


def _env_allowed(name: str) -> bool:
    if name in _ENV_NOT_PASSED:
        return False
    return name in _ENV_NAMES or name.startswith(_ENV_PREFIXES)
