"""The agent shim's wire format (docs/shim-protocol.md), for both ends: the version, the frame
type letters, the frame and payload layouts, and their encoders and decoders.

The shim (`shim.py`) and the daemon's side of it (`shim_client.py`) both use this module and
nothing else to build and read frames: a daemon adopting the shims an older daemon started
speaks exactly this. The shim runs as a standalone program (`python3 -I -S shim.py`), which
imports this file from beside it, so it uses the standard library only.
"""

from __future__ import annotations

import struct

PROTOCOL_VERSION = 1  # in the hello; a daemon attaches only to shims of its own version

# Frame types, daemon -> shim.
INPUT = b"I"  # bytes for the agent's stdin (journaled)
JOURNAL = b"J"  # opaque record (journaled)
ACK = b"A"  # 8-byte offset: drop stdout before it and every record before this A
END_INPUT = b"E"  # close the agent's stdin
LABEL = b"L"  # JSON label, returned in every hello
DAEMON_FRAMES = (INPUT, JOURNAL, ACK, END_INPUT, LABEL)
# Frame types, shim -> daemon.
HELLO = b"H"  # JSON: version, pids, label, base, lost, exited
STDERR = b"S"  # stderr bytes (the retained tail in the replay, then live)
STDOUT = b"O"  # 8-byte offset of the chunk's first byte, then the bytes
REPLAYED = b"R"  # empty: the replay is complete, everything after is live
EXIT = b"X"  # 4-byte signed returncode

HEADER = struct.Struct(">cI")  # type letter, payload length
OFFSET = struct.Struct(">Q")
RETURNCODE = struct.Struct(">i")
MAX_FRAME = 256 * 1024  # an O frame the shim sends, header included, is at most this long
MAX_STDOUT_CHUNK = MAX_FRAME - HEADER.size - OFFSET.size  # stdout bytes per O frame


def encode_frame(kind: bytes, payload: bytes = b"") -> bytes:
    """One frame: the type letter, the payload's length (4 bytes, big-endian), the payload."""
    return HEADER.pack(kind, len(payload)) + payload


def decode_header(header: bytes) -> tuple[bytes, int]:
    """A frame's type letter and payload length, from its first `HEADER.size` bytes."""
    kind, length = HEADER.unpack(header)
    return bytes(kind), int(length)


def split_frames(buf: bytes | bytearray) -> tuple[list[tuple[bytes, bytes]], bytes]:
    """The complete frames at the start of `buf` as (type, payload), and the incomplete rest."""
    frames: list[tuple[bytes, bytes]] = []
    pos = 0
    while len(buf) - pos >= HEADER.size:
        kind, length = HEADER.unpack_from(buf, pos)
        end = pos + HEADER.size + length
        if end > len(buf):
            break
        frames.append((bytes(kind), bytes(buf[pos + HEADER.size : end])))
        pos = end
    return frames, bytes(buf[pos:])


def encode_output(offset: int, data: bytes) -> bytes:
    """An O payload: the 8-byte offset of the chunk's first byte, then the bytes."""
    return OFFSET.pack(offset) + data


def decode_output(payload: bytes) -> tuple[int, bytes]:
    return int(OFFSET.unpack_from(payload)[0]), payload[OFFSET.size :]


def encode_ack(offset: int) -> bytes:
    """An A payload."""
    return OFFSET.pack(offset)


def decode_ack(payload: bytes) -> int:
    """An A payload's offset; raises `struct.error` unless it is exactly 8 bytes."""
    return int(OFFSET.unpack(payload)[0])


def encode_exit(returncode: int) -> bytes:
    """An X payload: the returncode, signed (negative: killed by that signal)."""
    return RETURNCODE.pack(returncode)


def decode_exit(payload: bytes) -> int:
    return int(RETURNCODE.unpack(payload)[0])
