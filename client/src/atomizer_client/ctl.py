"""atomizerctl: manage atomizerd sessions and talk to them from a terminal or a script."""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import queue
import select
import signal
import sys
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from types import FrameType
from typing import Any, TextIO

from atomizer.v1 import session_pb2
from google.protobuf.descriptor import FieldDescriptor
from google.protobuf.message import Message as ProtoMessage
from google.protobuf.timestamp_pb2 import Timestamp

from atomizer_client import ctl_tasks
from atomizer_client.client import DEFAULT_TIMEOUT, Client, EventStream, attachment_from_path
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
from atomizer_client.events import (
    Event,
    Notice,
    PermissionDecided,
    PermissionRequest,
    TextDelta,
    ThinkingDelta,
    ToolResult,
    ToolUse,
    TurnCompleted,
    TurnFailed,
    TurnStarted,
    UserMessage,
    decider_name,
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

EPILOG = """\
socket: --socket, else $ATOMIZERD_SOCKET, else $XDG_RUNTIME_DIR/atomizerd/atomizerd.sock,
else /run/atomizerd/atomizerd.sock.

--json prints one JSON object per line (per record, or per event of a turn) for scripts.

tool approval: in user mode the agent asks before it uses a tool outside the allowlist. `send`
and `chat` print the request and ask "allow? [y/N/a(lways)]" on the terminal (a: allow, and
allow the same call for the rest of the session). With --json, or when stdin is not a
terminal, nothing is asked: answer from anywhere with `approve`/`deny` (`watch` shows the
requests too), else the daemon denies it when approvals.timeout runs out. --yes / --no answer
every request of the turn with allow / deny. `audit` lists every outcome.

exit codes:
  0    ok
  1    the turn failed, or the agent reported an error
  2    usage error
  3    session (or pending permission request) not found
  4    invalid argument, or not possible now (closed session, no running turn, a permission
       request already answered)
  5    daemon unavailable (not running, draining, or not answering in time)
  6    permission denied (e.g. power mode disabled by the daemon's policy)
  7    resource exhausted (session, queue or size limits, the session's spending cap)
  130  interrupted (Ctrl-C)
"""

STATES = ("idle", "starting", "ready", "busy", "closed")


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


def _enum_short(msg: ProtoMessage, field: str) -> str:
    """An enum field's value for people: MODE_POWER -> power."""
    f = msg.DESCRIPTOR.fields_by_name[field]
    name = str(_field_value(f, getattr(msg, field)))
    prefix = f.enum_type.name if f.enum_type is not None else ""
    snake = "".join("_" + c if c.isupper() and i else c for i, c in enumerate(prefix)).upper()
    return name.removeprefix(snake + "_").lower()


def _when(ts: Timestamp) -> str:
    if not ts.seconds and not ts.nanos:
        return "-"
    return ts.ToDatetime(tzinfo=UTC).astimezone().strftime("%Y-%m-%d %H:%M:%S")


def _clock(when: datetime | None) -> str:
    return when.astimezone().strftime("%H:%M:%S") if when is not None else "-"


def _usd(amount: float) -> str:
    return f"${amount:.4f}"


def _tokens(n: int) -> str:
    return f"{n:,}"


# --- rendering a turn ----------------------------------------------------------------------


def _one_line(text: str, width: int = 100) -> str:
    flat = " ".join(text.split())
    return flat if len(flat) <= width else flat[: width - 1] + "…"


class TurnRenderer:
    """Shows one turn's events as they arrive and remembers how it ended."""

    def __init__(self, out: Output, *, show_prompt: bool, answer_hint: bool = False) -> None:
        self.out = out
        self.show_prompt = show_prompt
        # Tell how to answer a permission request from elsewhere (nobody is asked here).
        self.answer_hint = answer_hint
        self.streamed_text = False

    def show(self, ev: Event) -> None:
        if self.out.json:
            self.out.record(ev.to_dict())
            return
        handler = self._handlers().get(type(ev))
        if handler is not None:
            handler(ev)

    def _handlers(self) -> dict[type[Event], Callable[[Any], None]]:
        return {
            TurnStarted: self._turn_started,
            TextDelta: self._text,
            ThinkingDelta: self._thinking,
            ToolUse: self._tool_use,
            ToolResult: self._tool_result,
            Notice: self._notice,
            PermissionRequest: self._permission_request,
            PermissionDecided: self._permission_decided,
            TurnCompleted: self._completed,
            TurnFailed: self._failed,
            UserMessage: self._user_message,
            **ctl_tasks.task_handlers(self.out),
        }

    def _turn_started(self, ev: TurnStarted) -> None:
        self.streamed_text = False
        if ev.by_agent:  # no client's message: say who began it, and show what it was told
            self.out.end_line()
            self.out.note(ctl_tasks.origin_note(ev))
            if self.show_prompt and ev.text:
                self.out.note("  " + _one_line(ev.text))
        elif self.show_prompt:
            self.out.end_line()
            self.out.line("> " + ev.text.replace("\n", "\n> "))

    def _user_message(self, ev: UserMessage) -> None:
        self.out.end_line()
        self.out.line(">> " + ev.text.replace("\n", "\n>> "))

    def _text(self, ev: TextDelta) -> None:
        self.streamed_text = True
        self.out.text(ev.text)

    def _thinking(self, ev: ThinkingDelta) -> None:
        # Thinking goes to stderr so a redirected reply holds only the answer.
        self.out.dim_text(ev.text)

    def _tool_use(self, ev: ToolUse) -> None:
        if ev.parent_tool_use_id:  # a subagent's call, indented under the Task that runs it
            self.out.note("  " + _one_line(f"⏺ [subagent] {ev.name} {ev.input_json}"))
        else:
            self.out.note(_one_line(f"⏺ {ev.name} {ev.input_json}"))

    def _tool_result(self, ev: ToolResult) -> None:
        if ev.is_error:
            self.out.note(_one_line(f"  ⎿ error: {ev.content}"))

    def _notice(self, ev: Notice) -> None:
        if ev.message:
            self.out.note(ev.message)
        elif ev.kind == "API_RETRY":
            self.out.note(f"model API retry {ev.attempt} of {ev.max_retries} ({ev.error_status})")

    def _permission_request(self, ev: PermissionRequest) -> None:
        self.out.note(_one_line(f"? permission for {ev.tool_name}: {ev.input_json}"))
        if ev.description:
            self.out.note(_one_line("  " + ev.description))
        if self.answer_hint:
            self.out.note(
                f"  answer with: atomizerctl approve {ev.session_id} {ev.request_id}"
                f"  (or deny); denied at {_clock(ev.deadline)} without one"
            )

    def _permission_decided(self, ev: PermissionDecided) -> None:
        verdict = "✓ allowed" if ev.allow else "✗ denied"
        detail = f": {ev.message}" if ev.message else ""
        self.out.note(_one_line(f"{verdict} {ev.tool_name} by {ev.decider}{detail}"))

    def _completed(self, ev: TurnCompleted) -> None:
        if ev.is_error and not self.streamed_text and ev.text:
            self.out.error(f"agent error: {ev.text}")
        self.out.end_line()
        for d in ev.permission_denials:
            self.out.note(_one_line(f"denied: {d.tool_name} {d.input_json}"))
        self.out.note(self._summary(ev))

    @staticmethod
    def _summary(ev: TurnCompleted) -> str:
        parts = ["interrupted"] if ev.interrupted else []
        if ev.is_error:
            detail = "" if ev.result_subtype in ("", "success") else f" ({ev.result_subtype})"
            parts.append("agent error" + detail)
        parts.append(f"${ev.cost_usd:.4f}")
        parts.append(
            f"{_tokens(ev.usage.input_tokens)} in / {_tokens(ev.usage.output_tokens)} out tokens"
        )
        parts.append(f"{ev.duration_ms / 1000:.1f} s")
        return "— " + " · ".join(parts)

    def _failed(self, ev: TurnFailed) -> None:
        self.out.end_line()
        self.out.error(f"turn failed ({ev.code}): {ev.message}")
        for line in ev.stderr_tail.strip().splitlines()[-10:]:
            self.out.note("  " + line)


def turn_exit_code(ev: Event | None) -> int:
    """How a turn's terminal event maps to the exit code."""
    if isinstance(ev, TurnCompleted):
        if ev.interrupted:
            return EXIT_INTERRUPTED
        return EXIT_FAILED if ev.is_error else EXIT_OK
    return EXIT_FAILED


class Interrupter:
    """Ctrl-C during a turn asks the daemon to interrupt it, and the reply runs to its end.

    The Interrupt call waits for our own TurnStarted (the turn may still be queued behind
    another client's, which must not be the one stopped). The handler itself only sets flags
    and starts a thread: it runs in the middle of the stream's iteration, possibly inside a
    write to the very stream it would print to. A second Ctrl-C stops waiting
    (KeyboardInterrupt).
    """

    def __init__(self, client: Client, session_id: str, out: Output) -> None:
        self.client = client
        self.session_id = session_id
        self.out = out
        self.requested = False
        self.turn_started = False
        self._sent = False
        self._lock = threading.Lock()

    @contextlib.contextmanager
    def installed(self) -> Iterator[Interrupter]:
        previous = signal.signal(signal.SIGINT, self._on_sigint)
        try:
            yield self
        finally:
            signal.signal(signal.SIGINT, previous)

    def _on_sigint(self, signum: int, frame: FrameType | None) -> None:
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        threading.Thread(target=self._requested, daemon=True).start()

    def _requested(self) -> None:
        self.out.note("interrupting… (Ctrl-C again to stop waiting)")
        if self.turn_started:
            self._send()

    def saw(self, ev: Event) -> None:
        if isinstance(ev, TurnStarted | UserMessage):  # a steer joins a turn already started
            self.turn_started = True
            if self.requested:
                self._send()

    def _send(self) -> None:
        with self._lock:
            if self._sent:
                return
            self._sent = True
        try:
            self.client.interrupt(self.session_id)
        except FailedPreconditionError:
            pass  # the turn ended on its own meanwhile
        except AtomizerError as e:
            self.out.error(f"interrupt failed: {e}")


class EventPump:
    """Reads a turn's stream in a thread, so that a prompt can wait for the person at the
    terminal and for the daemon (an answer from elsewhere, the timeout) at the same time."""

    def __init__(self, stream: EventStream) -> None:
        self._queue: queue.Queue[Event | AtomizerError | None] = queue.Queue()
        self._back: deque[Event] = deque()
        self._ended = False
        threading.Thread(target=self._read, args=(stream,), daemon=True).start()

    def _read(self, stream: EventStream) -> None:
        try:
            for ev in stream:
                self._queue.put(ev)
        except AtomizerError as e:
            self._queue.put(e)
        except Exception as e:  # never leave the reader waiting for an end that never comes
            self._queue.put(AtomizerError(f"reading the reply failed: {e!r}"))
        finally:
            self._queue.put(None)

    def get(self, timeout: float | None = None) -> Event | None:
        """The next event, None at the end of the stream; raises the stream's error, and
        queue.Empty when `timeout` passes first."""
        if self._back:
            return self._back.popleft()
        if self._ended:
            return None
        item = self._queue.get(timeout=timeout) if timeout != 0 else self._queue.get_nowait()
        if item is None or isinstance(item, AtomizerError):
            self._ended = True
        if isinstance(item, AtomizerError):
            raise item
        return item

    def put_back(self, events: Sequence[Event]) -> None:
        """Events taken out early, to be read again first, in order."""
        self._back.extendleft(reversed(events))

    def __iter__(self) -> Iterator[Event]:
        while (ev := self.get()) is not None:
            yield ev


@dataclass(frozen=True)
class ApprovalPolicy:
    """How `send` and `chat` answer permission requests."""

    auto: bool | None = None
    """--yes (True) / --no (False): answer every request so, without asking."""
    interactive: bool = False
    """Ask on the terminal (stdin is one, and not the message or --json)."""


PROMPT = "allow? [y/N/a(lways)] "
_ANSWERS = {
    "y": (True, False),
    "yes": (True, False),
    "a": (True, True),
    "always": (True, True),
    "": (False, False),
    "n": (False, False),
    "no": (False, False),
}


class Approver:
    """Answers a turn's permission requests: by --yes/--no, by asking, or not at all."""

    def __init__(
        self,
        client: Client,
        session_id: str,
        out: Output,
        policy: ApprovalPolicy,
        pump: EventPump,
        stdin: TextIO | None = None,
    ) -> None:
        self.client = client
        self.session_id = session_id
        self.out = out
        self.policy = policy
        self.pump = pump
        self.stdin = stdin or sys.stdin

    def handle(self, req: PermissionRequest) -> None:
        if self.policy.auto is not None:
            self._respond(req, self.policy.auto, remember=False)
        elif self.policy.interactive:
            answer = self._ask(req)
            if answer is not None:
                self._respond(req, *answer)

    def _respond(self, req: PermissionRequest, allow: bool, remember: bool) -> None:
        try:
            self.client.respond_to_permission(
                self.session_id, req.request_id, allow, remember=remember
            )
        except (NotFoundError, FailedPreconditionError) as e:
            self.out.note(f"the answer came too late: {e.details}")
        except UnavailableError:
            raise
        except AtomizerError as e:
            self.out.error(f"answering the permission request failed: {e}")

    def _ask(self, req: PermissionRequest) -> tuple[bool, bool] | None:
        """The person's (allow, remember), or None when the request was settled meanwhile
        (answered elsewhere, timed out, the turn interrupted or ended)."""
        fd = self.stdin.fileno()
        meanwhile: list[Event] = []
        try:
            if self._settled(req, meanwhile):  # already, e.g. by another client
                return None
            self.out.note(f"  the daemon denies it at {_clock(req.deadline)} without an answer")
            self.out.ask(PROMPT)
            while True:
                if select.select([fd], [], [], 0.1)[0]:
                    line = os.read(fd, 4096).decode(errors="replace")
                    self.out.answered()
                    answer = _ANSWERS.get(line.strip().lower()) if line else (False, False)
                    if answer is not None:
                        return answer
                    self.out.ask("please answer y, n or a: ")
                if self._settled(req, meanwhile):
                    self._abandon_prompt(fd)
                    return None
        finally:
            self.pump.put_back(meanwhile)

    def _settled(self, req: PermissionRequest, meanwhile: list[Event]) -> bool:
        while True:
            try:
                ev = self.pump.get(timeout=0)
            except queue.Empty:
                return False
            if ev is None:
                return True
            meanwhile.append(ev)
            if ev.terminal or (
                isinstance(ev, PermissionDecided) and ev.request_id == req.request_id
            ):
                return True

    def _abandon_prompt(self, fd: int) -> None:
        self.out.withdraw_prompt()
        try:
            import termios

            termios.tcflush(fd, termios.TCIFLUSH)  # drop what was typed at the dead prompt
        except (ImportError, OSError):
            pass


def run_turn(
    client: Client,
    session_id: str,
    text: str,
    out: Output,
    policy: ApprovalPolicy | None = None,
    attachments: Sequence[session_pb2.Attachment] = (),
    steer: bool = False,
) -> int:
    """Sends one message (with `attachments`; `steer`: into the running turn), shows the reply
    live (answering permission requests as `policy` says), returns its outcome's exit code."""
    policy = policy or ApprovalPolicy()
    interrupter = Interrupter(client, session_id, out)
    hint = policy.auto is None and not policy.interactive
    renderer = TurnRenderer(out, show_prompt=False, answer_hint=hint)
    with interrupter.installed():
        stream = client.send_message(session_id, text, attachments=attachments, steer=steer)
        pump = EventPump(stream)
        approver = Approver(client, session_id, out, policy, pump)
        try:
            last = _follow(pump, renderer, interrupter, approver)
        except KeyboardInterrupt:
            stream.cancel()
            out.end_line()
            out.note("stopped waiting; the turn was asked to stop")
            return EXIT_INTERRUPTED
    if last is None:
        out.error("the reply stream ended without a terminal event")
    elif interrupter.requested and not isinstance(last, TurnFailed):
        return EXIT_INTERRUPTED
    return turn_exit_code(last)


def _follow(
    pump: EventPump, renderer: TurnRenderer, interrupter: Interrupter, approver: Approver
) -> Event | None:
    last: Event | None = None
    for ev in pump:
        interrupter.saw(ev)
        renderer.show(ev)
        if isinstance(ev, PermissionRequest):
            approver.handle(ev)
        if ev.terminal:
            last = ev
    return last


# --- commands ------------------------------------------------------------------------------

Command = Callable[[Client, argparse.Namespace, Output], int]


def cmd_new(client: Client, args: argparse.Namespace, out: Output) -> int:
    s = client.create_session(
        mode="power" if args.power else None,
        study_id=args.study or "",
        session_id=args.id or "",
        budget_usd=args.budget,
        turn_budget_usd=args.turn_budget,
    )
    if out.json:
        out.record(proto_dict(s))
    else:
        out.line(s.session_id)
    return EXIT_OK


def cmd_ls(client: Client, args: argparse.Namespace, out: Output) -> int:
    sessions = client.list_sessions(
        study_id=args.study or "", state=args.state, host_id=args.host_id or ""
    )
    if out.json:
        for s in sessions:
            out.record(proto_dict(s))
        return EXIT_OK
    rows = [_session_row(s) for s in sessions]
    header = ("SESSION", "MODE", "STATE", "STUDY", "MSGS", "COST", "LAST ACTIVE", "HOST")
    _table(out, header, rows)
    return EXIT_OK


def _session_row(s: Any) -> tuple[str, ...]:
    return (
        s.session_id,
        _enum_short(s, "mode"),
        _enum_short(s, "state"),
        s.study_id or "-",
        str(s.message_count),
        f"${s.total_cost_usd:.4f}",
        _when(s.last_active_at),
        s.host_id or "-",
    )


def _table(out: Output, header: Sequence[str], rows: Sequence[Sequence[str]]) -> None:
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    for row in [header, *rows]:
        out.line("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip())


def _show_session(out: Output, s: Any) -> None:
    if out.json:
        out.record(proto_dict(s))
        return
    mcp = ", ".join(f"{m.name} ({m.status})" for m in s.mcp_servers) or "-"
    pairs = [
        ("session", s.session_id),
        ("mode", _enum_short(s, "mode")),
        ("state", _enum_short(s, "state")),
        ("study", s.study_id or "-"),
        ("host", s.host_id or "-"),
        ("agent session", s.agent_session_id or "-"),
        ("created", _when(s.created_at)),
        ("last active", _when(s.last_active_at)),
        ("messages", str(s.message_count)),
        ("spent", _usd(s.total_cost_usd)),
        ("budget", _budget(s.budget_usd, s.total_cost_usd)),
        ("turn budget", _usd(s.turn_budget_usd) if s.turn_budget_usd > 0 else "none"),
        ("last seq", str(s.last_seq)),
        ("queued turns", str(s.queued_turns)),
        ("mcp servers", mcp),
    ]
    _pairs(out, pairs)


def _budget(cap: float, spent: float) -> str:
    if cap <= 0:
        return "none"
    if spent >= cap:
        return f"{_usd(cap)} (reached: no more messages)"
    return f"{_usd(cap)} ({_usd(cap - spent)} left)"


def _pairs(out: Output, pairs: Iterable[tuple[str, str]]) -> None:
    pairs = list(pairs)
    width = max(len(k) for k, _ in pairs)
    for k, v in pairs:
        out.line(f"{k.ljust(width)}  {v}")


def cmd_show(client: Client, args: argparse.Namespace, out: Output) -> int:
    _show_session(out, client.get_session(args.id))
    return EXIT_OK


def cmd_history(client: Client, args: argparse.Namespace, out: Output) -> int:
    # All on stdout: here the headers are part of the record, not activity beside a reply.
    for i, m in enumerate(client.get_history(args.id)):
        if out.json:
            out.record(proto_dict(m))
            continue
        status = _enum_short(m, "status")
        extra = "" if status in ("complete", "unspecified") else f" ({status})"
        if _enum_short(m, "origin") not in ("client", "unspecified"):
            extra += f" [started by the agent: {_enum_short(m, 'origin')}]"
        cost = f" · ${m.cost_usd:.4f}" if m.cost_usd else ""
        out.line(
            ("\n" if i else "")
            + f"── {_enum_short(m, 'role')}{extra} · {_when(m.created_at)}{cost}"
        )
        for call in m.tool_calls:
            out.line(_one_line(f"  ⏺ {call.name} {call.input_json}"))
        out.line(m.content)
    return EXIT_OK


def cmd_mode(client: Client, args: argparse.Namespace, out: Output) -> int:
    s = client.switch_mode(args.id, args.mode)
    if out.json:
        out.record(proto_dict(s))
    else:
        out.line(f"{s.session_id}: mode {_enum_short(s, 'mode')}")
    return EXIT_OK


def cmd_study(client: Client, args: argparse.Namespace, out: Output) -> int:
    s = client.set_study_context(args.id, None if args.none else args.study)
    if out.json:
        out.record(proto_dict(s))
    else:
        out.line(f"{s.session_id}: study {s.study_id or '(none)'}")
    return EXIT_OK


def cmd_rm(client: Client, args: argparse.Namespace, out: Output) -> int:
    s = client.terminate_session(args.id, purge=args.purge)
    if out.json:
        out.record({"session_id": args.id, "purged": args.purge, "session": s and proto_dict(s)})
    else:
        out.line(f"{'purged' if args.purge else 'closed'} {args.id}")
    return EXIT_OK


def cmd_status(client: Client, args: argparse.Namespace, out: Output) -> int:
    st = client.get_status()
    if out.json:
        out.record(proto_dict(st))
        return EXIT_OK
    r = st.last_reaper_pass
    reaper = (
        f"{_when(r.finished_at)}: {r.processes_stopped} stopped, {r.sessions_purged} purged, "
        f"{r.errors} errors"
        if st.HasField("last_reaper_pass")
        else "-"
    )
    pairs = [
        ("version", st.version),
        ("started", _when(st.started_at)),
        ("uptime", f"{st.uptime_seconds:.0f} s"),
        ("sessions", str(st.sessions_known)),
        ("live processes", f"{st.live_processes} of {st.pool_capacity}"),
        ("busy sessions", str(st.busy_sessions)),
        ("queued turns", str(st.queued_turns)),
        ("agent", f"{st.agent_command} {st.agent_version}".strip()),
        ("total cost", f"${st.total_cost_usd:.4f}"),
        ("last reaper pass", reaper),
    ]
    _pairs(out, pairs)
    return EXIT_OK


def cmd_daemon(client: Client, args: argparse.Namespace, out: Output) -> int:
    """`daemon restart`: a planned restart, then waits until the next daemon serves."""
    before = client.get_status()
    answer = client.restart_daemon()
    if not out.json:
        what = "handing over" if answer.hand_over else "stopping"
        out.note(
            f"restarting atomizerd (pid {answer.pid}): {what} {answer.live_processes} agents, "
            f"{answer.busy_sessions} busy sessions"
        )
    deadline = time.monotonic() + args.wait
    while True:
        time.sleep(0.2)
        try:
            st = client.get_status(timeout=2.0)
        except AtomizerError:
            st = None
        if st is not None and st.started_at != before.started_at:
            break
        if time.monotonic() > deadline:
            out.error(f"the daemon did not come back within {args.wait:g} s")
            return EXIT_UNAVAILABLE
    assert st is not None
    if out.json:
        out.record(proto_dict(st))
        return EXIT_OK
    _pairs(
        out,
        [
            ("agents adopted", str(st.agents_adopted)),
            ("turns resumed", str(st.turns_resumed)),
            ("adoption", f"{st.adoption_seconds * 1000:.0f} ms"),
        ],
    )
    return EXIT_OK


def _policy(args: argparse.Namespace, *, can_ask: bool) -> ApprovalPolicy:
    auto = True if args.yes else False if args.no else None
    return ApprovalPolicy(auto=auto, interactive=can_ask and _stdin_is_terminal())


def _stdin_is_terminal() -> bool:
    try:
        return sys.stdin.isatty()
    except (AttributeError, ValueError):  # closed or replaced
        return False


def cmd_send(client: Client, args: argparse.Namespace, out: Output) -> int:
    from_stdin = args.text == "-"
    text = sys.stdin.read() if from_stdin else args.text
    policy = _policy(args, can_ask=not out.json and not from_stdin)
    try:
        files = [attachment_from_path(path) for path in args.attach]
    except (OSError, ValueError) as e:
        out.error(f"cannot attach: {e}")
        return EXIT_USAGE
    return run_turn(client, args.id, text, out, policy, files, steer=args.steer)


def cmd_approve(client: Client, args: argparse.Namespace, out: Output) -> int:
    return _answer(client, args, out, allow=True)


def cmd_deny(client: Client, args: argparse.Namespace, out: Output) -> int:
    return _answer(client, args, out, allow=False)


def _answer(client: Client, args: argparse.Namespace, out: Output, *, allow: bool) -> int:
    d = client.respond_to_permission(
        args.id,
        args.request_id,
        allow,
        message=getattr(args, "message", None) or "",
        remember=args.remember,
    )
    if out.json:
        out.record(proto_dict(d))
    else:
        kept = " (remembered for this session)" if args.remember else ""
        out.line(f"{'allowed' if d.allow else 'denied'} {args.request_id}{kept}")
    return EXIT_OK


def cmd_audit(client: Client, args: argparse.Namespace, out: Output) -> int:
    rows = []
    for a in client.list_audit_events(args.id):
        if out.json:
            out.record(proto_dict(a))
            continue
        kind = _enum_short(a, "kind").replace("_", " ")
        permission = a.kind == session_pb2.AUDIT_KIND_PERMISSION
        outcome = ("allowed" if a.allow else "denied") if permission else "-"
        rows.append(
            (
                _when(a.time),
                kind,
                a.tool_name or "-",
                outcome,
                decider_name(a.decider),
                _one_line(a.detail, 60) or "-",
            )
        )
    if not out.json:
        _table(out, ("TIME", "KIND", "TOOL", "OUTCOME", "BY", "DETAIL"), rows)
    return EXIT_OK


def cmd_watch(client: Client, args: argparse.Namespace, out: Output) -> int:
    stream = client.watch_session(args.id, after_seq=args.after)
    renderer = TurnRenderer(out, show_prompt=True, answer_hint=True)
    try:
        for ev in stream:
            renderer.show(ev)
    except KeyboardInterrupt:
        stream.cancel()
        out.end_line()
        return EXIT_INTERRUPTED
    out.error("the daemon ended the watch")
    return EXIT_UNAVAILABLE


def cmd_chat(client: Client, args: argparse.Namespace, out: Output) -> int:
    s = client.get_session(args.id)  # fail now (exit 3), not after the first message is typed
    history = _load_readline_history()
    chat_out = Output(as_json=False, out=out.out, err=out.err)
    chat_out.note(f"chat with {s.session_id} — /quit or Ctrl-D leaves, Ctrl-C interrupts a reply")
    policy = _policy(args, can_ask=True)
    try:
        return _chat_loop(client, s.session_id, chat_out, policy)
    finally:
        _save_readline_history(history)


def _chat_loop(client: Client, session_id: str, out: Output, policy: ApprovalPolicy) -> int:
    while True:
        try:
            line = input("you> ")
        except EOFError:
            out.line()
            return EXIT_OK
        except KeyboardInterrupt:
            out.line()
            continue
        text = line.strip()
        if not text:
            continue
        if text in ("/quit", "/exit"):
            return EXIT_OK
        try:
            run_turn(client, session_id, text, out, policy)
        except UnavailableError:
            raise  # the daemon went away: nothing more to chat with
        except AtomizerError as e:
            out.error(str(e))


def _history_path() -> Path:
    state = os.environ.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
    return Path(state) / "atomizerctl" / "history"


def _load_readline_history() -> Path | None:
    try:
        import readline
    except ImportError:  # not on every platform; chat works without line editing
        return None
    path = _history_path()
    readline.set_history_length(1000)
    with contextlib.suppress(OSError):
        readline.read_history_file(path)
    return path


def _save_readline_history(path: Path | None) -> None:
    if path is None:
        return
    import readline

    with contextlib.suppress(OSError):
        path.parent.mkdir(parents=True, exist_ok=True)
        readline.write_history_file(path)


# --- argument parsing ----------------------------------------------------------------------


def _global_options(parser: argparse.ArgumentParser, *, suppress: bool) -> None:
    # Added to the top parser and to every subcommand, so they work before or after it.
    default: Any = argparse.SUPPRESS if suppress else None
    parser.add_argument("--socket", default=default, help="daemon socket path")
    parser.add_argument(
        "--json",
        action="store_true",
        default=argparse.SUPPRESS if suppress else False,
        help="one JSON object per line (records, or events of a turn)",
    )
    parser.add_argument(
        "--timeout",
        type=float,
        default=argparse.SUPPRESS if suppress else DEFAULT_TIMEOUT,
        help=f"deadline in seconds for each call (default {DEFAULT_TIMEOUT:g})",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="atomizerctl",
        description="Manage atomizerd sessions and talk to them.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    _global_options(parser, suppress=False)
    common = argparse.ArgumentParser(add_help=False)
    _global_options(common, suppress=True)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def add(name: str, fn: Command, help: str) -> argparse.ArgumentParser:
        p = sub.add_parser(name, parents=[common], help=help, description=help)
        p.set_defaults(func=fn)
        return p

    p = add("new", cmd_new, "create a session (or reopen --id) and print its id")
    p.add_argument("--power", action="store_true", help="power mode (if the daemon allows it)")
    p.add_argument("--study", metavar="S", help="attach study S")
    p.add_argument("--id", metavar="ID", help="the session id (default: generated)")
    p.add_argument(
        "--budget",
        type=_usd_arg,
        default=0.0,
        metavar="USD",
        help="spending cap of the session; at it, messages are refused (exit 7)",
    )
    p.add_argument(
        "--turn-budget",
        type=_usd_arg,
        default=0.0,
        metavar="USD",
        help="spending cap of each turn (both may only lower the daemon's own caps)",
    )

    p = add("ls", cmd_ls, "list sessions, newest first")
    p.add_argument("--study", metavar="S", help="only sessions attached to study S")
    p.add_argument("--state", choices=STATES, help="only sessions in this state")
    p.add_argument(
        "--host-id", metavar="H", help="only sessions of host H (daemons sharing one database)"
    )

    add("show", cmd_show, "show one session, with its spend and caps").add_argument("id")
    add("history", cmd_history, "print a session's stored messages").add_argument("id")

    p = add("mode", cmd_mode, "switch a session's mode")
    p.add_argument("id")
    p.add_argument("mode", choices=("user", "power"))

    p = add("study", cmd_study, "attach a study to a session, or detach with --none")
    p.add_argument("id")
    p.add_argument("study", nargs="?")
    p.add_argument("--none", action="store_true", help="detach the study")

    p = add("rm", cmd_rm, "close a session (its history stays unless --purge)")
    p.add_argument("id")
    p.add_argument("--purge", action="store_true", help="also delete its history and files")

    add("status", cmd_status, "show the daemon's status")
    p = add(
        "daemon",
        cmd_daemon,
        "restart the daemon; running turns go on under the next one (docs/restart.md)",
    )
    p.add_argument("action", choices=("restart",))
    p.add_argument(
        "--wait", type=float, default=60.0, metavar="S", help="how long to wait for it to return"
    )

    p = add(
        "send",
        cmd_send,
        "send a message and stream the reply (Ctrl-C interrupts); asks before tools run",
    )
    p.add_argument("id")
    p.add_argument("text", help="the message; - reads it from stdin (then nothing is asked)")
    p.add_argument(
        "--attach",
        action="append",
        default=[],
        metavar="FILE",
        help="send FILE with the message (an image, a PDF, text, Markdown, CSV or JSON; "
        "the type from its extension); repeatable",
    )
    p.add_argument(
        "--steer",
        action="store_true",
        help="while a turn runs, put the text into it now (instead of a turn of its own)",
    )
    _approval_options(p)

    p = add("watch", cmd_watch, "follow a session's events live (Ctrl-C stops)")
    p.add_argument("id")
    p.add_argument("--after", type=int, default=0, metavar="SEQ", help="replay after SEQ")

    p = add("chat", cmd_chat, "interactive chat with a session; asks before tools run")
    p.add_argument("id")
    _approval_options(p)

    p = add("approve", cmd_approve, "allow a pending tool use (a permission request)")
    p.add_argument("id")
    p.add_argument("request_id", help="the request_id of the permission request")
    p.add_argument(
        "--remember", action="store_true", help="allow the same call for the rest of the session"
    )

    p = add("deny", cmd_deny, "deny a pending tool use (a permission request)")
    p.add_argument("id")
    p.add_argument("request_id", help="the request_id of the permission request")
    p.add_argument("--message", metavar="M", help="why, shown to the model")
    p.add_argument(
        "--remember", action="store_true", help="deny the same call for the rest of the session"
    )

    add("audit", cmd_audit, "a session's audit trail: tool approvals, mode switches").add_argument(
        "id"
    )
    ctl_tasks.add_commands(add)
    return parser


def _approval_options(p: argparse.ArgumentParser) -> None:
    group = p.add_mutually_exclusive_group()
    group.add_argument(
        "--yes", action="store_true", help="allow every tool use the agent asks for, unasked"
    )
    group.add_argument(
        "--no", action="store_true", help="deny every tool use the agent asks for, unasked"
    )


def _usd_arg(value: str) -> float:
    try:
        amount = float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an amount in USD: {value!r}") from None
    if not amount >= 0 or amount == float("inf"):
        raise argparse.ArgumentTypeError(f"not an amount in USD: {value!r}")
    return amount


def _parse(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command == "study" and (args.none == (args.study is not None)):
        parser.error("study: give either a STUDY or --none")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = _parse(argv)
    out = Output(as_json=args.json)
    try:
        with Client(args.socket, timeout=args.timeout) as client:
            code: int = args.func(client, args, out)
            return code
    except AtomizerError as e:
        _report(out, e)
        return exit_code_for(e)
    except KeyboardInterrupt:
        out.end_line()
        return EXIT_INTERRUPTED
    except BrokenPipeError:
        # The reader went away (`atomizerctl ls | head`); nothing left to say.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return EXIT_OK


def _report(out: Output, e: AtomizerError) -> None:
    if out.json:
        err = {"error": {"code": e.code.name, "details": e.details}}
        out.err.write(json.dumps(err) + "\n")
    else:
        out.error(str(e))


if __name__ == "__main__":
    sys.exit(main())
