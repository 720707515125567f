"""One owner for an agent shim's files (its socket under `<runtime_dir>/agents/`, its spool
under `<state_dir>/agent-spool/`): whoever ends a shim removes them at once. The daemon when it
stops an agent or finds its shim killed, the start-up adoption for a shim it stops (and crash
recovery never kills that shim on top of it), the shim itself at its orphan timeout."""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Callable
from pathlib import Path

from atomizer.v1 import session_pb2 as pb

from tests.conftest import stubs_for
from tests.support.daemon import RunningDaemon


def wait_for(condition: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


def shim_files(d: RunningDaemon) -> list[str]:
    """Every shim socket and spool file on disk."""
    found = [*(d.runtime_dir / "agents").glob("*"), *(d.state_dir / "agent-spool").glob("*")]
    return sorted(p.name for p in found)


def files_of(d: RunningDaemon, shim: str) -> list[str]:
    return [name for name in shim_files(d) if name.startswith(shim + ".")]


def spawned(d: RunningDaemon) -> list[dict[str, object]]:
    return [r for r in d.log_records() if r.get("event") == "agent.spawned"]


def shim_pid(agent_pid: int) -> int:
    with open(f"/proc/{agent_pid}/stat") as f:
        return int(f.read().rsplit(")", 1)[1].split()[1])


def gone(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] == "Z"
    except FileNotFoundError:
        return True


def test_a_shim_killed_while_the_daemon_runs_leaves_nothing(short_tmp: Path) -> None:
    with RunningDaemon(short_tmp) as d:
        stubs = stubs_for(d.channel())
        stubs.sessions.CreateSession(pb.CreateSessionRequest(session_id="k"))
        list(stubs.sessions.SendMessage(pb.SendMessageRequest(session_id="k", text="hi")))
        (record,) = spawned(d)
        name, agent = str(record["shim"]), int(str(record["agent_pid"]))
        assert len(files_of(d, name)) == 3  # socket, stdout spool, journal
        os.kill(shim_pid(agent), signal.SIGKILL)
        wait_for(lambda: not files_of(d, name), 10, "the killed shim's files to be removed")
        # The session goes on with a new agent.
        events = list(stubs.sessions.SendMessage(pb.SendMessageRequest(session_id="k", text="x")))
        assert events[-1].event.WhichOneof("kind") == "turn_completed"


def test_a_final_stop_leaves_no_shim_files(short_tmp: Path) -> None:
    d = RunningDaemon(short_tmp, {"pool": {"spares": 1}}).start()
    try:
        stubs = stubs_for(d.channel())
        for sid in ("a", "b"):
            stubs.sessions.CreateSession(pb.CreateSessionRequest(session_id=sid))
            list(stubs.sessions.SendMessage(pb.SendMessageRequest(session_id=sid, text="hi")))
        wait_for(lambda: len(spawned(d)) == 3, 20, "two agents and a spare")
        pids = [int(str(r["agent_pid"])) for r in spawned(d)]
        shims = [shim_pid(p) for p in pids]
        assert shim_files(d)
    finally:
        assert d.stop() == 0
    assert shim_files(d) == [], "the stopped daemon removed what its shims had"
    wait_for(lambda: all(gone(p) for p in pids + shims), 10, "the agents and shims to exit")


def test_adoption_ends_the_shims_it_stops_and_recovery_does_not_kill_them(
    short_tmp: Path,
) -> None:
    d = RunningDaemon(short_tmp, {"pool": {"spares": 1}}).start()
    wait_for(lambda: len(spawned(d)) == 1, 20, "the spare")
    (spare,) = spawned(d)
    d.kill()  # a crash: the spare's shim lives on; the next daemon stops it (not a session)
    d.start()
    try:
        records = d.log_records()
        stopped = [
            r for r in records if r.get("event") == "agent left by the previous daemon stopped"
        ]
        assert [r["pid"] for r in stopped] == [spare["agent_pid"]]
        killed = [r for r in records if r.get("event") == "killed agent left by a previous daemon"]
        assert killed == [], "crash recovery raced the adoption's stop"
        assert files_of(d, str(spare["shim"])) == []
        wait_for(lambda: gone(int(str(spare["agent_pid"]))), 10, "the old spare to exit")
    finally:
        d.stop()
    assert shim_files(d) == []
