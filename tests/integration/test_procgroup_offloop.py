"""Stopping an agent never scans /proc on the event loop: the leader's own stat (or an empty
group) decides, and when only the members' start times can tell, the scan runs in a thread.

`procgroup._all_stats` (the scan) is replaced by a wrapper that records the thread it runs in.
"""

from __future__ import annotations

import asyncio
import os
import re
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from atomizerd.agents import procgroup
from atomizerd.agents import protocol as p
from atomizerd.agents.argv import STREAM_JSON_FLAGS, build_env
from atomizerd.agents.process import AgentProcess
from atomizerd.agents.procgroup import (
    is_our_group,
    is_running,
    kill_group_if_same,
    kill_group_if_same_async,
    process_start_time,
)

FAKE = Path(__file__).resolve().parents[2] / "tests" / "support" / "fake_agent.py"


@pytest.fixture
def scans(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Names of the threads that scanned /proc."""
    seen: list[str] = []
    real = procgroup._all_stats

    def recording() -> Iterator[procgroup.ProcStat]:
        seen.append(threading.current_thread().name)
        yield from real()

    monkeypatch.setattr(procgroup, "_all_stats", recording)
    return seen


def wait_gone(pid: int, seconds: float = 5.0) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if not is_running(pid):
            return True
        time.sleep(0.05)
    return False


async def spawn(cwd: Path) -> AgentProcess:
    argv = [sys.executable, str(FAKE), *STREAM_JSON_FLAGS, f"--session-id={uuid.uuid4()}"]
    return await AgentProcess.spawn(argv, env=build_env(os.environ, {}), cwd=cwd)


async def reply(proc: AgentProcess, text: str) -> str:
    await proc.send_user_message(text)
    parts = []
    async with asyncio.timeout(30):
        while not isinstance(item := await proc.receive(), p.Result):
            if isinstance(item, p.TextDelta):
                parts.append(item.text)
    return "".join(parts)


def test_stopping_live_agents_does_not_scan_proc(tmp_path: Path, scans: list[str]) -> None:
    async def scenario() -> tuple[int | None, int | None]:
        calm = await spawn(tmp_path)
        await reply(calm, "hello")
        stuck = await spawn(tmp_path)
        await stuck.send_user_message("stuck here [[hang]]")
        while not isinstance(await stuck.receive(), p.TextDelta):
            pass
        # calm exits when its input closes; stuck is signalled (SIGTERM, then SIGKILL) while
        # alive, when its stat decides; once gone, both groups are empty: nothing to scan.
        return await calm.stop(grace=2.0), await stuck.stop(grace=0.3)

    assert asyncio.run(scenario()) == (0, -signal.SIGKILL)
    assert scans == []


def test_a_leftover_member_is_found_off_the_loop(tmp_path: Path, scans: list[str]) -> None:
    async def scenario() -> tuple[int, int | None]:
        proc = await spawn(tmp_path)
        child = int(re.findall(r"child pid (\d+)", await reply(proc, "[[spawn-child]]"))[0])
        return child, await proc.stop(grace=2.0)  # the agent exits; its child stays behind

    child, code = asyncio.run(scenario())
    try:
        assert code == 0
        assert wait_gone(child), "the agent's child outlived stop()"
        assert scans, "a group without its leader needs the members' start times"
        assert threading.main_thread().name not in scans
    finally:
        if is_running(child):
            os.kill(child, signal.SIGKILL)


def test_the_leader_or_an_empty_group_decides_without_a_scan(scans: list[str]) -> None:
    sleeper = subprocess.Popen(["sleep", "300"], start_new_session=True)
    try:
        start = process_start_time(sleeper.pid)
        assert start is not None
        assert is_our_group(sleeper.pid, start)
        assert not is_our_group(sleeper.pid, start + 1)
        assert kill_group_if_same(sleeper.pid, start)
        sleeper.wait(5)
        assert not is_our_group(sleeper.pid, start)  # reaped, nobody left in the group
        assert not kill_group_if_same(sleeper.pid, start)
        assert scans == []
    finally:
        sleeper.kill()
        sleeper.wait()


def test_the_async_kill_of_a_leaderless_group_scans_in_a_thread(scans: list[str]) -> None:
    leader = subprocess.Popen(
        [sys.executable, "-c", "import subprocess; print(subprocess.Popen(['sleep', '300']).pid)"],
        stdout=subprocess.PIPE,
        start_new_session=True,
    )
    assert leader.stdout is not None
    member = int(leader.stdout.readline())
    start = process_start_time(leader.pid)
    try:
        leader.wait(10)
        assert start is not None and is_running(member)

        async def kill(start_time: int) -> bool:
            return await kill_group_if_same_async(leader.pid, start_time)

        assert not asyncio.run(kill(start + 10**9))  # members older than that: not ours
        assert is_running(member)
        assert asyncio.run(kill(start))
        assert wait_gone(member)
        assert len(scans) == 2
        assert threading.main_thread().name not in scans
    finally:
        leader.stdout.close()
        if is_running(member):
            os.kill(member, signal.SIGKILL)
