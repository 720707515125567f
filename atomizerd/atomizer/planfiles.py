"""Where plan-mode agents keep their plans (`modes.plan.plans_dir`, sessions/plans.py).

The CLI takes a plans folder only inside its project root (its `plansDirectory` setting,
relative to the working directory, which is the Atomizer root: measured on the pinned CLI,
a folder outside it is refused), and its default, `~/.claude/plans`, is closed to user-mode
tools by the sandbox with the rest of the CLI's config dir (and shared by every session). So
each plan-mode session gets `<root>/<plans_dir>/<session_id>/`, made before its agent starts
(the CLI wants it to exist) and removed when the session is purged.

`<root>/<plans_dir>` is one of the daemon's components (atomizer/components.py): made at
start-up (0700), checked to have no symlinked part, and write-denied to every user-mode
agent, so no agent can redirect it; Bash reads only the session's own folder in it.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from atomizerd import ids
from atomizerd.config import Config
from atomizerd.errors import FailedPrecondition


def plans_path(config: Config, session_id: str) -> Path:
    ids.check_session_id(session_id)
    return config.atomizer_root / config.modes.plan.plans_dir / session_id


def plans_folder(config: Config, session_id: str) -> str:
    """The session's plans folder, made if missing, as the CLI's `plansDirectory` (relative
    to the Atomizer root)."""
    path = plans_path(config, session_id)
    # The parent is the daemon's own (checked at start-up, closed to agents): no parents=True.
    path.mkdir(mode=0o700, exist_ok=True)
    if path.is_symlink() or not path.is_dir():
        raise FailedPrecondition(f"the session's plans folder {path} is not a plain folder")
    return str(Path(config.modes.plan.plans_dir) / session_id)


def remove_plans(config: Config, session_id: str) -> None:
    path = plans_path(config, session_id)
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
