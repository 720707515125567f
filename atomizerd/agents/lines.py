"""Framing a byte stream into whole lines, with a length limit that never loses the stream.

Reads from a pipe arrive in arbitrary chunks: a multi-byte UTF-8 character or a JSON line can be
split anywhere. `LineSplitter` buffers bytes until a newline and hands out whole lines, so the
caller decodes complete lines only. A line longer than the limit is not buffered: its bytes are
counted and dropped up to the next newline, and an `Overflow` takes its place, so the reader
reports that one line and carries on with the next (asyncio's `StreamReader.readline` instead
raises and leaves the stream in a state that is easy to get wrong).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Overflow:
    """Stands in for a dropped line: `size` bytes (without the newline) over `limit`."""

    size: int
    limit: int


class LineSplitter:
    """Turns chunks into whole lines (without the newline); empty lines are skipped.

    `offset` is the stream position of the first byte fed (a reader that starts in the middle
    of a stream, such as a daemon re-attaching to an agent, gives where it starts);
    `feed_ends` also tells the stream position just after each line's newline.
    """

    def __init__(self, max_line_bytes: int, offset: int = 0) -> None:
        if max_line_bytes < 1:
            raise ValueError("max_line_bytes must be positive")
        self._limit = max_line_bytes
        self._buf = bytearray()
        self._discarding = False  # inside a line that is already over the limit
        self._discarded = 0
        self.fed = offset  # stream position after the last byte fed

    def feed(self, chunk: bytes) -> list[bytes | Overflow]:
        return [line for line, _ in self.feed_ends(chunk)]

    def feed_ends(self, chunk: bytes) -> list[tuple[bytes | Overflow, int]]:
        """Whole lines, each with the stream position just after its newline."""
        out: list[bytes | Overflow] = []
        ends: list[tuple[bytes | Overflow, int]] = []
        base = self.fed
        self.fed += len(chunk)
        view = memoryview(chunk)
        start = 0
        while True:
            newline = chunk.find(b"\n", start)
            if newline < 0:
                self._hold(view[start:])
                return ends
            self._end_line(view[start:newline], out)
            if len(out) > len(ends):
                ends.append((out[-1], base + newline + 1))
            start = newline + 1

    def finish(self) -> list[bytes | Overflow]:
        """At end of stream: the unterminated last line, if any."""
        out: list[bytes | Overflow] = []
        if self._discarding or self._buf:
            self._end_line(memoryview(b""), out)
        return out

    def _hold(self, part: memoryview) -> None:
        """Keep the start of a line that has no newline yet, or count it if it is too long."""
        if self._discarding:
            self._discarded += len(part)
            return
        if len(self._buf) + len(part) > self._limit:
            self._discarding = True
            self._discarded = len(self._buf) + len(part)
            self._buf = bytearray()  # release the memory now, not at the newline
            return
        self._buf += part

    def _end_line(self, tail: memoryview, out: list[bytes | Overflow]) -> None:
        if self._discarding:
            out.append(Overflow(self._discarded + len(tail), self._limit))
            self._discarding = False
            self._discarded = 0
            return
        size = len(self._buf) + len(tail)
        if size > self._limit:
            out.append(Overflow(size, self._limit))
        elif self._buf:
            self._buf += tail
            out.append(bytes(self._buf))
        elif size:
            out.append(tail.tobytes())
        self._buf = bytearray()
