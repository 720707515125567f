"""The files the agent changed, as it left them: what RewindFiles compares the disk with.

The CLI rewinds a file to its copy from before the message whatever happened to it since
(measured: a file edited by hand after the agent's change is overwritten or removed). So at
the end of every turn the files the agent's edit tools touched are hashed as they are then
(the agent's version); at a rewind, a file whose hash differs now was changed by someone else
since, and is reported instead of overwritten. Files changed by the agent's shell commands are
not the CLI's to rewind (it checkpoints only its edit tools), so not ours to track either.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable
from pathlib import Path

from atomizerd.model import ToolCallRecord

# The edit tools the CLI checkpoints, and the input key naming the file each changes.
EDIT_TOOLS = {
    "Write": "file_path",
    "Edit": "file_path",
    "MultiEdit": "file_path",
    "NotebookEdit": "notebook_path",
}
# Files larger than this are told apart by size and modification time, not read whole.
_HASH_LIMIT = 256 * 1024 * 1024
ABSENT = ""


def touched(calls: Iterable[ToolCallRecord]) -> set[str]:
    """The absolute paths the agent's successful edit-tool calls changed."""
    paths = set()
    for call in calls:
        key = EDIT_TOOLS.get(call.name)
        if key is None or call.is_error:
            continue
        try:
            value = json.loads(call.input_json or "{}").get(key)
        except (ValueError, AttributeError):
            continue
        if isinstance(value, str) and value.startswith("/"):
            paths.add(value)
    return paths


def digest(path: str) -> str:
    """The file's content hash now; ABSENT when there is no such file."""
    p = Path(path)
    try:
        stat = p.stat()
        if stat.st_size > _HASH_LIMIT:
            return f"size:{stat.st_size}:mtime:{stat.st_mtime_ns}"
        return hashlib.sha256(p.read_bytes()).hexdigest()
    except FileNotFoundError:
        return ABSENT
    except OSError as e:  # unreadable: never equal to a hash, so reported as changed
        return f"unreadable:{e.errno}"


def load(marks_json: str) -> dict[str, str]:
    try:
        marks = json.loads(marks_json or "{}")
    except ValueError:
        return {}
    return {str(k): str(v) for k, v in marks.items()} if isinstance(marks, dict) else {}


def after_turn(marks_json: str, calls: Iterable[ToolCallRecord]) -> str | None:
    """The marks once the turn's edits are taken in (None: the turn edited nothing)."""
    paths = touched(calls)
    if not paths:
        return None
    return refreshed(marks_json, paths)


def refreshed(marks_json: str, paths: Iterable[str]) -> str:
    """The marks with `paths` as they are on disk now."""
    marks = load(marks_json)
    for path in paths:
        marks[path] = digest(path)
    return json.dumps(marks, sort_keys=True)


def conflicts(marks_json: str, paths: Iterable[str]) -> list[str]:
    """Those of `paths` that are no longer as the agent left them."""
    marks = load(marks_json)
    return sorted(p for p in paths if p in marks and digest(p) != marks[p])
