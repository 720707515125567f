"""The pool under contention, from outside: the real daemon, the real pinned CLI against the
fake Messages API, processes counted in /proc by a sampler thread (not the daemon's word)."""

from __future__ import annotations

import os
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path

import pytest
from atomizer.v1 import session_pb2 as pb

from tests.conftest import Stubs, stubs_for
from tests.e2e.conftest import E2E
from tests.support.daemon import RunningDaemon
from tests.support.turns import send

pytestmark = pytest.mark.e2e

SHIM = b"/agents/shim.py"  # a shim's argv


def agents_of(daemon_pid: int, runtime_dir: Path) -> int:
    """Live agent processes of this daemon: processes whose argv names its runtime dir
    (--mcp-config), among its children and, when agents run under shims, the shims' children.
    A shim is not an agent (its argv holds its agent's, but once the agent exited it holds
    nothing); the CLI's own children (its sandbox's socat, its tools) are not agents either."""
    marker = f"--mcp-config={runtime_dir}".encode()
    procs: dict[int, tuple[int, bytes, bytes]] = {}  # pid -> (ppid, state, argv)
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/cmdline", "rb") as f:
                args = f.read()
            with open(f"/proc/{name}/stat", "rb") as f:
                state, ppid = f.read().rsplit(b")", 1)[1].split()[:2]
        except OSError:
            continue
        procs[int(name)] = (int(ppid), state, args)
    shims = {
        pid
        for pid, (ppid, _, args) in procs.items()
        if ppid == daemon_pid and any(SHIM in a for a in args.split(b"\0")[:4])
    }
    return sum(
        1
        for pid, (ppid, state, args) in procs.items()
        if state != b"Z"
        and marker in args
        and pid not in shims
        and (ppid == daemon_pid or ppid in shims)
    )


@contextmanager
def sampled(daemon: RunningDaemon) -> Iterator[list[int]]:
    assert daemon.proc is not None
    pid, runtime_dir = daemon.proc.pid, daemon.runtime_dir
    samples: list[int] = []
    done = threading.Event()

    def sample() -> None:
        while not done.is_set():
            samples.append(agents_of(pid, runtime_dir))
            done.wait(0.01)

    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    try:
        yield samples
    finally:
        done.set()
        thread.join()


def outcome(stubs: Stubs, sid: str, text: str) -> str:
    events = send(stubs, sid, text)
    last = events[-1]
    if last.WhichOneof("kind") == "turn_failed":
        return f"failed: {last.turn_failed.message}"
    return "interrupted" if last.turn_completed.interrupted else "ok"


def test_four_new_sessions_sending_at_once_never_exceed_a_cap_of_two(e2e: E2E) -> None:
    stubs = e2e.start({"pool": {"max_live": 2}})
    assert e2e.daemon is not None
    for round_ in range(3):
        sids = [f"r{round_}s{i}" for i in range(4)]
        with sampled(e2e.daemon) as samples, ThreadPoolExecutor(4) as ex:
            for sid in sids:
                stubs.sessions.CreateSession(pb.CreateSessionRequest(session_id=sid))
            results = list(ex.map(lambda sid: outcome(stubs, sid, "hello"), sids))
        assert results == ["ok"] * 4
        assert samples and max(samples) <= 2, f"round {round_}: up to {max(samples)} live agents"
        assert max(samples) == 2, "the sampler sees the agents (the cap was reached)"


def test_one_slot_two_sessions_twenty_rounds_at_once_no_turn_fails(short_tmp: Path) -> None:
    # Forty evictions and respawns: the scripted fake agent keeps this quick (the real CLI's
    # version of the race is the four-session test above).
    config = {"pool": {"max_live": 1}, "agent": {"prewarm": False}}
    with RunningDaemon(short_tmp, config) as daemon:
        stubs = stubs_for(daemon.channel())
        for sid in ("a", "b"):
            stubs.sessions.CreateSession(pb.CreateSessionRequest(session_id=sid))
        with sampled(daemon) as samples, ThreadPoolExecutor(2) as ex:
            failures = []
            for i in range(20):
                texts = [f"round {i}"] * 2
                results = list(ex.map(lambda sid, t: outcome(stubs, sid, t), ("a", "b"), texts))
                failures += [r for r in results if r != "ok"]
        assert failures == []
        assert max(samples) == 1, "at most one agent, and the sampler sees it"
