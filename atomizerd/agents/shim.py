"""The agent shim: one small process per agent that holds the agent's pipes, so that the agent
outlives a daemon restart. The daemon attaches over a private Unix socket and, after a restart,
is sent everything it needs to rebuild the turn in progress. The wire contract is
docs/shim-protocol.md; this module is its shim side, and `shim_codec.py` (beside it) the frames
both sides build and read. It runs as `python3 -I -S shim.py ...`, so it uses the standard
library only, and imports the codec from its own folder.

Threads doing blocking I/O around one lock. The main thread binds the socket, spawns the agent
and then only accepts connections and keeps the timers (orphan timeout, SIGTERM) in a select
loop woken by a self-pipe. It must be the thread that spawns the agent: the parent-death signal
(`setpriv --pdeathsig`) fires when the *thread* that forked the child exits, and the main thread
lives exactly as long as the shim. One thread per stream reads the agent's stdout / stderr and
forwards each read at once as one frame (no batching): it waits for data outside the lock and
reads (the pipe is non-blocking) and forwards under it, so whenever the lock is free every byte
taken from a pipe has been retained and sent. One thread waits for the agent; one thread per
connection sends the replay and then reads the daemon's frames.

`Shim.lock` guards all state and every socket send, so frames never interleave and a replay
(hello, journal, stderr tail, stdout from base, R) is an atomic snapshot: output read meanwhile
waits behind it and continues at the next offset. A daemon that stops reading blocks a send
while the lock is held; that is the intended backpressure (the stdout thread stops reading the
agent). Only a replacement connection can end it: the main thread shuts the old socket down
(the blocked send fails with EPIPE) before it takes the lock, and otherwise never waits for the
lock. The agent's stdin is written outside the lock (under its own), so an agent that does not
read its stdin stalls only the connection feeding it, never the forwarding of its output.

After the agent exits, its output is read to EOF however slow the daemon is or however long it
stays away. Only if a stream still has a writer EXIT_DRAIN s after the exit, and all that the
agent wrote to it before exiting (what was read, plus what its pipe held when the exit was
recorded) has been read and forwarded, is the rest taken to come from a grandchild holding it
open: then the agent's group is killed and the output no longer read.

Memory stays flat: retained stdout and journal records live in two spool files (the journal
holds the records as the frames they came in, so its replay is a plain copy), read back in
256 KiB chunks; only the label and a 64 KiB stderr tail are kept in memory. Nothing polls in
a loop: every thread blocks in a read, a send, a wait (with a deadline) or a select / poll.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import select
import signal
import socket
import stat
import struct
import subprocess
import sys
import termios
import threading
import time
from collections.abc import Callable

if __package__:  # imported (the daemon, the tests) or run as `python -m atomizerd.agents.shim`
    from atomizerd.agents import shim_codec as codec
else:  # run by path (`python3 -I -S shim.py`, no package): the codec is the file beside it
    sys.path.append(os.path.dirname(os.path.abspath(__file__)))  # after the standard library
    import shim_codec as codec  # type: ignore[import-not-found,no-redef]

STDERR_TAIL = 64 * 1024  # stderr kept for the replay
EXIT_DRAIN = 2.0  # seconds a grandchild may hold the output open after the agent exited


def log(message: str) -> None:
    """One line on the shim's own stderr (the daemon points it at a file or /dev/null)."""
    line = f"{time.strftime('%Y-%m-%d %H:%M:%S')} shim[{os.getpid()}]: {message}\n"
    with contextlib.suppress(OSError):
        os.write(2, line.encode("utf-8", "replace"))


def unread(fd: int) -> int:
    """How many bytes a pipe holds (FIONREAD)."""
    try:
        return int(struct.unpack("i", fcntl.ioctl(fd, termios.FIONREAD, bytes(4)))[0])
    except OSError as exc:  # not seen on Linux pipes; the drain then goes by time alone
        log(f"cannot tell what a pipe holds: {exc}")
        return 0


def held_open(fd: int) -> bool:
    """Whether a pipe still has a writer (no POLLHUP yet)."""
    poller = select.poll()
    poller.register(fd, select.POLLIN)
    return not any(events & select.POLLHUP for _, events in poller.poll(0))


def read_start_time(pid: int) -> int | None:
    """Field 22 of /proc/<pid>/stat (clock ticks since boot); the name may hold ')'."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            data = f.read()
        return int(data[data.rindex(b")") + 2 :].split()[19])
    except (OSError, ValueError, IndexError):
        return None


_OPTIONS = ("--socket", "--spool", "--orphan-timeout", "--spool-bytes", "--stop-grace", "--umask")


class Options:
    """The command line: `--name value` or `--name=value` options, `--`, the agent's argv."""

    def __init__(self, args: list[str]) -> None:
        if "--" not in args or args.index("--") == len(args) - 1:
            raise ValueError(
                "usage: shim.py --socket PATH --spool PATH --orphan-timeout S "
                "--spool-bytes N --stop-grace S [--umask OCTAL] -- PROGRAM ARG..."
            )
        cut = args.index("--")
        self.argv = args[cut + 1 :]
        values: dict[str, str] = {}
        rest = iter(args[:cut])
        for arg in rest:
            name, eq, value = arg.partition("=")
            if name not in _OPTIONS:
                raise ValueError(f"unknown option {arg!r}")
            if not eq:
                value = next(rest, "")
            values[name] = value
        try:
            self.socket_path = values["--socket"]
            self.spool = values["--spool"]
            self.orphan_timeout = float(values["--orphan-timeout"])
            self.spool_bytes = int(values["--spool-bytes"])
            self.stop_grace = float(values["--stop-grace"])
            umask = values.get("--umask")
            self.umask = -1 if umask is None else int(umask, 8)  # -1: subprocess leaves it
        except KeyError as exc:
            raise ValueError(f"missing option {exc.args[0]}") from None
        if not os.path.isabs(self.argv[0]):
            raise ValueError(f"PROGRAM must be an absolute path, not {self.argv[0]!r}")


class Conn:
    """One daemon connection. `dead`: replaced or gone; nothing more is sent to or handled
    from it. The socket is closed only by its own thread, and shut down (which wakes a send
    blocked on it) under `fd_lock`, so a shutdown never hits a reused descriptor."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.live = False  # the replay is done: live frames go to it
        self.dead = False
        self.got_exit = False
        self.fd_lock = threading.Lock()
        self.closed = False

    def kill(self) -> None:
        self.dead = True
        with self.fd_lock:
            if not self.closed:
                with contextlib.suppress(OSError):
                    self.sock.shutdown(socket.SHUT_RDWR)

    def close(self) -> None:
        with self.fd_lock:
            self.closed = True
            self.sock.close()


def recv_exact(sock: socket.socket, n: int) -> bytes | None:
    """n bytes from sock, or None on EOF before them."""
    buf = bytearray(n)
    view = memoryview(buf)
    got = 0
    while got < n:
        k = sock.recv_into(view[got:])
        if k == 0:
            return None
        got += k
    return bytes(buf)


_STOP_SIGNALS: list[int] = []


class Shim:
    def __init__(
        self,
        opts: Options,
        listener: socket.socket,
        spools: tuple[int, int],
        proc: subprocess.Popen[bytes],
    ) -> None:
        self.opts, self.listener, self.proc = opts, listener, proc
        self.socket_ino = os.stat(opts.socket_path).st_ino
        self.spool_fd, self.journal_fd = spools
        self.start_time = read_start_time(proc.pid)
        self.lock = threading.Lock()  # all state below, every socket send, every pipe read
        self.changed = threading.Condition(self.lock)  # notified after each pipe read
        self.conn: Conn | None = None
        self.detached_at = time.monotonic()  # the orphan clock runs from here while detached
        self.read_off = 0  # stdout bytes read from the agent
        self.base = 0  # offset of the first retained stdout byte; the spool holds [base, read_off)
        self.spool_len = self.journal_len = 0
        self.keep_journal = False  # left for the next daemon (an orphaned turn's record)
        self.retaining, self.lost = True, False
        self.label: object = None
        self.stderr_tail = bytearray()
        self.returncode: int | None = None
        assert proc.stdout is not None and proc.stderr is not None
        self.streams = {codec.STDOUT: proc.stdout.fileno(), codec.STDERR: proc.stderr.fileno()}
        for fd in self.streams.values():
            os.set_blocking(fd, False)  # read under the lock: a read must never wait
        self.taken = dict.fromkeys(self.streams, 0)  # bytes read from each stream
        self.open_streams = {codec.STDOUT, codec.STDERR}
        self.abandoned = False  # a grandchild holds the output open: stop reading it
        self.done = False  # exited and all output read: X can be sent
        self.exited = threading.Event()
        self.exit_sent = False
        assert proc.stdin is not None
        self.stdin = proc.stdin
        self.stdin_lock = threading.Lock()  # writes to and the closing of the agent's stdin
        self.stdin_closed = False
        self.wake_r, self.wake_w = os.pipe()
        os.set_blocking(self.wake_r, False)
        os.set_blocking(self.wake_w, False)

    def start_threads(self) -> None:
        for target, args in (
            (self._pump, (codec.STDOUT,)),
            (self._pump, (codec.STDERR,)),
            (self._wait_agent, ()),
        ):
            threading.Thread(target=target, args=args, daemon=True).start()

    def _wake(self) -> None:
        with contextlib.suppress(OSError):  # a full pipe wakes the main thread all the same
            os.write(self.wake_w, b"\0")

    def _drain_wake(self) -> None:
        with contextlib.suppress(BlockingIOError):
            while os.read(self.wake_r, 4096):
                pass

    # --- sending (lock held) ---

    def _send(self, conn: Conn, data: bytes) -> bool:
        if conn.dead:
            return False
        try:
            conn.sock.sendall(data)
            return True
        except OSError as exc:  # EPIPE/ECONNRESET: the daemon went away, which is normal
            self._detach(conn, f"send failed: {exc}")
            return False

    def _detach(self, conn: Conn, why: str) -> None:
        conn.kill()
        if self.conn is conn:
            self.detached_at = time.monotonic()  # before conn: the main thread reads conn first
            self.conn = None
            log(f"daemon detached ({why})")
            self._wake()

    def _replay(self, conn: Conn) -> None:
        hello = {
            "version": codec.PROTOCOL_VERSION,
            "shim_pid": os.getpid(),
            "agent_pid": self.proc.pid,
            "agent_start_time": self.start_time,
            "label": self.label,
            "base": self.base,
            "lost": self.lost,
            "exited": self.returncode,
        }
        ok = self._send(conn, codec.encode_frame(codec.HELLO, json.dumps(hello).encode()))
        pos = 0
        while ok and pos < self.journal_len:  # already framed: copy it as it is
            chunk = os.pread(self.journal_fd, min(codec.MAX_FRAME, self.journal_len - pos), pos)
            ok = bool(chunk) and self._send(conn, chunk)
            pos += len(chunk)
        if ok and self.stderr_tail:
            ok = self._send(conn, codec.encode_frame(codec.STDERR, bytes(self.stderr_tail)))
        pos = 0
        while ok and pos < self.spool_len:
            chunk = os.pread(self.spool_fd, min(codec.MAX_STDOUT_CHUNK, self.spool_len - pos), pos)
            ok = bool(chunk) and self._send(
                conn, codec.encode_frame(codec.STDOUT, codec.encode_output(self.base + pos, chunk))
            )
            pos += len(chunk)
        if not ok:
            if not conn.dead:
                self._detach(conn, "a spool file is shorter than expected")
            return
        if self._send(conn, codec.encode_frame(codec.REPLAYED)):
            conn.live = True
            self._send_exit(conn)

    def _send_exit(self, conn: Conn) -> None:
        rc = self.returncode
        if not self.done or rc is None or not conn.live or conn.got_exit:
            return
        if self._send(conn, codec.encode_frame(codec.EXIT, codec.encode_exit(rc))):
            conn.got_exit = self.exit_sent = True
            self._wake()

    def _check_done(self) -> None:
        if self.returncode is None or self.open_streams:
            return
        if not self.done:
            self.done = True
            log("agent finished: exit status and all its output read")
            self._wake()
        if self.conn is not None:
            self._send_exit(self.conn)

    # --- retention (lock held) ---

    def _room(self, n: int) -> bool:
        """Whether n more bytes may be retained; past --spool-bytes, drop all of it."""
        if not self.retaining:
            return False
        if self.spool_len + self.journal_len + n <= self.opts.spool_bytes:
            return True
        self._drop_all(f"more than --spool-bytes {self.opts.spool_bytes} to retain")
        return False

    def _drop_all(self, why: str) -> None:
        log(f"lost: {why}; not retaining until the next A")
        self.retaining, self.lost = False, True
        for fd in (self.spool_fd, self.journal_fd):
            with contextlib.suppress(OSError):
                os.ftruncate(fd, 0)
        self.spool_len = self.journal_len = 0
        self.base = self.read_off

    def _append(self, fd: int, at: int, data: bytes) -> bool:
        """Append to a spool file if there is room; False if the data is not retained."""
        if not self._room(len(data)):
            return False
        try:
            if os.pwrite(fd, data, at) == len(data):
                return True
            raise OSError("short write")
        except OSError as exc:  # e.g. ENOSPC: never block the agent for the spool
            self._drop_all(f"spool write failed: {exc}")
            return False

    def _ack(self, offset: int) -> None:
        if offset > self.read_off:
            log(f"A {offset} is past the {self.read_off} bytes read: taken as {self.read_off}")
            offset = self.read_off
        self.retaining, self.lost = True, False
        try:
            os.ftruncate(self.journal_fd, 0)
            self.journal_len = 0
            if offset > self.base:  # keep [offset, read_off): move that tail to the start
                drop, keep = offset - self.base, self.spool_len - (offset - self.base)
                pos = 0
                while pos < keep:
                    chunk = os.pread(self.spool_fd, min(codec.MAX_FRAME, keep - pos), drop + pos)
                    if not chunk or os.pwrite(self.spool_fd, chunk, pos) != len(chunk):
                        raise OSError("spool shorter than expected")
                    pos += len(chunk)
                os.ftruncate(self.spool_fd, keep)
                self.spool_len, self.base = keep, offset
        except OSError as exc:
            self._drop_all(f"spool rewrite failed: {exc}")

    # --- threads ---

    def _pump(self, kind: bytes) -> None:
        """Read one of the agent's streams; retain and forward each read at once. It waits
        for data outside the lock and reads and forwards it under the lock, so `taken` and
        the pipe's contents always account for all of the stream."""
        fd = self.streams[kind]
        poller = select.poll()
        poller.register(fd, select.POLLIN)
        while True:
            poller.poll()  # the only wait: nothing taken from the pipe is pending here
            with self.lock:
                if self.abandoned:
                    return
                try:
                    data = os.read(fd, codec.MAX_STDOUT_CHUNK)
                except BlockingIOError:
                    continue
                except OSError:
                    data = b""
                self.taken[kind] += len(data)
                self.changed.notify_all()  # _wait_agent runs once this read is forwarded
                if not data:
                    self.open_streams.discard(kind)
                    self._check_done()
                    return
                if kind == codec.STDOUT:
                    payload = codec.encode_output(self.read_off, data)
                    self.read_off += len(data)
                    if self._append(self.spool_fd, self.spool_len, data):
                        self.spool_len += len(data)
                    else:
                        self.base = self.read_off  # not retained: the next byte is the first
                else:
                    payload = data
                    self.stderr_tail += data
                    del self.stderr_tail[:-STDERR_TAIL]
                conn = self.conn
                if conn is not None and conn.live:
                    self._send(conn, codec.encode_frame(kind, payload))

    def _wait_agent(self) -> None:
        returncode = self.proc.wait()
        with self.lock:
            self.returncode = returncode
            # All the agent wrote is now either taken or still in its pipes; later bytes
            # can only come from a grandchild.
            owed = {kind: self.taken[kind] + unread(fd) for kind, fd in self.streams.items()}
            log(f"agent exited with {returncode}")
            self._check_done()
        self.exited.set()
        self._wake()
        deadline = time.monotonic() + EXIT_DRAIN
        with self.lock:
            while not self.done:
                left = deadline - time.monotonic()
                if left <= 0 and all(
                    self.taken[k] >= owed[k] and held_open(self.streams[k])
                    for k in self.open_streams
                ):
                    # Read and forwarded up to the exit, and a writer is left: do not wait
                    # for it forever. (A stream without a writer ends: wait for its EOF.)
                    log(
                        f"agent's output still open {EXIT_DRAIN:g} s after its exit and all "
                        "it wrote forwarded: a grandchild holds it; SIGKILL its group"
                    )
                    self._killpg(signal.SIGKILL)
                    self.abandoned = True
                    self.open_streams.clear()
                    self._check_done()
                    return
                self.changed.wait(left if left > 0 else None)

    def _serve(self, conn: Conn) -> None:
        """A connection's thread: the replay, then the daemon's frames, until EOF."""
        why = "closed by the daemon"
        try:
            with self.lock:
                if self.conn is conn:
                    self._replay(conn)
            while not conn.dead:
                header = recv_exact(conn.sock, codec.HEADER.size)
                if header is None:
                    break
                kind, length = codec.decode_header(header)
                if kind not in codec.DAEMON_FRAMES:
                    log(f"unknown frame type {kind!r} ({length} bytes): ignored")
                    while length > 0 and recv_exact(conn.sock, min(length, codec.MAX_FRAME)):
                        length -= min(length, codec.MAX_FRAME)
                    continue
                payload = recv_exact(conn.sock, length)
                if payload is None:
                    break
                self._handle(conn, kind, payload)
        except OSError as exc:
            why = str(exc)
        finally:
            with self.lock:
                self._detach(conn, why)
            conn.close()

    def _handle(self, conn: Conn, kind: bytes, payload: bytes) -> None:
        with self.lock:
            # A replaced connection's late frames are dropped, atomically with the replay
            # to its successor: a record is either in that replay and acted on, or neither.
            if self.conn is not conn:
                return
            if kind in (codec.INPUT, codec.JOURNAL):
                frame = codec.encode_frame(kind, payload)
                if self._append(self.journal_fd, self.journal_len, frame):
                    self.journal_len += len(frame)
            elif kind == codec.ACK:
                if len(payload) == codec.OFFSET.size:
                    self._ack(codec.decode_ack(payload))
                else:
                    log(f"A with a {len(payload)}-byte payload: ignored")
            elif kind == codec.LABEL:
                try:
                    self.label = json.loads(payload)
                except ValueError:
                    log("L payload is not JSON: label set to null")
                    self.label = None
        if kind == codec.INPUT:  # outside the state lock: the agent may not be reading its stdin
            with self.stdin_lock:
                if self.stdin_closed:
                    log(f"{len(payload)} input bytes after stdin was closed: dropped")
                    return
                try:
                    view = memoryview(payload)
                    while view:
                        view = view[os.write(self.stdin.fileno(), view) :]
                except OSError as exc:
                    log(f"writing the agent's stdin failed ({exc}): closing it")
                    self._close_stdin()
        elif kind == codec.END_INPUT:
            with self.stdin_lock:
                self._close_stdin()

    def _close_stdin(self) -> None:  # stdin_lock held
        if not self.stdin_closed:
            self.stdin_closed = True
            with contextlib.suppress(OSError):
                self.stdin.close()
            log("agent's stdin closed")

    # --- the main thread ---

    def run(self) -> None:
        signal.set_wakeup_fd(self.wake_w)
        while True:
            if _STOP_SIGNALS:
                log(f"signal {_STOP_SIGNALS[0]}: stopping")
                self._finish()
                return
            if self.done and self.conn is None and self.exit_sent:
                log("exit status delivered and the daemon is gone: exiting")
                return
            timeout = None
            if self.conn is None:
                timeout = self.detached_at + self.opts.orphan_timeout - time.monotonic()
                if timeout <= 0:
                    log(f"no daemon attached for {self.opts.orphan_timeout:g} s: orphaned")
                    self._finish()
                    # The turn's record outlives the shim: the next daemon stores the turn
                    # from it (every event clients saw), then removes it.
                    self.keep_journal = self.journal_len > 0 and not self.lost
                    return
            readable = select.select([self.listener.fileno(), self.wake_r], [], [], timeout)[0]
            self._drain_wake()
            if self.listener.fileno() in readable:
                self._accept()

    def _accept(self) -> None:
        try:
            sock, _ = self.listener.accept()
        except OSError:
            return
        sock.setblocking(True)
        conn, old = Conn(sock), self.conn
        if old is not None:
            old.kill()  # first: it fails a send blocked on the old daemon, which holds the lock
        with self.lock:
            self.conn = conn
        log("daemon attached" if old is None else "new daemon connection replaces the current")
        threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _wait(self, predicate: Callable[[], bool], timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while not predicate():
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return False
            select.select([self.wake_r], [], [], remaining)
            self._drain_wake()
        return True

    def _killpg(self, sig: int) -> None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.proc.pid, sig)  # the agent leads its group: pgid == pid

    def _finish(self) -> None:
        """Stop the agent if it still runs, then give an attached daemon its X."""
        grace = self.opts.stop_grace
        if not self.exited.is_set():
            log("stopping the agent: closing its stdin")
            # Held for long: a write the agent does not read; SIGTERM will end it.
            if self.stdin_lock.acquire(timeout=min(grace, 0.5)):
                self._close_stdin()
                self.stdin_lock.release()
            if not self._wait(self.exited.is_set, grace):
                log("agent still running: SIGTERM to its process group")
                self._killpg(signal.SIGTERM)
                if not self._wait(self.exited.is_set, grace):
                    log("agent still running: SIGKILL to its process group")
                    self._killpg(signal.SIGKILL)
                    self._wait(self.exited.is_set, 10.0)
        if not self._wait(lambda: self.done, EXIT_DRAIN + 1.0):
            log("agent's output did not end")
        conn = self.conn
        if conn is not None and not self._wait(lambda: conn.got_exit or conn.dead, 2.0):
            log("the daemon did not take its X in time")

    def cleanup(self) -> None:
        with contextlib.suppress(OSError):
            if os.lstat(self.opts.socket_path).st_ino == self.socket_ino:  # still ours
                os.unlink(self.opts.socket_path)
        left = [self.opts.spool]
        if not self.keep_journal:
            left.append(self.opts.spool + ".journal")
        for path in left:
            with contextlib.suppress(OSError):
                os.unlink(path)


def listen(path: str) -> socket.socket:
    with contextlib.suppress(FileNotFoundError):
        if stat.S_ISSOCK(os.lstat(path).st_mode):
            os.unlink(path)  # stale (a live shim's path is never reused); others make bind fail
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    old = os.umask(0o177)  # no thread runs yet: the socket is 0600 from its creation
    try:
        sock.bind(path)
    finally:
        os.umask(old)
    os.chmod(path, 0o600)
    sock.listen(16)
    sock.setblocking(False)
    return sock


def open_spool(path: str) -> int:
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o600)
    os.fchmod(fd, 0o600)
    return fd


def spawn(opts: Options) -> subprocess.Popen[bytes]:
    if not (os.path.isfile(opts.argv[0]) and os.access(opts.argv[0], os.X_OK)):
        raise ValueError(f"{opts.argv[0]}: not found or not executable")
    dirs = os.environ.get("PATH", "").split(os.pathsep)
    setpriv = next(
        (p for p in (os.path.join(d, "setpriv") for d in dirs if d) if os.access(p, os.X_OK)),
        "/usr/bin/setpriv",
    )
    if not os.access(setpriv, os.X_OK):
        raise ValueError("setpriv (util-linux) not found")
    # No preexec_fn (Python between fork and exec); setpriv sets the parent-death signal.
    return subprocess.Popen(
        [setpriv, "--pdeathsig", "KILL", "--", *opts.argv],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        bufsize=0,
        start_new_session=True,
        umask=opts.umask,
    )


def write_ready(message: dict[str, object]) -> None:
    """The one line on stdout, then stdout is closed (/dev/null takes fd 1)."""
    data = (json.dumps(message) + "\n").encode()
    try:
        while data:
            data = data[os.write(1, data) :]
    except OSError as exc:
        log(f"cannot write the ready line: {exc}")
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 1)
    os.close(devnull)


def _on_stop_signal(signum: int, frame: object) -> None:
    _STOP_SIGNALS.append(signum)  # the wakeup fd wakes the main loop, which acts on it


def _on_hup(signum: int, frame: object) -> None:
    """SIGHUP is ignored by a handler, not SIG_IGN: an ignored disposition would be inherited
    by the agent through exec, a handler is reset to the default there."""


def main(args: list[str]) -> int:
    signal.signal(signal.SIGPIPE, signal.SIG_IGN)  # subprocess restores it in the agent
    signal.signal(signal.SIGHUP, _on_hup)
    signal.signal(signal.SIGTERM, _on_stop_signal)
    signal.signal(signal.SIGINT, _on_stop_signal)
    created: list[str] = []
    try:
        opts = Options(args)
        listener = listen(opts.socket_path)
        created.append(opts.socket_path)
        spools = []
        for path in (opts.spool, opts.spool + ".journal"):
            spools.append(open_spool(path))
            created.append(path)
        proc = spawn(opts)
    except (ValueError, OSError, subprocess.SubprocessError) as exc:
        log(f"cannot start the agent: {exc}")
        for path in created:
            with contextlib.suppress(OSError):
                os.unlink(path)
        write_ready({"error": str(exc)})
        return 127
    shim = Shim(opts, listener, (spools[0], spools[1]), proc)
    shim.start_threads()
    write_ready(
        {"agent_pid": proc.pid, "agent_start_time": shim.start_time, "shim_pid": os.getpid()}
    )
    log(f"agent {proc.pid} started: {opts.argv}")
    try:
        shim.run()
    finally:
        shim.cleanup()
    log("exit")
    return 0


if __name__ == "__main__":
    # os._exit: a thread may still be blocked in a send to a daemon that stopped reading;
    # nothing is left to flush (the log is written unbuffered).
    os._exit(main(sys.argv[1:]))
