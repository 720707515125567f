"""Agents that outlive the daemon: the daemon's side of the agent shim.

With `agent.survive_restart` on, every agent is started by a shim (`agents/shim.py`, a small
stdlib-only process in its own session, one per agent) that holds the agent's pipes. The
daemon talks to the shim over a private Unix socket in `<runtime_dir>/agents/` with the frames
of docs/shim-protocol.md, built and read by `shim_codec.py` as in the shim; `ShimLink` turns
that socket into an `AgentLink`, so an `AgentProcess` reads, writes and stops the agent exactly
as over its own pipes.

What the socket adds is what a restart needs: the shim keeps the agent's output since the
last `forget_before` (the start of the turn in progress) and the records the daemon left with
it (`record`: the turn's events), and replays both to the next daemon that attaches
(`Replay`). A daemon that goes away, planned or killed, just closes the socket: the agent keeps
running. A shim left alone past `agent.orphan_timeout` stops its agent and exits.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import secrets
import signal
import subprocess
import sys
from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import structlog

from atomizerd.agents import shim_codec as codec
from atomizerd.agents.process import AgentProcess, _find_program
from atomizerd.agents.procgroup import SetprivMissing, kill_group_if_same, process_start_time
from atomizerd.agents.vocabulary import AgentSpawnError, ProcessIdentity

log = structlog.get_logger("atomizerd.agents.shim_client")

SHIM_PATH = Path(__file__).with_name("shim.py")
# The largest frame payload taken from a shim: anything longer is a broken shim, not data.
_MAX_PAYLOAD = 64 * 1024 * 1024 + 16
_READY_TIMEOUT = 30.0


class ShimError(Exception):
    """The shim could not be started or reached, or broke the protocol."""


@dataclass
class Replay:
    """What a shim sent on attach, before anything live."""

    hello: dict[str, Any]
    records: list[bytes] = field(default_factory=list)  # `record` payloads, in order
    inputs: list[bytes] = field(default_factory=list)  # what was written to the agent's stdin

    @property
    def base(self) -> int:
        """Stream position of the first stdout byte replayed."""
        return int(self.hello.get("base") or 0)

    @property
    def lost(self) -> bool:
        """Output was dropped (over agent.spool_bytes): the turn cannot be rebuilt."""
        return bool(self.hello.get("lost"))

    @property
    def label(self) -> dict[str, Any]:
        label = self.hello.get("label")
        return label if isinstance(label, dict) else {}


class ShimLink:
    """One agent behind its shim, as an `AgentLink`."""

    durable = True

    def __init__(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        hello: dict[str, Any],
        socket_path: Path,
    ) -> None:
        self._reader = reader
        self._writer = writer
        self.socket_path = socket_path
        self.pid = int(hello["agent_pid"])
        self.shim = ProcessIdentity(
            int(hello["shim_pid"]), int(hello["shim_pid"]), process_start_time(hello["shim_pid"])
        )
        self.exited = asyncio.Event()
        self._returncode: int | None = None
        # Stdout replayed on attach, read before anything live; stderr frames met on the way.
        self._replayed: deque[bytes] = deque()
        self._stderr: asyncio.Queue[bytes] = asyncio.Queue()
        self._input_closed = False
        self._detached = False
        self._next_offset = int(hello.get("base") or 0)
        self._ended = False
        # An adopted shim may still be our child (started by this process before it exec'd
        # itself for a restart), which nobody else would reap: reaped here once it exits.
        self.reap = False
        # The shim's spool (its stdout file; the journal beside it): removed with the socket
        # by whoever ends the shim, here once the agent's end is known (`_end`).
        self.spool: Path | None = None
        self._shim_lost = False

    # --- AgentLink ---------------------------------------------------------------------------

    @property
    def returncode(self) -> int | None:
        return self._returncode

    async def read_stdout(self) -> bytes:
        """The next stdout bytes, read straight off the socket by the agent's own reader (no
        task or queue between: the shim adds one hop, not two)."""
        if self._replayed:
            return self._replayed.popleft()
        while not self._ended:
            try:
                kind, payload = await read_frame(self._reader)
            except Exception as e:  # whatever broke the connection, the agent's end is delivered
                self._lost(e)
                break
            if kind == codec.STDOUT:
                try:
                    return self._chunk(payload)
                except ShimError as e:
                    self._lost(e)
                    break
            if kind == codec.STDERR:
                self._stderr.put_nowait(payload)
            elif kind == codec.EXIT:
                self._returncode = codec.decode_exit(payload)
                break
        return await self._end()

    async def read_stderr(self) -> bytes:
        return await self._stderr.get()

    def write(self, data: bytes) -> None:
        self._send(codec.INPUT, data)

    async def drain(self) -> None:
        try:
            await self._writer.drain()
        except (ConnectionError, RuntimeError) as e:
            raise BrokenPipeError(str(e)) from e

    def input_closing(self) -> bool:
        return self._input_closed or self._writer.is_closing()

    def close_input(self) -> None:
        if not self._input_closed and not self._writer.is_closing():
            self._send(codec.END_INPUT)
        self._input_closed = True

    def signal_leader(self, sig: signal.Signals) -> None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(self.pid, sig)

    def close(self) -> None:
        self._writer.close()

    # --- what the shim adds ------------------------------------------------------------------

    def record(self, payload: bytes) -> None:
        """Leaves `payload` with the shim, replayed to the next daemon that attaches."""
        if not self._writer.is_closing():
            self._send(codec.JOURNAL, payload)

    def forget_before(self, offset: int) -> None:
        """The shim may drop the output before `offset` and every record so far."""
        if not self._writer.is_closing():
            self._send(codec.ACK, codec.encode_ack(offset))

    def set_label(self, label: Mapping[str, Any]) -> None:
        """What the next daemon needs to know whose agent this is."""
        if not self._writer.is_closing():
            self._send(codec.LABEL, json.dumps(dict(label)).encode())

    def detach(self) -> None:
        """Lets go of the agent without stopping it (a restart hands it over). Nothing is
        read from it any more and it never counts as exited here: whoever waits for its exit
        must be cancelled (AgentPool.hand_over). What is still buffered for the shim is sent
        as the socket closes (`drained` waits for it)."""
        self._detached = True
        self._writer.close()

    async def drained(self) -> None:
        """Returns once everything written to the shim has left this process."""
        with contextlib.suppress(ConnectionError, RuntimeError, OSError):
            await self._writer.wait_closed()

    def _send(self, kind: bytes, payload: bytes = b"") -> None:
        if self._writer.is_closing():
            raise BrokenPipeError("the agent's shim connection is closed")
        self._writer.write(codec.encode_frame(kind, payload))

    # --- reading -----------------------------------------------------------------------------

    def _lost(self, e: Exception) -> None:
        if not self._detached:
            # The shim is gone, and so is the agent (it dies with its shim).
            log.warning("agent shim connection lost", agent_pid=self.pid, error=str(e))
            self._returncode = -signal.SIGKILL
            self._shim_lost = True

    async def _end(self) -> bytes:
        """The end of the agent's output: its exit is known (or it was handed over: then
        nothing ends here, ever)."""
        self._input_closed = True
        if self._detached:
            await asyncio.get_running_loop().create_future()  # handed over: never ends here
        if not self._ended:
            self._ended = True
            self._stderr.put_nowait(b"")
            self.exited.set()
            self._writer.close()  # the shim exits once its daemon has let go
            self._end_shim()
            if self.reap:
                _reap_soon(self.shim.pid)
        return b""

    def _end_shim(self) -> None:
        """The agent has ended, and with it its shim's use: this daemon owns the shim's end.
        A shim whose connection broke is killed (it may be alive, broken); its socket and
        spool are removed now, not left for the shim to (it may be dead) or the next start."""
        if self._shim_lost and self.shim.start_time is not None:
            kill_group_if_same(self.shim.pgid, self.shim.start_time, signal.SIGKILL)
        if self.spool is not None:
            remove_shim_files(self.socket_path, self.spool)

    def _chunk(self, payload: bytes) -> bytes:
        offset, data = codec.decode_output(payload)
        if offset != self._next_offset:
            raise ShimError(f"stdout offset {offset} where {self._next_offset} was expected")
        self._next_offset += len(data)
        return data


async def read_frame(reader: asyncio.StreamReader) -> tuple[bytes, bytes]:
    kind, size = codec.decode_header(await reader.readexactly(codec.HEADER.size))
    if size > _MAX_PAYLOAD:
        raise ShimError(f"a frame of {size} bytes from the shim")
    return kind, await reader.readexactly(size)


async def attach(
    socket_path: Path, *, timeout: float, limit: int = 2**20
) -> tuple[ShimLink, Replay, list[bytes]]:
    """Connects to a shim and reads its replay: the link (not started), the replay, and the
    replayed stdout chunks (to feed the reader before anything live)."""
    writer: asyncio.StreamWriter | None = None
    try:
        async with asyncio.timeout(timeout):
            reader, writer = await asyncio.open_unix_connection(str(socket_path), limit=limit)
            kind, payload = await read_frame(reader)
            if kind != codec.HELLO:
                raise ShimError(f"the shim at {socket_path} did not say hello")
            hello = json.loads(payload)
            if hello.get("version") != codec.PROTOCOL_VERSION:
                raise ShimError(f"shim protocol version {hello.get('version')} is not ours")
            replay = Replay(hello)
            chunks: list[bytes] = []
            link = ShimLink(reader, writer, hello, socket_path)
            while True:
                kind, payload = await read_frame(reader)
                if kind == codec.REPLAYED:
                    break
                if kind == codec.JOURNAL:
                    replay.records.append(payload)
                elif kind == codec.INPUT:
                    replay.inputs.append(payload)
                elif kind == codec.STDOUT:
                    chunks.append(link._chunk(payload))
                elif kind == codec.STDERR:
                    link._stderr.put_nowait(payload)
                elif kind == codec.EXIT:  # exited before this daemon attached: read on to it
                    raise ShimError("an exit frame before the end of the replay")
    except (OSError, ValueError, asyncio.IncompleteReadError, TimeoutError, ShimError) as e:
        if writer is not None:
            writer.close()
        raise ShimError(f"cannot attach to the agent shim at {socket_path}: {e}") from e
    return link, replay, chunks


def adopted_process(
    link: ShimLink, replay: Replay, chunks: list[bytes], settings: ShimSettings
) -> AgentProcess:
    """An `AgentProcess` over an attached shim, its replayed output first in line."""
    link._replayed.extend(chunks)
    link.spool = settings.spools / f"{link.socket_path.stem}.out"
    start_time = replay.hello.get("agent_start_time")
    process = AgentProcess(
        link,
        max_line_bytes=settings.max_line_bytes,
        stderr_tail_bytes=settings.stderr_tail_bytes,
        mailbox_size=4096,
        write_timeout=settings.write_timeout,
        start_time=int(start_time) if start_time is not None else None,
        stdout_offset=replay.base,
    )
    return process


@dataclass(frozen=True)
class ShimSettings:
    """Where shims live and how long they wait for a daemon."""

    sockets: Path  # <runtime_dir>/agents
    spools: Path  # <state_dir>/agent-spool
    orphan_timeout: float
    spool_bytes: int
    stop_grace: float
    max_line_bytes: int
    stderr_tail_bytes: int
    write_timeout: float


async def spawn(
    settings: ShimSettings,
    argv: list[str],
    *,
    env: Mapping[str, str],
    cwd: str,
    umask: int | None,
) -> AgentProcess:
    """Starts a shim that starts the agent, and attaches to it."""
    name = secrets.token_hex(6)
    for folder in (settings.sockets, settings.spools):
        folder.mkdir(mode=0o700, parents=True, exist_ok=True)
    socket_path = settings.sockets / f"{name}.sock"
    try:
        program = _find_program(argv, env, cwd)
        command = [
            sys.executable,
            "-I",
            "-S",
            str(SHIM_PATH),
            "--socket",
            str(socket_path),
            "--spool",
            str(settings.spools / f"{name}.out"),
            "--orphan-timeout",
            f"{settings.orphan_timeout:g}",
            "--spool-bytes",
            str(settings.spool_bytes),
            "--stop-grace",
            f"{settings.stop_grace:g}",
            *(["--umask", f"{umask:o}"] if umask is not None else []),
            "--",
            program,
            *argv[1:],
        ]
        shim = await asyncio.create_subprocess_exec(
            *command,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            cwd=cwd,
            env=dict(env),
            start_new_session=True,  # not in the daemon's group: it outlives the daemon
            umask=0o077,
        )
    except (OSError, subprocess.SubprocessError, ValueError, SetprivMissing) as exc:
        raise AgentSpawnError(f"cannot start agent {argv[0] if argv else ''!r}: {exc}") from exc
    _reap_later(shim)
    try:
        process = await _attach_new(shim, socket_path, settings, argv)
    except BaseException:
        # Failed or abandoned (a shutdown cancels spawns): the shim is ended here, with its
        # agent and its files, not left to its orphan timeout.
        end_shim(shim.pid, socket_path, settings.spools / f"{name}.out")
        raise
    log.info("agent.spawned", argv0=argv[0], cwd=cwd, agent_pid=process.pid, shim=name)
    return process


async def _attach_new(
    shim: asyncio.subprocess.Process, socket_path: Path, settings: ShimSettings, argv: list[str]
) -> AgentProcess:
    """Reads the new shim's ready line and attaches to it."""
    assert shim.stdout is not None
    try:
        ready = json.loads(await asyncio.wait_for(shim.stdout.readline(), _READY_TIMEOUT) or b"{}")
    except (TimeoutError, ValueError) as e:
        raise AgentSpawnError(f"the agent's shim did not start: {e}") from e
    if "error" in ready or "agent_pid" not in ready:
        raise AgentSpawnError(
            f"cannot start agent {argv[0]!r}: {ready.get('error', 'the shim exited')}"
        )
    try:
        link, replay, chunks = await attach(socket_path, timeout=_READY_TIMEOUT)
    except ShimError as e:
        raise AgentSpawnError(str(e)) from e
    return adopted_process(link, replay, chunks, settings)


def end_shim(pid: int, socket_path: Path, spool: Path) -> None:
    """Ends a shim now (SIGKILL to its group; its agent dies with it, by its parent-death
    signal) and removes what it leaves: whoever ends a shim owns its files."""
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, signal.SIGKILL)
    remove_shim_files(socket_path, spool)


def remove_shim_files(socket_path: Path, spool: Path) -> None:
    """A shim's socket and its spool files (stdout and journal)."""
    for path in (socket_path, spool, spool.with_name(spool.name + ".journal")):
        with contextlib.suppress(OSError):
            path.unlink()


_reapers: set[asyncio.Task[Any]] = set()


def _reap_later(shim: asyncio.subprocess.Process) -> None:
    """The shim is our child while we run: reap it when it exits (no zombie)."""
    task = asyncio.ensure_future(shim.wait())
    _reapers.add(task)
    task.add_done_callback(_reapers.discard)


def reap_if_ours(pid: int) -> bool:
    """Reaps `pid` if it is an exited child of ours; False while it still runs. (Only for
    processes asyncio does not watch: shims a previous image of this process started.)"""
    try:
        done, _ = os.waitpid(pid, os.WNOHANG)
    except ChildProcessError:
        return True  # not our child (or reaped already): its parent reaps it
    return done != 0


def _reap_soon(pid: int, delay: float = 0.1) -> None:
    """Reaps `pid` once it exits (a shim exits right after its daemon let go; one whose agent
    is slow to stop may take its stop grace twice), checking less and less often."""
    if not reap_if_ours(pid) and delay < 60:
        asyncio.get_running_loop().call_later(delay, _reap_soon, pid, delay * 2)


def shim_sockets(folder: Path) -> list[Path]:
    """The sockets of the shims a previous daemon left (oldest first)."""
    try:
        found = [p for p in folder.iterdir() if p.suffix == ".sock"]
    except FileNotFoundError:
        return []
    return sorted(found, key=lambda p: p.stat().st_mtime if p.exists() else 0.0)
