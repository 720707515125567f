"""One live agent process: spawn, line-framed stdout, stderr tail, control requests, stop.

Spawning. The agent runs in a new session (so its own process group: stopping it signals the
group, grandchildren included) and gets SIGKILL from the kernel when its parent dies, even by
SIGKILL (the daemon, for an agent on its own pipes; its shim, for one that outlives the daemon,
agents/shim.py): its argv is prefixed with `setpriv --pdeathsig KILL --`, which sets the signal and
execs the agent (so the pid is the agent's). Nothing of ours runs between fork and exec: no
`preexec_fn`, which crashed children of the gRPC-threaded daemon (see
`procgroup.pdeathsig_argv`, also for why agents must be spawned from the event loop's
thread); `start_new_session` is done by subprocess in C. The program is looked up before the
spawn (in the agent's PATH, or relative to its cwd), so a missing one is still an
AgentSpawnError and not a setpriv exit status. The agent's pid, pgid and start time
(`identity`) let a later daemon kill leftovers with `kill_group_if_same` without hitting a
reused pid.

Reading. Stdout is read in chunks and framed into whole lines by `LineSplitter` (multi-byte
characters split across reads are only decoded once the line is complete); each line is decoded
as UTF-8 (invalid bytes replaced and logged), parsed, and delivered in order through a bounded
mailbox: `receive()` / `async for`. A line over `max_line_bytes` is dropped and delivered as
`LineTooLong` — the turn can fail clearly, the process is still read. A line that is not JSON is
logged and skipped. The process's end is delivered last as `AgentExited`, and again on every
later `receive()`. Stderr is drained concurrently into a ring of its last bytes, so a chatty
agent never blocks on a full pipe.

Control requests we send (`initialize`, `interrupt`) are answered by `control_response` lines
that the reader routes to the waiting caller instead of the mailbox. The mailbox is bounded for
backpressure: whoever owns the process must keep receiving, or the reader stops reading, the
agent blocks on its stdout, and control answers stop arriving too.

Writing. A line written to stdin waits until the pipe takes it, at most `write_timeout`
seconds: an agent that stops reading (hung, stopped) fills the pipe, and the write then fails
with `WriteTimeout` instead of blocking its caller forever. Part of the line may already be in
the pipe, so the input is unusable afterwards: later writes fail at once, and the owner should
stop the process.

Exit. asyncio's `Process.wait()` also waits for the pipes to close, which an orphaned grandchild
holding the agent's stdout can postpone forever, so exit is observed from the protocol's
`process_exited` callback instead; if stdout is still open a little after the agent exited, the
leftover group is killed so the reader reaches end of file.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import os
import secrets
import shutil
import signal
import subprocess
from collections.abc import AsyncIterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import structlog

from atomizerd.agents import protocol
from atomizerd.agents.lines import LineSplitter, Overflow
from atomizerd.agents.links import READ_CHUNK, AgentLink, PipeLink, PipeProtocol
from atomizerd.agents.mailbox import Entry, Mailbox, StderrTail
from atomizerd.agents.procgroup import (
    SetprivMissing,
    kill_group_if_same,
    kill_group_if_same_async,
    pdeathsig_argv,
    process_start_time,
)
from atomizerd.agents.protocol import ControlResponse, ProtocolError
from atomizerd.agents.vocabulary import (
    AgentError,
    AgentExited,
    AgentItem,
    AgentSpawnError,
    ControlError,
    ControlTimeout,
    LineTooLong,
    ProcessIdentity,
    WriteTimeout,
)

__all__ = [
    "DEFAULT_MAX_LINE_BYTES",
    "DEFAULT_STDERR_TAIL_BYTES",
    "DEFAULT_WRITE_TIMEOUT",
    "AgentProcess",
    "kill_group_if_same",
    "probe_version",
    "process_start_time",
]

log = structlog.get_logger()

DEFAULT_MAX_LINE_BYTES = 32 * 1024 * 1024
DEFAULT_STDERR_TAIL_BYTES = 64 * 1024
DEFAULT_MAILBOX_SIZE = 4096
DEFAULT_WRITE_TIMEOUT = 10.0  # agent.write_timeout
# After the agent exits: how long its pipes may stay open (held by an orphaned grandchild)
# before the leftovers are killed, and how long to wait for the output to be delivered.
_EXIT_DRAIN_GRACE = 2.0
_KILL_WAIT = 5.0


class AgentProcess:
    """One running agent. Create it with `await AgentProcess.spawn(...)` (its own pipes) or
    over a shim (`agents/shim_client.py`)."""

    def __init__(
        self,
        link: AgentLink,
        *,
        max_line_bytes: int,
        stderr_tail_bytes: int,
        mailbox_size: int,
        write_timeout: float | None,
        start_time: int | None = None,
        stdout_offset: int = 0,
    ) -> None:
        self._link = link
        self.pid: int = link.pid
        self.pgid: int = self.pid  # a new session: the agent leads its own group
        self.start_time = start_time if start_time is not None else process_start_time(self.pid)
        self._log = log.bind(agent_pid=self.pid)
        self._splitter = LineSplitter(max_line_bytes, stdout_offset)
        # Where the agent's output stands (see `boundary`): messages parsed, the index just
        # past the last one received, and the last line end nothing unreceived precedes.
        self._parsed = 0
        self.received = 0
        self._boundary = (stdout_offset, 0)
        self.helper: ProcessIdentity | None = getattr(link, "shim", None)
        self._stderr = StderrTail(stderr_tail_bytes)
        self._mailbox = Mailbox(mailbox_size)
        self._pending: dict[str, asyncio.Future[dict[str, Any]]] = {}
        self._ids = itertools.count(1)
        self._stdout_eof = asyncio.Event()
        self._stop_task: asyncio.Task[int | None] | None = None
        self.write_timeout = write_timeout  # None: writes wait as long as it takes
        self._input_broken: str | None = None  # why stdin is unusable (a write timed out)
        self.skipped_lines = 0  # not JSON
        self.invalid_utf8_lines = 0
        self._stderr_task = asyncio.create_task(self._drain_stderr())
        self._reader_task = asyncio.create_task(self._read_stdout())
        self._exit_task = asyncio.create_task(self._watch_exit())

    # --- spawning ---------------------------------------------------------------------------

    @classmethod
    async def spawn(
        cls,
        argv: Sequence[str],
        *,
        env: Mapping[str, str],
        cwd: str | Path,
        max_line_bytes: int = DEFAULT_MAX_LINE_BYTES,
        stderr_tail_bytes: int = DEFAULT_STDERR_TAIL_BYTES,
        mailbox_size: int = DEFAULT_MAILBOX_SIZE,
        write_timeout: float | None = DEFAULT_WRITE_TIMEOUT,
        umask: int | None = None,
    ) -> AgentProcess:
        """Start `argv` with exactly `env` in `cwd`, under `setpriv --pdeathsig KILL`.

        Must be called from the event loop's thread (see `procgroup.pdeathsig_argv`). Raises
        AgentSpawnError if it cannot start (missing program, bad cwd, no setpriv).
        """
        loop = asyncio.get_running_loop()
        name = argv[0] if argv else ""
        try:
            command = [*pdeathsig_argv(), _find_program(argv, env, cwd), *argv[1:]]
            transport, proto = await loop.subprocess_exec(
                lambda: PipeProtocol(limit=READ_CHUNK, loop=loop),
                *command,
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                cwd=cwd,
                env=dict(env),
                start_new_session=True,
                # Set by subprocess's C code in the child, like the new session: no Python
                # runs between fork and exec. None keeps the daemon's own (private) umask.
                umask=-1 if umask is None else umask,
            )
        except (OSError, subprocess.SubprocessError, ValueError, SetprivMissing) as exc:
            raise AgentSpawnError(f"cannot start agent {name!r}: {exc}") from exc
        agent = cls(
            PipeLink(transport, proto),
            max_line_bytes=max_line_bytes,
            stderr_tail_bytes=stderr_tail_bytes,
            mailbox_size=mailbox_size,
            write_timeout=write_timeout,
        )
        agent._log.info("agent.spawned", argv0=argv[0], cwd=str(cwd))
        return agent

    # --- state ------------------------------------------------------------------------------

    @property
    def identity(self) -> ProcessIdentity:
        return ProcessIdentity(pid=self.pid, pgid=self.pgid, start_time=self.start_time)

    @property
    def link(self) -> AgentLink:
        return self._link

    @property
    def durable(self) -> bool:
        """Whether the agent outlives this daemon (it runs under a shim)."""
        return self._link.durable

    def record(self, payload: bytes) -> None:
        """Leaves `payload` with the agent's shim for the next daemon (durable agents)."""
        self._link.record(payload)

    def forget_before(self, offset: int) -> None:
        """What the shim kept before `offset` (and its records) is no longer needed."""
        self._link.forget_before(offset)

    def detach(self) -> None:
        """Lets go of a durable agent without stopping it: the next daemon adopts it."""
        self._link.detach()

    async def drained(self) -> None:
        """After `detach`: once what was written to the shim has left this process."""
        await self._link.drained()

    @property
    def returncode(self) -> int | None:
        return self._link.returncode

    @property
    def alive(self) -> bool:
        return self.returncode is None

    def stderr_tail(self) -> str:
        return self._stderr.text()

    async def wait_exit(self) -> None:
        """Returns once the process has exited (it may still have output to deliver)."""
        await self._link.exited.wait()

    # --- reading ------------------------------------------------------------------------------

    async def receive(self) -> AgentItem:
        """The next item; after the process ended, `AgentExited` (every time)."""
        return self._took(await self._mailbox.get())

    def receive_nowait(self) -> AgentItem | None:
        """The next item if one has arrived already, else None (never waits)."""
        entry = self._mailbox.get_nowait()
        return None if entry is None else self._took(entry)

    def peek(self) -> AgentItem | None:
        """The next item without taking it (None if nothing has arrived)."""
        entry = self._mailbox.peek()
        return None if entry is None else entry[0]

    async def wait_output(self) -> None:
        """Returns once there is an item to take (or the process has ended)."""
        await self._mailbox.wait_nonempty()

    def _took(self, entry: Entry) -> AgentItem:
        item, index, end = entry
        if index >= 0:
            self.received = index + 1
            if end >= 0:
                self._boundary = (end, index + 1)
        return item

    @property
    def boundary(self) -> tuple[int, int]:
        """(stream position, message index) of the last line end before which every message
        has been received or answered: a reader starting at that position again sees exactly
        the messages from that index on."""
        return self._boundary

    async def __aiter__(self) -> AsyncIterator[AgentItem]:
        """Items up to and including `AgentExited`."""
        while True:
            item = await self.receive()
            yield item
            if isinstance(item, AgentExited):
                return

    async def _read_stdout(self) -> None:
        try:
            while chunk := await self._link.read_stdout():
                for line, end in self._splitter.feed_ends(chunk):
                    await self._deliver(line, end)
            for line in self._splitter.finish():
                await self._deliver(line, self._splitter.fed)
        except Exception:  # a pipe error must still end with AgentExited
            self._log.exception("agent.stdout_read_failed")
        finally:
            self._stdout_eof.set()
        await self._link.exited.wait()
        await _wait_quietly(self._stderr_task, _EXIT_DRAIN_GRACE)
        self._close_mailbox()

    async def _deliver(self, line: bytes | Overflow, end: int) -> None:
        if isinstance(line, Overflow):
            self._log.warning("agent.line_too_long", size=line.size, limit=line.limit)
            await self._put(LineTooLong(size=line.size, limit=line.limit), end)
            return
        try:
            messages = protocol.parse_line(self._decode(line))
        except ProtocolError as exc:
            self.skipped_lines += 1
            preview = line[:200].decode("utf-8", "replace")
            self._log.warning("agent.stdout_not_json", error=str(exc), preview=preview)
            self._passed(end)
            return
        if not messages:
            self._passed(end)
        for n, message in enumerate(messages, 1):
            last = n == len(messages)
            if isinstance(message, ControlResponse) and self._answer(message):
                self._parsed += 1
                if last:
                    self._passed(end)
                continue
            await self._put(message, end if last else -1)

    async def _put(self, item: AgentItem, end: int) -> None:
        index = self._parsed
        self._parsed += 1
        await self._mailbox.put((item, index, end))

    def _passed(self, end: int) -> None:
        """A line that reached nobody (answered a request of ours, or not JSON): the boundary
        moves past it if nothing before it is still unreceived."""
        if self._mailbox.empty:
            self._boundary = (end, self._parsed)

    def _decode(self, line: bytes) -> str:
        try:
            return line.decode("utf-8")
        except UnicodeDecodeError as exc:
            self.invalid_utf8_lines += 1
            self._log.warning("agent.stdout_invalid_utf8", error=str(exc), size=len(line))
            return line.decode("utf-8", "replace")

    async def _drain_stderr(self) -> None:
        with contextlib.suppress(Exception):
            while chunk := await self._link.read_stderr():
                self._stderr.add(chunk)

    async def _watch_exit(self) -> None:
        await self._link.exited.wait()
        self._log.info("agent.exited", returncode=self.returncode)
        # Output written before the exit is still in the pipe: give the reader time to get it.
        # No end of file after that: an orphaned descendant holds stdout (killed here), or
        # nobody receives and the mailbox is full (then stop() ends the reading).
        if not await _wait_quietly(self._stdout_eof.wait(), _EXIT_DRAIN_GRACE):
            self._log.warning("agent.output_not_drained_after_exit")
            await self._kill_group_after_exit()

    def _close_mailbox(self) -> None:
        if self._mailbox.closed:
            return
        self._mailbox.close(self._exited("exited"))
        for future in self._pending.values():
            if not future.done():
                future.set_exception(self._exited("exited before answering"))

    def _exited(self, what: str) -> AgentExited:
        returncode = self.returncode
        status = f"exit status {returncode}" if returncode is not None else "still running"
        return AgentExited(
            f"agent process {self.pid} {what} ({status})", returncode, self.stderr_tail()
        )

    # --- writing ------------------------------------------------------------------------------

    async def write_line(self, line: bytes, *, timeout: float | None = None) -> None:
        """Write one newline-terminated line to stdin and wait until the pipe takes it.

        Waits at most `timeout` seconds (default: the process's `write_timeout`), then raises
        WriteTimeout, and so does every later write. AgentExited if the process has ended.
        """
        if line.find(b"\n") != len(line) - 1:
            raise ValueError("write_line takes exactly one newline-terminated line")
        if self._input_broken is not None:
            raise WriteTimeout(self._input_broken)
        if self._link.input_closing() or not self.alive:
            raise self._exited("is not accepting input")
        limit = self.write_timeout if timeout is None else timeout
        try:
            self._link.write(line)
            async with asyncio.timeout(limit):
                await self._link.drain()
        except (BrokenPipeError, ConnectionResetError) as exc:
            raise self._exited("closed its input") from exc
        except TimeoutError:
            self._input_broken = (
                f"agent process {self.pid} did not read its input for {limit:g} s "
                f"(a write of {len(line)} bytes timed out; its input is unusable)"
            )
            self._log.warning("agent.write_timeout", size=len(line), timeout=limit)
            raise WriteTimeout(self._input_broken) from None

    async def send_user_message(self, text: str, uuid: str = "") -> None:
        await self.write_line(protocol.user_message_line(text, uuid))

    async def send_user_content(self, content: list[dict[str, Any]], uuid: str = "") -> None:
        await self.write_line(protocol.user_message_line(content, uuid))

    async def respond_control(self, request_id: str, response: Mapping[str, Any]) -> None:
        """Answer a `ControlRequest` from the agent (e.g. `protocol.permission_allow(...)`)."""
        await self.write_line(protocol.control_response(request_id, response))

    async def respond_control_error(self, request_id: str, error: str) -> None:
        await self.write_line(protocol.control_error_response(request_id, error))

    # --- control requests -----------------------------------------------------------------

    # The timeouts below are defaults that bound a silent agent; asyncio.timeout around the
    # call would leave no ControlTimeout to tell it from other timeouts.
    async def request(self, subtype: str, *, timeout: float, **fields: Any) -> dict[str, Any]:
        """Send a control request and return the agent's answer.

        Raises ControlError (the agent answered with an error), ControlTimeout, AgentExited,
        WriteTimeout (the agent does not read its input).
        """
        request_id = f"atomizerd_{next(self._ids)}_{secrets.token_hex(4)}"
        future: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self._pending[request_id] = future
        try:
            await self.write_line(protocol.control_request_line(request_id, subtype, **fields))
            try:
                return await asyncio.wait_for(future, timeout)
            except TimeoutError:
                raise ControlTimeout(f"no answer to {subtype!r} within {timeout:g} s") from None
        finally:
            del self._pending[request_id]

    async def initialize(self, *, timeout: float = 60.0, **fields: Any) -> dict[str, Any]:
        """The `initialize` handshake: readies the CLI before the first turn."""
        fields.setdefault("hooks", None)
        return await self.request("initialize", timeout=timeout, **fields)

    async def interrupt(self, *, timeout: float = 10.0) -> dict[str, Any]:
        """Ask the agent to end the running turn; it then writes that turn's `result` line.
        Harmless when no turn runs. Returns the acknowledgement."""
        return await self.request("interrupt", timeout=timeout)

    def _answer(self, message: ControlResponse) -> bool:
        future = self._pending.get(message.request_id)
        if future is None or future.done():
            return False  # not ours or no longer awaited: deliver it as a message
        if message.subtype == "error":
            future.set_exception(ControlError(message.error or "control request failed"))
        else:
            future.set_result(message.response)
        return True

    # --- stopping ---------------------------------------------------------------------------

    def kill(self) -> None:
        """SIGKILL the whole group at once (no grace); `stop()` still reaps it."""
        self._kill_group(signal.SIGKILL)

    async def stop(self, grace: float = 3.0) -> int | None:
        """Stop the agent and everything in its process group, and reap it.

        Close stdin (the CLI finishes and exits), wait `grace`; SIGTERM the group, wait
        `grace`; SIGKILL the group. Leftover descendants are killed in any case. Idempotent
        and safe to call concurrently or on an exited process; cancelling a caller does not
        abort the sequence. Returns the exit code (None only if even SIGKILL did not reap it).
        """
        if self._stop_task is None:
            self._stop_task = asyncio.create_task(self._stop_sequence(grace))
        return await asyncio.shield(self._stop_task)

    async def _stop_sequence(self, grace: float) -> int | None:
        self._close_stdin()
        if not await self._wait_exit(grace):
            self._kill_group(signal.SIGTERM)
            if not await self._wait_exit(grace):
                self._kill_group(signal.SIGKILL)
                if not await self._wait_exit(_KILL_WAIT):
                    self._log.error("agent.not_reaped_after_sigkill")
        await self._kill_group_after_exit()  # descendants left behind by an agent that exited
        await self._finish_io()
        return self.returncode

    async def _wait_exit(self, seconds: float) -> bool:
        return await _wait_quietly(self._link.exited.wait(), seconds)

    def _close_stdin(self) -> None:
        self._link.close_input()

    def _kill_group(self, sig: signal.Signals) -> None:
        if self.alive or sig != signal.SIGKILL:
            self._log.info("agent.signal_group", signal=sig.name)
        if self.start_time is not None:
            kill_group_if_same(self.pgid, self.start_time, sig)
        elif self.alive:
            # Start time unknown (it exited at once): signal only the unreaped leader itself.
            self._link.signal_leader(sig)

    async def _kill_group_after_exit(self) -> None:
        """SIGKILL what is left of the group of an agent that exited. Proving a group without
        its leader ours may take a scan of /proc: that runs in a thread, off the event loop."""
        if self.start_time is None:
            self._kill_group(signal.SIGKILL)
        else:
            await kill_group_if_same_async(self.pgid, self.start_time, signal.SIGKILL)

    async def _finish_io(self) -> None:
        """Let the reader deliver what is left, then make sure nothing stays pending."""
        tasks = (self._reader_task, self._stderr_task, self._exit_task)
        if await _wait_quietly(asyncio.gather(*tasks), _EXIT_DRAIN_GRACE):
            return
        # Nobody is receiving (mailbox full) or a pipe is held open: end it from our side.
        self._log.warning("agent.io_forced_closed")
        self._close_mailbox()
        self._link.close()
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


def _find_program(argv: Sequence[str], env: Mapping[str, str], cwd: str | Path) -> str:
    """The executable `argv[0]` names, found as exec would for the child: a name with a slash
    relative to the child's `cwd`, a bare name in the child's PATH. Raises FileNotFoundError,
    so a missing program fails the spawn instead of becoming setpriv's exit status 127."""
    if not argv or not argv[0]:
        raise ValueError("empty agent command")
    name = argv[0]
    if "/" in name:
        path = os.path.join(cwd, name)  # an absolute name stays as it is
        if os.path.isfile(path) and os.access(path, os.X_OK):
            return name if os.path.isabs(name) else os.path.abspath(path)
        raise FileNotFoundError(f"no executable file {path!r}")
    found = shutil.which(name, path=env.get("PATH", os.defpath))
    if found is None:
        raise FileNotFoundError(f"{name!r} not found in the agent's PATH")
    return found


async def _wait_quietly(awaitable: Any, seconds: float) -> bool:
    """Await with a timeout, without raising: True if it completed in time.

    A task passed in is shielded, so timing out does not cancel it.
    """
    target = asyncio.shield(awaitable) if isinstance(awaitable, asyncio.Future) else awaitable
    try:
        await asyncio.wait_for(target, max(seconds, 0.0))
    except TimeoutError:
        return False
    return True


async def probe_version(
    command: Sequence[str], *, env: Mapping[str, str] | None = None, timeout: float = 10.0
) -> str:
    """Run `<command> --version` and return its output, e.g. "2.1.332 (Claude Code)".

    Started as agents are (setpriv, a new session, from the loop's thread). Raises
    AgentSpawnError if it cannot start, AgentError if it fails or takes too long.
    """
    argv = [*command, "--version"]
    try:
        program = _find_program(argv, os.environ if env is None else env, os.getcwd())
        proc = await asyncio.create_subprocess_exec(
            *pdeathsig_argv(),
            program,
            *argv[1:],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env=dict(env) if env is not None else None,
            start_new_session=True,
        )
    except (OSError, subprocess.SubprocessError, ValueError, SetprivMissing) as exc:
        raise AgentSpawnError(f"cannot run {argv[0]!r}: {exc}") from exc
    try:
        out, err = await asyncio.wait_for(proc.communicate(), timeout)
    except TimeoutError:
        raise AgentError(f"`{' '.join(argv)}` did not answer within {timeout:g} s") from None
    finally:
        if proc.returncode is None:  # timed out or cancelled; unreaped, so the group is ours
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            await asyncio.shield(proc.wait())
    if proc.returncode != 0:
        tail = err.decode("utf-8", "replace").strip()[-500:]
        raise AgentError(f"`{' '.join(argv)}` exited with {proc.returncode}: {tail}")
    return out.decode("utf-8", "replace").strip()
