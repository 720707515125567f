"""The daemon's own components: the Atomizer MCP server and the plans folder.

They are resolved ONCE, at start-up, from the configuration, and checked: every part of a
component's path from its trusted base down is a real directory or file (no symlink), owned
by the daemon's user or root, and not writable by group or others. Otherwise the daemon does
not start (and `--check-config` says why). Nothing here is looked at again when an agent is
spawned: a path probed at spawn time is one a user-mode agent could have planted in the
meantime (the default MCP server inside the Atomizer root once was).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import stat
from dataclasses import dataclass
from pathlib import Path

from atomizerd.config import Config

PLANS_MODE = 0o700

ROOT_WARNING = (
    "the daemon runs as root, so every agent does: power mode is root, and user mode is kept "
    "in bounds only by its sandbox (which then also hides root-only files such as /root and "
    "/etc/shadow); run the daemon as an ordinary user"
)


def warnings() -> list[str]:
    """How the daemon runs, for GetStatus and --check-config."""
    return [ROOT_WARNING] if os.geteuid() == 0 else []


class ComponentError(Exception):
    """A component the daemon would run or write is not safely its own."""


@dataclass(frozen=True)
class Components:
    # The `atomizer` MCP server's command, or () for none.
    atomizer_mcp: tuple[str, ...]
    # Where plan-mode sessions get their plan folders (`<root>/<modes.plan.plans_dir>`).
    plans_root: Path
    # What the daemon checked and relies on: write-denied to user-mode agents.
    paths: tuple[Path, ...]


def default_mcp_script(config: Config) -> Path:
    return config.atomizer_root / "mcp-server" / "atomizer-tools" / "dist" / "index.js"


def resolve(config: Config, *, create: bool) -> Components:
    """The components of `config`; `create` makes the plans folder (the daemon's start-up;
    `--check-config` only looks). Raises ComponentError saying what is wrong and where."""
    command, mcp_paths = _atomizer_mcp(config)
    plans_root = config.atomizer_root / config.modes.plan.plans_dir
    if create:
        _make_private_dirs(config.atomizer_root, plans_root)
    # Not made yet (--check-config) is fine: start-up makes it; a symlink on the way is not.
    what = "the plans folder (modes.plan.plans_dir)"
    check_trusted(plans_root, config.atomizer_root, what, missing_ok=True)
    paths = (*mcp_paths, plans_root)
    return Components(atomizer_mcp=tuple(command), plans_root=plans_root, paths=paths)


def describe(c: Components) -> str:
    """One line for `--check-config`."""
    mcp = " ".join(c.atomizer_mcp) if c.atomizer_mcp else "none"
    return f"atomizer MCP server: {mcp}; plans folder: {c.plans_root}"


def _atomizer_mcp(config: Config) -> tuple[list[str], list[Path]]:
    configured = list(config.mcp.atomizer_command)
    if configured:
        # The program may be a link (a venv's python, /usr/bin/node): where it leads is
        # checked. The files it is given (its script) must be plainly the daemon's.
        files = [Path(a) for a in configured[1:] if os.path.isabs(a) and Path(a).exists()]
        for path in files:
            check_trusted(path, path.parent, "the atomizer MCP server (mcp.atomizer_command)")
        program = shutil.which(configured[0])
        if program is not None:
            _check_owner(Path(program).resolve(), "the atomizer MCP server's program")
        return configured, files
    script = default_mcp_script(config)
    if not (script.exists() or script.is_symlink()):
        # None now means none for the daemon's lifetime; the path stays write-denied.
        return [], [script]
    check_trusted(script, config.atomizer_root, f"the default atomizer MCP server {script}")
    return ["node", str(script)], [script]


def check_trusted(path: Path, base: Path, what: str, *, missing_ok: bool = False) -> None:
    """Every part of `path` from `base` (included) down: no symlink, owned by the daemon's
    user or root, not group- or world-writable (`missing_ok`: the parts that exist)."""
    try:
        rel = path.relative_to(base)
    except ValueError:
        raise ComponentError(f"{what}: {path} is not inside {base}") from None
    current = base
    for part in ("", *rel.parts):
        current = current / part if part else current
        try:
            st = current.lstat()
        except FileNotFoundError:
            if missing_ok:
                return
            raise ComponentError(f"{what}: {current} does not exist") from None
        except OSError as e:
            raise ComponentError(f"{what}: cannot inspect {current}: {e.strerror}") from None
        if stat.S_ISLNK(st.st_mode):
            raise ComponentError(
                f"{what}: {current} is a symbolic link; the daemon runs or writes only "
                "components whose every part is its own"
            )
        _check_stat(current, st, what)


def _check_owner(path: Path, what: str) -> None:
    try:
        st = path.stat()
    except OSError as e:
        raise ComponentError(f"{what}: cannot inspect {path}: {e.strerror}") from None
    _check_stat(path, st, what)


def _check_stat(path: Path, st: os.stat_result, what: str) -> None:
    if st.st_uid not in (os.geteuid(), 0):
        raise ComponentError(
            f"{what}: {path} belongs to uid {st.st_uid}, not to the daemon's user or root"
        )
    if st.st_mode & 0o022:
        raise ComponentError(
            f"{what}: {path} is writable by group or others (mode {stat.S_IMODE(st.st_mode):04o}); "
            "fix it with chmod go-w"
        )


def _make_private_dirs(root: Path, target: Path) -> None:
    """Makes the folders from `root` down to `target` (0700), never through a symlink."""
    current = root
    for part in target.relative_to(root).parts:
        current = current / part
        if current.is_symlink():
            return  # check_trusted reports it
        with contextlib.suppress(FileExistsError):
            current.mkdir(mode=PLANS_MODE)
