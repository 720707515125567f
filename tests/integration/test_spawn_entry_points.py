"""Many agent spawns through the daemon as it ships: no agent dies at spawn.

The daemon is started as the installed `atomizerd` console script (what systemd runs) and as
`python -m atomizerd`. Each session is created (its agent is pre-warmed: one spawn), gets one
turn and is terminated (its agent stopped), a few sessions at a time. A spawn crash is an
agent ended by a signal the daemon did not send: children that crashed between fork and exec
(SIGSEGV, SIGABRT) used to be one spawn in eight under the console script. Checked from the
outside: every turn completes, there is exactly one spawn per session, every agent exits on
its own with status 0, and the pid the daemon records is the agent itself (not a wrapper), a
child of the daemon.
"""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
from atomizer.v1 import session_pb2 as pb

from atomizerd.agents.procgroup import read_stat
from tests.conftest import Stubs, stubs_for
from tests.e2e.conftest import real_cli_config
from tests.support.daemon import EntryPoint, RunningDaemon, console_script, real_claude
from tests.support.fake_messages_api import FakeMessagesAPI
from tests.support.turns import reply_text, send

WORKERS = 4


def spawn_many(
    daemon: RunningDaemon,
    stubs: Stubs,
    count: int,
    check_agent: Callable[[int], None],
    workers: int = WORKERS,
) -> None:
    """`count` sessions, each: created (a spawn), one turn, terminated."""

    def one(i: int) -> None:
        sid = f"s{i}"
        stubs.sessions.CreateSession(pb.CreateSessionRequest(session_id=sid), timeout=60)
        events = send(stubs, sid, f"hello {i}")
        last = events[-1]
        assert last.WhichOneof("kind") == "turn_completed", (sid, last)
        assert reply_text(events) == f"echo: hello {i}"
        if i % 10 == 0:  # the agent is alive and idle between its turn and its stop
            check_agent(agent_pid(daemon, sid))
        stubs.sessions.TerminateSession(pb.TerminateSessionRequest(session_id=sid), timeout=60)

    with ThreadPoolExecutor(workers) as pool:
        list(pool.map(one, range(count)))


def agent_pid(daemon: RunningDaemon, session_id: str) -> int:
    pids = [
        int(r["agent_pid"])
        for r in daemon.log_records()
        if r.get("event") == "agent.spawned" and r.get("session_id") == session_id
    ]
    assert len(pids) == 1, f"{session_id}: {len(pids)} agents started (pids {pids})"
    return pids[0]


def assert_no_spawn_crash(daemon: RunningDaemon, sessions: int) -> None:
    records = daemon.log_records()
    spawned = [r["agent_pid"] for r in records if r.get("event") == "agent.spawned"]
    signalled = {r["agent_pid"] for r in records if r.get("event") == "agent.signal_group"}
    exits = {
        r["agent_pid"]: r.get("returncode") for r in records if r.get("event") == "agent.exited"
    }
    crashed = {
        pid: code
        for pid, code in exits.items()
        if isinstance(code, int) and code < 0 and pid not in signalled
    }
    assert crashed == {}, f"agents killed by a signal the daemon did not send: {crashed}"
    assert len(spawned) == sessions, f"{len(spawned)} spawns for {sessions} sessions (respawns)"
    assert sorted(exits) == sorted(spawned), "an agent's exit was not seen"
    assert set(exits.values()) == {0}, f"exit statuses: {sorted(exits.values(), key=str)}"


def cmdline(pid: int) -> list[str]:
    return Path(f"/proc/{pid}/cmdline").read_bytes().decode().split("\0")[:-1]


def check_is_child_agent(daemon: RunningDaemon, marker: str) -> Callable[[int], None]:
    def check(pid: int) -> None:
        assert daemon.proc is not None
        argv = cmdline(pid)
        assert "setpriv" not in Path(argv[0]).name, argv  # setpriv exec'd the agent in place
        assert any(marker in arg for arg in argv), argv
        stat = read_stat(pid)
        assert stat is not None
        # Started by the daemon, or by its shim (agent.survive_restart), which the daemon started.
        shim = read_stat(stat.ppid)
        assert daemon.proc.pid in (stat.ppid, shim.ppid if shim is not None else None)

    return check


def test_the_daemon_is_started_as_the_installed_console_script(short_tmp: Path) -> None:
    daemon = RunningDaemon(short_tmp)
    with daemon:
        assert daemon.proc is not None
        assert cmdline(daemon.proc.pid)[1] == str(console_script())  # python <script> ...


@pytest.mark.parametrize(("entry", "count"), [("script", 100), ("module", 40)])
def test_fake_agent_spawns_never_crash(short_tmp: Path, entry: EntryPoint, count: int) -> None:
    config: dict[str, Any] = {"pool": {"max_live": WORKERS}, "agent": {"stop_grace": 10.0}}
    with RunningDaemon(short_tmp, config, entry=entry) as daemon:
        spawn_many(
            daemon,
            stubs_for(daemon.channel()),
            count,
            check_is_child_agent(daemon, "fake_agent.py"),
        )
    assert daemon.proc is not None and daemon.proc.returncode == 0
    assert_no_spawn_crash(daemon, count)


@pytest.mark.e2e
@pytest.mark.skipif(not Path(real_claude()).exists(), reason=f"no claude CLI at {real_claude()}")
def test_real_cli_spawns_never_crash(short_tmp: Path) -> None:
    count = 12
    with FakeMessagesAPI() as api:
        config = real_cli_config(
            short_tmp, api, {"pool": {"max_live": 3}, "agent": {"stop_grace": 10.0}}
        )
        with RunningDaemon(short_tmp, config) as daemon:
            spawn_many(
                daemon,
                stubs_for(daemon.channel()),
                count,
                check_is_child_agent(daemon, "claude"),
                workers=3,
            )
    assert daemon.proc is not None and daemon.proc.returncode == 0
    assert_no_spawn_crash(daemon, count)
