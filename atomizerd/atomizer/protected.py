"""The one list of paths that the daemon or the Claude Code CLI load on their own, and that no
user-mode agent may therefore create or change: a file planted there would run as the
daemon's user, or steer a later agent (power mode's included), outside any sandbox.

Each entry says why. `atomizerd.atomizer.sandbox` turns the list into the sandbox's
`denyWrite` (Bash) and Edit deny rules (the Write and Edit tools); names that do not exist yet
are denied too, which blocks their creation. The names were taken from the pinned CLI
(2.1.332): what it reads from its working directory, from a folder added with `--add-dir` and
from any folder a file is read in (nested instructions).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Loaded:
    name: str
    why: str


# Denied in every folder a later agent works in, adds or reads in: the Atomizer root, the
# folders on the way down to a study, and the study itself.
INSTRUCTIONS: tuple[Loaded, ...] = (
    Loaded(
        "CLAUDE.md", "instructions the CLI loads from the working dir, added dirs, nested folders"
    ),
    Loaded("CLAUDE.local.md", "personal instructions, loaded like CLAUDE.md"),
    Loaded("AGENTS.md", "instructions, loaded by the CLI's built-in agents-md support"),
    Loaded(
        ".claude",
        "settings (hooks run unsandboxed, permission rules), commands, skills, agents, "
        "output styles, rules, workflows, scheduled tasks, CLAUDE.md",
    ),
    Loaded(".mcp.json", "project MCP servers: started as the daemon's user"),
)

# Denied in the Atomizer root only: the agents' working directory.
WORKING_DIR: tuple[Loaded, ...] = (
    Loaded(
        ".git",
        "the CLI runs git in its working dir: a planted .git/config (core.fsmonitor, hooks) "
        "runs code as the daemon's user",
    ),
)

# The daemon's own components: their paths are resolved once at start-up
# (atomizerd/atomizer/components.py) and denied like the names above.
COMPONENTS: tuple[Loaded, ...] = (
    Loaded(
        "the Atomizer MCP server (mcp.atomizer_command, or <root>/mcp-server/atomizer-tools/"
        "dist/index.js)",
        "started as the daemon's user, unsandboxed, in every session",
    ),
    Loaded(
        "the plans folder (<root>/<modes.plan.plans_dir>)",
        "holds the plans clients approve; redirected, plans would land where an agent writes",
    ),
)


def names_in(folder_is_root: bool) -> tuple[str, ...]:
    """The protected names of one folder a later agent uses."""
    entries = INSTRUCTIONS + (WORKING_DIR if folder_is_root else ())
    return tuple(e.name for e in entries)


def instruction_names() -> tuple[str, ...]:
    return tuple(e.name for e in INSTRUCTIONS)


def working_dir_names() -> tuple[str, ...]:
    return tuple(e.name for e in WORKING_DIR)


def top_entry(path: Path, root: Path) -> Path | None:
    """The entry of `root` that holds `path` (None: `path` is not inside the root)."""
    try:
        rel = path.relative_to(root)
    except ValueError:
        return None
    return root / rel.parts[0] if rel.parts else None
