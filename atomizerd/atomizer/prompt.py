"""The ContextBuilder: mode + study → the text appended to Claude Code's own system prompt.

The CLI keeps its default prompt and tool instructions (`--append-system-prompt`); we add what
Atomizer is, what the mode allows, and a bounded summary of the study folder. Reading the study
never fails on odd or huge files: every read is capped and errors become a note.

The summary is made on the event loop at every agent spawn, so it is bounded in work too: at
most `_DIR_SCAN` entries are read from any one folder and `_SCAN_TOTAL` for the whole summary
(a study of 100,000 files costs what one of a few thousand does), trial folders are counted up
to `_TRIALS_SCAN`. And it is cached per study: it is made again only when something it was made
from changed (the mtime of a folder it listed, the mtime or size of a file it used), or after
`SUMMARY_TTL` seconds; checking is a stat per such path. A summary made from paths changed in
the last `_RACY_SECONDS` is not cached, since a further change within the file system's
timestamp granularity would leave their mtimes as they were.
"""

from __future__ import annotations

import fnmatch
import os
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from os import scandir  # a name of this module's own: tests count the folders it reads
from pathlib import Path

from atomizerd.model import MessageRecord, Mode

DEFAULT_BUDGET = 16 * 1024
SUMMARY_TTL = 60.0
_TREE_ENTRIES = 60
_TREE_FILES_PER_DIR = 20
_FILE_HEAD = 4096
_DIR_SCAN = 1000
_SCAN_TOTAL = 5000
_TRIALS_SCAN = 10_000
_CACHED_STUDIES = 64
_RACY_SECONDS = 2.0

_INTRO = (
    "You are assisting a user of Atomizer, an engineering-optimization toolkit. Its studies are "
    "FEA optimization runs, each a folder: `1_setup/` holds the optimization configuration, "
    "`2_*` the trial runs, `3_results/` reports and results, and `STUDY_REPORT.md` the study's "
    "report."
)
_MODES = {
    Mode.USER: (
        "Mode: user (safe). You may read files, write STUDY_REPORT.md and Markdown reports under "
        "3_results/, and run Python scripts. Other tool uses are denied; say so plainly when a "
        "request needs them, and suggest the user switch to power mode."
    ),
    Mode.POWER: "Mode: power. You have full tool access; act carefully on study data.",
    Mode.PLAN: (
        "Mode: plan. Study what is needed and write a plan first; nothing is changed until the "
        "user approves it. When the plan is ready, present it with ExitPlanMode."
    ),
}


class ContextBuilder:
    def __init__(self, budget_bytes: int = DEFAULT_BUDGET, cache_ttl: float = SUMMARY_TTL) -> None:
        self.budget = budget_bytes
        self.cache_ttl = cache_ttl
        self._cache: OrderedDict[tuple[str, str], _Summary] = OrderedDict()

    def build(self, mode: Mode, study_id: str | None, study_dir: Path | None) -> str:
        parts = [_INTRO, _MODES.get(mode, "")]
        if study_id and study_dir is not None:
            parts.append(self.study_summary(study_id, study_dir))
        else:
            parts.append("No study is attached to this conversation.")
        return _clip("\n\n".join(p for p in parts if p), self.budget)

    def study_summary(self, study_id: str, study_dir: Path) -> str:
        """Never reads outside `study_dir`: symlinks pointing out of it are skipped. Cached
        until something it was made from changes (see the module docstring)."""
        key = (study_id, str(study_dir))
        cached = self._cache.get(key)
        if cached is not None and cached.still_valid(self.cache_ttl):
            self._cache.move_to_end(key)
            return cached.text
        summary = _summarize(study_id, study_dir)
        if summary.cacheable():
            self._cache[key] = summary
            self._cache.move_to_end(key)
            while len(self._cache) > _CACHED_STUDIES:
                self._cache.popitem(last=False)
        else:
            self._cache.pop(key, None)
        return summary.text


Signature = tuple[int, int, int] | None  # (inode, size, mtime in ns) of a path; None: missing


def _signature(path: str) -> Signature:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_ino, st.st_size, st.st_mtime_ns


@dataclass
class _Summary:
    """A summary, what it was made from, and when."""

    text: str = ""
    sources: dict[str, Signature] = field(default_factory=dict)
    made_at: float = field(default_factory=time.monotonic)
    made_at_wall: float = field(default_factory=time.time)

    def still_valid(self, ttl: float) -> bool:
        if time.monotonic() - self.made_at >= ttl:
            return False
        return all(_signature(path) == sig for path, sig in self.sources.items())

    def cacheable(self) -> bool:
        newest = self.made_at_wall - _RACY_SECONDS
        return all(sig is None or sig[2] / 1e9 < newest for sig in self.sources.values())


class _Scan:
    """Bounded folder listings for one summary; every folder listed and file used is noted
    (with its signature) as a source of the summary."""

    def __init__(self, total: int = _SCAN_TOTAL) -> None:
        self.left = total
        self.sources: dict[str, Signature] = {}
        self._listed: dict[str, list[os.DirEntry[str]]] = {}
        self.cut: list[str] = []  # folders listed only in part

    def note(self, path: Path | str) -> None:
        key = str(path)
        if key not in self.sources:
            self.sources[key] = _signature(key)

    def entries(self, folder: Path | str, limit: int = _DIR_SCAN) -> list[os.DirEntry[str]]:
        """At most `limit` entries of `folder` (fewer once the summary's total is spent), in
        the order the file system gives them; a folder is read once per summary. Raises
        OSError if it cannot be listed."""
        key = str(folder)
        if key in self._listed:
            return self._listed[key]
        self.note(key)
        limit = min(limit, self.left)
        out: list[os.DirEntry[str]] = []
        if limit > 0:
            with scandir(key) as it:
                for entry in it:
                    if len(out) >= limit:
                        self.cut.append(key)
                        break
                    out.append(entry)
        self.left -= len(out)
        self._listed[key] = out
        return out


def _summarize(study_id: str, study_dir: Path) -> _Summary:
    scan = _Scan()
    sections = [
        f"Current study: {study_id} (folder {study_dir}).",
        "Files:\n" + _tree(scan, study_dir),
    ]
    setup = _first_existing(
        scan,
        study_dir / "1_setup",
        study_dir,
        ("optimization_config.json", "*.json", "*.yaml", "*.toml"),
    )
    if setup is not None:
        sections.append(f"Optimization config ({setup.name}):\n" + _head(scan, setup, _FILE_HEAD))
    trials = _count_trials(scan, study_dir)
    if trials:
        more = " or more" if trials >= _TRIALS_SCAN else ""
        sections.append(f"Trial folders: {trials}{more}.")
    reports = _newest(scan, study_dir / "3_results", "*.md", 3)
    if reports:
        sections.append("Newest reports in 3_results/: " + ", ".join(reports))
    report = study_dir / "STUDY_REPORT.md"
    scan.note(report)
    if report.is_file() and _inside(report, study_dir):
        sections.append("STUDY_REPORT.md (head):\n" + _head(scan, report, _FILE_HEAD))
    if scan.cut:
        folders = ", ".join(_shown(f, study_dir) for f in scan.cut[:5])
        sections.append(f"(Folders too big to list whole, summarized in part: {folders}.)")
    return _Summary(text="\n\n".join(sections), sources=scan.sources)


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


def _shown(folder: str, study_dir: Path) -> str:
    rel = os.path.relpath(folder, study_dir)
    return "the study folder" if rel == "." else rel + "/"


def _is_dir(entry: os.DirEntry[str]) -> bool:
    try:
        return entry.is_dir()
    except OSError:
        return False


def _tree(scan: _Scan, root: Path) -> str:
    """Up to `_TREE_ENTRIES` lines: the files of the study folder and of the folders two
    levels down, sorted, at most `_TREE_FILES_PER_DIR` per folder; symlinked folders are
    listed as folders but not entered."""
    lines: list[str] = []

    def walk(folder: str, depth: tuple[str, ...]) -> bool:
        """False once the tree is full."""
        try:
            entries = scan.entries(folder)
        except OSError as e:
            if not depth:
                lines.append(f"(could not list: {e.strerror})")
            return True
        dirs = sorted((e for e in entries if _is_dir(e)), key=lambda e: e.name)
        files = sorted(e.name for e in entries if not _is_dir(e))
        for name in files[:_TREE_FILES_PER_DIR]:
            lines.append("  " * len(depth) + ("/".join(depth) + "/" if depth else "") + name)
            if len(lines) >= _TREE_ENTRIES:
                lines.append("  ...")
                return False
        if len(depth) >= 2:
            return True
        return all(d.is_symlink() or walk(d.path, (*depth, d.name)) for d in dirs)

    walk(str(root), ())
    return "\n".join(lines) or "(empty)"


def _first_existing(
    scan: _Scan, folder: Path, study_dir: Path, patterns: tuple[str, ...]
) -> Path | None:
    if not folder.is_dir():
        return None
    try:
        names = sorted(e.name for e in scan.entries(folder) if e.is_file(follow_symlinks=False))
    except OSError:
        return None
    for pattern in patterns:
        for name in fnmatch.filter(names, pattern):
            path = folder / name
            if _inside(path, study_dir):
                return path
    return None


def _inside(path: Path, root: Path) -> bool:
    try:
        return path.resolve().is_relative_to(root.resolve())
    except OSError:
        return False


def _head(scan: _Scan, path: Path, limit: int) -> str:
    scan.note(path)
    try:
        with path.open("rb") as fh:
            data = fh.read(limit + 1)
    except OSError as e:
        return f"(unreadable: {e.strerror})"
    text = data[:limit].decode("utf-8", "replace")
    return text + ("\n[...]" if len(data) > limit else "")


def _count_trials(scan: _Scan, study_dir: Path) -> int:
    """Subfolders of the `2_*` folders, counted up to `_TRIALS_SCAN`."""
    count = 0
    try:
        tops = scan.entries(study_dir)
    except OSError:
        return 0
    for top in sorted(tops, key=lambda e: e.name):
        if not (top.name.startswith("2_") and top.is_dir(follow_symlinks=False)):
            continue
        scan.note(top.path)
        try:
            with scandir(top.path) as it:
                for entry in it:
                    if entry.is_dir(follow_symlinks=False):
                        count += 1
                        if count >= _TRIALS_SCAN:
                            return count
        except OSError:
            continue
    return count


def _newest(scan: _Scan, folder: Path, pattern: str, n: int) -> list[str]:
    """Names of the `n` newest files matching `pattern` among the folder's first entries.
    The folder and the files named are the summary's sources: an older file rewritten (now
    the newest) shows after `SUMMARY_TTL`, a new one at once."""
    if not folder.is_dir():
        return []
    found: list[tuple[int, str, str]] = []
    try:
        for entry in scan.entries(folder):
            if fnmatch.fnmatch(entry.name, pattern) and entry.is_file(follow_symlinks=False):
                mtime = entry.stat(follow_symlinks=False).st_mtime_ns
                found.append((mtime, entry.name, entry.path))
    except OSError:
        return []
    newest = sorted(found, reverse=True)[:n]
    for _, _, path in newest:
        scan.note(path)
    return [name for _, name, _ in newest]
