"""The agent shim (docs/shim-protocol.md): a process that holds an agent's pipes so the agent
outlives a daemon restart, and replays what a re-attaching daemon needs.

The shim is started exactly as the daemon starts it (`python -I -S shim.py ...`, its own
session, a bare environment); the agent is a small Python script driven by stdin commands; the
daemon is a plain socket that builds and parses frames with the protocol's codec (shim_codec).
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import select
import shutil
import signal
import socket
import stat
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from atomizerd.agents import shim, shim_codec

SHIM = Path(shim.__file__).resolve()
F_SETPIPE_SZ = 1031
TIMEOUT = 10.0  # bound on every single wait; a healthy run needs a fraction of it

AGENT = r"""
import os, signal, subprocess, sys, time
if "--ignore-term" in sys.argv:
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
out, err = sys.stdout.buffer, sys.stderr.buffer
for line in sys.stdin.buffer:
    cmd, _, arg = line.rstrip(b"\n").partition(b" ")
    if cmd == b"echo":
        out.write(arg + b"\n")
    elif cmd == b"err":
        err.write(arg + b"\n")
        err.flush()
    elif cmd == b"spew":
        for i in range(int(arg)):
            out.write(b"line %d\n" % i)
        out.write(b"done\n")
    elif cmd == b"umask":
        mask = os.umask(0)
        out.write(b"umask %o\n" % mask)
    elif cmd == b"hold":  # a grandchild keeps stdout open after the agent exits
        child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
        out.write(b"child %d\n" % child.pid)
    elif cmd == b"exit":
        out.flush()
        os._exit(int(arg))
    elif cmd == b"flood":  # fill a pipe made big enough for it, then exit: it never blocks
        import fcntl
        size, status = map(int, arg.split())
        out.flush()
        fcntl.fcntl(1, 1031, size)  # F_SETPIPE_SZ
        lines = b"".join(b"%07d\n" % i for i in range(size // 8 - 1))
        out.write(lines + b"result\n")
        out.flush()
        os._exit(status)
    out.flush()
if "--linger" in sys.argv:  # ignores the end of its stdin too
    while True:
        time.sleep(1)
out.write(b"bye\n")
out.flush()
sys.exit(3)
"""


def spew(n: int) -> bytes:
    return b"".join(b"line %d\n" % i for i in range(n)) + b"done\n"


def flood(size: int) -> bytes:
    return b"".join(b"%07d\n" % i for i in range(size // 8 - 1)) + b"result\n"


def big_pipe() -> int:
    """The largest pipe (up to 4 MiB) a process of ours may make: a "flood" of that size is
    all in the agent's pipe as soon as it is written, whether the shim reads or not."""
    r, w = os.pipe()
    try:
        for size in (4 << 20, int(Path("/proc/sys/fs/pipe-max-size").read_text())):
            with contextlib.suppress(PermissionError):
                return min(fcntl.fcntl(w, F_SETPIPE_SZ, size), 4 << 20)
        raise AssertionError("cannot size a pipe")
    finally:
        os.close(r)
        os.close(w)


def wait_for(what: str, predicate: Callable[[], bool], timeout: float = TIMEOUT) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.01)


def gone(pid: int) -> bool:
    """The process no longer exists, or is a zombie nobody reaps (its parent died)."""
    try:
        data = Path(f"/proc/{pid}/stat").read_bytes()
    except FileNotFoundError:
        return True
    return data[data.rindex(b")") + 2 :].split()[0] in (b"Z", b"X")


def stuck_writing(pid: int) -> bool:
    """The process is blocked writing to a full pipe: it wrote nothing for 0.1 s."""

    def written() -> int:
        io = Path(f"/proc/{pid}/io").read_text().split()
        return int(io[io.index("wchar:") + 1])

    before = written()
    time.sleep(0.1)
    return written() == before and "pipe_write" in Path(f"/proc/{pid}/wchan").read_text()


class Daemon:
    """One connection to the shim, as the daemon side would hold it."""

    def __init__(self, path: Path) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(TIMEOUT)
        self.sock.connect(str(path))
        self.buf = b""
        self.frames: list[tuple[bytes, bytes]] = []
        self.kinds: list[bytes] = []  # every frame's type, in order
        self.hello: dict[str, object] = {}
        self.journal: list[tuple[bytes, bytes]] = []
        self.stderr = b""
        self.base: int | None = None
        self.stdout = b""
        self.exit: int | None = None

    def close(self) -> None:
        self.sock.close()

    def send(self, kind: bytes, payload: bytes = b"") -> None:
        self.sock.sendall(shim_codec.encode_frame(kind, payload))

    def frame(self) -> tuple[bytes, bytes]:
        while not self.frames:
            data = self.sock.recv(1 << 20)
            if not data:
                raise EOFError("the shim closed the connection")
            self.frames, self.buf = shim_codec.split_frames(self.buf + data)
        kind, payload = self.frames.pop(0)
        self.kinds.append(kind)
        if kind == shim_codec.HELLO:
            assert self.kinds == [shim_codec.HELLO]
            self.hello = json.loads(payload)
            self.base = int(self.hello["base"])  # type: ignore[call-overload]
        elif kind in (shim_codec.JOURNAL, shim_codec.INPUT):
            assert shim_codec.REPLAYED not in self.kinds, "journal records come before R"
            self.journal.append((kind, payload))
        elif kind == shim_codec.STDERR:
            self.stderr += payload
        elif kind == shim_codec.STDOUT:
            offset, data = shim_codec.decode_output(payload)
            assert self.base is not None
            assert offset == self.base + len(self.stdout), "stdout offsets are contiguous"
            assert data and shim_codec.HEADER.size + len(payload) <= 256 * 1024, "256 KiB per frame"
            self.stdout += data
        elif kind == shim_codec.EXIT:
            assert self.exit is None
            self.exit = shim_codec.decode_exit(payload)
        return kind, payload

    def trickle(self, step: int, predicate: Callable[[Daemon], bool]) -> Daemon:
        """Like `until`, read slowly: `step` bytes every 10 ms, as a daemon busy elsewhere."""
        while True:
            while self.frames:
                self.frame()
                if predicate(self):
                    return self
            data = self.sock.recv(step)
            if not data:
                raise EOFError("the shim closed the connection")
            self.frames, self.buf = shim_codec.split_frames(self.buf + data)
            time.sleep(0.01)

    def replay(self) -> Daemon:
        """Read the hello and the replay, up to R."""
        while self.frame()[0] != shim_codec.REPLAYED:
            pass
        return self

    def until(self, predicate: Callable[[Daemon], bool]) -> Daemon:
        while not predicate(self):
            self.frame()
        return self

    def until_stdout(self, needle: bytes) -> Daemon:
        return self.until(lambda d: needle in d.stdout)

    def eof(self) -> bool:
        """Whether the shim closed the connection (after the frames already read)."""
        try:
            while True:
                self.frame()
        except EOFError:
            return True

    def replay_kinds(self) -> bytes:
        """The replay's frame types in order, runs collapsed: b"HJIOR" etc."""
        kinds = self.kinds[: self.kinds.index(shim_codec.REPLAYED) + 1]
        return b"".join(k for i, k in enumerate(kinds) if i == 0 or kinds[i - 1] != k)


class ShimProcess:
    """A shim started as the daemon starts it, with the test agent."""

    def __init__(
        self,
        tmp_path: Path,
        *agent_args: str,
        orphan_timeout: float = 30.0,
        spool_bytes: int = 64 << 20,
        stop_grace: float = 2.0,
        umask: str | None = None,
        program: str | None = None,
        stale_socket: bool = False,
    ) -> None:
        self.dir = Path(tempfile.mkdtemp(dir="/tmp", prefix="shim-"))  # short: sun_path limit
        self.dir.chmod(0o700)
        self.socket = self.dir / "shim.sock"
        if stale_socket:  # left behind by a shim that was SIGKILLed
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as dead:
                dead.bind(str(self.socket))
        self.spool = self.dir / "stdout.spool"
        self.journal = Path(f"{self.spool}.journal")
        script = tmp_path / "agent.py"
        script.write_text(AGENT)
        argv = [program or sys.executable, str(script), *agent_args]
        cmd = [sys.executable, "-I", "-S", str(SHIM), "--socket", str(self.socket)]
        cmd += ["--spool", str(self.spool), "--orphan-timeout", str(orphan_timeout)]
        cmd += ["--spool-bytes", str(spool_bytes), "--stop-grace", str(stop_grace)]
        cmd += ["--umask", umask] if umask is not None else []
        self.log_path = tmp_path / "shim.log"
        with self.log_path.open("wb") as log:
            self.proc = subprocess.Popen(
                [*cmd, "--", *argv],
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=log,
                start_new_session=True,
                env={"PATH": os.environ["PATH"]},
                cwd=tmp_path,
            )
        assert self.proc.stdout is not None
        self.ready_line, self.stdout_rest = self._read_stdout()
        self.ready = json.loads(self.ready_line)
        self.agent_pid: int | None = self.ready.get("agent_pid")

    def _read_stdout(self) -> tuple[bytes, bytes]:
        """The ready line, and whatever follows it until stdout is closed."""
        assert self.proc.stdout is not None
        fd, data = self.proc.stdout.fileno(), b""
        deadline = time.monotonic() + TIMEOUT
        while True:
            remaining = deadline - time.monotonic()
            assert remaining > 0, f"no EOF on the shim's stdout, got {data!r}"
            if select.select([fd], [], [], remaining)[0]:
                chunk = os.read(fd, 4096)
                if not chunk:
                    break
                data += chunk
        line, _, rest = data.partition(b"\n")
        return line, rest

    def attach(self) -> Daemon:
        return Daemon(self.socket)

    def wait(self) -> int:
        return self.proc.wait(timeout=TIMEOUT)

    def log(self) -> str:
        return self.log_path.read_text()

    def files_left(self) -> list[Path]:
        return [p for p in (self.socket, self.spool, self.journal) if p.exists()]

    def cleanup(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=TIMEOUT)
        if self.agent_pid is not None:
            with contextlib.suppress(OSError):
                os.killpg(self.agent_pid, signal.SIGKILL)
        shutil.rmtree(self.dir, ignore_errors=True)


@pytest.fixture
def start(tmp_path: Path) -> Iterator[Callable[..., ShimProcess]]:
    started: list[ShimProcess] = []

    def start(*agent_args: str, **kwargs: object) -> ShimProcess:
        s = ShimProcess(tmp_path, *agent_args, **kwargs)  # type: ignore[arg-type]
        started.append(s)
        return s

    yield start
    for s in started:
        s.cleanup()


def test_ready_line_then_hello_describe_the_agent(start) -> None:
    s = start()
    assert set(s.ready) == {"agent_pid", "agent_start_time", "shim_pid"}
    assert s.ready["shim_pid"] == s.proc.pid
    assert s.stdout_rest == b"", "exactly one line, then stdout is closed"
    stat_line = Path(f"/proc/{s.agent_pid}/stat").read_bytes()
    assert s.ready["agent_start_time"] == int(stat_line[stat_line.rindex(b")") + 2 :].split()[19])
    for path in (s.socket, s.spool, s.journal):
        assert stat.S_IMODE(path.stat().st_mode) == 0o600, path
    assert stat.S_ISSOCK(s.socket.stat().st_mode)

    d = s.attach().replay()
    assert d.hello == {
        "version": 1,
        "shim_pid": s.proc.pid,
        "agent_pid": s.agent_pid,
        "agent_start_time": s.ready["agent_start_time"],
        "label": None,
        "base": 0,
        "lost": False,
        "exited": None,
    }
    assert d.kinds == [shim_codec.HELLO, shim_codec.REPLAYED]


def test_input_reaches_the_agent_and_output_comes_back_with_contiguous_offsets(start) -> None:
    s = start()
    d = s.attach().replay()
    s.proc.send_signal(signal.SIGHUP)  # ignored
    d.send(b"Z", b"an unknown frame type is skipped")
    d.send(shim_codec.INPUT, b"echo one\n")
    d.send(shim_codec.INPUT, b"echo two\nerr oops\nspew 3000\n")
    d.until_stdout(b"done\n").until(lambda d: b"oops" in d.stderr)
    assert d.stdout == b"one\ntwo\n" + spew(3000)
    assert d.stderr == b"oops\n"
    assert d.base == 0


def test_a_reattaching_daemon_gets_journal_then_stdout_from_base_then_live(start) -> None:
    s = start()
    d = s.attach().replay()
    d.send(shim_codec.LABEL, b'{"session": "s1"}')
    d.send(shim_codec.JOURNAL, b'{"turn": 1}')
    d.send(shim_codec.INPUT, b"err thinking\n")
    d.send(shim_codec.INPUT, b"spew 50000\n")
    d.until(lambda d: len(d.stdout) > 0)  # the agent is writing: detach now
    d.close()

    again = s.attach().replay()
    assert again.hello["label"] == {"session": "s1"}
    assert (again.hello["base"], again.hello["lost"]) == (0, False)
    assert again.journal == [
        (shim_codec.JOURNAL, b'{"turn": 1}'),
        (shim_codec.INPUT, b"err thinking\n"),
        (shim_codec.INPUT, b"spew 50000\n"),
    ]
    assert again.replay_kinds() in (b"HJISOR", b"HJIOR")  # stderr may not be read yet
    replayed = len(again.stdout)
    again.until_stdout(b"done\n")
    assert again.stdout == spew(50000), "replayed, then live, from offset 0 without a gap"
    assert replayed > 0
    # Live from here on.
    again.send(shim_codec.INPUT, b"echo live\n")
    again.until_stdout(b"live\n")
    assert again.stdout.endswith(b"done\nlive\n")


def test_an_ack_drops_earlier_stdout_and_records(start) -> None:
    s = start()
    d = s.attach().replay()
    d.send(shim_codec.JOURNAL, b"j1")
    d.send(shim_codec.INPUT, b"echo first\n")
    d.until_stdout(b"first\n")
    d.send(shim_codec.ACK, shim_codec.encode_ack(3))  # mid-way: the spool keeps its tail ("st\n")
    d.send(shim_codec.JOURNAL, b"j2")
    d.send(shim_codec.INPUT, b"echo second\n")
    d.until_stdout(b"second\n")  # frames are handled in order: the A has been applied
    d.close()

    again = s.attach().replay()
    assert again.hello["base"] == 3
    assert again.journal == [(shim_codec.JOURNAL, b"j2"), (shim_codec.INPUT, b"echo second\n")]
    assert again.stdout == b"st\nsecond\n"

    end = len(b"first\nsecond\n")
    again.send(shim_codec.ACK, shim_codec.encode_ack(end))  # everything: the spool is emptied
    again.send(shim_codec.INPUT, b"echo third\n")
    again.until_stdout(b"third\n")
    again.close()

    last = s.attach().replay()
    assert last.hello["base"] == end
    assert last.journal == [(shim_codec.INPUT, b"echo third\n")]
    assert last.stdout == b"third\n"


def test_end_of_input_ends_the_agent_and_x_follows_all_its_output(start) -> None:
    s = start()
    d = s.attach().replay()
    d.send(shim_codec.INPUT, b"spew 20000\n")
    d.send(shim_codec.END_INPUT)
    d.until(lambda d: d.exit is not None)
    assert d.stdout == spew(20000) + b"bye\n"
    assert d.exit == 3
    assert d.kinds[-1] == shim_codec.EXIT
    d.close()  # the daemon has its X and goes: the shim exits
    assert s.wait() == 0
    assert s.files_left() == []


def test_a_new_connection_replaces_the_current_one(start) -> None:
    s = start()
    first = s.attach().replay()
    second = s.attach().replay()
    assert first.eof()
    second.send(shim_codec.INPUT, b"echo hi\n")
    second.until_stdout(b"hi\n")


def test_a_new_connection_replaces_one_that_stopped_reading(start) -> None:
    s = start()
    stuck = s.attach().replay()
    stuck.send(shim_codec.INPUT, b"spew 300000\n")  # megabytes: the shim's send to it blocks
    stuck.until(lambda d: len(d.stdout) > 0)
    # The shim's send to it blocks, so the shim stops reading the agent (backpressure).
    wait_for("the agent to block on its stdout", lambda: stuck_writing(s.agent_pid))
    fresh = s.attach().replay()
    assert fresh.journal == [(shim_codec.INPUT, b"spew 300000\n")]
    fresh.until_stdout(b"done\n")
    assert fresh.stdout == spew(300000)
    stuck.close()


def test_the_orphan_timeout_stops_an_agent_without_a_daemon(start) -> None:
    s = start(orphan_timeout=1.0)
    d = s.attach().replay()
    time.sleep(1.3)  # attached for longer than the timeout: nothing happens
    assert s.proc.poll() is None
    d.close()
    assert s.wait() == 0
    assert gone(s.agent_pid)
    assert s.files_left() == []
    assert "orphan" in s.log()


def test_the_orphan_stop_escalates_to_sigkill(start) -> None:
    s = start("--ignore-term", "--linger", orphan_timeout=0.5, stop_grace=0.2)
    assert s.wait() == 0
    wait_for("the agent to be killed", lambda: gone(s.agent_pid))
    assert "SIGTERM" in s.log() and "SIGKILL" in s.log()
    assert s.files_left() == []


def test_an_agent_that_exits_while_detached_is_reported_on_the_next_attach(start) -> None:
    s = start()
    d = s.attach().replay()
    d.send(shim_codec.INPUT, b"echo last words\n")
    d.until_stdout(b"last words\n")
    d.send(shim_codec.INPUT, b"exit 5\n")
    d.close()
    wait_for("the agent to exit", lambda: gone(s.agent_pid))

    attaches: list[Daemon] = []

    def reports_the_exit() -> bool:  # the pid is reaped just before the shim records the status
        attaches.append(s.attach().replay())  # each attach replaces the one before
        return attaches[-1].hello["exited"] is not None

    wait_for("a hello with exited set", reports_the_exit)
    again = attaches[-1]
    assert again.hello["exited"] == 5
    assert again.journal == [
        (shim_codec.INPUT, b"echo last words\n"),
        (shim_codec.INPUT, b"exit 5\n"),
    ]
    assert again.stdout == b"last words\n"
    again.until(lambda d: d.exit is not None)
    assert again.exit == 5
    again.close()
    assert s.wait() == 0
    assert s.files_left() == []


def test_spool_overflow_sets_lost_until_the_next_ack(start) -> None:
    s = start(spool_bytes=10_000)
    d = s.attach().replay()
    d.send(shim_codec.INPUT, b"spew 5000\n")
    d.until_stdout(b"done\n")
    assert d.stdout == spew(5000), "live output is forwarded in full all the same"
    d.close()

    again = s.attach().replay()
    total = len(spew(5000))
    assert (again.hello["lost"], again.hello["base"]) == (True, total)
    assert again.journal == [] and again.stdout == b""
    again.send(shim_codec.ACK, shim_codec.encode_ack(total))
    again.send(shim_codec.INPUT, b"echo kept\n")
    again.until_stdout(b"kept\n")
    again.close()

    last = s.attach().replay()
    assert (last.hello["lost"], last.hello["base"]) == (False, total)
    assert last.journal == [(shim_codec.INPUT, b"echo kept\n")]
    assert last.stdout == b"kept\n"


def test_a_missing_program_gives_the_error_line_and_127(start, tmp_path: Path) -> None:
    s = start(program=str(tmp_path / "no-such-program"))
    assert s.wait() == 127
    assert "no-such-program" in s.ready["error"]
    assert set(s.ready) == {"error"}
    assert s.files_left() == []


def test_the_agent_leads_its_own_group_and_dies_with_the_shim(start) -> None:
    s = start()
    pid = s.agent_pid
    assert os.getpgid(pid) == pid and os.getsid(pid) == pid
    assert os.getpgid(s.proc.pid) == s.proc.pid != pid
    ignored = next(
        line
        for line in Path(f"/proc/{pid}/status").read_text().splitlines()
        if line.startswith("SigIgn:")
    )
    assert not int(ignored.split()[1], 16) & (1 << (signal.SIGHUP - 1)), "SIGHUP not ignored"
    s.proc.kill()
    s.wait()
    wait_for("the agent to die with the shim", lambda: gone(pid))


def test_sigterm_stops_the_agent_and_gives_x_to_the_daemon(start) -> None:
    s = start()
    d = s.attach().replay()
    d.send(shim_codec.INPUT, b"echo hi\n")
    d.until_stdout(b"hi\n")
    s.proc.send_signal(signal.SIGTERM)
    d.until(lambda d: d.exit is not None)
    assert d.stdout == b"hi\nbye\n" and d.exit == 3  # stdin closed: the agent finished
    assert s.wait() == 0
    assert s.files_left() == []


def test_a_grandchild_holding_stdout_does_not_delay_x_forever(start) -> None:
    s = start()
    d = s.attach().replay()
    d.send(shim_codec.INPUT, b"hold\n")
    d.until_stdout(b"\n")
    child = int(d.stdout.split()[1])
    d.send(shim_codec.INPUT, b"exit 7\n")
    d.until(lambda d: d.exit is not None)  # after the shim killed the agent's group
    assert d.exit == 7
    wait_for("the grandchild to be killed", lambda: gone(child))


def test_output_written_before_the_exit_outlasts_a_slow_daemon(start) -> None:
    size = big_pipe()
    assert size >= 1 << 20, "more than the socket buffers and one frame hold"
    s = start()
    d = s.attach().replay()
    d.send(shim_codec.INPUT, b"flood %d 9\n" % size)  # the shim's send to us blocks: we do not read
    wait_for("the agent to exit", lambda: gone(s.agent_pid))
    time.sleep(shim.EXIT_DRAIN + 1.0)
    d.trickle(size // 500, lambda d: d.exit is not None)  # busy: 5 s or more for all of it
    assert d.stdout == flood(size), "all of it, offsets contiguous, up to the result line"
    assert (d.exit, d.kinds[-1]) == (9, shim_codec.EXIT)
    assert "SIGKILL" not in s.log()
    d.close()
    assert s.wait() == 0


def test_output_written_before_the_exit_reaches_a_slow_daemon_replacing_a_stuck_one(
    start,
) -> None:
    size = big_pipe()
    s = start()
    stuck = s.attach()
    stuck.replay().send(shim_codec.INPUT, b"flood %d 9\n" % size)
    wait_for("the agent to exit", lambda: gone(s.agent_pid))
    time.sleep(shim.EXIT_DRAIN + 1.0)
    fresh = s.attach()
    fresh.trickle(size // 500, lambda d: d.exit is not None)
    assert fresh.hello["exited"] == 9
    assert fresh.stdout == flood(size), "replayed from the spool and live, without a gap"
    assert fresh.exit == 9
    assert "SIGKILL" not in s.log()
    assert stuck.eof()
    fresh.close()
    assert s.wait() == 0


def test_a_stale_socket_is_replaced(start) -> None:
    s = start(stale_socket=True)
    d = s.attach().replay()
    assert d.hello["agent_pid"] == s.agent_pid


def test_umask_is_applied_to_the_agent(start) -> None:
    s = start(umask="027")
    d = s.attach().replay()
    d.send(shim_codec.INPUT, b"umask\n")
    d.until_stdout(b"\n")
    assert d.stdout == b"umask 27\n"
