"""The CLI's transcript file (`<config>/projects/<cwd slug>/<conversation>.jsonl`), read to
import a conversation started with the plain `claude` CLI (ImportSession).

One JSON object per line. The conversation is in its `user` and `assistant` lines; everything
else (attachments, snapshots, costs, queue records) is the CLI's bookkeeping. An assistant
message comes as one line per content block, all with the same `message.id`; a user line whose
content is only tool results, a meta line (`isMeta`) or a side chain (`isSidechain`, a
subagent's) is not something a person said or was told.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

# A conversation id as the CLI writes it (a uuid) and so as it names its transcript.
UUID_RE = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")
MAX_BYTES = 64 * 1024 * 1024


class TranscriptError(ValueError):
    """The file is not a transcript that can be imported (the message says why)."""


@dataclass
class ImportedTurn:
    user: str
    reply: str = ""
    reply_uuid: str = ""  # the reply's last line (a fork or rollback point)


def project_slug(cwd: Path) -> str:
    """The CLI's folder name for a working directory: every other character than a letter or
    a digit becomes "-" (measured; names over 200 characters are hashed: not supported)."""
    return re.sub(r"[^A-Za-z0-9]", "-", str(cwd))


def read(path: Path) -> list[ImportedTurn]:
    """The turns of a transcript, oldest first. Raises TranscriptError."""
    try:
        size = path.stat().st_size
        if size > MAX_BYTES:
            raise TranscriptError(f"the transcript is {size} bytes; at most {MAX_BYTES}")
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise TranscriptError(f"the transcript cannot be read: {e}") from None
    turns: list[ImportedTurn] = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            data = json.loads(line)
        except ValueError:
            raise TranscriptError(f"line {number} of the transcript is not JSON") from None
        if isinstance(data, dict) and not data.get("isSidechain") and not data.get("isMeta"):
            _take(data, turns)
    if not turns:
        raise TranscriptError("the transcript holds no user message")
    return turns


def _take(data: dict[str, Any], turns: list[ImportedTurn]) -> None:
    message = data.get("message")
    if not isinstance(message, dict):
        return
    if data.get("type") == "user":
        text = _text(message.get("content"))
        if text:
            turns.append(ImportedTurn(user=text))
    elif data.get("type") == "assistant" and turns:
        turn = turns[-1]
        text = _text(message.get("content"))
        if text:
            turn.reply = f"{turn.reply}\n\n{text}" if turn.reply else text
        if isinstance(data.get("uuid"), str):
            turn.reply_uuid = data["uuid"]


def _text(content: object) -> str:
    """The text a person wrote or read: a string, or the text blocks of a list (tool results
    and tool uses are left out)."""
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        return ""
    return "\n".join(
        str(b.get("text", "")) for b in content if isinstance(b, dict) and b.get("type") == "text"
    ).strip()
