"""Studies on disk and the per-session files in the runtime dir.

A study id is a plain name resolved inside `atomizer.studies_root` after symlinks are
resolved; nothing outside that root is ever read. Per-session runtime files (MCP config)
live in `<runtime_dir>/sessions/` with mode 0600.
"""

from __future__ import annotations

import os
from pathlib import Path

from atomizerd import ids
from atomizerd.daemon.config import Config
from atomizerd.errors import InvalidArgument


class Studies:
    def __init__(self, config: Config) -> None:
        self.config = config
        self.root = config.studies_root
        self.session_dir = config.runtime_dir / "sessions"

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

    def remove_session_files(self, session_id: str) -> None:
        if not self.session_dir.is_dir():
            return
        for path in self.session_dir.glob(f"{ids.check_session_id(session_id)}.*"):
            path.unlink(missing_ok=True)

    def remove_stale_files(self, keep: set[str]) -> int:
        """Start-up sweep: files of sessions that no longer exist (or half-written ones)."""
        if not self.session_dir.is_dir():
            return 0
        removed = 0
        for path in self.session_dir.iterdir():
            owner = path.name.split(".", 1)[0]
            if owner not in keep or path.name.endswith(".tmp"):
                path.unlink(missing_ok=True)
                removed += 1
        return removed
