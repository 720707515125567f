"""Files sent with a message (SendMessage's `attachments`): checked, turned into content blocks
of the user's line to the agent, stored once per session by their sha256.

Images (PNG, JPEG, GIF, WebP) become `image` blocks and PDFs `document` blocks, both base64;
text files (plain, Markdown, CSV, JSON) become `document` blocks with a text source titled with
the file's name. The CLI passes all three on to the model as they are (docs/agent-protocol.md).
A media type outside these, or bytes that are not what the type says (an image's signature, a
PDF's header, text that is not UTF-8, JSON that does not parse) is INVALID_ARGUMENT, as is an
attachment or a message over the `attachments` limits (the message names the limit).
The history keeps each attachment's name, type, size and sha256; GetAttachment returns the bytes.
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from atomizerd.config.agents import AttachmentsConfig
from atomizerd.errors import InvalidArgument
from atomizerd.model import AttachmentRecord, StoredAttachment
from atomizerd.sessions import events as ev

IMAGE_TYPES = ("image/png", "image/jpeg", "image/gif", "image/webp")
PDF = "application/pdf"
TEXT_TYPES = ("text/plain", "text/markdown", "text/csv", "application/json")
MEDIA_TYPES = (*IMAGE_TYPES, PDF, *TEXT_TYPES)
MAX_NAME_CHARS = 255
_SHA256 = re.compile(r"[0-9a-f]{64}")
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


@dataclass(frozen=True)
class Attachment:
    name: str
    media_type: str
    data: bytes = field(repr=False)
    sha256: str

    @property
    def size(self) -> int:
        return len(self.data)

    def info(self) -> ev.AttachmentInfo:
        return ev.AttachmentInfo(self.name, self.media_type, self.size, self.sha256)


def check(
    raw: Sequence[tuple[str, str, bytes]], limits: AttachmentsConfig
) -> tuple[Attachment, ...]:
    """The attachments of one message, checked against their types and the limits."""
    if len(raw) > limits.max_count:
        raise InvalidArgument(
            f"the message has {len(raw)} attachments; the limit is {limits.max_count} "
            "(attachments.max_count)"
        )
    total = sum(len(data) for _, _, data in raw)
    if total > limits.max_message_bytes:
        raise InvalidArgument(
            f"the message's attachments are {total} bytes in all; the limit is "
            f"{limits.max_message_bytes} (attachments.max_message_bytes)"
        )
    return tuple(_one(name, media_type, data, limits) for name, media_type, data in raw)


def _one(name: str, media_type: str, data: bytes, limits: AttachmentsConfig) -> Attachment:
    shown = repr(name[:80])
    if not name or len(name) > MAX_NAME_CHARS or _CONTROL.search(name):
        raise InvalidArgument(
            f"attachment name {shown} must be 1-{MAX_NAME_CHARS} characters, no control characters"
        )
    media_type = media_type.strip().lower()
    if media_type not in MEDIA_TYPES:
        raise InvalidArgument(
            f"attachment {shown} has media type {media_type[:80]!r}; accepted: "
            + ", ".join(MEDIA_TYPES)
        )
    if not data:
        raise InvalidArgument(f"attachment {shown} is empty")
    if len(data) > limits.max_bytes:
        raise InvalidArgument(
            f"attachment {shown} is {len(data)} bytes; the limit is {limits.max_bytes} "
            "(attachments.max_bytes)"
        )
    why = _mismatch(media_type, data)
    if why:
        raise InvalidArgument(f"attachment {shown} is not {media_type}: {why}")
    return Attachment(name, media_type, data, hashlib.sha256(data).hexdigest())


def _mismatch(media_type: str, data: bytes) -> str:
    """Why `data` is not of `media_type` ("" when it is)."""
    signatures = {
        "image/png": (b"\x89PNG\r\n\x1a\n",),
        "image/jpeg": (b"\xff\xd8\xff",),
        "image/gif": (b"GIF87a", b"GIF89a"),
        PDF: (b"%PDF-",),
    }
    if media_type in signatures:
        return "" if data.startswith(signatures[media_type]) else "its first bytes are not"
    if media_type == "image/webp":
        ok = data[:4] == b"RIFF" and data[8:12] == b"WEBP"
        return "" if ok else "its first bytes are not"
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        return f"not UTF-8 text ({e.reason} at byte {e.start})"
    if "\x00" in text:
        return "text with a NUL character"
    if media_type == "application/json":
        try:
            json.loads(text)
        except ValueError as e:
            return f"not valid JSON ({e})"
    return ""


def check_sha256(value: str) -> str:
    if not _SHA256.fullmatch(value):
        raise InvalidArgument("sha256 must be 64 lowercase hexadecimal digits")
    return value


def content_blocks(text: str, attachments: Sequence[Attachment]) -> list[dict[str, Any]]:
    """The user line's content: the text, then one block per attachment."""
    blocks: list[dict[str, Any]] = [{"type": "text", "text": text}] if text else []
    for a in attachments:
        if a.media_type in IMAGE_TYPES or a.media_type == PDF:
            source = {
                "type": "base64",
                "media_type": a.media_type,
                "data": base64.b64encode(a.data).decode("ascii"),
            }
            kind = "image" if a.media_type in IMAGE_TYPES else "document"
            block: dict[str, Any] = {"type": kind, "source": source}
            if kind == "document":
                block["title"] = a.name
        else:  # the API's text documents are text/plain whatever the file was
            source = {"type": "text", "media_type": "text/plain", "data": a.data.decode()}
            block = {"type": "document", "source": source, "title": a.name}
        blocks.append(block)
    return blocks


def to_store(a: Attachment) -> StoredAttachment:
    return StoredAttachment(AttachmentRecord(a.name, a.media_type, a.size, a.sha256), a.data)
