"""Files sent with a message, with the real CLI: what the model receives (read from the fake
Messages API), what the history keeps, GetAttachment, the limits and the checks, storage once
per content and the purge, and `atomizerctl send --attach`."""

from __future__ import annotations

import base64
import hashlib
import json
import sqlite3
import struct
import zlib
from typing import Any

import grpc
import pytest
from atomizer.v1 import session_pb2 as pb

from tests.conftest import Stubs
from tests.e2e.conftest import E2E
from tests.integration.test_ctl import ctl
from tests.support.turns import kinds, send

pytestmark = pytest.mark.e2e


def png() -> bytes:
    """A real 1x1 PNG."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        crc = zlib.crc32(kind + data) & 0xFFFFFFFF
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", crc)

    header = struct.pack(">IIBBBBB", 1, 1, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(b"\x00\xff\x00\x00"))
        + chunk(b"IEND", b"")
    )


PDF = b"%PDF-1.4\n1 0 obj<<>>endobj\ntrailer<<>>\n%%EOF\n"
CSV = b"load,case\n1200,gravity\n300,wind\n"
JSON = json.dumps({"beam": {"length_m": 3}}).encode()


def att(name: str, media_type: str, data: bytes) -> pb.Attachment:
    return pb.Attachment(name=name, media_type=media_type, data=data)


def last_user_blocks(e2e: E2E) -> list[dict[str, Any]]:
    users = [m for m in e2e.api.requests[-1].messages if m.get("role") == "user"]
    content = users[-1]["content"]
    return [b for b in content if isinstance(b, dict)]


def refused(stubs: Stubs, sid: str, text: str, files: list[pb.Attachment]) -> str:
    with pytest.raises(grpc.RpcError) as err:
        send(stubs, sid, text, attachments=files)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    return err.value.details() or ""


def blob_rows(e2e: E2E, sid: str) -> list[tuple[str, int]]:
    assert e2e.daemon is not None
    db = sqlite3.connect(f"file:{e2e.daemon.state_dir / 'atomizerd.db'}?mode=ro", uri=True)
    try:
        rows = db.execute(
            "SELECT sha256, size FROM attachment_blobs WHERE session_id = ? ORDER BY sha256",
            (sid,),
        ).fetchall()
    finally:
        db.close()
    return [(str(s), int(n)) for s, n in rows]


def test_files_reach_the_model_as_content_blocks_and_the_history_keeps_them(e2e: E2E) -> None:
    stubs = e2e.start()
    stubs.sessions.CreateSession(pb.CreateSessionRequest(session_id="a"))
    image = png()
    files = [
        att("beam.png", "image/png", image),
        att("spec.pdf", "application/pdf", PDF),
        att("loads.csv", "text/csv", CSV),
        att("beam.json", "application/json", JSON),
    ]
    events = send(stubs, "a", "what do these say?", attachments=files)
    assert kinds(events)[-1] == "turn_completed"

    blocks = last_user_blocks(e2e)
    by_kind = [(b["type"], b.get("source", {}).get("media_type"), b.get("title")) for b in blocks]
    assert ("image", "image/png", None) in by_kind
    assert ("document", "application/pdf", "spec.pdf") in by_kind
    assert ("document", "text/plain", "loads.csv") in by_kind
    assert ("document", "text/plain", "beam.json") in by_kind
    sources = {b.get("title") or b["type"]: b["source"] for b in blocks if "source" in b}
    assert base64.b64decode(sources["image"]["data"]) == image
    assert base64.b64decode(sources["spec.pdf"]["data"]) == PDF
    assert sources["loads.csv"] == {
        "type": "text",
        "media_type": "text/plain",
        "data": CSV.decode(),
    }
    assert any(b.get("text") == "what do these say?" for b in blocks)
    assert e2e.api.requests[-1].prompt_text == "what do these say?"

    expected = [
        (f.name, f.media_type, len(f.data), hashlib.sha256(f.data).hexdigest()) for f in files
    ]
    started = events[0].turn_started
    assert [(a.name, a.media_type, a.size_bytes, a.sha256) for a in started.attachments] == expected
    user = stubs.sessions.GetHistory(pb.GetHistoryRequest(session_id="a")).messages[0]
    assert [(a.name, a.media_type, a.size_bytes, a.sha256) for a in user.attachments] == expected
    for f in files:
        got = stubs.sessions.GetAttachment(
            pb.GetAttachmentRequest(session_id="a", sha256=hashlib.sha256(f.data).hexdigest())
        ).attachment
        assert (got.name, got.media_type, got.data) == (f.name, f.media_type, f.data)

    # The same bytes again (another name, no text): stored once.
    again = send(stubs, "a", "", attachments=[att("copy.png", "image/png", image)])
    assert kinds(again)[-1] == "turn_completed"
    assert len(blob_rows(e2e, "a")) == 4
    assert sorted(blob_rows(e2e, "a")) == sorted((e[3], e[2]) for e in expected)

    with pytest.raises(grpc.RpcError) as err:
        stubs.sessions.GetAttachment(pb.GetAttachmentRequest(session_id="a", sha256="0" * 64))
    assert err.value.code() == grpc.StatusCode.NOT_FOUND
    stubs.sessions.TerminateSession(pb.TerminateSessionRequest(session_id="a", purge=True))
    assert blob_rows(e2e, "a") == []


def test_limits_and_mismatched_bytes_are_refused_before_anything_is_sent(e2e: E2E) -> None:
    stubs = e2e.start(
        {"attachments": {"max_bytes": 1000, "max_message_bytes": 1500, "max_count": 2}}
    )
    stubs.sessions.CreateSession(pb.CreateSessionRequest(session_id="l"))
    small = att("a.txt", "text/plain", b"x" * 800)
    reasons = [
        refused(stubs, "l", "big", [att("big.txt", "text/plain", b"x" * 1001)]),
        refused(stubs, "l", "sum", [small, small]),
        refused(stubs, "l", "many", [att(f"{i}.txt", "text/plain", b"x") for i in range(3)]),
        refused(stubs, "l", "bmp", [att("a.bmp", "image/bmp", b"BM....")]),
        refused(stubs, "l", "fake png", [att("a.png", "image/png", b"not a png at all")]),
        refused(stubs, "l", "fake pdf", [att("a.pdf", "application/pdf", b"GIF89a")]),
        refused(stubs, "l", "binary", [att("a.txt", "text/plain", b"\xff\xfe\x00")]),
        refused(stubs, "l", "bad json", [att("a.json", "application/json", b"{nope")]),
        refused(stubs, "l", "", [att("", "text/plain", b"x")]),
    ]
    assert "attachments.max_bytes" in reasons[0] and "1001 bytes" in reasons[0]
    assert "attachments.max_message_bytes" in reasons[1]
    assert "attachments.max_count" in reasons[2]
    assert "image/bmp" in reasons[3]
    assert "is not image/png" in reasons[4] and "is not application/pdf" in reasons[5]
    assert "UTF-8" in reasons[6] and "JSON" in reasons[7]
    assert "name" in reasons[8]
    assert e2e.api.requests == []  # nothing reached the model
    history = stubs.sessions.GetHistory(pb.GetHistoryRequest(session_id="l")).messages
    assert list(history) == []


def test_atomizerctl_send_attaches_files(e2e: E2E) -> None:
    stubs = e2e.start()
    stubs.sessions.CreateSession(pb.CreateSessionRequest(session_id="c"))
    image, notes = e2e.workdir / "beam.png", e2e.workdir / "notes.md"
    image.write_bytes(png())
    notes.write_text("# Notes\nThe beam is 3 m long.\n")
    assert e2e.daemon is not None
    done = ctl(e2e.daemon, "send", "c", "look", "--attach", str(image), "--attach", str(notes))
    assert done.returncode == 0, done.stderr
    assert "echo: look" in done.stdout
    blocks = last_user_blocks(e2e)
    assert [b["type"] for b in blocks if b["type"] != "text"] == ["image", "document"]
    doc = next(b for b in blocks if b["type"] == "document")
    assert doc["title"] == "notes.md" and "3 m long" in doc["source"]["data"]
    user = stubs.sessions.GetHistory(pb.GetHistoryRequest(session_id="c")).messages[0]
    assert [(a.name, a.media_type) for a in user.attachments] == [
        ("beam.png", "image/png"),
        ("notes.md", "text/markdown"),
    ]
    unknown = e2e.workdir / "mesh.stl"
    unknown.write_bytes(b"solid")
    bad = ctl(e2e.daemon, "send", "c", "look", "--attach", str(unknown))
    assert bad.returncode == 2 and "no media type" in bad.stderr
