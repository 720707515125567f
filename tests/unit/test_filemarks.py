"""What RewindFiles compares the disk with: the files the agent's edit tools left."""

from __future__ import annotations

import json
from pathlib import Path

from atomizerd.model import ToolCallRecord
from atomizerd.sessions import filemarks


def call(
    name: str, path: Path, *, is_error: bool = False, key: str = "file_path"
) -> ToolCallRecord:
    return ToolCallRecord("tu", name, json.dumps({key: str(path)}), "", is_error)


def test_only_successful_edit_tool_calls_with_absolute_paths_count(tmp_path: Path) -> None:
    a, b, c = tmp_path / "a", tmp_path / "b", tmp_path / "c.ipynb"
    calls = [
        call("Write", a),
        call("Edit", b),
        call("NotebookEdit", c, key="notebook_path"),
        call("Write", tmp_path / "failed", is_error=True),
        call("Bash", tmp_path / "shell"),
        ToolCallRecord("tu", "Write", json.dumps({"file_path": "relative.txt"})),
        ToolCallRecord("tu", "Edit", "not json"),
    ]
    assert filemarks.touched(calls) == {str(a), str(b), str(c)}
    assert filemarks.after_turn("{}", [call("Bash", a)]) is None


def test_a_file_changed_or_removed_since_is_a_conflict_and_one_left_alone_is_not(
    tmp_path: Path,
) -> None:
    kept, edited, removed, created = (tmp_path / n for n in ("kept", "edited", "removed", "new"))
    for p in (kept, edited, removed):
        p.write_text("agent's\n")
    marks = filemarks.after_turn("{}", [call("Write", p) for p in (kept, edited, removed, created)])
    assert marks is not None
    assert json.loads(marks)[str(created)] == filemarks.ABSENT  # gone when the turn ended
    edited.write_text("by hand\n")
    removed.unlink()
    created.write_text("appeared\n")
    paths = [str(p) for p in (kept, edited, removed, created, tmp_path / "never-the-agents")]
    assert filemarks.conflicts(marks, paths) == sorted([str(edited), str(removed), str(created)])
    # Once refreshed (after a rewind) they are the agent's again.
    assert filemarks.conflicts(filemarks.refreshed(marks, paths), paths) == []


def test_marks_from_another_version_are_read_as_none() -> None:
    assert filemarks.load("not json") == {}
    assert filemarks.load("[1]") == {}
