"""atomizerctl: manage atomizerd sessions and talk to them from a terminal or a script."""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import sys
import threading
from collections.abc import Callable, Iterable, Iterator, Sequence
from datetime import UTC
from pathlib import Path
from types import FrameType
from typing import Any, TextIO

from google.protobuf.descriptor import FieldDescriptor
from google.protobuf.message import Message as ProtoMessage
from google.protobuf.timestamp_pb2 import Timestamp

from atomizer_client.client import DEFAULT_TIMEOUT, Client, EventStream
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
    TextDelta,
    ThinkingDelta,
    ToolResult,
    ToolUse,
    TurnCompleted,
    TurnFailed,
    TurnStarted,
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

exit codes:
  0    ok
  1    the turn failed, or the agent reported an error
  2    usage error
  3    session not found
  4    invalid argument, or not possible now (closed session, no running turn)
  5    daemon unavailable (not running, draining, or not answering in time)
  6    permission denied (e.g. power mode disabled by the daemon's policy)
  7    resource exhausted (session, queue or size limits)
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


def _tokens(n: int) -> str:
    return f"{n:,}"


# --- rendering a turn ----------------------------------------------------------------------


def _one_line(text: str, width: int = 100) -> str:
    flat = " ".join(text.split())
    return flat if len(flat) <= width else flat[: width - 1] + "…"


class TurnRenderer:
    """Shows one turn's events as they arrive and remembers how it ended."""

    def __init__(self, out: Output, *, show_prompt: bool) -> None:
        self.out = out
        self.show_prompt = show_prompt
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
            TurnCompleted: self._completed,
            TurnFailed: self._failed,
        }

    def _turn_started(self, ev: TurnStarted) -> None:
        self.streamed_text = False
        if self.show_prompt:
            self.out.end_line()
            self.out.line("> " + ev.text.replace("\n", "\n> "))

    def _text(self, ev: TextDelta) -> None:
        self.streamed_text = True
        self.out.text(ev.text)

    def _thinking(self, ev: ThinkingDelta) -> None:
        # Thinking goes to stderr so a redirected reply holds only the answer.
        self.out.dim_text(ev.text)

    def _tool_use(self, ev: ToolUse) -> None:
        self.out.note(_one_line(f"⏺ {ev.name} {ev.input_json}"))

    def _tool_result(self, ev: ToolResult) -> None:
        if ev.is_error:
            self.out.note(_one_line(f"  ⎿ error: {ev.content}"))

    def _notice(self, ev: Notice) -> None:
        if ev.message:
            self.out.note(ev.message)
        elif ev.kind == "API_RETRY":
            self.out.note(f"model API retry {ev.attempt} of {ev.max_retries} ({ev.error_status})")

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
        if isinstance(ev, TurnStarted):
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


def run_turn(client: Client, session_id: str, text: str, out: Output) -> int:
    """Sends one message, shows the reply live, returns the exit code of its outcome."""
    interrupter = Interrupter(client, session_id, out)
    renderer = TurnRenderer(out, show_prompt=False)
    with interrupter.installed():
        stream = client.send_message(session_id, text)
        try:
            last = _follow(stream, renderer, interrupter)
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


def _follow(stream: EventStream, renderer: TurnRenderer, interrupter: Interrupter) -> Event | None:
    last: Event | None = None
    for ev in stream:
        interrupter.saw(ev)
        renderer.show(ev)
        if ev.terminal:
            last = ev
    return last


# --- commands ------------------------------------------------------------------------------

Command = Callable[[Client, argparse.Namespace, Output], int]


def cmd_new(client: Client, args: argparse.Namespace, out: Output) -> int:
    s = client.create_session(
        mode="power" if args.power else None, study_id=args.study or "", session_id=args.id or ""
    )
    if out.json:
        out.record(proto_dict(s))
    else:
        out.line(s.session_id)
    return EXIT_OK


def cmd_ls(client: Client, args: argparse.Namespace, out: Output) -> int:
    sessions = client.list_sessions(study_id=args.study or "", state=args.state)
    if out.json:
        for s in sessions:
            out.record(proto_dict(s))
        return EXIT_OK
    rows = [_session_row(s) for s in sessions]
    header = ("SESSION", "MODE", "STATE", "STUDY", "MSGS", "COST", "LAST ACTIVE")
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
        ("agent session", s.agent_session_id or "-"),
        ("created", _when(s.created_at)),
        ("last active", _when(s.last_active_at)),
        ("messages", str(s.message_count)),
        ("cost", f"${s.total_cost_usd:.4f}"),
        ("last seq", str(s.last_seq)),
        ("queued turns", str(s.queued_turns)),
        ("mcp servers", mcp),
    ]
    _pairs(out, pairs)


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


def cmd_send(client: Client, args: argparse.Namespace, out: Output) -> int:
    text = sys.stdin.read() if args.text == "-" else args.text
    return run_turn(client, args.id, text, out)


def cmd_watch(client: Client, args: argparse.Namespace, out: Output) -> int:
    stream = client.watch_session(args.id, after_seq=args.after)
    renderer = TurnRenderer(out, show_prompt=True)
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
    try:
        return _chat_loop(client, s.session_id, chat_out)
    finally:
        _save_readline_history(history)


def _chat_loop(client: Client, session_id: str, out: Output) -> int:
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
            run_turn(client, session_id, text, out)
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

    p = add("ls", cmd_ls, "list sessions, newest first")
    p.add_argument("--study", metavar="S", help="only sessions attached to study S")
    p.add_argument("--state", choices=STATES, help="only sessions in this state")

    add("show", cmd_show, "show one session").add_argument("id")
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

    p = add("send", cmd_send, "send a message and stream the reply (Ctrl-C interrupts)")
    p.add_argument("id")
    p.add_argument("text", help="the message; - reads it from stdin")

    p = add("watch", cmd_watch, "follow a session's events live (Ctrl-C stops)")
    p.add_argument("id")
    p.add_argument("--after", type=int, default=0, metavar="SEQ", help="replay after SEQ")

    add("chat", cmd_chat, "interactive chat with a session").add_argument("id")
    return parser


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
