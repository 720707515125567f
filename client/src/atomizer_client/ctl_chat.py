"""Running a turn from the terminal: Ctrl-C interrupts it, the agent's permission requests are
asked (or answered by --yes / --no), and `chat`, the conversation loop."""

from __future__ import annotations

import argparse
import contextlib
import os
import queue
import select
import signal
import sys
import threading
from collections import deque
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import TextIO

from atomizer.v1 import session_pb2

from atomizer_client.client import Client, EventStream
from atomizer_client.ctl_output import EXIT_INTERRUPTED, EXIT_OK, Output, clock
from atomizer_client.ctl_render import TurnRenderer, turn_exit_code
from atomizer_client.errors import (
    AtomizerError,
    FailedPreconditionError,
    NotFoundError,
    UnavailableError,
)
from atomizer_client.events import (
    Event,
    PermissionDecided,
    PermissionRequest,
    TurnFailed,
    TurnStarted,
    UserMessage,
)


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
            self.out.note(f"  the daemon denies it at {clock(req.deadline)} without an answer")
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
    output_schema: str = "",
) -> int:
    """Sends one message (with `attachments`; `steer`: into the running turn), shows the reply
    live (answering permission requests as `policy` says), returns its outcome's exit code."""
    policy = policy or ApprovalPolicy()
    interrupter = Interrupter(client, session_id, out)
    hint = policy.auto is None and not policy.interactive
    renderer = TurnRenderer(out, show_prompt=False, answer_hint=hint)
    with interrupter.installed():
        stream = client.send_message(
            session_id, text, attachments=attachments, steer=steer, output_schema=output_schema
        )
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


def approval_policy(args: argparse.Namespace, *, can_ask: bool) -> ApprovalPolicy:
    auto = True if args.yes else False if args.no else None
    return ApprovalPolicy(auto=auto, interactive=can_ask and _stdin_is_terminal())


def _stdin_is_terminal() -> bool:
    try:
        return sys.stdin.isatty()
    except (AttributeError, ValueError):  # closed or replaced
        return False


def cmd_chat(client: Client, args: argparse.Namespace, out: Output) -> int:
    s = client.get_session(args.id)  # fail now (exit 3), not after the first message is typed
    history = _load_readline_history()
    chat_out = Output(as_json=False, out=out.out, err=out.err)
    chat_out.note(f"chat with {s.session_id} — /quit or Ctrl-D leaves, Ctrl-C interrupts a reply")
    policy = approval_policy(args, can_ask=True)
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
