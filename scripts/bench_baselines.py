"""Baselines for scripts/bench.py: the things atomizerd is compared against, side by side.

- `serve_grpc_baseline`: a bare `grpc.aio` server on a Unix socket, no logic: a generic unary
  handler that returns the request bytes (the GetSession baseline) and a generic
  server-streaming handler that sends N payloads of S bytes (the events/s baseline). It runs
  in its own process (`bench.py --serve-baseline SOCKET`), as the daemon does.
- `DirectAgent`: the `claude` CLI driven directly over stdin, one persistent stream-json
  process (the warm-turn, pre-warmed-first-turn and spawned-for-the-message baselines).
- `one_shot`: one `claude -p` process per message with the prompt over stdin, as the original
  web backend did (the cold and follow-up baselines). The original read plain text, so its
  user saw nothing before the whole answer; here the output is stream-json with partial
  messages, so the baseline's first text is its first text delta (the best a one-shot process
  can do), and its exit is reported beside it.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import struct
import time
from collections.abc import AsyncIterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import grpc
import grpc.aio

BASELINE_SERVICE = "bench.Baseline"
ECHO_METHOD = f"/{BASELINE_SERVICE}/Echo"
STREAM_METHOD = f"/{BASELINE_SERVICE}/Stream"
_LINE_LIMIT = 64 * 1024 * 1024


# --- bare grpc.aio server ---------------------------------------------------------------------


def stream_request(count: int, size: int) -> bytes:
    return struct.pack("<II", count, size)


async def _echo(request: bytes, context: grpc.aio.ServicerContext[bytes, bytes]) -> bytes:
    return request


async def _stream(
    request: bytes, context: grpc.aio.ServicerContext[bytes, bytes]
) -> AsyncIterator[bytes]:
    count, size = struct.unpack("<II", request)
    payload = b"x" * size
    for _ in range(count):
        yield payload


async def serve_grpc_baseline(socket_path: str) -> None:
    """Serves until SIGTERM/SIGINT; prints "ready" once the socket accepts calls."""
    server = grpc.aio.server()
    handler = grpc.method_handlers_generic_handler(
        BASELINE_SERVICE,
        {
            "Echo": grpc.unary_unary_rpc_method_handler(_echo),
            "Stream": grpc.unary_stream_rpc_method_handler(_stream),
        },
    )
    server.add_generic_rpc_handlers((handler,))
    server.add_insecure_port(f"unix:{socket_path}")
    await server.start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    print("ready", flush=True)
    await stop.wait()
    await server.stop(0)


# --- the CLI driven directly ------------------------------------------------------------------


def user_line(text: str) -> bytes:
    msg = {
        "type": "user",
        "message": {"role": "user", "content": text},
        "parent_tool_use_id": None,
        "session_id": "",
    }
    return json.dumps(msg, ensure_ascii=False).encode() + b"\n"


def _kill_group(pid: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, signal.SIGKILL)


@dataclass
class TurnTiming:
    first_text: float  # seconds from writing the user line to the first text delta
    total: float  # ... to the `result` line
    cli_duration: float  # the CLI's own duration_ms of the turn (in its `result` line), s
    cli_ttft: float  # the CLI's own ttft_ms (reading our message -> first token), s


class DirectAgent:
    """One persistent `claude` stream-json process that we drive ourselves."""

    def __init__(
        self,
        proc: asyncio.subprocess.Process,
        spawned_at: float,
        initialize: Mapping[str, Any] | None = None,
    ) -> None:
        self.proc = proc
        self.spawned_at = spawned_at
        self.init_fields = dict(initialize or {})
        self._ids = 0

    @classmethod
    async def spawn(
        cls,
        argv: Sequence[str],
        env: Mapping[str, str],
        cwd: str,
        initialize: Mapping[str, Any] | None = None,
    ) -> DirectAgent:
        """Starts the process; `initialize`: the extra fields of its `initialize` request (the
        daemon's LaunchSpec.initialize, e.g. the system prompt)."""
        started = time.perf_counter()
        proc = await asyncio.create_subprocess_exec(
            *argv,
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.DEVNULL,
            env=dict(env),
            cwd=cwd,
            start_new_session=True,
            limit=_LINE_LIMIT,
        )
        return cls(proc, started, initialize)

    async def _write(self, data: bytes) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(data)
        await self.proc.stdin.drain()

    async def _line(self, deadline: float) -> bytes:
        assert self.proc.stdout is not None
        line = await asyncio.wait_for(
            self.proc.stdout.readline(), max(0.01, deadline - time.monotonic())
        )
        if not line:
            raise RuntimeError(f"claude (pid {self.proc.pid}) closed its stdout")
        return line

    async def initialize(self, timeout: float = 60.0) -> float:
        """The `initialize` control request, as the daemon sends it at spawn (its fields
        given at spawn); returns seconds from spawn to its answer."""
        self._ids += 1
        rid = f"bench_{self._ids}"
        request = {"subtype": "initialize", "hooks": None, **self.init_fields}
        req = {"type": "control_request", "request_id": rid, "request": request}
        await self._write(json.dumps(req).encode() + b"\n")
        deadline = time.monotonic() + timeout
        while True:
            line = await self._line(deadline)
            if b'"control_response"' in line and rid.encode() in line:
                return time.perf_counter() - self.spawned_at

    async def turn(self, text: str, timeout: float = 60.0) -> TurnTiming:
        deadline = time.monotonic() + timeout
        t0 = time.perf_counter()
        await self._write(user_line(text))
        first: float | None = None
        while True:
            line = await self._line(deadline)
            if first is None and b'"text_delta"' in line:
                first = time.perf_counter() - t0
            elif b'"type":"result"' in line:
                total = time.perf_counter() - t0
                result = json.loads(line)
                if result.get("type") != "result":
                    continue
                if first is None:
                    raise RuntimeError(f"turn ended without text: {line[:300]!r}")
                return TurnTiming(
                    first,
                    total,
                    float(result.get("duration_ms") or 0) / 1000,
                    float(result.get("ttft_ms") or 0) / 1000,
                )

    async def close(self) -> None:
        if self.proc.returncode is None and self.proc.stdin is not None:
            self.proc.stdin.close()
        try:
            await asyncio.wait_for(self.proc.wait(), 5.0)
        except TimeoutError:
            _kill_group(self.proc.pid)
            await self.proc.wait()
        _kill_group(self.proc.pid)  # anything it left in its group


ONE_SHOT_FLAGS = ("--output-format=stream-json", "--verbose", "--include-partial-messages")


async def one_shot(
    argv: Sequence[str], env: Mapping[str, str], cwd: str, prompt: str, timeout: float = 60.0
) -> tuple[float, float, str]:
    """One `claude -p` process for one message (prompt over stdin; `argv` should carry
    ONE_SHOT_FLAGS, so the reply streams as stream-json lines).

    Returns (seconds to the first text delta, seconds to exit, the output)."""
    t0 = time.perf_counter()
    proc = await asyncio.create_subprocess_exec(
        *argv,
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env=dict(env),
        cwd=cwd,
        start_new_session=True,
        limit=_LINE_LIMIT,
    )
    try:
        assert proc.stdin is not None and proc.stdout is not None and proc.stderr is not None
        proc.stdin.write(prompt.encode())
        await proc.stdin.drain()
        proc.stdin.close()
        first: float | None = None
        lines: list[bytes] = []
        async with asyncio.timeout(timeout):
            errors = asyncio.ensure_future(proc.stderr.read())
            while line := await proc.stdout.readline():
                if first is None and b'"text_delta"' in line:
                    first = time.perf_counter() - t0
                lines.append(line)
            await proc.wait()
            total = time.perf_counter() - t0
            err = await errors
        if proc.returncode != 0 or first is None:
            raise RuntimeError(
                f"claude -p exited {proc.returncode} (text seen: {first is not None}): "
                f"{err.decode(errors='replace')[-500:]}"
            )
        return first, total, b"".join(lines).decode(errors="replace")
    finally:
        if proc.returncode is None:
            _kill_group(proc.pid)
            await proc.wait()
        _kill_group(proc.pid)


def original_prompt(context: str, history: Sequence[tuple[str, str]], message: str) -> str:
    """The prompt the original built for every message: context, replayed history, message."""
    parts = [context]
    if history:
        lines = ["## Conversation so far"]
        for user, assistant in history:
            lines += [f"User: {user}", f"Assistant: {assistant}"]
        parts.append("\n".join(lines))
    parts.append(f"User: {message}\n\nRespond helpfully and concisely:")
    return "\n\n".join(parts)


def jsonable(value: Any) -> Any:
    """Floats rounded for the JSON report."""
    if isinstance(value, float):
        return round(value, 6)
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [jsonable(v) for v in value]
    return value
