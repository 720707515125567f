"""Reading the CLI's transcript for ImportSession."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from atomizerd.agents import transcript as tr


def lines(*objs: object) -> str:
    return "".join(json.dumps(o) + "\n" for o in objs)


def user(content: object, **kw: object) -> dict[str, object]:
    return {"type": "user", "message": {"role": "user", "content": content}, **kw}


def assistant(text: str, uuid: str, message_id: str = "m1") -> dict[str, object]:
    content = [{"type": "text", "text": text}] if text else [{"type": "tool_use", "id": "t"}]
    return {"type": "assistant", "uuid": uuid, "message": {"id": message_id, "content": content}}


def test_turns_are_the_user_lines_and_the_assistant_blocks_after_them(tmp_path: Path) -> None:
    path = tmp_path / "c.jsonl"
    path.write_text(
        lines(
            {"type": "queue-operation", "operation": "enqueue"},
            user("remember kiwi"),
            {"type": "attachment", "attachment": {"type": "date"}},
            assistant("", "u1"),
            user([{"type": "tool_result", "tool_use_id": "t", "content": "ok"}]),
            assistant("echo: kiwi", "u2", "m2"),
            user("a subagent's", isSidechain=True),
            user("<meta>", isMeta=True),
            user([{"type": "text", "text": "and now?"}]),
            assistant("part one", "u3", "m3"),
            assistant("part two", "u4", "m3"),
            {"type": "cost-state", "totalCostUSD": 0.1},
        )
        + "\n"
    )
    turns = tr.read(path)
    assert [(t.user, t.reply, t.reply_uuid) for t in turns] == [
        ("remember kiwi", "echo: kiwi", "u2"),
        ("and now?", "part one\n\npart two", "u4"),
    ]


@pytest.mark.parametrize(
    ("content", "why"),
    [
        ("{broken\n", "line 1 of the transcript is not JSON"),
        (lines({"type": "cost-state"}), "no user message"),
        (b"\xff\xfe", "cannot be read"),
    ],
)
def test_a_transcript_that_cannot_be_imported_says_why(
    tmp_path: Path, content: str | bytes, why: str
) -> None:
    path = tmp_path / "c.jsonl"
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        path.write_text(content)
    with pytest.raises(tr.TranscriptError, match=why):
        tr.read(path)


def test_the_project_folder_is_the_working_directory_with_every_other_character_a_dash() -> None:
    assert tr.project_slug(Path("/tmp/probe/cwd")) == "-tmp-probe-cwd"
    assert tr.project_slug(Path("/srv/at omizer_1.x")) == "-srv-at-omizer-1-x"
