"""atomizerctl's output: exit codes, plain text or --json records, and the small formatters
the commands share."""

from __future__ import annotations

import json
import os
import sys
from datetime import UTC, datetime
from typing import Any, TextIO

from google.protobuf.descriptor import FieldDescriptor
from google.protobuf.message import Message as ProtoMessage
from google.protobuf.timestamp_pb2 import Timestamp

from atomizer_client.errors import (
    AtomizerError,
    DeadlineExceededError,
    FailedPreconditionError,
    InvalidArgumentError,
    NotFoundError,
    PermissionDeniedError,
    ResourceExhaustedError,
    UnavailableError,
)

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2
EXIT_NOT_FOUND = 3
EXIT_INVALID = 4
EXIT_UNAVAILABLE = 5
EXIT_PERMISSION = 6
EXIT_EXHAUSTED = 7
EXIT_INTERRUPTED = 130


def exit_code_for(err: AtomizerError) -> int:
    """The documented exit code for a failed call."""
    table: list[tuple[type[AtomizerError], int]] = [
        (NotFoundError, EXIT_NOT_FOUND),
        (InvalidArgumentError, EXIT_INVALID),
        (FailedPreconditionError, EXIT_INVALID),
        (UnavailableError, EXIT_UNAVAILABLE),
        (DeadlineExceededError, EXIT_UNAVAILABLE),
        (PermissionDeniedError, EXIT_PERMISSION),
        (ResourceExhaustedError, EXIT_EXHAUSTED),
    ]
    for cls, code in table:
        if isinstance(err, cls):
            return code
    return EXIT_FAILED


# --- output --------------------------------------------------------------------------------


def _color_ok(stream: TextIO) -> bool:
    return stream.isatty() and "NO_COLOR" not in os.environ and os.environ.get("TERM") != "dumb"


class Output:
    """Where everything goes: records and reply text to stdout, activity and errors to stderr."""

    def __init__(self, as_json: bool, out: TextIO | None = None, err: TextIO | None = None) -> None:
        self.json = as_json
        self.out = out or sys.stdout
        self.err = err or sys.stderr
        self._dim = _color_ok(self.err)
        # Whether each stream's cursor is at a line start, so that on a terminal (where both
        # streams meet) a note never lands in the middle of a sentence.
        self._out_open = False
        self._err_open = False

    def record(self, obj: dict[str, Any]) -> None:
        self.out.write(json.dumps(obj, ensure_ascii=False) + "\n")
        self.out.flush()

    def line(self, text: str = "") -> None:
        self.text(text + "\n")

    def text(self, text: str) -> None:
        """Reply text on stdout, as it arrives."""
        if not text:
            return
        self._close_err()
        self.out.write(text)
        self.out.flush()
        self._out_open = not text.endswith("\n")

    def end_line(self) -> None:
        if self._out_open:
            self.text("\n")

    def dim_text(self, text: str) -> None:
        """Streamed activity (thinking) on stderr, without a line break."""
        if not text:
            return
        self._close_out()
        self.err.write(f"\x1b[2m{text}\x1b[0m" if self._dim else text)
        self.err.flush()
        self._err_open = not text.endswith("\n")

    def ask(self, prompt: str) -> None:
        """A question on stderr, the cursor left after it (the answer is typed there)."""
        self._close_out()
        self._close_err()
        self.err.write(prompt)
        self.err.flush()
        self._err_open = True

    def answered(self) -> None:
        """The answer's Enter ended the prompt's line (the terminal echoed it)."""
        self._err_open = False

    def withdraw_prompt(self) -> None:
        """Leaves a prompt that will get no answer, on a line of its own."""
        self._close_err()

    def note(self, text: str) -> None:
        """A dim activity line on stderr (tool calls, retries, the turn's cost)."""
        self._close_out()
        self._close_err()
        self.err.write((f"\x1b[2m{text}\x1b[0m" if self._dim else text) + "\n")
        self.err.flush()

    def error(self, text: str) -> None:
        self._close_out()
        self._close_err()
        self.err.write(f"atomizerctl: {text}\n")
        self.err.flush()

    def _close_out(self) -> None:
        if self._out_open and self.out.isatty():
            self.end_line()

    def _close_err(self) -> None:
        if self._err_open:
            self.err.write("\n")
            self._err_open = False


def proto_dict(msg: ProtoMessage) -> dict[str, Any]:
    """A JSON-ready dict of a record: every field, snake_case, enum names, ISO timestamps."""
    out: dict[str, Any] = {}
    for f in msg.DESCRIPTOR.fields:
        value = getattr(msg, f.name)
        if f.is_repeated:
            out[f.name] = [_field_value(f, v) for v in value]
        elif f.type == FieldDescriptor.TYPE_MESSAGE and not msg.HasField(f.name):
            out[f.name] = None
        else:
            out[f.name] = _field_value(f, value)
    return out


def _field_value(f: Any, value: Any) -> Any:  # a FieldDescriptor (python or upb)
    if isinstance(value, Timestamp):
        return value.ToDatetime(tzinfo=UTC).isoformat()
    if isinstance(value, ProtoMessage):
        return proto_dict(value)
    if f.enum_type is not None:
        enum_value = f.enum_type.values_by_number.get(value)
        return enum_value.name if enum_value is not None else value
    return value


def enum_short(msg: ProtoMessage, field: str) -> str:
    """An enum field's value for people: MODE_POWER -> power."""
    f = msg.DESCRIPTOR.fields_by_name[field]
    name = str(_field_value(f, getattr(msg, field)))
    prefix = f.enum_type.name if f.enum_type is not None else ""
    snake = "".join("_" + c if c.isupper() and i else c for i, c in enumerate(prefix)).upper()
    return name.removeprefix(snake + "_").lower()


def when(ts: Timestamp) -> str:
    if not ts.seconds and not ts.nanos:
        return "-"
    return ts.ToDatetime(tzinfo=UTC).astimezone().strftime("%Y-%m-%d %H:%M:%S")


def clock(moment: datetime | None) -> str:
    return moment.astimezone().strftime("%H:%M:%S") if moment is not None else "-"


def usd(amount: float) -> str:
    return f"${amount:.4f}"


def tokens(n: int) -> str:
    return f"{n:,}"


def one_line(text: str, width: int = 100) -> str:
    flat = " ".join(text.split())
    return flat if len(flat) <= width else flat[: width - 1] + "…"
