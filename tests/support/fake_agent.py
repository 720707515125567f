#!/usr/bin/env python3
"""A scripted stand-in for the `claude` CLI in stream-json mode (standard library only).

Speaks what Claude Code 2.1.332 speaks with `-p --input-format stream-json --output-format
stream-json --verbose --include-partial-messages`: one JSON line per message on stdin and
stdout. Nothing is written until the first input. For each user line it writes a `system`/`init`
line (the real CLI opens every turn with one), a `system`/`status` line, `stream_event` text
deltas, the whole `assistant` message, and a `result` line with cost and usage. It answers the
`initialize` and `interrupt` control requests (an interrupt ends the running turn with the
"[Request interrupted by user]" user line and an `error_during_execution` result, and the
process stays usable), queues user lines that arrive mid-turn, and exits at the end of stdin
(code 1 if the last result was an error, else 0). A stdin line that is not JSON makes it exit 1,
as the CLI does.

With `--replay-user-messages`, each user line is echoed (`isReplay`, with the writer's `uuid`)
after the turn's init line, as the CLI does.

Argv: accepts the CLI's flags in `--flag=value` and `--flag value` forms and ignores unknown
ones. `--session-id`/`--resume` set the conversation id echoed in every line (a random one
otherwise); `--model`, `--permission-mode`, `--dangerously-skip-permissions`, `--tools`,
`--mcp-config` (server names read from the file, reported `connected`) and `--add-dir` show in
the init line, which also carries `fake_argv` (the arguments as received). `--version` prints
"0.0.0-fake (Fake Agent)" and exits.

Environment:
  FAKE_AGENT_EXIT_AT_START=1       print an error to stderr and exit 1 before reading anything
                                   (like a CLI without credentials).
  FAKE_AGENT_TRANSCRIPT_DIR=<dir>  keep each conversation's user texts in <dir>/<id>.jsonl, so
                                   `--resume=<id>` continues it (`[[history]]` shows it). As the
                                   CLI, at start-up: resuming an unknown id writes an error
                                   result ("No conversation found with session ID: <id>") and
                                   exits 1; `--session-id` of an existing one exits 1 with
                                   "Error: Session ID <id> is already in use." on stderr.

Directives, anywhere in the user's text (the default reply is "echo: <text without them>",
one text delta per word):
  [[crash]]            two text deltas, then exit 3 (a line on stderr first).
  [[hang]]             one text delta, then stop forever: no output, stdin and SIGTERM ignored.
  [[garbage]]          a line that is not JSON, then the normal reply.
  [[huge:N]]           one `user` tool_result line of exactly N bytes (plus newline), then the
                       normal reply (tool_use_id "toolu_huge").
  [[stderr-flood:N]]   N bytes on stderr, ending "FLOOD-END\n", before any stdout of the turn.
  [[bad-utf8]]         a text-delta line holding the invalid bytes FF FE, then the normal reply.
  [[split-utf8]]       a text delta "é 世界 🎉" written one byte at a time, 2 ms apart, so
                       multi-byte characters straddle reads.
  [[deltas:N]]         the reply is N text deltas of "x", written as fast as possible.
  [[slow:MS]]          sleep MS milliseconds before each text delta (interruptible).
  [[gate:PATH]]        the first text delta, then wait (interruptible) until the file PATH
                       exists before the rest of the reply: a turn that runs until a test
                       says so.
  [[exit-at-start]]    print an error to stderr and exit 1 before any output of the turn.
  [[tool:NAME]]        a tool_use of NAME (assistant line) and its tool_result (user line)
                       "ran NAME", before the reply.
  [[ask:NAME]]         a `can_use_tool` control request for NAME, waiting for our
                       control_response; the reply says "permission NAME: allow" or
                       "permission NAME: deny (<message>)"; a denial is listed in the
                       result's permission_denials. An interrupt while waiting sends a
                       control_cancel_request, rejects the tool and ends the turn
                       ("[Request interrupted by user for tool use]", `aborted_tools`).
  [[hold:PATH]]        before anything else of the turn, wait (interruptible) until the file
                       PATH exists.
  [[thinking]]         a thinking delta "pondering" and a thinking block before the reply.
  [[api-retry:N]]      N `system`/`api_retry` lines (status 529) before the reply.
  [[error-result]]     the result has is_error true with subtype success (an API failure).
  [[spawn-child]]      start `sleep 300` in the agent's process group, holding its stdout and
                       stderr; the reply (and a stderr line) says "child pid <pid>".
  [[env:NAME]]         the reply says "env NAME=<value>" or "env NAME unset".
  [[history]]          the reply lists the earlier user texts of this conversation.
  [[abandon]]          a broken stream retried without streaming: two text deltas, then a
                       message_stop with `abandoned_blocks` for them, then the whole reply as
                       one assistant line under a new message id (no deltas).
"""

from __future__ import annotations

import json
import os
import queue
import re
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections import deque
from typing import Any

VERSION = "0.0.0-fake"
_OUT = sys.stdout.buffer
_EOF = object()
_DIRECTIVE = re.compile(r"\[\[([a-z0-9-]+)(?::([^\]]*))?\]\]")
_VALUE_FLAGS = {
    "--session-id",
    "--resume",
    "-r",
    "--model",
    "--permission-mode",
    "--permission-prompt-tool",
    "--mcp-config",
    "--append-system-prompt",
    "--append-system-prompt-file",
    "--add-dir",
    "--max-budget-usd",
    "--allowedTools",
    "--allowed-tools",
    "--disallowedTools",
    "--disallowed-tools",
    "--tools",
    "--input-format",
    "--output-format",
    "--settings",
    "--setting-sources",
}


class Interrupted(Exception):
    pass


def emit_raw(data: bytes) -> None:
    _OUT.write(data)
    _OUT.flush()


def emit(obj: dict[str, Any]) -> None:
    emit_raw(json.dumps(obj, ensure_ascii=False).encode("utf-8") + b"\n")


def parse_args(argv: list[str]) -> dict[str, list[str]]:
    """Flag -> values (boolean flags get [""]); unknown flags are kept and ignored."""
    opts: dict[str, list[str]] = {}
    i = 0
    while i < len(argv):
        arg = argv[i]
        if arg.startswith("-") and "=" in arg:
            name, value = arg.split("=", 1)
            opts.setdefault(name, []).append(value)
        elif arg in _VALUE_FLAGS and i + 1 < len(argv):
            opts.setdefault(arg, []).append(argv[i + 1])
            i += 1
        else:
            opts.setdefault(arg, []).append("")
        i += 1
    return opts


def read_stdin(inbox: queue.Queue[object]) -> None:
    for raw in sys.stdin.buffer:
        line = raw.strip()
        if not line:
            continue
        try:
            inbox.put(json.loads(line))
        except ValueError:
            sys.stderr.write(f"Error parsing streaming input line ({len(line)} bytes)\n")
            sys.stderr.flush()
            os._exit(1)
    inbox.put(_EOF)


def user_text(message: dict[str, Any]) -> str:
    content = message.get("message", {}).get("content", "")
    if isinstance(content, str):
        return content
    return "\n".join(
        b.get("text", "") for b in content if isinstance(b, dict) and b.get("type") == "text"
    )


def words(text: str) -> list[str]:
    return re.findall(r"\S+\s*|\s+", text) or [text]


class FakeAgent:
    def __init__(self, opts: dict[str, list[str]], argv: list[str]) -> None:
        self.opts = opts
        self.argv = argv
        self.resuming = bool(opts.get("--resume") or opts.get("-r"))
        self.session_id = self._opt("--session-id") or self._opt("--resume") or self._opt("-r")
        self.session_id = self.session_id or str(uuid.uuid4())
        self.inbox: queue.Queue[object] = queue.Queue()
        self.pending_users: deque[dict[str, Any]] = deque()
        self.responses: dict[str, dict[str, Any]] = {}
        self.eof = False
        self.in_turn = False
        self.interrupted = False
        self.history: list[str] = self._load_history()
        self.turns = 0
        self.started = time.monotonic()
        self.api_calls = 1
        self.denials: list[dict[str, Any]] = []
        self.verdict = ""
        self.last_error = False
        self.message_id = ""

    def _opt(self, name: str) -> str:
        values = self.opts.get(name)
        return values[-1] if values else ""

    # --- transcript ---

    def _transcript_path(self) -> str | None:
        directory = os.environ.get("FAKE_AGENT_TRANSCRIPT_DIR")
        return os.path.join(directory, f"{self.session_id}.jsonl") if directory else None

    def _load_history(self) -> list[str]:
        path = self._transcript_path()
        if path is None or not os.path.exists(path):
            return []
        with open(path, encoding="utf-8") as f:
            return [json.loads(line)["text"] for line in f if line.strip()]

    def _record(self, text: str) -> None:
        self.history.append(text)
        path = self._transcript_path()
        if path is not None:
            with open(path, "a", encoding="utf-8") as f:
                f.write(json.dumps({"text": text}, ensure_ascii=False) + "\n")

    # --- inbound ---

    def run(self) -> None:
        self.check_transcript()
        threading.Thread(target=read_stdin, args=(self.inbox,), daemon=True).start()
        while True:
            if self.pending_users:
                self.run_turn(self.pending_users.popleft())
            elif self.eof:
                sys.exit(1 if self.last_error else 0)  # as the CLI: 1 after an error result
            else:
                self.dispatch(self.inbox.get())

    def check_transcript(self) -> None:
        """With a transcript dir, fail at start-up as the CLI does: resuming an unknown
        conversation (an error result, exit 1) or reusing a session id (stderr, exit 1)."""
        path = self._transcript_path()
        if path is None:
            return
        if self.resuming and not os.path.exists(path):
            error = f"No conversation found with session ID: {self.session_id}"
            emit(
                self.envelope(
                    "result",
                    subtype="error_during_execution",
                    is_error=True,
                    duration_ms=0,
                    num_turns=0,
                    total_cost_usd=0,
                    usage={},
                    permission_denials=[],
                    errors=[error],
                )
            )
            die(error)
        if not self.resuming and os.path.exists(path):
            die(f"Error: Session ID {self.session_id} is already in use.")

    def poll(self, seconds: float = 0.0) -> None:
        """Handle inbound messages for `seconds` (0: those already waiting), or until an
        interrupt arrives."""
        deadline = time.monotonic() + seconds
        while not self.interrupted:
            remaining = deadline - time.monotonic()
            try:
                msg = (
                    self.inbox.get(timeout=remaining) if remaining > 0 else self.inbox.get_nowait()
                )
            except queue.Empty:
                return
            self.dispatch(msg)

    def check(self) -> None:
        self.poll()
        if self.interrupted:
            raise Interrupted("")

    def sleep(self, seconds: float) -> None:
        self.poll(seconds)
        if self.interrupted:
            raise Interrupted("")

    def dispatch(self, msg: object) -> None:
        if msg is _EOF:
            self.eof = True
            return
        if not isinstance(msg, dict):
            return
        kind = msg.get("type")
        if kind == "user":
            self.pending_users.append(msg)
        elif kind == "control_request":
            self.answer_control(msg)
        elif kind == "control_response":
            body = msg.get("response", {})
            self.responses[body.get("request_id", "")] = body

    def answer_control(self, msg: dict[str, Any]) -> None:
        request_id = msg.get("request_id", "")
        subtype = msg.get("request", {}).get("subtype")
        if subtype == "interrupt":
            if self.in_turn:
                self.interrupted = True
            self.control_success(request_id, {"still_queued": []})
        elif subtype == "initialize":
            self.control_success(
                request_id,
                {
                    "commands": [],
                    "agents": [],
                    "models": [],
                    "pid": os.getpid(),
                    "claude_code_version": VERSION,
                    "current_permission_mode": self.permission_mode(),
                },
            )
        else:
            emit(
                {
                    "type": "control_response",
                    "response": {
                        "subtype": "error",
                        "request_id": request_id,
                        "error": f"Unsupported control request subtype: {subtype}",
                    },
                }
            )

    def control_success(self, request_id: str, response: dict[str, Any]) -> None:
        emit(
            {
                "type": "control_response",
                "response": {"subtype": "success", "request_id": request_id, "response": response},
            }
        )

    # --- outbound pieces ---

    def envelope(self, kind: str, **fields: Any) -> dict[str, Any]:
        return {
            "type": kind,
            "uuid": str(uuid.uuid4()),
            **fields,
            "session_id": self.session_id,
        }

    def stream_event(self, event: dict[str, Any], **extra: Any) -> dict[str, Any]:
        return self.envelope(
            "stream_event",
            event=event,
            parent_tool_use_id=None,
            api_message_id=self.message_id,
            **extra,
        )

    def text_delta_line(self, text: str) -> bytes:
        delta = {"type": "text_delta", "text": text}
        event = {"type": "content_block_delta", "index": 0, "delta": delta}
        return json.dumps(self.stream_event(event), ensure_ascii=False).encode("utf-8") + b"\n"

    def permission_mode(self) -> str:
        if "--dangerously-skip-permissions" in self.opts:
            return "bypassPermissions"
        return self._opt("--permission-mode") or "default"

    def mcp_servers(self) -> list[dict[str, str]]:
        servers: list[dict[str, str]] = []
        for path in self.opts.get("--mcp-config", []):
            try:
                with open(path, encoding="utf-8") as f:
                    names = json.load(f).get("mcpServers", {})
            except (OSError, ValueError, AttributeError):
                continue
            servers += [{"name": name, "status": "connected"} for name in names]
        return servers

    def init_line(self) -> dict[str, Any]:
        tools = self._opt("--tools")
        return self.envelope(
            "system",
            subtype="init",
            cwd=os.getcwd(),
            tools=[t for t in re.split(r"[,\s]+", tools) if t] if tools else ["Bash", "Read"],
            mcp_servers=self.mcp_servers(),
            model=self._opt("--model") or "fake-model",
            permissionMode=self.permission_mode(),
            apiKeySource="none",
            claude_code_version=VERSION,
            additional_directories=self.opts.get("--add-dir", []),
            fake_argv=self.argv,
        )

    def assistant(self, blocks: list[dict[str, Any]]) -> None:
        message = {
            "id": self.message_id or f"msg_fake_{self.turns}",
            "type": "message",
            "role": "assistant",
            "model": self._opt("--model") or "fake-model",
            "content": blocks,
            "stop_reason": None,
            "usage": {"input_tokens": 10, "output_tokens": 5},
        }
        emit(self.envelope("assistant", message=message, parent_tool_use_id=None))

    def tool_result(self, tool_use_id: str, content: str, is_error: bool) -> dict[str, Any]:
        block = {
            "tool_use_id": tool_use_id,
            "type": "tool_result",
            "content": content,
            "is_error": is_error,
        }
        message = {"role": "user", "content": [block]}
        return self.envelope("user", message=message, parent_tool_use_id=None)

    def add_cost(self, turn_cost: float) -> float:
        """Like the CLI, the result reports the conversation's cost so far, not the turn's."""
        self.total_cost = getattr(self, "total_cost", 0.0) + turn_cost
        return round(self.total_cost, 6)

    def result(self, text: str, *, is_error: bool = False, **extra: Any) -> None:
        emit(
            self.envelope(
                "result",
                subtype="success",
                is_error=is_error,
                duration_ms=int((time.monotonic() - self.started) * 1000),
                duration_api_ms=1,
                num_turns=self.api_calls,
                result=text,
                stop_reason="end_turn",
                total_cost_usd=self.add_cost(0.0001 * (1 + len(text))),
                usage={
                    "input_tokens": 10 * self.api_calls,
                    "output_tokens": len(text.split()) or 1,
                    "cache_creation_input_tokens": 0,
                    "cache_read_input_tokens": 0,
                },
                modelUsage={},
                permission_denials=self.denials,
                terminal_reason="completed",
                **extra,
            )
        )

    # --- a turn ---

    def run_turn(self, msg: dict[str, Any]) -> None:
        text = user_text(msg)
        directives = [(m.group(1), m.group(2) or "") for m in _DIRECTIVE.finditer(text)]
        names = {name: arg for name, arg in directives}
        if "exit-at-start" in names:
            die("Invalid API key · Please run /login")
        if "stderr-flood" in names:
            flood_stderr(int(names["stderr-flood"]))
        self.turns += 1
        self.started = time.monotonic()
        self.api_calls = 1
        self.denials = []
        self.in_turn, self.interrupted = True, False
        try:
            emit(self.init_line())
            if "--replay-user-messages" in self.argv:  # the line is taken into this turn
                message = msg.get("message", {})
                emit(
                    self.envelope("user", message=message, isReplay=True, uuid=msg.get("uuid", ""))
                )
            emit(self.envelope("system", subtype="status", status="requesting"))
            self.turn_body(text, directives, names)
        except Interrupted as interrupt:
            marker = {"type": "text", "text": f"[Request interrupted by user{interrupt.args[0]}]"}
            message = {"role": "user", "content": [marker]}
            emit(self.envelope("user", message=message, parent_tool_use_id=None))
            self.last_error = True
            emit(
                self.envelope(
                    "result",
                    subtype="error_during_execution",
                    is_error=True,
                    duration_ms=int((time.monotonic() - self.started) * 1000),
                    num_turns=self.api_calls,
                    stop_reason=None,
                    total_cost_usd=0,
                    usage={"input_tokens": 0, "output_tokens": 0},
                    permission_denials=self.denials,
                    terminal_reason="aborted_tools" if interrupt.args[0] else "aborted_streaming",
                )
            )
        finally:
            self.in_turn = False
            self._record(_DIRECTIVE.sub("", text).strip())

    def turn_body(
        self, text: str, directives: list[tuple[str, str]], names: dict[str, str]
    ) -> None:
        slow = int(names["slow"]) / 1000 if "slow" in names else 0.0
        if "hold" in names:
            while not os.path.exists(names["hold"]):
                self.sleep(0.02)
        self.pre_reply(directives)
        reply = self.reply_text(text, names)
        self.message_id = f"msg_fake_{self.turns}_{self.api_calls}"
        emit(self.stream_event({"type": "message_start", "message": {"id": self.message_id}}))
        block = {"type": "text", "text": ""}
        emit(self.stream_event({"type": "content_block_start", "index": 0, "content_block": block}))
        if "abandon" in names:
            self.abandoned_stream(reply)
        elif "deltas" in names:
            self.fast_deltas(int(names["deltas"]), slow)
            reply = "x" * int(names["deltas"])
        else:
            self.slow_deltas(words(reply), slow, names)
        self.assistant([{"type": "text", "text": reply}])
        if "abandon" not in names:  # the non-streamed retry has no stream events
            emit(self.stream_event({"type": "content_block_stop", "index": 0}))
            stop = {"type": "message_delta", "delta": {"stop_reason": "end_turn"}}
            emit(self.stream_event(stop))
            emit(self.stream_event({"type": "message_stop"}))
        self.last_error = "error-result" in names
        if self.last_error:
            self.result("API Error: fake failure", is_error=True)
        else:
            self.result(reply)

    def pre_reply(self, directives: list[tuple[str, str]]) -> None:
        """Directives that write lines before the reply, in the order they were given."""
        for name, arg in directives:
            self.check()
            if name == "garbage":
                emit_raw(b"this is not JSON {\n")
            elif name == "huge":
                emit_raw(self.huge_line(int(arg)))
            elif name == "bad-utf8":
                line = self.text_delta_line("<BAD>")
                emit_raw(line.replace(b"<BAD>", b"bad \xff\xfe bytes"))
            elif name == "split-utf8":
                for byte in self.text_delta_line("é 世界 🎉"):
                    emit_raw(bytes([byte]))
                    time.sleep(0.002)
            elif name == "thinking":
                delta = {"type": "thinking_delta", "thinking": "pondering"}
                emit(self.stream_event({"type": "content_block_delta", "index": 0, "delta": delta}))
                self.assistant([{"type": "thinking", "thinking": "pondering", "signature": "s"}])
            elif name == "api-retry":
                self.api_retries(int(arg or 1))
            elif name == "tool":
                self.tool(arg)
            elif name == "ask":
                self.ask(arg)

    def abandoned_stream(self, reply: str) -> None:
        """A stream broken after two deltas, retried without streaming: the deltas are
        abandoned and the answer comes as a whole assistant line with a new message id."""
        for piece in (reply[:3], reply[3:4]):
            emit_raw(self.text_delta_line(piece))
        abandoned = {"api_message_id": self.message_id, "from_block_index": 0}
        emit(self.stream_event({"type": "message_stop"}, abandoned_blocks=abandoned))
        self.message_id = f"msg_fake_{self.turns}_retry"

    def huge_line(self, size: int) -> bytes:
        empty = json.dumps(self.tool_result("toolu_huge", "", False)).encode()
        pad = max(size - len(empty), 0)
        line = json.dumps(self.tool_result("toolu_huge", "A" * pad, False)).encode()
        return line + b"\n"

    def api_retries(self, count: int) -> None:
        for attempt in range(1, count + 1):
            emit(
                self.envelope(
                    "system",
                    subtype="api_retry",
                    attempt=attempt,
                    max_retries=count,
                    retry_delay_ms=1,
                    error_status=529,
                    error="overloaded",
                )
            )

    def tool(self, name: str) -> None:
        tool_id = f"toolu_{uuid.uuid4().hex[:12]}"
        self.assistant([{"type": "tool_use", "id": tool_id, "name": name, "input": {"x": 1}}])
        emit(self.tool_result(tool_id, f"ran {name}", False))
        self.api_calls += 1

    def ask(self, name: str) -> None:
        tool_id = f"toolu_{uuid.uuid4().hex[:12]}"
        tool_input = {"command": f"use {name}"}
        self.assistant([{"type": "tool_use", "id": tool_id, "name": name, "input": tool_input}])
        request_id = str(uuid.uuid4())
        request: dict[str, Any] = {
            "subtype": "can_use_tool",
            "tool_name": name,
            "display_name": name,
            "input": tool_input,
            "permission_suggestions": [],
            "blocked_path": None,
            "tool_use_id": tool_id,
        }
        emit({"type": "control_request", "request_id": request_id, "request": request})
        while request_id not in self.responses:
            if self.eof:
                self.responses[request_id] = {"subtype": "error", "error": "stdin closed"}
                break
            try:
                self.sleep(0.05)
            except Interrupted:
                # As the CLI: withdraw the question, reject the tool, end the turn.
                emit({"type": "control_cancel_request", "request_id": request_id})
                refusal = "The user doesn't want to proceed with this tool use."
                emit(self.tool_result(tool_id, refusal, True))
                raise Interrupted(" for tool use") from None
        self.permission_outcome(name, tool_id, tool_input, self.responses.pop(request_id))

    def permission_outcome(
        self, name: str, tool_id: str, tool_input: dict[str, Any], body: dict[str, Any]
    ) -> None:
        answer = body.get("response") or {}
        if body.get("subtype") == "success" and answer.get("behavior") == "allow":
            self.verdict = f"permission {name}: allow"
            emit(self.tool_result(tool_id, f"ran {name}", False))
        else:
            message = answer.get("message") or body.get("error") or "denied"
            self.verdict = f"permission {name}: deny ({message})"
            emit(self.tool_result(tool_id, message, True))
            self.denials.append(
                {"tool_name": name, "tool_use_id": tool_id, "tool_input": tool_input}
            )
        self.api_calls += 1

    def reply_text(self, text: str, names: dict[str, str]) -> str:
        parts = [f"echo: {_DIRECTIVE.sub('', text).strip()}".rstrip()]
        if "ask" in names:
            parts.append(self.verdict)
        if "spawn-child" in names:
            child = subprocess.Popen(["sleep", "300"])  # inherits our stdout and stderr
            parts.append(f"child pid {child.pid}")
            sys.stderr.write(f"fake agent: child pid {child.pid}\n")
            sys.stderr.flush()
        if "env" in names:
            name = names["env"]
            value = os.environ.get(name)
            parts.append(f"env {name}={value}" if value is not None else f"env {name} unset")
        if "history" in names:
            parts.append("history: " + " | ".join(self.history))
        return "\n".join(parts)

    def slow_deltas(self, pieces: list[str], slow: float, names: dict[str, str]) -> None:
        for count, piece in enumerate(pieces, 1):
            if slow:
                self.sleep(slow)
            else:
                self.check()
            emit_raw(self.text_delta_line(piece))
            if "gate" in names and count == 1:
                while not os.path.exists(names["gate"]):
                    self.sleep(0.02)
            if "crash" in names and count == 2:
                die("fake agent: crashing on purpose", code=3)
            if "hang" in names:
                hang()
        if "crash" in names:
            die("fake agent: crashing on purpose", code=3)

    def fast_deltas(self, count: int, slow: float) -> None:
        line = self.text_delta_line("x")
        batch = 1 if slow else 256
        for start in range(0, count, batch):
            if slow:
                self.sleep(slow)
            else:
                self.check()
            emit_raw(line * min(batch, count - start))


def flood_stderr(size: int) -> None:
    marker = b"FLOOD-END\n"
    body = max(size - len(marker), 0)
    chunk = (b"e" * 99 + b"\n") * 655  # ~64 KiB
    written = 0
    while written < body:
        part = chunk[: body - written]
        sys.stderr.buffer.write(part)
        written += len(part)
    sys.stderr.buffer.write(marker[-size:] if size < len(marker) else marker)
    sys.stderr.buffer.flush()


def die(message: str, code: int = 1) -> None:
    _OUT.flush()
    sys.stderr.write(message + "\n")
    sys.stderr.flush()
    os._exit(code)


def hang() -> None:
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    while True:
        time.sleep(3600)


def main() -> None:
    argv = sys.argv[1:]
    opts = parse_args(argv)
    if "--version" in opts or "-v" in opts:
        print(f"{VERSION} (Fake Agent)")
        return
    if os.environ.get("FAKE_AGENT_EXIT_AT_START") == "1":
        die("Invalid API key · Please run /login")
    FakeAgent(opts, argv).run()


if __name__ == "__main__":
    main()
