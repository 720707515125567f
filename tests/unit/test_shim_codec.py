"""The shim protocol's codec (agents/shim_codec.py), from both ends: what the daemon's side
(shim_client) writes is read as the shim reads it, and what the shim writes is read by the
daemon's side. The shim itself, its threads and its agent are tested in
tests/integration/test_shim.py; here only the bytes between the two ends."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from atomizerd.agents import shim, shim_client
from atomizerd.agents import shim_codec as codec

SHIM = Path(shim.__file__).resolve()


def test_frame_helpers_round_trip() -> None:
    frames = codec.encode_frame(codec.STDOUT, codec.encode_output(7, b"abc"))
    frames += codec.encode_frame(codec.REPLAYED)
    frames += codec.encode_frame(codec.EXIT, codec.encode_exit(-9))
    parsed, rest = codec.split_frames(frames + b"O\x00\x00")
    assert rest == b"O\x00\x00"
    assert [k for k, _ in parsed] == [codec.STDOUT, codec.REPLAYED, codec.EXIT]
    assert codec.decode_output(parsed[0][1]) == (7, b"abc")
    assert codec.decode_exit(parsed[2][1]) == -9
    assert codec.decode_ack(codec.encode_ack(2**40)) == 2**40
    assert frames[:5] == b"O\x00\x00\x00\x0b"


def test_headers_and_limits() -> None:
    header = codec.encode_frame(codec.JOURNAL, b"x" * 300)[: codec.HEADER.size]
    assert codec.decode_header(header) == (codec.JOURNAL, 300)
    assert codec.HEADER.size == 5 and codec.OFFSET.size == 8
    # An O frame of a full chunk is exactly the largest frame the shim sends.
    full = codec.encode_frame(codec.STDOUT, codec.encode_output(0, b"y" * codec.MAX_STDOUT_CHUNK))
    assert len(full) == codec.MAX_FRAME
    assert set(codec.DAEMON_FRAMES) == {b"I", b"J", b"A", b"E", b"L"}
    assert codec.decode_exit(codec.encode_exit(2**31 - 1)) == 2**31 - 1


def test_both_ends_use_the_one_codec() -> None:
    """Both ends hold the codec itself, not copies of its names: below, `codec` stands for the
    shim's end, and shim_client's real code for the daemon's."""
    assert getattr(shim, "codec") is codec  # noqa: B009
    assert getattr(shim_client, "codec") is codec  # noqa: B009


# --- daemon -> shim ----------------------------------------------------------------------------


class _Writer:
    """What ShimLink writes to its socket."""

    def __init__(self) -> None:
        self.data = bytearray()
        self.closed = False

    def write(self, data: bytes) -> None:
        self.data += data

    def is_closing(self) -> bool:
        return self.closed

    def close(self) -> None:
        self.closed = True


def _link(writer: _Writer) -> shim_client.ShimLink:
    hello = {"version": codec.PROTOCOL_VERSION, "agent_pid": 4242, "shim_pid": os.getpid()}
    return shim_client.ShimLink(
        asyncio.StreamReader(),
        writer,
        hello,
        Path("unused.sock"),  # type: ignore[arg-type]
    )


def _read_as_the_shim(data: bytes) -> list[tuple[bytes, bytes]]:
    """Frames the way the shim's connection thread takes them: a header, then its payload
    (Shim._serve)."""
    frames = []
    pos = 0
    while pos < len(data):
        kind, length = codec.decode_header(data[pos : pos + codec.HEADER.size])
        pos += codec.HEADER.size
        assert kind in codec.DAEMON_FRAMES
        frames.append((kind, data[pos : pos + length]))
        pos += length
    return frames


def test_what_the_daemon_writes_is_what_the_shim_reads() -> None:
    async def scenario() -> None:
        writer = _Writer()
        link = _link(writer)
        link.set_label({"session": "s1"})
        link.write(b'{"type":"user"}\n')
        link.record(b'{"c":0,"e":[]}')
        link.forget_before(2**33 + 5)
        link.close_input()
        frames = _read_as_the_shim(bytes(writer.data))
        assert [kind for kind, _ in frames] == [
            codec.LABEL,
            codec.INPUT,
            codec.JOURNAL,
            codec.ACK,
            codec.END_INPUT,
        ]
        assert json.loads(frames[0][1]) == {"session": "s1"}
        assert frames[1][1] == b'{"type":"user"}\n'
        assert frames[2][1] == b'{"c":0,"e":[]}'
        assert codec.decode_ack(frames[3][1]) == 2**33 + 5
        assert frames[4][1] == b""

    asyncio.run(scenario())


# --- shim -> daemon ----------------------------------------------------------------------------


def _shim_replay(hello: dict[str, Any], *, exit_code: int | None) -> bytes:
    """A shim's replay and live frames, encoded as the shim encodes them (Shim._replay)."""
    out = codec.encode_frame(codec.HELLO, json.dumps(hello).encode())
    out += codec.encode_frame(codec.JOURNAL, b"record one")
    out += codec.encode_frame(codec.INPUT, b"input one\n")
    out += codec.encode_frame(codec.STDERR, b"warming up\n")
    out += codec.encode_frame(codec.STDOUT, codec.encode_output(100, b"replayed "))
    out += codec.encode_frame(codec.STDOUT, codec.encode_output(109, b"line\n"))
    out += codec.encode_frame(codec.REPLAYED)
    out += codec.encode_frame(codec.STDOUT, codec.encode_output(114, b"live\n"))
    if exit_code is not None:
        out += codec.encode_frame(codec.EXIT, codec.encode_exit(exit_code))
    return out


async def _serve_once(tmp_path: Path, data: bytes) -> tuple[Path, asyncio.Server]:
    path = tmp_path / "s.sock"

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(data)
        await writer.drain()
        await reader.read()  # until the daemon's side closes
        writer.close()

    server = await asyncio.start_unix_server(handle, str(path))
    return path, server


def _hello(**extra: Any) -> dict[str, Any]:
    return {
        "version": codec.PROTOCOL_VERSION,
        "shim_pid": os.getpid(),
        "agent_pid": 4242,
        "agent_start_time": None,
        "label": {"session": "s1"},
        "base": 100,
        "lost": False,
        "exited": None,
        **extra,
    }


def test_what_the_shim_writes_is_what_the_daemon_reads(tmp_path: Path) -> None:
    async def scenario() -> None:
        path, server = await _serve_once(tmp_path, _shim_replay(_hello(), exit_code=-9))
        async with server:
            link, replay, chunks = await shim_client.attach(path, timeout=30)
            try:
                assert replay.base == 100 and replay.label == {"session": "s1"} and not replay.lost
                assert replay.records == [b"record one"]
                assert replay.inputs == [b"input one\n"]
                assert chunks == [b"replayed ", b"line\n"]
                assert await link.read_stderr() == b"warming up\n"
                assert await link.read_stdout() == b"live\n"  # offsets go on from the replay
                assert await link.read_stdout() == b""  # the exit frame ends the output
                assert link.returncode == -9
            finally:
                link.close()

    asyncio.run(scenario())


def test_a_shim_of_another_version_is_not_attached(tmp_path: Path) -> None:
    async def scenario() -> None:
        hello = _hello(version=codec.PROTOCOL_VERSION + 1)
        path, server = await _serve_once(tmp_path, _shim_replay(hello, exit_code=None))
        async with server:
            with pytest.raises(shim_client.ShimError, match="version"):
                await shim_client.attach(path, timeout=30)

    asyncio.run(scenario())


def test_output_offsets_must_follow_on(tmp_path: Path) -> None:
    async def scenario() -> None:
        data = codec.encode_frame(codec.HELLO, json.dumps(_hello()).encode())
        data += codec.encode_frame(codec.STDOUT, codec.encode_output(101, b"a gap"))
        path, server = await _serve_once(tmp_path, data)
        async with server:
            with pytest.raises(shim_client.ShimError, match="offset 101"):
                await shim_client.attach(path, timeout=30)

    asyncio.run(scenario())


# --- the shim as a program ---------------------------------------------------------------------


@pytest.mark.parametrize(
    "how",
    [
        pytest.param([sys.executable, "-I", "-S", str(SHIM)], id="by-path-isolated"),
        pytest.param([sys.executable, "-m", "atomizerd.agents.shim"], id="as-module"),
    ],
)
def test_the_shim_program_finds_its_codec(how: list[str]) -> None:
    """Run as the daemon runs it (by path, isolated: no package, no site-packages) or as a
    module, the shim imports the codec and gets as far as its command line."""
    done = subprocess.run(
        how, capture_output=True, timeout=60, cwd=SHIM.parents[2], check=False, text=True
    )
    assert done.returncode == 127, done.stderr
    assert json.loads(done.stdout)["error"].startswith("usage: shim.py")
