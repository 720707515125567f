"""A fake Anthropic Messages API for driving the real ``claude`` CLI fully offline.

Standard library only. The server binds to 127.0.0.1 on an ephemeral port, records every
request it receives and answers ``POST /v1/messages`` (streaming SSE or plain JSON) with a reply
scripted by *directives* in the text of the user's latest message, so a test controls the "model"
from the message it sends to the agent.

Usage::

    with FakeMessagesAPI() as api:
        env = {**base_env, **api.env()}        # ANTHROPIC_BASE_URL etc. for the CLI
        ...                                    # run `claude` with env
        req = api.wait_for_requests(1, timeout=30)[-1]
        assert "hello" in req.prompt_text

Standalone (benchmarks, demos); prints its base URL, then serves until SIGINT/SIGTERM::

    python -m tests.support.fake_messages_api --port 0 [--quiet] [--dump-dir DIR]
        [--ttft-ms MS] [--tokens-per-s N]

Latency model
-------------
By default the "model" answers at once. ``FakeMessagesAPI(ttft_ms=800, tokens_per_s=60)``
(standalone: ``--ttft-ms 800 --tokens-per-s 60``) makes every model call behave like a real
model's: nothing of the reply (``message_start`` included; the HTTP headers go at once) is
sent before ``ttft_ms`` after the request arrived, the first content delta goes at that
time, and the output then streams at ``tokens_per_s``: each later delta is sent once the
tokens before it have been "generated" (a token is about 4 characters, as the usage estimate;
text, thinking and tool input alike), the end of the message once all of them have. A
non-streaming reply is sent whole after the time to first token plus all its tokens. 0 turns
either part off. Error answers and ``count_tokens`` are not delayed; ``[[slow:MS]]`` adds its
pause on top.

Which text is the prompt
------------------------
The request's ``messages`` can end with a ``system``-role note after the user's turn, and the
user's turn holds several text blocks: ``<system-reminder>`` notes, a
``[Request interrupted by user]`` note after an interrupt, and, after a turn that failed with an
API error, the failed turn's text too (the CLI merges it into the next user message). The
*prompt text* is therefore the **last** text block of the last ``user``-role message that is not a
CLI note (a block wholly wrapped in one XML-like tag, or an ``[Request interrupted ...]`` line).
Requests whose last user message holds only ``tool_result`` blocks are follow-ups of the turn
started by the nearest earlier prompt.

Directive language
------------------
Directives are ``[[name]]`` or ``[[name:argument]]`` anywhere in the prompt text.

Reply content (default: ``echo: <prompt text with the directives removed>``):

``[[reply:TEXT]]``        reply with exactly TEXT (TEXT cannot contain ``]]``).
``[[big:N]]``             reply with exactly N bytes of ASCII text (1 KiB deltas by default).
``[[thinking:TEXT]]``     a thinking block (thinking deltas, then a signature) before the text.
``[[tool:NAME {JSON}]]``  answer with a ``tool_use`` block calling tool NAME with the JSON input.
                          Several tool directives run one after another, one call per request.
                          When all have their ``tool_result``, the reply is one line per result:
                          ``tool_result NAME is_error=true|false: CONTENT``.
``[[plan:TEXT]]``         plan mode: write TEXT to the plan file the CLI's plan-mode reminder names
                          (a ``Write`` call), then call ``ExitPlanMode``; both run before the
                          ``[[tool:...]]`` calls, which are the plan's execution.
``[[stop:REASON]]``       the ``stop_reason`` of the final reply (default ``end_turn``).
``[[usage:IN:OUT]]``      report IN input and OUT output tokens (default: about bytes / 4).

Timing and shape:

``[[chunks:N]]``          send the text in N deltas (default: 32-character deltas).
``[[slow:MS]]``           sleep MS milliseconds before each delta.
``[[hang]]``              start the reply, send one text delta, then never finish: a ``ping``
                          event every 0.5 s until the client disconnects or the server stops.

Failures:

``[[error:CODE]]``        answer HTTP CODE with an Anthropic JSON error body (400, 401, 403, 404,
                          413, 429, 500, 529, ...); every request for this prompt fails.
``[[error:CODE:N]]``      fail only the first N requests for this prompt, then answer normally.
``[[no-retry]]``          send ``x-should-retry: false`` with the error: the CLI gives up at once
                          (without it, it retries 401/429/5xx/529 with backoff).
``[[sse-error]]``         stream one text delta, then an ``event: error`` (overloaded) and end
                          the stream. Streaming requests only: the CLI then retries without
                          streaming, and that request is answered normally.

Timing directives of a prompt also apply to the tool follow-up replies of its turn; the others
apply to the first reply only. Unknown directives are left in the text and logged.

Other endpoints: ``POST /v1/messages/count_tokens`` answers ``{"input_tokens": N}``; any other
path answers ``200 {}`` (HEAD: 200, no body). Every request is kept in
:attr:`FakeMessagesAPI.all_requests`; the model calls (``POST /v1/messages``) in
:attr:`FakeMessagesAPI.requests`.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import re
import signal
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import FrameType, TracebackType
from typing import Any, cast
from urllib.parse import urlsplit

__all__ = [
    "Directives",
    "FakeMessagesAPI",
    "RecordedRequest",
    "parse_directives",
    "prompt_text_of",
]

log = logging.getLogger("fake_messages_api")

HOST = "127.0.0.1"
DEFAULT_DELTA_CHARS = 32
BIG_DELTA_BYTES = 1024
HANG_PING_SECONDS = 0.5

_ERROR_TYPES: dict[int, str] = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    413: "request_too_large",
    429: "rate_limit_error",
    500: "api_error",
    529: "overloaded_error",
}

_DIRECTIVE_RE = re.compile(r"\[\[([a-z][a-z-]*)(?::(.*?))?\]\]", re.DOTALL)
_TOOL_START = "[[tool:"
_WRAPPED_NOTE_RE = re.compile(r"\s*<([A-Za-z][\w-]*)(?:\s[^>]*)?>.*</\1>\s*", re.DOTALL)
# Sent by the CLI at the start of the next user turn after an interrupt.
_INTERRUPTED_NOTE_RE = re.compile(r"\s*\[Request interrupted by user[^\]\n]*\]\s*")
# Added by the CLI after a user message with an image: where it saved the image.
_IMAGE_NOTE_RE = re.compile(r"\s*\[Image: source: [^\]\n]*\]\s*")


# --------------------------------------------------------------------------------------------
# Directives
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ToolCall:
    """One ``[[tool:NAME {JSON}]]`` directive."""

    name: str
    input: dict[str, Any]


@dataclass
class Directives:
    """The directives found in one prompt text, and the text with them removed."""

    clean_text: str = ""
    reply: str | None = None
    big: int | None = None
    thinking: str | None = None
    tools: list[ToolCall] = field(default_factory=list)
    stop_reason: str | None = None
    usage: tuple[int, int] | None = None
    chunks: int | None = None
    slow_ms: int = 0
    hang: bool = False
    error_status: int | None = None
    error_times: int | None = None
    no_retry: bool = False
    sse_error: bool = False
    plan: str | None = None
    unknown: list[str] = field(default_factory=list)


def _extract_tools(text: str, found: list[ToolCall], unknown: list[str]) -> str:
    """Remove ``[[tool:NAME {JSON}]]`` directives from text (JSON may itself hold ``]]``)."""
    out: list[str] = []
    pos = 0
    decoder = json.JSONDecoder()
    while True:
        start = text.find(_TOOL_START, pos)
        if start < 0:
            out.append(text[pos:])
            return "".join(out)
        out.append(text[pos:start])
        i = start + len(_TOOL_START)
        m = re.compile(r"\s*([A-Za-z0-9_.:-]+)\s*").match(text, i)
        try:
            if m is None:
                raise ValueError("missing tool name")
            name = m.group(1)
            j = m.end()
            tool_input: Any = {}
            if text.startswith("]]", j):
                end = j + 2
            else:
                tool_input, j = decoder.raw_decode(text, j)
                while j < len(text) and text[j].isspace():
                    j += 1
                if not text.startswith("]]", j) or not isinstance(tool_input, dict):
                    raise ValueError("tool input must be a JSON object followed by ]]")
                end = j + 2
        except ValueError as exc:
            close = text.find("]]", start)
            end = len(text) if close < 0 else close + 2
            unknown.append(f"bad tool directive {text[start:end]!r}: {exc}")
            pos = end
            continue
        found.append(ToolCall(name, cast(dict[str, Any], tool_input)))
        pos = end


def parse_directives(text: str) -> Directives:
    """Parse the directive language (see the module docstring) out of a prompt text."""
    d = Directives()
    rest = _extract_tools(text, d.tools, d.unknown)

    def apply(m: re.Match[str]) -> str:
        name, arg = m.group(1), m.group(2)
        try:
            if name == "reply":
                d.reply = arg or ""
            elif name == "big":
                d.big = int(arg or "0")
            elif name == "thinking":
                d.thinking = arg or "thinking"
            elif name == "stop":
                d.stop_reason = arg or "end_turn"
            elif name == "usage":
                a, b = (arg or "").split(":")
                d.usage = (int(a), int(b))
            elif name == "chunks":
                d.chunks = max(1, int(arg or "1"))
            elif name == "slow":
                d.slow_ms = max(0, int(arg or "0"))
            elif name == "hang":
                d.hang = True
            elif name == "error":
                parts = (arg or "529").split(":")
                d.error_status = int(parts[0])
                d.error_times = int(parts[1]) if len(parts) > 1 else None
            elif name == "no-retry":
                d.no_retry = True
            elif name == "sse-error":
                d.sse_error = True
            elif name == "plan":
                d.plan = arg or "the plan"
            else:
                d.unknown.append(m.group(0))
                return m.group(0)
        except ValueError:
            d.unknown.append(m.group(0))
        return ""

    rest = _DIRECTIVE_RE.sub(apply, rest)
    d.clean_text = re.sub(r"[ \t]{2,}", " ", rest).strip()
    return d


# --------------------------------------------------------------------------------------------
# Reading a Messages API request body
# --------------------------------------------------------------------------------------------


def _blocks(content: Any) -> list[dict[str, Any]]:
    """A message's content as a list of blocks (a string content is one text block)."""
    if isinstance(content, str):
        return [{"type": "text", "text": content}]
    if isinstance(content, list):
        return [b for b in content if isinstance(b, dict) and isinstance(b.get("type"), str)]
    return []


def _is_wrapped_note(text: str) -> bool:
    """A block the CLI adds around the user's text (not the user's own words)."""
    return (
        _WRAPPED_NOTE_RE.fullmatch(text) is not None
        or _INTERRUPTED_NOTE_RE.fullmatch(text) is not None
        or _IMAGE_NOTE_RE.fullmatch(text) is not None
    )


def _user_texts(message: dict[str, Any]) -> list[str]:
    """The user's own text blocks of a user message (notes such as <system-reminder> left out)."""
    texts = [str(b.get("text", "")) for b in _blocks(message.get("content")) if b["type"] == "text"]
    return [t for t in texts if not _is_wrapped_note(t)]


def _last_user_index(messages: list[Any]) -> int | None:
    for i in range(len(messages) - 1, -1, -1):
        m = messages[i]
        if isinstance(m, dict) and m.get("role") == "user":
            return i
    return None


def _prompt_index(messages: list[Any]) -> int | None:
    """Index of the user message that started the current turn (has the user's own text)."""
    last = _last_user_index(messages)
    if last is None:
        return None
    for i in range(last, -1, -1):
        m = messages[i]
        if not isinstance(m, dict) or m.get("role") != "user":
            continue
        blocks = _blocks(m.get("content"))
        if any(b["type"] == "tool_result" for b in blocks) and not _user_texts(m):
            continue  # tool results of the turn in progress
        return i
    return last


def prompt_text_of(body: Any) -> str:
    """The text of the user's turn that the request answers (see the module docstring)."""
    if not isinstance(body, dict):
        return ""
    messages = body.get("messages")
    if not isinstance(messages, list):
        return ""
    i = _prompt_index(messages)
    if i is None:
        return ""
    texts = _user_texts(messages[i])
    if not texts:  # only notes: fall back to the last text block of the message
        blocks = _blocks(messages[i].get("content"))
        texts = [str(b.get("text", "")) for b in blocks if b["type"] == "text"]
    # The last block: after a turn that failed with an API error the CLI merges the failed
    # turn's text and the new one into one user message, so earlier blocks can be stale.
    return texts[-1] if texts else ""


def _tool_result_text(block: dict[str, Any]) -> str:
    content = block.get("content")
    if isinstance(content, str):
        return content
    parts: list[str] = []
    for b in _blocks(content):
        if b["type"] == "text":
            parts.append(str(b.get("text", "")))
        else:
            parts.append(f"[{b['type']}]")
    return "\n".join(parts)


@dataclass(frozen=True)
class RecordedRequest:
    """One HTTP request the fake received."""

    method: str
    path: str
    query: str
    headers: dict[str, str]
    body: Any
    raw_body: bytes
    received_at: float

    @property
    def is_messages(self) -> bool:
        """Whether this is a model call (``POST /v1/messages``)."""
        return self.method == "POST" and self.path == "/v1/messages"

    @property
    def data(self) -> dict[str, Any]:
        """The JSON body as a dict (empty if the body was not a JSON object)."""
        return self.body if isinstance(self.body, dict) else {}

    @property
    def stream(self) -> bool:
        return bool(self.data.get("stream"))

    @property
    def model(self) -> str:
        return str(self.data.get("model", ""))

    @property
    def system(self) -> Any:
        """The ``system`` field as sent: a string, a list of blocks, or None."""
        return self.data.get("system")

    @property
    def system_text(self) -> str:
        """All system prompt text, blocks joined with newlines."""
        return "\n".join(str(b.get("text", "")) for b in _blocks(self.system))

    @property
    def messages(self) -> list[dict[str, Any]]:
        msgs = self.data.get("messages")
        return [m for m in msgs if isinstance(m, dict)] if isinstance(msgs, list) else []

    @property
    def prompt_text(self) -> str:
        """The user's text of the turn this request answers (directives still in)."""
        return prompt_text_of(self.body)

    @property
    def tool_results(self) -> list[dict[str, Any]]:
        """Every ``tool_result`` block in the request, oldest first."""
        return [
            b
            for m in self.messages
            if m.get("role") == "user"
            for b in _blocks(m.get("content"))
            if b["type"] == "tool_result"
        ]

    def texts(self, role: str) -> list[str]:
        """Every text block of messages with the given role, oldest first."""
        return [
            str(b.get("text", ""))
            for m in self.messages
            if m.get("role") == role
            for b in _blocks(m.get("content"))
            if b["type"] == "text"
        ]


# --------------------------------------------------------------------------------------------
# Planning a reply
# --------------------------------------------------------------------------------------------


class _Pacer:
    """When each part of one reply may go out under the API's latency model."""

    def __init__(self, api: FakeMessagesAPI, started: float) -> None:
        self.api = api
        self.first_at = started + api.ttft_ms / 1000  # time.monotonic()
        self.tokens = 0.0  # output tokens sent so far

    def due(self) -> float:
        rate = self.api.tokens_per_s
        return self.first_at + (self.tokens / rate if rate > 0 else 0.0)

    def wait(self, tokens_next: float = 0.0) -> None:
        """Waits until the next part may be sent; it carries `tokens_next` tokens."""
        left = self.due() - time.monotonic()
        if left > 0 and self.api._stopping.wait(left):
            raise _ClientGone("server stopping")
        self.tokens += tokens_next


def _tokens(text: str) -> float:
    return len(text) / 4


@dataclass
class _Plan:
    """What to answer to one model call."""

    error_status: int | None = None
    no_retry: bool = False
    thinking: str | None = None
    text: str = ""
    tool: ToolCall | None = None
    stop_reason: str = "end_turn"
    usage: tuple[int, int] | None = None
    chunks: int | None = None
    delta_chars: int = DEFAULT_DELTA_CHARS
    slow_ms: int = 0
    hang: bool = False
    sse_error: bool = False


# Where the CLI's plan-mode reminder tells the model to keep its plan.
_PLAN_FILE_RE = re.compile(r"plan[^\n]{0,60}? at (/[^\s\"'`]+?\.md)")


def _plan_calls(rec: RecordedRequest, text: str) -> list[ToolCall]:
    """The calls of ``[[plan:TEXT]]``: the plan written to its file, then ExitPlanMode."""
    found = _PLAN_FILE_RE.search(json.dumps(rec.body, ensure_ascii=False))
    if found is None:
        log.warning("[[plan]] without a plan-mode reminder naming the plan file")
        return [ToolCall("ExitPlanMode", {"plan": text})]
    return [
        ToolCall("Write", {"file_path": found.group(1), "content": text}),
        ToolCall("ExitPlanMode", {}),
    ]


def _estimate_tokens(n_chars: int) -> int:
    return max(1, math.ceil(n_chars / 4))


def _big_text(n: int) -> str:
    unit = "0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ-_\n"
    return (unit * (n // len(unit) + 1))[:n]


# --------------------------------------------------------------------------------------------
# HTTP
# --------------------------------------------------------------------------------------------


class _ClientGone(Exception):
    pass


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True
    api: FakeMessagesAPI


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "FakeMessagesAPI/1"

    @property
    def api(self) -> FakeMessagesAPI:
        return cast(_Server, self.server).api

    def log_message(self, format: str, *args: Any) -> None:
        log.debug("%s " + format, self.address_string(), *args)

    # -- request ---------------------------------------------------------------------------

    def _read_body(self) -> bytes:
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            parts: list[bytes] = []
            while True:
                size_line = self.rfile.readline()
                size = int(size_line.split(b";")[0].strip() or b"0", 16)
                if size == 0:
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                        pass
                    return b"".join(parts)
                parts.append(self.rfile.read(size))
                self.rfile.readline()
        length = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(length) if length > 0 else b""

    def _record(self) -> RecordedRequest:
        raw = self._read_body()
        body: Any = None
        if raw:
            try:
                body = json.loads(raw)
            except ValueError:
                body = None
        url = urlsplit(self.path)
        rec = RecordedRequest(
            method=self.command,
            path=url.path,
            query=url.query,
            headers={k.lower(): v for k, v in self.headers.items()},
            body=body,
            raw_body=raw,
            received_at=time.time(),
        )
        self.api._record(rec)
        return rec

    # -- responses -------------------------------------------------------------------------

    def _send_json(self, status: int, payload: Any, *, head: bool = False) -> None:
        data = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.send_header("request-id", self.api._next_id("req_fake_"))
        self.end_headers()
        if not head:
            self.wfile.write(data)
            self.wfile.flush()

    def _send_error_body(self, status: int, *, no_retry: bool = False) -> None:
        etype = _ERROR_TYPES.get(status, "api_error")
        payload = {
            "type": "error",
            "error": {"type": etype, "message": f"fake {etype} ({status})"},
        }
        self.send_response(status)
        data = json.dumps(payload).encode()
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.send_header("request-id", self.api._next_id("req_fake_"))
        if no_retry:
            self.send_header("x-should-retry", "false")
        self.end_headers()
        self.wfile.write(data)
        self.wfile.flush()

    def do_HEAD(self) -> None:
        self._record()
        self._send_json(200, {}, head=True)

    def do_GET(self) -> None:
        self._record()
        self._send_json(200, {})

    def do_DELETE(self) -> None:
        self._record()
        self._send_json(200, {})

    def do_PUT(self) -> None:
        self._record()
        self._send_json(200, {})

    def do_POST(self) -> None:
        started = time.monotonic()
        rec = self._record()
        if rec.path == "/v1/messages/count_tokens":
            n = _estimate_tokens(len(rec.raw_body))
            self._send_json(200, {"input_tokens": n})
            return
        if rec.path != "/v1/messages":
            self._send_json(200, {})
            return
        if not isinstance(rec.body, dict):
            self._send_error_body(400)
            return
        plan = self.api._plan(rec)
        if plan.error_status is not None:
            self._send_error_body(plan.error_status, no_retry=plan.no_retry)
            return
        if rec.stream:
            try:
                self._stream(rec, plan, started)
            except (_ClientGone, OSError):
                log.info("client went away during a streamed reply")
                self.close_connection = True
        else:
            message = self._whole_message(rec, plan)
            out = plan.text + (plan.thinking or "")
            if plan.tool is not None:
                out += json.dumps(plan.tool.input, ensure_ascii=False)
            pacer = _Pacer(self.api, started)
            try:
                pacer.wait(_tokens(out))  # the time to first token
                pacer.wait()  # every token generated
            except _ClientGone:
                self.close_connection = True
                return
            self._send_json(200, message)

    # -- message content -------------------------------------------------------------------

    def _usage(self, rec: RecordedRequest, plan: _Plan) -> tuple[int, int]:
        if plan.usage is not None:
            return plan.usage
        out_chars = len(plan.text) + len(plan.thinking or "")
        if plan.tool is not None:
            out_chars += len(json.dumps(plan.tool.input))
        return _estimate_tokens(len(rec.raw_body)), _estimate_tokens(out_chars)

    def _whole_message(self, rec: RecordedRequest, plan: _Plan) -> dict[str, Any]:
        content: list[dict[str, Any]] = []
        if plan.thinking is not None:
            content.append(
                {"type": "thinking", "thinking": plan.thinking, "signature": "fake-signature"}
            )
        if plan.text or plan.tool is None:
            content.append({"type": "text", "text": plan.text})
        if plan.tool is not None:
            content.append(
                {
                    "type": "tool_use",
                    "id": self.api._next_id("toolu_fake_"),
                    "name": plan.tool.name,
                    "input": plan.tool.input,
                }
            )
        n_in, n_out = self._usage(rec, plan)
        return {
            "id": self.api._next_id("msg_fake_"),
            "type": "message",
            "role": "assistant",
            "model": rec.model or "claude-fake",
            "content": content,
            "stop_reason": plan.stop_reason,
            "stop_sequence": None,
            "usage": {
                "input_tokens": n_in,
                "output_tokens": n_out,
                "cache_creation_input_tokens": 0,
                "cache_read_input_tokens": 0,
            },
        }

    # -- SSE -------------------------------------------------------------------------------

    def _write_chunk(self, data: bytes) -> None:
        if self.api._stopping.is_set():
            raise _ClientGone("server stopping")
        try:
            self.wfile.write(b"%x\r\n%s\r\n" % (len(data), data))
            self.wfile.flush()
        except OSError as exc:
            raise _ClientGone(str(exc)) from exc

    def _event(self, name: str, payload: dict[str, Any]) -> None:
        payload = {"type": name, **payload}
        data = json.dumps(payload, ensure_ascii=False)
        self._write_chunk(f"event: {name}\ndata: {data}\n\n".encode())

    def _pause(self, plan: _Plan, pacer: _Pacer | None = None, tokens: float = 0.0) -> None:
        if plan.slow_ms > 0 and self.api._stopping.wait(plan.slow_ms / 1000):
            raise _ClientGone("server stopping")
        if pacer is not None:
            pacer.wait(tokens)

    def _pieces(self, text: str, plan: _Plan) -> Iterator[str]:
        if not text:
            return
        if plan.chunks is not None:
            size = max(1, math.ceil(len(text) / plan.chunks))
        else:
            size = plan.delta_chars
        for i in range(0, len(text), size):
            yield text[i : i + size]

    def _stream(self, rec: RecordedRequest, plan: _Plan, started: float) -> None:
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream; charset=utf-8")
        self.send_header("Cache-Control", "no-cache")
        self.send_header("Transfer-Encoding", "chunked")
        self.send_header("request-id", self.api._next_id("req_fake_"))
        self.end_headers()
        pacer = _Pacer(self.api, started)
        pacer.wait()  # the time to first token
        n_in, n_out = self._usage(rec, plan)
        self._event(
            "message_start",
            {
                "message": {
                    "id": self.api._next_id("msg_fake_"),
                    "type": "message",
                    "role": "assistant",
                    "model": rec.model or "claude-fake",
                    "content": [],
                    "stop_reason": None,
                    "stop_sequence": None,
                    "usage": {
                        "input_tokens": n_in,
                        "output_tokens": 1,
                        "cache_creation_input_tokens": 0,
                        "cache_read_input_tokens": 0,
                    },
                }
            },
        )
        index = 0
        if plan.thinking is not None:
            self._event(
                "content_block_start",
                {"index": index, "content_block": {"type": "thinking", "thinking": ""}},
            )
            for piece in self._pieces(plan.thinking, plan):
                self._pause(plan, pacer, _tokens(piece))
                self._event(
                    "content_block_delta",
                    {"index": index, "delta": {"type": "thinking_delta", "thinking": piece}},
                )
            self._event(
                "content_block_delta",
                {"index": index, "delta": {"type": "signature_delta", "signature": "fake-sig"}},
            )
            self._event("content_block_stop", {"index": index})
            index += 1
        if plan.text or plan.tool is None or plan.hang:
            self._event(
                "content_block_start",
                {"index": index, "content_block": {"type": "text", "text": ""}},
            )
            if plan.hang:
                pacer.wait()
                self._event(
                    "content_block_delta",
                    {"index": index, "delta": {"type": "text_delta", "text": plan.text}},
                )
                while not self.api._stopping.wait(HANG_PING_SECONDS):
                    self._event("ping", {})
                raise _ClientGone("server stopping")
            for piece in self._pieces(plan.text, plan):
                self._pause(plan, pacer, _tokens(piece))
                self._event(
                    "content_block_delta",
                    {"index": index, "delta": {"type": "text_delta", "text": piece}},
                )
                if plan.sse_error:
                    self._event(
                        "error",
                        {"error": {"type": "overloaded_error", "message": "fake overloaded"}},
                    )
                    self._write_chunk(b"")
                    self.close_connection = True
                    return
            self._event("content_block_stop", {"index": index})
            index += 1
        if plan.tool is not None:
            self._event(
                "content_block_start",
                {
                    "index": index,
                    "content_block": {
                        "type": "tool_use",
                        "id": self.api._next_id("toolu_fake_"),
                        "name": plan.tool.name,
                        "input": {},
                    },
                },
            )
            partial = json.dumps(plan.tool.input, ensure_ascii=False)
            self._pause(plan, pacer, _tokens(partial))
            self._event(
                "content_block_delta",
                {
                    "index": index,
                    "delta": {"type": "input_json_delta", "partial_json": partial},
                },
            )
            self._event("content_block_stop", {"index": index})
            index += 1
        pacer.wait()  # every token generated
        self._event(
            "message_delta",
            {
                "delta": {"stop_reason": plan.stop_reason, "stop_sequence": None},
                "usage": {"output_tokens": n_out},
            },
        )
        self._event("message_stop", {})
        self._write_chunk(b"")  # end of the chunked body


# --------------------------------------------------------------------------------------------
# Public API
# --------------------------------------------------------------------------------------------


class FakeMessagesAPI:
    """A scripted Anthropic Messages API on 127.0.0.1, served from a background thread."""

    def __init__(self, port: int = 0, *, ttft_ms: float = 0.0, tokens_per_s: float = 0.0) -> None:
        """`ttft_ms`, `tokens_per_s`: the latency model (see the module docstring); 0 (the
        default) answers at once."""
        if ttft_ms < 0 or tokens_per_s < 0:
            raise ValueError("ttft_ms and tokens_per_s must not be negative")
        self.ttft_ms = float(ttft_ms)
        self.tokens_per_s = float(tokens_per_s)
        self._requested_port = port
        self._lock = threading.Lock()
        self._cond = threading.Condition(self._lock)
        self._all: list[RecordedRequest] = []
        self._ids = 0
        self._error_counts: dict[str, int] = {}
        self._stopping = threading.Event()
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None

    # -- lifecycle -------------------------------------------------------------------------

    def start(self) -> FakeMessagesAPI:
        if self._server is not None:
            return self
        server = _Server((HOST, self._requested_port), _Handler)
        server.api = self
        self._server = server
        self._stopping.clear()
        self._thread = threading.Thread(
            target=server.serve_forever,
            kwargs={"poll_interval": 0.1},
            name="fake-messages-api",
            daemon=True,
        )
        self._thread.start()
        log.info("fake Messages API listening on %s", self.base_url)
        return self

    def stop(self) -> None:
        server, self._server = self._server, None
        if server is None:
            return
        self._stopping.set()
        server.shutdown()
        server.server_close()
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None

    def __enter__(self) -> FakeMessagesAPI:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    # -- addresses -------------------------------------------------------------------------

    @property
    def port(self) -> int:
        if self._server is None:
            raise RuntimeError("FakeMessagesAPI is not running")
        return int(self._server.server_address[1])

    @property
    def base_url(self) -> str:
        return f"http://{HOST}:{self.port}"

    def env(self) -> dict[str, str]:
        """Environment variables that point the claude CLI at this server, offline."""
        return {
            "ANTHROPIC_BASE_URL": self.base_url,
            "ANTHROPIC_API_KEY": "sk-ant-fake-key",
            "CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC": "1",
            "CLAUDE_CODE_MAX_RETRIES": "1",
        }

    # -- recorded requests -----------------------------------------------------------------

    @property
    def all_requests(self) -> list[RecordedRequest]:
        """Every request received (any method and path), oldest first."""
        with self._lock:
            return list(self._all)

    @property
    def requests(self) -> list[RecordedRequest]:
        """The model calls (``POST /v1/messages``) received, oldest first."""
        with self._lock:
            return [r for r in self._all if r.is_messages]

    def clear(self) -> None:
        with self._lock:
            self._all.clear()

    def wait_for_requests(self, n: int, timeout: float = 30.0) -> list[RecordedRequest]:
        """Wait until at least n model calls arrived; return them. Raises TimeoutError."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                got = [r for r in self._all if r.is_messages]
                if len(got) >= n:
                    return got
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError(f"got {len(got)} of {n} model requests in {timeout}s")
                self._cond.wait(left)

    # -- internals used by the handler -----------------------------------------------------

    def _record(self, rec: RecordedRequest) -> None:
        with self._cond:
            self._all.append(rec)
            self._cond.notify_all()
        if rec.is_messages:
            log.info(
                "%s %s stream=%s model=%s messages=%d prompt=%r",
                rec.method,
                rec.path,
                rec.stream,
                rec.model,
                len(rec.messages),
                rec.prompt_text[:120],
            )
        else:
            query = f"?{rec.query}" if rec.query else ""
            log.info("%s %s%s (%d bytes)", rec.method, rec.path, query, len(rec.raw_body))

    def _next_id(self, prefix: str) -> str:
        with self._lock:
            self._ids += 1
            return f"{prefix}{self._ids:08d}"

    def _plan(self, rec: RecordedRequest) -> _Plan:
        messages: list[Any] = rec.messages
        pi = _prompt_index(messages)
        prompt = rec.prompt_text
        d = parse_directives(prompt)
        if d.plan is not None:
            d.tools[:0] = _plan_calls(rec, d.plan)
        plan = _Plan(chunks=d.chunks, slow_ms=d.slow_ms)
        if d.unknown:
            log.warning("unknown or malformed directives: %s", d.unknown)

        after = messages[pi + 1 :] if pi is not None else []
        rounds = sum(1 for m in after if m.get("role") == "assistant")
        if pi is not None and rounds > 0:
            # A follow-up request of the same turn (tool results came back).
            if rounds < len(d.tools):
                plan.tool = d.tools[rounds]
                plan.stop_reason = "tool_use"
                return plan
            names: dict[str, str] = {}
            for m in after:
                for b in _blocks(m.get("content")):
                    if b["type"] == "tool_use":
                        names[str(b.get("id"))] = str(b.get("name"))
            lines = []
            for m in after:
                if m.get("role") != "user":
                    continue
                for b in _blocks(m.get("content")):
                    if b["type"] == "tool_result":
                        name = names.get(str(b.get("tool_use_id")), "?")
                        err = "true" if b.get("is_error") else "false"
                        lines.append(f"tool_result {name} is_error={err}: {_tool_result_text(b)}")
            plan.text = "\n".join(lines) if lines else "echo: (follow-up without tool results)"
            return plan

        if d.error_status is not None:
            key = f"{d.error_status}:{d.error_times}:{prompt}"
            with self._lock:
                seen = self._error_counts.get(key, 0)
                self._error_counts[key] = seen + 1
            if d.error_times is None or seen < d.error_times:
                plan.error_status = d.error_status
                plan.no_retry = d.no_retry
                return plan
        plan.thinking = d.thinking
        plan.usage = d.usage
        plan.hang = d.hang
        plan.sse_error = d.sse_error
        if d.tools:
            plan.tool = d.tools[0]
            plan.stop_reason = "tool_use"
            plan.text = d.reply or ""
            return plan
        if d.big is not None:
            plan.text = _big_text(d.big)
            plan.delta_chars = BIG_DELTA_BYTES
        elif d.reply is not None:
            plan.text = d.reply
        elif d.hang:
            plan.text = "hanging…"
        else:
            plan.text = f"echo: {d.clean_text}"
        plan.stop_reason = d.stop_reason or "end_turn"
        return plan


# --------------------------------------------------------------------------------------------
# Standalone
# --------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m tests.support.fake_messages_api",
        description="Serve a scripted fake Anthropic Messages API on 127.0.0.1 until killed.",
    )
    parser.add_argument("--port", type=int, default=0, help="port (0: an ephemeral one)")
    parser.add_argument("-q", "--quiet", action="store_true", help="log warnings only")
    parser.add_argument(
        "--dump-dir", default=None, help="write every request body as JSON into this directory"
    )
    parser.add_argument(
        "--ttft-ms", type=float, default=0.0, help="time to first token of every reply (ms)"
    )
    parser.add_argument(
        "--tokens-per-s", type=float, default=0.0, help="output rate after it (0: at once)"
    )
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.WARNING if args.quiet else logging.INFO,
        format="%(asctime)s %(name)s %(message)s",
        stream=sys.stderr,
    )
    api = FakeMessagesAPI(port=args.port, ttft_ms=args.ttft_ms, tokens_per_s=args.tokens_per_s)
    done = threading.Event()

    def on_signal(signum: int, frame: FrameType | None) -> None:
        done.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    with api:
        print(api.base_url, flush=True)
        dumped = 0
        while not done.wait(0.2):
            if args.dump_dir:
                reqs = api.all_requests
                for i in range(dumped, len(reqs)):
                    r = reqs[i]
                    path = f"{args.dump_dir}/{i:04d}-{r.method}{r.path.replace('/', '_')}.json"
                    with open(path, "w", encoding="utf-8") as f:
                        json.dump(
                            {"headers": r.headers, "query": r.query, "body": r.body},
                            f,
                            indent=1,
                            ensure_ascii=False,
                        )
                dumped = len(reqs)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
