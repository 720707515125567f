"""A full disk under the state dir: writes are refused as RESOURCE_EXHAUSTED naming the disk,
reads go on, and freed space brings writes back without a restart. A disk that fails (its file
system turned read-only) is an outage the daemon rides out the same way.

The state dir is a 2 MiB tmpfs, filled to the last byte or remounted read-only (needs root).
"""

from __future__ import annotations

import errno
import os
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path

import grpc
import pytest
from atomizer.v1 import session_pb2 as pb
from grpc_health.v1 import health_pb2, health_pb2_grpc

from tests.conftest import Stubs, stubs_for
from tests.support.daemon import RunningDaemon
from tests.support.waiting import wait_for


@pytest.fixture
def small_disk(short_tmp: Path) -> Iterator[Path]:
    """A 2 MiB tmpfs, unmounted afterwards whatever happens."""
    if os.geteuid() != 0:
        pytest.skip("mounting a small tmpfs needs root")
    mountpoint = short_tmp / "disk"
    mountpoint.mkdir()
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=2m,mode=0700", "tmpfs", str(mountpoint)],
        capture_output=True,
        text=True,
        check=False,
    )
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.strip() or mounted.returncode}")
    try:
        yield mountpoint
    finally:
        if subprocess.run(["umount", str(mountpoint)], check=False).returncode != 0:
            subprocess.run(["umount", "-l", str(mountpoint)], check=False)


def fill(path: Path) -> None:
    """Writes `path` until the filesystem has not one byte left."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    try:
        for chunk in (b"\0" * 65536, b"\0" * 4096, b"\0"):
            try:
                while True:
                    os.write(fd, chunk)
            except OSError as e:
                assert e.errno == errno.ENOSPC, e
    finally:
        os.close(fd)


def turn(stubs: Stubs, sid: str, text: str) -> list[pb.SessionEvent]:
    stream = stubs.sessions.SendMessage(
        pb.SendMessageRequest(session_id=sid, text=text), timeout=60
    )
    return [r.event for r in stream]


def refused(call: Callable[[], object]) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as err:
        call()
    return err.value


def test_a_full_disk_refuses_writes_clearly_and_freed_space_brings_them_back(
    short_tmp: Path, small_disk: Path
) -> None:
    state = small_disk / "state"
    with RunningDaemon(short_tmp, {"daemon": {"state_dir": str(state)}}) as d:
        stubs = stubs_for(d.channel())
        stubs.sessions.CreateSession(pb.CreateSessionRequest(session_id="before"), timeout=10)
        # A whole turn first: the session's agent is up and everything of it is stored.
        assert turn(stubs, "before", "hello")[-1].WhichOneof("kind") == "turn_completed"

        filler = small_disk / "filler"
        fill(filler)

        err = refused(lambda: stubs.sessions.CreateSession(pb.CreateSessionRequest(), timeout=10))
        assert err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, err.details()
        details = err.details() or ""
        assert "disk is full" in details and str(state) in details

        err = refused(lambda: turn(stubs, "before", "while full"))
        assert err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, err.details()
        assert "disk is full" in (err.details() or "")

        # Reads go on.
        got = stubs.sessions.GetSession(pb.GetSessionRequest(session_id="before"), timeout=10)
        assert got.session.session_id == "before"
        listed = stubs.sessions.ListSessions(pb.ListSessionsRequest(), timeout=10)
        assert [s.session_id for s in listed.sessions] == ["before"]
        history = stubs.sessions.GetHistory(
            pb.GetHistoryRequest(session_id="before"), timeout=10
        ).messages
        assert [m.content for m in history] == ["hello", "echo: hello"]

        # Space freed: the same daemon writes again.
        filler.unlink()
        stubs.sessions.CreateSession(pb.CreateSessionRequest(session_id="after"), timeout=10)
        assert turn(stubs, "before", "again")[-1].WhichOneof("kind") == "turn_completed"
        assert turn(stubs, "after", "fresh")[-1].WhichOneof("kind") == "turn_completed"
        history = stubs.sessions.GetHistory(
            pb.GetHistoryRequest(session_id="before"), timeout=10
        ).messages
        assert [m.content for m in history] == ["hello", "echo: hello", "again", "echo: again"]
        # Refused, not failed: no request ended in an internal error.
        assert not [r for r in d.log_records() if r.get("event") == "request failed"]
    assert d.proc is not None and d.proc.returncode == 0, d.log()


@pytest.fixture
def failing_disk(short_tmp: Path) -> Iterator[Callable[[], None]]:
    """A 16 MiB ext4 file system on a loop device, mounted at `short_tmp/disk` with
    errors=remount-ro; the fixture's value makes it fail now (ext4's own error trigger: the
    kernel turns it read-only, as after an I/O error). Unmounted afterwards."""
    if os.geteuid() != 0:
        pytest.skip("a loop-mounted file system needs root")
    image, mountpoint = short_tmp / "disk.img", short_tmp / "disk"
    mountpoint.mkdir()
    with open(image, "wb") as f:
        f.truncate(16 << 20)
    made = subprocess.run(["mkfs.ext4", "-q", str(image)], capture_output=True, check=False)
    mounted = subprocess.run(
        ["mount", "-o", "loop,errors=remount-ro", str(image), str(mountpoint)],
        capture_output=True,
        text=True,
        check=False,
    )
    if made.returncode != 0 or mounted.returncode != 0:
        pytest.skip(f"cannot loop-mount an ext4 image here: {mounted.stderr.strip()}")
    device = subprocess.run(
        ["findmnt", "-no", "SOURCE", str(mountpoint)], capture_output=True, text=True, check=True
    ).stdout.strip()
    trigger = Path("/sys/fs/ext4") / Path(device).name / "trigger_fs_error"
    try:
        if not trigger.exists():
            pytest.skip("this kernel's ext4 has no error trigger")

        def fail() -> None:
            trigger.write_text("1")

        yield fail
    finally:
        if subprocess.run(["umount", str(mountpoint)], check=False).returncode != 0:
            subprocess.run(["umount", "-l", str(mountpoint)], check=False)


def serving(d: RunningDaemon) -> int:
    with grpc.insecure_channel(d.target) as ch:
        return int(
            health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=5).status
        )


def test_a_disk_that_fails_mid_turn_is_an_outage_the_daemon_rides_out(
    short_tmp: Path, failing_disk: Callable[[], None]
) -> None:
    """The file system under the state dir fails while a turn streams (the kernel turns it
    read-only, as on I/O errors). The daemon keeps running and says NOT_SERVING; writes are
    refused as UNAVAILABLE naming the database; the running turn still ends for its client;
    no request fails internally and the daemon stops cleanly. (A database that comes back is
    the PostgreSQL outage tests' and the full disk's: the same code stores what waited.)"""
    state = short_tmp / "disk" / "state"
    with RunningDaemon(short_tmp, {"daemon": {"state_dir": str(state)}}) as d:
        stubs = stubs_for(d.channel())
        stubs.sessions.CreateSession(pb.CreateSessionRequest(session_id="s"), timeout=10)
        assert turn(stubs, "s", "hello")[-1].WhichOneof("kind") == "turn_completed"

        words = " ".join(f"w{i}" for i in range(30))
        stream = stubs.sessions.SendMessage(
            pb.SendMessageRequest(session_id="s", text=f"[[slow:100]] {words}"), timeout=120
        )
        events = []
        for resp in stream:
            events.append(resp.event)
            if resp.event.WhichOneof("kind") == "text_delta":
                break
        failing_disk()
        wait_for(
            "the daemon says it cannot write",
            lambda: serving(d) == health_pb2.HealthCheckResponse.NOT_SERVING,
            60,
        )
        err = refused(lambda: stubs.sessions.CreateSession(pb.CreateSessionRequest(), timeout=10))
        assert err.code() == grpc.StatusCode.UNAVAILABLE, err.details()
        assert "database" in (err.details() or "")
        events += [resp.event for resp in stream]  # the turn ends for its client
        assert events[-1].WhichOneof("kind") == "turn_completed", events[-1]
        streamed = "".join(
            e.text_delta.text for e in events if e.WhichOneof("kind") == "text_delta"
        )
        assert streamed == f"echo: {words}"
        assert not [r for r in d.log_records() if r.get("event") == "request failed"]
    assert d.proc is not None and d.proc.returncode == 0, d.log()
