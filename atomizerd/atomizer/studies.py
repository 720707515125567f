"""Studies on disk and the per-session files in the runtime dir.

A study id is a plain name resolved inside `atomizer.studies_root` after symlinks are
resolved; nothing outside that root is ever read. Per-session runtime files (MCP config,
settings) live in `<runtime_dir>/sessions/` with mode 0600; each agent's private temporary dir
(its TMPDIR) is `<sandbox.tmp_dir>/<session id>/`, 0700.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import stat
from pathlib import Path

from atomizerd import ids
from atomizerd.config import Config
from atomizerd.errors import FailedPrecondition, InvalidArgument


class Studies:
    def __init__(self, config: Config) -> None:
        self.config = config
        self.root = config.studies_root
        self.session_dir = config.runtime_dir / "sessions"
        self.tmp_root = Path(config.sandbox.tmp_dir)

    def resolve(self, study_id: str) -> Path:
        """The study's folder; INVALID_ARGUMENT for anything but a real folder in the root."""
        ids.check_study_id(study_id)
        root = self.root.resolve()
        path = (root / study_id).resolve()
        if path.parent != root:
            raise InvalidArgument(f"study {study_id!r} resolves outside the studies root")
        if not path.is_dir():
            raise InvalidArgument(f"study {study_id!r} does not exist under {root}")
        return path

    def session_file(self, session_id: str, suffix: str) -> Path:
        ids.check_session_id(session_id)
        return self.session_dir / f"{session_id}{suffix}"

    def write_session_file(self, session_id: str, suffix: str, content: str) -> Path:
        """Writes a private (0600) runtime file for the session, atomically."""
        self.session_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        path = self.session_file(session_id, suffix)
        tmp = path.with_suffix(path.suffix + ".tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(content)
        os.replace(tmp, path)
        return path

    def session_tmp(self, session_id: str) -> Path:
        """The session's private temporary dir (made 0700 if missing). FAILED_PRECONDITION
        when its parent is not a private folder of the daemon's user."""
        ids.check_session_id(session_id)
        self.tmp_root.mkdir(mode=0o700, parents=True, exist_ok=True)
        _check_private(self.tmp_root)
        path = self.tmp_root / session_id
        with contextlib.suppress(FileExistsError):
            path.mkdir(mode=0o700)
        _check_private(path)
        return path

    def remove_session_files(self, session_id: str) -> None:
        ids.check_session_id(session_id)
        _remove_tree(self.tmp_root / session_id)
        if not self.session_dir.is_dir():
            return
        for path in self.session_dir.glob(f"{session_id}.*"):
            path.unlink(missing_ok=True)

    def remove_stale_files(self, keep: set[str]) -> int:
        """Start-up sweep: files of sessions that no longer exist (or half-written ones), and
        temporary dirs of agents that are gone."""
        removed = 0
        if self.tmp_root.is_dir() and not self.tmp_root.is_symlink():
            for path in self.tmp_root.iterdir():
                if path.name not in keep:
                    _remove_tree(path)
                    removed += 1
        if not self.session_dir.is_dir():
            return removed
        for path in self.session_dir.iterdir():
            owner = path.name.split(".", 1)[0]
            if owner not in keep or path.name.endswith(".tmp"):
                path.unlink(missing_ok=True)
                removed += 1
        return removed


def _check_private(path: Path) -> None:
    """A real folder (not a link), owned by us, closed to others: nobody else can plant files
    in an agent's TMPDIR or read what it leaves there."""
    st = path.lstat()
    if not stat.S_ISDIR(st.st_mode) or st.st_uid != os.geteuid():
        raise FailedPrecondition(
            f"{path} (an agent's temporary dir) is not a folder owned by the daemon's user; "
            "remove it or choose another sandbox.tmp_dir"
        )
    if stat.S_IMODE(st.st_mode) & 0o077:
        os.chmod(path, 0o700)


def _remove_tree(path: Path) -> None:
    if path.is_symlink() or path.is_file():
        path.unlink(missing_ok=True)
    elif path.is_dir():

        def writable_again(func: object, failed: str, exc: object) -> None:
            # A tool may leave read-only folders behind: open them to us, try once more.
            try:
                os.chmod(os.path.dirname(failed), 0o700)
                os.chmod(failed, 0o700)
                if os.path.isdir(failed) and not os.path.islink(failed):
                    os.rmdir(failed)
                else:
                    os.unlink(failed)
            except OSError:
                pass

        shutil.rmtree(path, onerror=writable_again)
