"""Claude Code's own sandbox for user-mode agents: whether it can run here, and what one
session's agent may touch.

The CLI runs each Bash command in bubblewrap with a seccomp filter (Linux; the Debian packages
`bubblewrap` and `socat`), configured by the `sandbox` section of its settings (we pass them
with `--settings`). Measured on the pinned CLI (2.1.332), with `failIfUnavailable`,
`autoAllowBashIfSandboxed` and `allowUnsandboxedCommands: false`:

- creating a Unix socket fails with EPERM (seccomp), so no sandboxed command reaches the
  daemon's socket or any other;
- the filesystem is read-only except the working directory, `allowWrite` and the CLI's own
  `$TMPDIR/claude-<uid>`: a write elsewhere fails with EROFS;
- the working directory stays writable whatever `allowWrite` says, and a `denyWrite` on a
  directory also covers every `allowWrite` inside it (deny the root and allow the study: both
  read-only). A `denyWrite` on a path that does not exist yet blocks its creation. So, since
  agents run in the Atomizer root (the CLI keys transcripts by working directory: it can never
  change for a session), "writes only in the study" is a `denyWrite` on every other entry of
  the root, and of each folder on the way down to the study (`write_denials`); a `denyWrite`
  inside an `allowWrite` holds (the names the CLI loads, denied inside the study);
- `denyRead` hides a directory behind an empty tmpfs (reads fail, writes land in the tmpfs
  and vanish); `allowRead` re-opens a path inside it, and the most specific entry wins;
- network goes through the CLI's proxy: with `strictAllowlist` a host outside `allowedDomains`
  is refused (HTTP 403 from the proxy) instead of asking;
- `credentials.envVars` with mode `deny` unsets a variable for sandboxed commands (the API
  key is in the agent's own environment, and a command would otherwise inherit it).
- With `failIfUnavailable` and bubblewrap missing, the CLI exits at start (status 1, "sandbox
  required but unavailable"); we check first so the client gets a clear FAILED_PRECONDITION.

The file tools (Read, Write, Edit) run inside the CLI, not in the sandbox: permission rules
confine them. Read deny rules also reach the sandbox's `denyRead`, Edit rules its write lists.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import threading
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from atomizerd.agents.argv import build_env
from atomizerd.atomizer import protected
from atomizerd.config import Config

# Readable only by root: hidden from user-mode tools when the daemon (so every agent) runs as
# root, where the filesystem's own permissions no longer keep them out.
ROOT_ONLY = (
    "/root",
    "/etc/shadow",
    "/etc/shadow-",
    "/etc/gshadow",
    "/etc/gshadow-",
    "/etc/sudoers",
    "/etc/sudoers.d",
    "/etc/ssh",
    "/var/lib/sudo",
)
# Variables a sandboxed command never sees (the CLI's own environment keeps them).
_SECRET_ENV = re.compile(r"KEY|TOKEN|SECRET|PASSWORD|CREDENTIAL", re.IGNORECASE)
_PROBE_TIMEOUT = 10.0
_RETRY_UNAVAILABLE = 10.0  # seconds a failed probe is trusted before it is tried again

INSTALL_HINT = (
    "install the Debian packages bubblewrap and socat (apt-get install bubblewrap socat), or "
    "set sandbox.enabled = false in the daemon's configuration (user mode is then advisory "
    "only)"
)


@dataclass(frozen=True)
class SandboxStatus:
    enabled: bool  # sandbox.enabled
    available: bool
    detail: str  # what was found, or what is missing

    def refusal(self) -> str:
        """The FAILED_PRECONDITION message of a user-mode session that cannot start."""
        return (
            "user mode runs the agent's commands in Claude Code's sandbox, which cannot run "
            f"on the daemon's machine: {self.detail}; {INSTALL_HINT}"
        )

    def summary(self) -> str:
        if not self.enabled:
            return "off (sandbox.enabled = false): user mode is advisory only"
        if self.available:
            return f"available ({self.detail})"
        return f"UNAVAILABLE: {self.detail}; user-mode sessions will not start: {INSTALL_HINT}"


class SandboxProbe:
    """Whether the CLI's sandbox can run for agents with a given PATH: bubblewrap and socat
    found there (where the CLI looks), and bubblewrap able to create the namespaces and the
    fresh /proc the CLI asks of it (a container or a hardened unit may forbid them)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._works: dict[str, tuple[bool, str, float]] = {}  # bwrap path -> ok, why, when

    def status(self, enabled: bool, path: str) -> SandboxStatus:
        if not enabled:
            return SandboxStatus(False, False, "sandbox.enabled = false")
        bwrap = shutil.which("bwrap", path=path)
        socat = shutil.which("socat", path=path)
        missing = [
            what
            for what, found in (("bubblewrap (bwrap)", bwrap), ("socat", socat))
            if found is None
        ]
        if missing:
            return SandboxStatus(
                True, False, f"{' and '.join(missing)} not found on the agent's PATH ({path})"
            )
        assert bwrap is not None and socat is not None
        ok, why = self._bwrap_works(bwrap, path)
        if not ok:
            return SandboxStatus(True, False, f"bubblewrap ({bwrap}) cannot sandbox here: {why}")
        return SandboxStatus(True, True, f"bwrap {bwrap}, socat {socat}")

    def _bwrap_works(self, bwrap: str, path: str) -> tuple[bool, str]:
        with self._lock:
            known = self._works.get(bwrap)
            if known is not None and (known[0] or time.monotonic() - known[2] < _RETRY_UNAVAILABLE):
                return known[0], known[1]
            ok, why = _try_bwrap(bwrap, path)
            self._works[bwrap] = (ok, why, time.monotonic())
            return ok, why


# One for the daemon: a working bubblewrap is tried once (a failing one again after a while).
PROBE = SandboxProbe()


def agent_path(config: Config) -> str:
    """The PATH agents get, where the CLI looks for bwrap and socat."""
    return build_env(os.environ, config.agent.env).get("PATH") or os.defpath


def check(config: Config) -> SandboxStatus:
    """Whether user-mode agents of this configuration can be sandboxed (GetStatus,
    --check-config)."""
    return PROBE.status(config.sandbox.enabled, agent_path(config))


def _try_bwrap(bwrap: str, path: str) -> tuple[bool, str]:
    true = shutil.which("true", path=path) or "/bin/true"
    argv = [
        bwrap,
        "--new-session",
        "--die-with-parent",
        "--unshare-net",
        "--unshare-pid",
        "--ro-bind",
        "/",
        "/",
        "--dev",
        "/dev",
        "--proc",
        "/proc",
        "--",
        true,
    ]
    try:
        done = subprocess.run(
            argv,
            env={"PATH": path},
            stdin=subprocess.DEVNULL,
            capture_output=True,
            timeout=_PROBE_TIMEOUT,
            check=False,
        )
    except (OSError, subprocess.SubprocessError) as e:
        return False, str(e)
    if done.returncode != 0:
        err = done.stderr.decode(errors="replace").strip() or f"exit status {done.returncode}"
        return False, err[-300:]
    return True, ""


# --- one session's policy ------------------------------------------------------------------


@dataclass(frozen=True)
class SessionPolicy:
    """What one user-mode agent may touch: its `--settings` and the rules of its file tools."""

    settings: dict[str, Any]
    # Read/Edit deny rules, also in `settings["permissions"]["deny"]` (kept for tests and logs).
    deny_rules: list[str]


def rule_path(path: Path) -> str:
    """A path in permission-rule syntax: `//abs/path` (a single `/` is relative to the
    settings file)."""
    return "/" + str(path)


@dataclass(frozen=True)
class DaemonPaths:
    """The daemon's own components (atomizer/components.py) as one policy sees them."""

    components: tuple[Path, ...] = ()  # write-denied to Bash and to the file tools
    plans_root: Path | None = None  # Bash reads only `own_plans` in it
    own_plans: Path | None = None


def user_policy(
    config: Config,
    *,
    env: Mapping[str, str],
    study: Path | None,
    tmp: Path,
    daemon: DaemonPaths | None = None,
) -> SessionPolicy:
    """The sandbox and file-tool rules of a user-mode agent of a session with `study`
    (resolved, or None) and private temporary dir `tmp`."""
    sb = config.sandbox
    daemon = daemon or DaemonPaths()
    home = Path(env.get("HOME") or Path.home())
    root = config.atomizer_root
    roots = _both(root)
    own = [*roots, *(_both(study) if study else []), tmp]
    plans = [daemon.plans_root] if daemon.plans_root else []
    own_plans = [daemon.own_plans] if daemon.own_plans else []

    always = always_denied(config, env)
    allow_read = _unique(
        [
            *own,
            *own_plans,
            *(p for p in expand(sb.allow_read, home) if not _inside_any(p, always)),
        ]
    )
    read_denied_all = _unique([*always, *plans, *expand(sb.deny_read, home)])
    deny_read = _outermost(read_denied_all, allow_read)
    allow_write = _unique([*([study] if study else []), tmp, *expand(sb.allow_write, home)])
    deny_write = write_denials(root, allow_write, daemon.components)

    # The file tools: deny beats allow whatever the nesting, so a denied folder holding the
    # root or the study is left to the allowlist and the approval flow instead.
    def keeps_own(p: Path) -> bool:
        return any(_inside(o, p) for o in own if o != tmp)

    # The plans folder is left to Bash's denyRead: a Read rule there would also close the
    # plan-mode agent's own plan file to it.
    read_denied = _outermost(
        [p for p in read_denied_all if not keeps_own(p) and p not in plans], []
    )
    edit_denied = _outermost(
        [
            p
            for p in [*_write_protected(config, env), *daemon.components]
            if not keeps_own(p) and p not in plans
        ],
        [],
    )
    deny_rules = [r for p in read_denied for r in _rules("Read", p)]
    deny_rules += [r for p in edit_denied for r in _rules("Edit", p)]
    deny_rules += loaded_file_rules([*roots, *(_both(study) if study else [])])
    deny_rules += [
        r for p in roots for name in protected.working_dir_names() for r in _rules("Edit", p / name)
    ]

    settings: dict[str, Any] = {
        "sandbox": {
            "enabled": True,
            "failIfUnavailable": True,
            "autoAllowBashIfSandboxed": sb.auto_allow_bash,
            "allowUnsandboxedCommands": False,
            "excludedCommands": [],
            "network": {"allowedDomains": list(sb.allowed_domains), "strictAllowlist": True},
            "filesystem": {
                "allowWrite": [str(p) for p in allow_write],
                "denyWrite": [str(p) for p in deny_write],
                "denyRead": [str(p) for p in deny_read],
                "allowRead": [str(p) for p in allow_read],
            },
            "credentials": {
                "envVars": [{"name": name, "mode": "deny"} for name in secret_env_names(env)]
            },
        },
        "permissions": {"deny": deny_rules},
    }
    return SessionPolicy(settings=settings, deny_rules=deny_rules)


def always_denied(config: Config, env: Mapping[str, str]) -> list[Path]:
    """What no user-mode tool may read, whatever the configuration: the daemon's state (its
    database) and runtime dir (its socket, the sessions' files), the CLI's config dir (every
    session's transcript) and the agents' temporary dirs (each agent's own is re-opened)."""
    home = Path(env.get("HOME") or Path.home())
    paths = [config.state_dir, config.runtime_dir, *_socket_dir(config)]
    paths += _cli_config(env, home)
    paths += _database_files(config)
    paths.append(Path(config.sandbox.tmp_dir))
    if os.geteuid() == 0:
        paths += [Path(p) for p in ROOT_ONLY if os.path.lexists(p)]
    return _unique(paths)


def loaded_file_rules(folders: Iterable[Path]) -> list[str]:
    """Edit deny rules for the files the CLI loads (protected.INSTRUCTIONS) at any depth of
    `folders`: no Write or Edit, approved or not, creates or changes one."""
    rules: list[str] = []
    for folder in _unique(folders):
        base = rule_path(folder)
        for name in protected.instruction_names():
            rules += [f"Edit({base}/**/{name})", f"Edit({base}/**/{name}/**)"]
    return rules


def _socket_dir(config: Config) -> list[Path]:
    """The socket's folder, unless it holds the Atomizer root (the seccomp filter keeps
    sandboxed commands off every Unix socket anyway)."""
    folder = config.socket_path.parent
    return [] if _inside(config.atomizer_root, folder) else [folder]


def _write_protected(config: Config, env: Mapping[str, str]) -> list[Path]:
    """Where not even an approved Write or Edit may write. Not the whole state dir: it holds
    the agents' temporary dirs, and an Edit deny there would also close them to Bash."""
    home = Path(env.get("HOME") or Path.home())
    return _unique(
        [
            config.runtime_dir,
            *_socket_dir(config),
            *_cli_config(env, home),
            *_database_files(config),
        ]
    )


def _cli_config(env: Mapping[str, str], home: Path) -> list[Path]:
    if env.get("CLAUDE_CONFIG_DIR"):
        return [Path(env["CLAUDE_CONFIG_DIR"])]
    return [home / ".claude", home / ".claude.json"]


def _database_files(config: Config) -> list[Path]:
    url = config.daemon.database
    if not url.startswith("sqlite:///"):
        return []
    db = Path(url[len("sqlite:///") :].split("?", 1)[0]).absolute()
    return [db, *(db.with_name(db.name + s) for s in ("-wal", "-shm", "-journal"))]


def write_denials(root: Path, keep: Sequence[Path], components: Sequence[Path] = ()) -> list[Path]:
    """`denyWrite` entries that leave Bash, whose working directory is the root, able to write
    only in `keep` (and outside the root, where only `allowWrite` is writable anyway).

    The working directory cannot be denied without denying everything in it, so: the root
    itself when nothing kept is inside it; otherwise every entry of the root, and of each
    folder on the way down to a kept path, except that way. On top, whether they exist or not
    (a denial of a missing name blocks its creation): the names the CLI loads
    (`protected`) in the root, in those folders and in each kept folder, and the daemon's own
    `components`. Other new names in the folders on the way down (the root, the studies root)
    stay creatable until the agent's next start.
    """
    root_real = root.resolve()
    kept = _unique([p.resolve() for p in keep])
    inside = [k for k in kept if _inside(k, root_real)]
    if root_real in inside:  # the whole root is allowed
        return []
    denials: list[Path] = [k / name for k in kept for name in protected.names_in(False)]
    for path in (c.resolve() for c in components):
        top = protected.top_entry(path, root_real)
        on_the_way = top is not None and any(_inside(k, top) for k in inside)
        denials.append(path if on_the_way or top is None else top)
    if not inside:
        return _unique([root_real, *denials])

    def walk(folder: Path) -> None:
        try:
            names = set(os.listdir(folder))
        except OSError:
            return
        loaded = protected.names_in(folder_is_root=folder == root_real)
        for name in sorted(names | set(loaded)):
            entry = folder / name
            if entry in inside:
                continue
            if any(_inside(k, entry) for k in inside):
                walk(entry)
                continue
            if entry.is_symlink():
                try:
                    target = entry.resolve()
                except OSError:
                    target = entry
                # The CLI denies where a link points: never let that be a kept path.
                if any(_inside(k, target) or _inside(target, k) for k in inside):
                    continue
            denials.append(entry)

    walk(root_real)
    return _unique(denials)


def expand(paths: Iterable[str], home: Path) -> list[Path]:
    out = []
    for raw in paths:
        if raw == "~" or raw.startswith("~/"):
            out.append(home / raw[2:] if raw != "~" else home)
        else:
            out.append(Path(raw))
    return out


def secret_env_names(env: Mapping[str, str]) -> list[str]:
    return sorted(name for name in env if _SECRET_ENV.search(name))


def _rules(tool: str, path: Path) -> list[str]:
    """The path itself (a file, or a folder not made yet) and everything under it."""
    return [f"{tool}({rule_path(path)})", f"{tool}({rule_path(path)}/**)"]


def _both(path: Path) -> list[Path]:
    """A path as configured and as resolved (the CLI checks both spellings)."""
    return _unique([path, path.resolve()])


def _inside(path: Path, folder: Path) -> bool:
    return path == folder or folder in path.parents


def _inside_any(path: Path, folders: Iterable[Path]) -> bool:
    return any(_inside(path, f) for f in folders)


def _outermost(denied: Sequence[Path], allowed: Sequence[Path]) -> list[Path]:
    """`denied` without the entries another one already covers, unless an allowed path
    between the two would open the inner one again (the most specific entry wins)."""

    def covered(inner: Path) -> bool:
        return any(
            outer != inner
            and _inside(inner, outer)
            and not any(_inside(inner, a) and _inside(a, outer) and a != outer for a in allowed)
            for outer in denied
        )

    return [p for p in denied if not covered(p)]


def _unique(paths: Iterable[Path]) -> list[Path]:
    seen: dict[Path, None] = {}
    for p in paths:
        seen.setdefault(p, None)
    return list(seen)
