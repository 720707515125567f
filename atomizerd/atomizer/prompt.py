"""The ContextBuilder: mode + study → the text appended to Claude Code's own system prompt.

The CLI keeps its default prompt and tool instructions (`--append-system-prompt`); we add what
Atomizer is, what the mode allows, and a bounded summary of the study folder. Reading the study
never fails on odd or huge files: every read is capped and errors become a note.
"""

from __future__ import annotations

import os
from pathlib import Path

from atomizerd.store.db import MessageRecord

DEFAULT_BUDGET = 16 * 1024
_TREE_ENTRIES = 60
_FILE_HEAD = 4096

_INTRO = (
    "You are assisting a user of Atomizer, an engineering-optimization toolkit. Its studies are "
    "FEA optimization runs, each a folder: `1_setup/` holds the optimization configuration, "
    "`2_*` the trial runs, `3_results/` reports and results, and `STUDY_REPORT.md` the study's "
    "report."
)
_MODES = {
    "user": (
        "Mode: user (safe). You may read files, write STUDY_REPORT.md and Markdown reports under "
        "3_results/, and run Python scripts. Other tool uses are denied; say so plainly when a "
        "request needs them, and suggest the user switch to power mode."
    ),
    "power": "Mode: power. You have full tool access; act carefully on study data.",
}


class ContextBuilder:
    def __init__(self, budget_bytes: int = DEFAULT_BUDGET) -> None:
        self.budget = budget_bytes

    def build(self, mode: str, study_id: str | None, study_dir: Path | None) -> str:
        parts = [_INTRO, _MODES.get(mode, "")]
        if study_id and study_dir is not None:
            parts.append(self.study_summary(study_id, study_dir))
        else:
            parts.append("No study is attached to this conversation.")
        return _clip("\n\n".join(p for p in parts if p), self.budget)

    def study_summary(self, study_id: str, study_dir: Path) -> str:
        """Never reads outside `study_dir`: symlinks pointing out of it are skipped."""
        sections = [
            f"Current study: {study_id} (folder {study_dir}).",
            "Files:\n" + _tree(study_dir),
        ]
        setup = _first_existing(
            study_dir / "1_setup", ("optimization_config.json", "*.json", "*.yaml", "*.toml")
        )
        if setup is not None:
            sections.append(f"Optimization config ({setup.name}):\n" + _head(setup, _FILE_HEAD))
        trials = _count_trials(study_dir)
        if trials:
            sections.append(f"Trial folders: {trials}.")
        reports = _newest(study_dir / "3_results", "*.md", 3)
        if reports:
            sections.append("Newest reports in 3_results/: " + ", ".join(p.name for p in reports))
        report = study_dir / "STUDY_REPORT.md"
        if report.is_file() and _inside(report, study_dir):
            sections.append("STUDY_REPORT.md (head):\n" + _head(report, _FILE_HEAD))
        return "\n\n".join(sections)


def history_seed(messages: list[MessageRecord]) -> str:
    """Earlier conversation, for an agent whose own transcript could not be resumed."""
    if not messages:
        return ""
    lines = [
        "The earlier part of this conversation could not be restored; here are its last "
        "messages for context:"
    ]
    for m in messages:
        lines.append(f"[{m.role}] {m.content[:2000]}")
    return "\n".join(lines)


def _clip(text: str, budget: int) -> str:
    data = text.encode("utf-8")
    if len(data) <= budget:
        return text
    return data[: budget - 20].decode("utf-8", "ignore") + "\n[... truncated]"


def _tree(root: Path) -> str:
    lines: list[str] = []
    try:
        for dirpath, dirnames, filenames in os.walk(root, followlinks=False):
            dirnames.sort()
            depth = Path(dirpath).relative_to(root).parts
            if len(depth) >= 2:
                dirnames.clear()
            for name in sorted(filenames)[:20]:
                lines.append("  " * len(depth) + ("/".join(depth) + "/" if depth else "") + name)
                if len(lines) >= _TREE_ENTRIES:
                    return "\n".join(lines) + "\n  ..."
    except OSError as e:
        lines.append(f"(could not list: {e.strerror})")
    return "\n".join(lines) or "(empty)"


def _first_existing(folder: Path, patterns: tuple[str, ...]) -> Path | None:
    if not folder.is_dir():
        return None
    for pattern in patterns:
        for path in sorted(folder.glob(pattern)):
            if path.is_file() and not path.is_symlink() and _inside(path, folder):
                return path
    return None


def _inside(path: Path, root: Path) -> bool:
    try:
        return path.resolve().is_relative_to(root.resolve())
    except OSError:
        return False


def _head(path: Path, limit: int) -> str:
    try:
        with path.open("rb") as fh:
            data = fh.read(limit + 1)
    except OSError as e:
        return f"(unreadable: {e.strerror})"
    text = data[:limit].decode("utf-8", "replace")
    return text + ("\n[...]" if len(data) > limit else "")


def _count_trials(study_dir: Path) -> int:
    count = 0
    try:
        for entry in os.scandir(study_dir):
            if entry.is_dir(follow_symlinks=False) and entry.name.startswith("2_"):
                count += sum(1 for e in os.scandir(entry.path) if e.is_dir(follow_symlinks=False))
    except OSError:
        return count
    return count


def _newest(folder: Path, pattern: str, n: int) -> list[Path]:
    if not folder.is_dir():
        return []
    try:
        files = [p for p in folder.glob(pattern) if p.is_file()]
        return sorted(files, key=lambda p: p.stat().st_mtime, reverse=True)[:n]
    except OSError:
        return []
