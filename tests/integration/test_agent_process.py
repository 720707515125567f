"""AgentProcess against real subprocesses: the scripted fake agent, plain `sleep`, and (for the
version probe and the argv handshake only) the real pinned `claude` CLI."""

from __future__ import annotations

import asyncio
import os
import re
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, TypeVar

import pytest

from atomizerd.agents import protocol as p
from atomizerd.agents.argv import STREAM_JSON_FLAGS, AgentSpec, build_argv, build_env
from atomizerd.agents.process import AgentProcess, probe_version
from atomizerd.agents.procgroup import (
    is_running,
    kill_group_if_same,
    process_start_time,
    read_stat,
)
from atomizerd.agents.vocabulary import (
    AgentExited,
    AgentItem,
    AgentSpawnError,
    ControlError,
    LineTooLong,
    WriteTimeout,
)

REPO = Path(__file__).resolve().parents[2]
FAKE = REPO / "tests" / "support" / "fake_agent.py"
REAL_CLI = Path(os.environ.get("ATOMIZERD_TEST_CLAUDE") or Path(sys.executable).parent / "claude")

T = TypeVar("T")


def run(test: Callable[[], Awaitable[T]], limit: float = 60.0) -> T:
    async def bounded() -> T:
        return await asyncio.wait_for(test(), limit)

    return asyncio.run(bounded())


def fake_argv(conversation_id: str | None = None) -> list[str]:
    cid = conversation_id or str(uuid.uuid4())
    return [sys.executable, str(FAKE), *STREAM_JSON_FLAGS, f"--session-id={cid}"]


async def spawn_fake(
    cwd: Path, env: dict[str, str] | None = None, argv: list[str] | None = None, **kw: Any
) -> AgentProcess:
    return await AgentProcess.spawn(
        argv or fake_argv(), env=build_env(os.environ, env or {}), cwd=cwd, **kw
    )


async def turn(proc: AgentProcess, text: str, seconds: float = 30.0) -> list[AgentItem]:
    """Send one user message; items up to the result (or the process's end)."""
    await proc.send_user_message(text)
    return await until_end(proc, seconds)


async def until_end(proc: AgentProcess, seconds: float = 30.0) -> list[AgentItem]:
    items: list[AgentItem] = []
    async with asyncio.timeout(seconds):
        while True:
            item = await proc.receive()
            items.append(item)
            if isinstance(item, p.Result | AgentExited):
                return items


def texts(items: list[AgentItem]) -> str:
    return "".join(i.text for i in items if isinstance(i, p.TextDelta))


def of_type(items: list[AgentItem], kind: type[T]) -> list[T]:
    return [i for i in items if isinstance(i, kind)]


def wait_gone(pid: int, seconds: float = 5.0) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if not is_running(pid):
            return True
        time.sleep(0.05)
    return False


# --- a normal life ----------------------------------------------------------------------------


def test_turn_then_graceful_stop(tmp_path: Path) -> None:
    cid = str(uuid.uuid4())

    async def scenario() -> None:
        proc = await spawn_fake(tmp_path, argv=fake_argv(cid))
        try:
            assert proc.alive and proc.pgid == proc.pid
            assert proc.start_time == process_start_time(proc.pid)
            items = await turn(proc, "hello wörld")
            init = items[0]
            assert isinstance(init, p.Init) and init.session_id == cid
            assert texts(items) == "echo: hello wörld"
            (assistant,) = of_type(items, p.AssistantMessage)
            assert assistant.text == "echo: hello wörld"
            result = items[-1]
            assert isinstance(result, p.Result)
            assert (result.is_error, result.result_text, result.session_id) == (
                False,
                "echo: hello wörld",
                cid,
            )
            assert result.total_cost_usd > 0 and result.usage["input_tokens"] > 0
            # The process stays up between turns.
            assert texts(await turn(proc, "again")) == "echo: again"
        finally:
            assert await proc.stop(grace=3.0) == 0
        exited = await proc.receive()
        assert isinstance(exited, AgentExited) and exited.returncode == 0
        assert isinstance(await proc.receive(), AgentExited)  # sticky
        assert proc.returncode == 0
        assert not is_running(proc.pid)

    run(scenario)


def test_initialize_handshake_is_answered_outside_the_stream(tmp_path: Path) -> None:
    async def scenario() -> None:
        proc = await spawn_fake(tmp_path)
        try:
            answer = await proc.initialize(timeout=10)
            assert answer["claude_code_version"] == "0.0.0-fake"
            assert answer["pid"] == proc.pid
            with pytest.raises(ControlError, match="Unsupported"):
                await proc.request("no_such_thing", timeout=10)
            items = await turn(proc, "hi")
            assert not of_type(items, p.ControlResponse)
        finally:
            await proc.stop(1.0)

    run(scenario)


def test_argv_from_spec_reaches_the_agent(tmp_path: Path) -> None:
    cid = str(uuid.uuid4())
    spec = AgentSpec(
        command=(sys.executable, str(FAKE)),
        conversation_id=cid,
        model="-odd-model",
        skip_permissions=True,
        add_dirs=(str(tmp_path),),
        allowed_tools=("Read", "Bash(git log *)"),
    )

    async def scenario() -> None:
        argv = build_argv(spec)
        proc = await spawn_fake(tmp_path, argv=argv)
        try:
            init = (await turn(proc, "hi"))[0]
            assert isinstance(init, p.Init)
            assert init.session_id == cid and init.model == "-odd-model"
            assert init.permission_mode == "bypassPermissions"
            assert init.raw["fake_argv"] == argv[2:]
            assert init.raw["cwd"] == str(tmp_path)
        finally:
            await proc.stop(1.0)

    run(scenario)


def test_environment_is_explicit_and_has_no_claudecode(tmp_path: Path, monkeypatch: Any) -> None:
    monkeypatch.setenv("CLAUDECODE", "1")
    monkeypatch.setenv("SOME_DAEMON_SECRET", "s3cr3t")

    async def scenario() -> None:
        proc = await spawn_fake(tmp_path, env={"ANTHROPIC_API_KEY": "k"})
        try:
            assert texts(await turn(proc, "[[env:CLAUDECODE]]")).endswith("env CLAUDECODE unset")
            assert texts(await turn(proc, "[[env:SOME_DAEMON_SECRET]]")).endswith("unset")
            assert texts(await turn(proc, "[[env:ANTHROPIC_API_KEY]]")).endswith("=k")
        finally:
            await proc.stop(1.0)

    run(scenario)


# --- reading -------------------------------------------------------------------------------


def test_utf8_split_across_reads_arrives_whole(tmp_path: Path) -> None:
    async def scenario() -> None:
        proc = await spawn_fake(tmp_path)
        try:
            items = await turn(proc, "[[split-utf8]] ok")
            assert of_type(items, p.TextDelta)[0].text == "é 世界 🎉"
            assert proc.invalid_utf8_lines == 0
        finally:
            await proc.stop(1.0)

    run(scenario)


def test_huge_line_within_the_limit_arrives_whole(tmp_path: Path) -> None:
    size = 20 * 1024 * 1024

    async def scenario() -> None:
        proc = await spawn_fake(tmp_path, max_line_bytes=size)
        try:
            items = await turn(proc, f"[[huge:{size}]]")
            (result,) = [i for i in of_type(items, p.ToolResult) if i.tool_use_id == "toolu_huge"]
            assert len(result.content) > size - 300
            assert result.content == "A" * len(result.content)
            assert isinstance(items[-1], p.Result)
        finally:
            await proc.stop(1.0)

    run(scenario)


def test_line_past_the_limit_fails_clearly_and_reading_goes_on(tmp_path: Path) -> None:
    async def scenario() -> None:
        proc = await spawn_fake(tmp_path, max_line_bytes=64 * 1024)
        try:
            items = await turn(proc, "[[huge:200000]] after")
            (too_long,) = of_type(items, LineTooLong)
            assert too_long == LineTooLong(size=200000, limit=64 * 1024)
            assert not [i for i in of_type(items, p.ToolResult) if i.tool_use_id == "toolu_huge"]
            assert texts(items) == "echo: after"  # the rest of that turn was read
            assert texts(await turn(proc, "next")) == "echo: next"
        finally:
            await proc.stop(1.0)

    run(scenario)


def test_stderr_flood_before_stdout_does_not_deadlock(tmp_path: Path) -> None:
    flood = 10 * 1024 * 1024

    async def scenario() -> None:
        proc = await spawn_fake(tmp_path, stderr_tail_bytes=64 * 1024)
        try:
            items = await turn(proc, f"[[stderr-flood:{flood}]] still here", seconds=30)
            assert texts(items) == "echo: still here"
        finally:
            await proc.stop(1.0)
        tail = proc.stderr_tail()  # complete once the process has ended
        assert len(tail) == 64 * 1024
        assert tail.endswith("eeeFLOOD-END\n")

    run(scenario)


def test_invalid_utf8_is_replaced_not_fatal(tmp_path: Path) -> None:
    async def scenario() -> None:
        proc = await spawn_fake(tmp_path)
        try:
            items = await turn(proc, "[[bad-utf8]] fine")
            assert of_type(items, p.TextDelta)[0].text == "bad \ufffd\ufffd bytes"
            assert proc.invalid_utf8_lines == 1
            assert isinstance(items[-1], p.Result)
        finally:
            await proc.stop(1.0)

    run(scenario)


def test_garbage_line_is_skipped(tmp_path: Path) -> None:
    async def scenario() -> None:
        proc = await spawn_fake(tmp_path)
        try:
            items = await turn(proc, "[[garbage]] fine")
            assert texts(items) == "echo: fine"
            assert proc.skipped_lines == 1
            assert not [i for i in of_type(items, p.Unknown) if not i.raw]
        finally:
            await proc.stop(1.0)

    run(scenario)


def test_many_deltas_arrive_in_order(tmp_path: Path) -> None:
    count = 20_000

    async def scenario() -> None:
        proc = await spawn_fake(tmp_path, mailbox_size=256)  # small: exercises backpressure
        try:
            started = time.monotonic()
            items = await turn(proc, f"[[deltas:{count}]]")
            elapsed = time.monotonic() - started
            assert texts(items) == "x" * count
            assert len(of_type(items, p.TextDelta)) == count
            assert elapsed < 20, f"{count} deltas took {elapsed:.1f} s"
        finally:
            await proc.stop(1.0)

    run(scenario)


def test_tools_thinking_retries_and_error_results(tmp_path: Path) -> None:
    async def scenario() -> None:
        proc = await spawn_fake(tmp_path)
        try:
            items = await turn(proc, "[[thinking]] [[api-retry:2]] [[tool:Read]] [[error-result]]")
            assert of_type(items, p.ThinkingDelta) == [p.ThinkingDelta("pondering")]
            assert [r.attempt for r in of_type(items, p.ApiRetry)] == [1, 2]
            (use,) = [t for a in of_type(items, p.AssistantMessage) for t in a.tool_uses]
            (res,) = of_type(items, p.ToolResult)
            assert (use.name, res.tool_use_id, res.content) == ("Read", use.id, "ran Read")
            result = items[-1]
            assert isinstance(result, p.Result)
            assert result.is_error and result.subtype == "success"
        finally:
            await proc.stop(1.0)

    run(scenario)


def test_permission_request_round_trip(tmp_path: Path) -> None:
    async def scenario() -> None:
        proc = await spawn_fake(tmp_path)
        try:
            await proc.send_user_message("[[ask:Write]]")
            while not isinstance(item := await proc.receive(), p.ControlRequest):
                assert not isinstance(item, p.Result | AgentExited)
            assert item.subtype == "can_use_tool" and item.payload["tool_name"] == "Write"
            await proc.respond_control(item.request_id, p.permission_deny("not in user mode"))
            items = await until_end(proc)
            (res,) = of_type(items, p.ToolResult)
            assert res.is_error and res.content == "not in user mode"
            result = items[-1]
            assert isinstance(result, p.Result)
            assert [d.tool_name for d in result.permission_denials] == ["Write"]
            assert "permission Write: deny (not in user mode)" in result.result_text

            await proc.send_user_message("[[ask:Read]]")
            while not isinstance(item := await proc.receive(), p.ControlRequest):
                pass
            await proc.respond_control(item.request_id, p.permission_allow(item.payload["input"]))
            items = await until_end(proc)
            assert "permission Read: allow" in texts(items)
        finally:
            await proc.stop(1.0)

    run(scenario)


def test_abandoned_deltas_are_reported(tmp_path: Path) -> None:
    async def scenario() -> None:
        proc = await spawn_fake(tmp_path)
        try:
            items = await turn(proc, "retry me [[abandon]]")
            deltas = of_type(items, p.TextDelta)
            (abandoned,) = of_type(items, p.AbandonedBlocks)
            assert {d.message_id for d in deltas} == {abandoned.message_id}
            assert abandoned.from_block_index == 0
            (final,) = of_type(items, p.AssistantMessage)
            assert final.text == "echo: retry me" and final.message_id != abandoned.message_id
        finally:
            await proc.stop(1.0)

    run(scenario)


def test_resume_continues_a_conversation(tmp_path: Path) -> None:
    transcripts = tmp_path / "transcripts"
    transcripts.mkdir()
    env = {"FAKE_AGENT_TRANSCRIPT_DIR": str(transcripts)}
    cid = str(uuid.uuid4())

    async def scenario() -> None:
        first = await spawn_fake(tmp_path, env=env, argv=fake_argv(cid))
        try:
            await turn(first, "remember banana")
        finally:
            await first.stop(1.0)
        spec = AgentSpec(command=(sys.executable, str(FAKE)), conversation_id=cid, resume=True)
        second = await spawn_fake(tmp_path, env=env, argv=build_argv(spec))
        try:
            assert texts(await turn(second, "[[history]]")).endswith("history: remember banana")
        finally:
            await second.stop(1.0)
        # Resuming a conversation that does not exist fails at start-up, as the CLI does.
        unknown = AgentSpec(spec.command, conversation_id=str(uuid.uuid4()), resume=True)
        third = await spawn_fake(tmp_path, env=env, argv=build_argv(unknown))
        try:
            items = await until_end(third)
            result = items[-1]
            assert isinstance(result, p.Result) and result.is_error and result.num_turns == 0
            assert "No conversation found" in result.errors[0]
            exited = await third.receive()
            assert isinstance(exited, AgentExited) and exited.returncode == 1
        finally:
            await third.stop(1.0)

    run(scenario)


# --- interrupting and failing -----------------------------------------------------------------


def test_interrupt_ends_a_slow_turn_and_the_process_stays_usable(tmp_path: Path) -> None:
    async def scenario() -> None:
        proc = await spawn_fake(tmp_path)
        try:
            await proc.send_user_message("[[slow:200]] [[deltas:50]]")  # 10 s if not interrupted
            while not isinstance(await proc.receive(), p.TextDelta):
                pass
            started = time.monotonic()
            ack = await proc.interrupt(timeout=5)
            assert ack == {"still_queued": []}
            items = await until_end(proc, seconds=5)
            assert time.monotonic() - started < 2
            result = items[-1]
            assert isinstance(result, p.Result)
            assert result.is_error and result.subtype == "error_during_execution"
            assert texts(await turn(proc, "after")) == "echo: after"
            assert proc.alive
        finally:
            await proc.stop(1.0)

    run(scenario)


def test_interrupt_during_a_permission_request(tmp_path: Path) -> None:
    async def scenario() -> None:
        proc = await spawn_fake(tmp_path)
        try:
            await proc.send_user_message("[[ask:Bash]]")
            while not isinstance(asked := await proc.receive(), p.ControlRequest):
                pass
            await proc.interrupt(timeout=5)
            items = await until_end(proc, seconds=5)
            assert p.ControlCancelRequest(asked.request_id) in items
            result = items[-1]
            assert isinstance(result, p.Result) and result.terminal_reason == "aborted_tools"
            assert texts(await turn(proc, "after")) == "echo: after"
        finally:
            await proc.stop(1.0)

    run(scenario)


def test_interrupt_when_idle_is_harmless(tmp_path: Path) -> None:
    async def scenario() -> None:
        proc = await spawn_fake(tmp_path)
        try:
            assert await proc.interrupt(timeout=5) == {"still_queued": []}
            assert texts(await turn(proc, "fine")) == "echo: fine"
        finally:
            await proc.stop(1.0)

    run(scenario)


def test_crash_mid_turn_surfaces_the_exit(tmp_path: Path) -> None:
    async def scenario() -> None:
        proc = await spawn_fake(tmp_path)
        try:
            items = await turn(proc, "one two three four [[crash]]")
            assert texts(items) == "echo: one "
            exited = items[-1]
            assert isinstance(exited, AgentExited) and exited.returncode == 3
            assert "crashing on purpose" in exited.stderr_tail
            assert proc.returncode == 3 and not proc.alive
            with pytest.raises(AgentExited):
                await proc.send_user_message("anyone?")
            with pytest.raises(AgentExited):
                await proc.interrupt(timeout=1)
        finally:
            assert await proc.stop(1.0) == 3

    run(scenario)


def test_exit_at_start_is_reported_with_stderr(tmp_path: Path) -> None:
    async def scenario() -> None:
        proc = await spawn_fake(tmp_path, env={"FAKE_AGENT_EXIT_AT_START": "1"})
        try:
            exited = await asyncio.wait_for(proc.receive(), 10)
            assert isinstance(exited, AgentExited) and exited.returncode == 1
            assert "Invalid API key" in exited.stderr_tail
            with pytest.raises(AgentExited):
                await proc.initialize(timeout=5)
        finally:
            await proc.stop(1.0)

    run(scenario)


def test_spawning_a_missing_program_fails_clearly(tmp_path: Path) -> None:
    async def scenario() -> None:
        with pytest.raises(AgentSpawnError, match="no-such-agent"):
            await AgentProcess.spawn([str(tmp_path / "no-such-agent")], env={}, cwd=tmp_path)
        with pytest.raises(AgentSpawnError, match="no-such-agent"):
            await AgentProcess.spawn(["no-such-agent"], env={"PATH": str(tmp_path)}, cwd=tmp_path)
        with pytest.raises(AgentSpawnError, match="missing-dir"):
            await AgentProcess.spawn(["sleep", "1"], env={}, cwd=tmp_path / "missing-dir")

    run(scenario)


def test_the_program_is_found_as_exec_would_for_the_child(tmp_path: Path) -> None:
    """A bare name in the agent's PATH (not the daemon's), a relative one in its cwd."""
    bin_dir, work = tmp_path / "bin", tmp_path / "work"
    bin_dir.mkdir()
    work.mkdir()
    for path in (bin_dir / "my-agent", work / "local-agent"):
        path.write_text(f'#!/bin/sh\necho \'{{"type": "{path.name}"}}\'\n')
        path.chmod(0o755)

    async def first(argv: list[str], env: dict[str, str]) -> str:
        proc = await AgentProcess.spawn(argv, env=env, cwd=work)
        try:
            item = await asyncio.wait_for(proc.receive(), 10)
            assert isinstance(item, p.Unknown), item
            return item.type
        finally:
            await proc.stop(1.0)

    async def scenario() -> None:
        assert await first(["my-agent"], {"PATH": f"{bin_dir}:/usr/bin:/bin"}) == "my-agent"
        assert await first(["./local-agent"], {"PATH": "/usr/bin:/bin"}) == "local-agent"

    run(scenario)


def test_the_recorded_pid_is_the_agent_itself(tmp_path: Path) -> None:
    """setpriv execs the agent in place: the pid is the agent's, a child of ours, in its own
    session and group, and its start time is the one recorded."""

    async def scenario() -> None:
        argv = fake_argv()
        proc = await spawn_fake(tmp_path, argv=argv)
        try:
            await turn(proc, "hello")  # it answered: the exec is done
            with open(f"/proc/{proc.pid}/cmdline", "rb") as f:  # noqa: ASYNC230 - procfs
                cmdline = f.read().split(b"\0")[:-1]
            assert [a.decode() for a in cmdline] == argv
            stat = read_stat(proc.pid)
            assert stat is not None
            assert (stat.ppid, stat.pgrp, stat.session) == (os.getpid(), proc.pid, proc.pid)
            assert proc.identity.start_time == stat.start_time
        finally:
            await proc.stop(1.0)

    run(scenario)


# --- writing --------------------------------------------------------------------------------


def test_a_write_to_an_agent_that_does_not_read_times_out(tmp_path: Path) -> None:
    """`sleep` never reads its stdin: a line bigger than the pipe and the transport's buffer
    can never be taken, so the write fails after its timeout instead of waiting forever."""
    line = b"x" * (4 * 1024 * 1024) + b"\n"

    async def scenario() -> None:
        proc = await AgentProcess.spawn(
            ["sleep", "300"], env=build_env(os.environ, {}), cwd=tmp_path, write_timeout=0.2
        )
        try:
            with pytest.raises(WriteTimeout, match="did not read its input"):
                await proc.write_line(line)
            assert proc.alive  # still running: stopping it is the owner's decision
            # Part of that line may be in the pipe: nothing more can be written after it.
            with pytest.raises(WriteTimeout):
                await proc.send_user_message("next")
            with pytest.raises(WriteTimeout):
                await proc.interrupt(timeout=5)
            with pytest.raises(WriteTimeout):
                await proc.write_line(line, timeout=30)
        finally:
            assert await proc.stop(0.5) == -signal.SIGTERM

    run(scenario)


def test_a_big_write_to_a_reading_agent_completes(tmp_path: Path) -> None:
    """The bound is on the agent not reading, not on the size: a message far over the pipe's
    buffer reaches an agent that reads it (the fake echoes it back)."""
    text = "y" * (2 * 1024 * 1024)

    async def scenario() -> None:
        proc = await spawn_fake(tmp_path)
        try:
            items = await turn(proc, text)
            assert texts(items).endswith("y")
            assert of_type(items, p.Result)
        finally:
            await proc.stop(1.0)

    run(scenario)


# --- stopping -------------------------------------------------------------------------------


def test_hang_then_stop_escalates_to_sigkill_and_reaps(tmp_path: Path) -> None:
    async def scenario() -> None:
        proc = await spawn_fake(tmp_path)
        await proc.send_user_message("stuck here [[hang]]")
        while not isinstance(await proc.receive(), p.TextDelta):
            pass
        started = time.monotonic()
        stops = [proc.stop(grace=0.5), proc.stop(grace=0.5)]  # concurrent: one sequence
        assert await asyncio.gather(*stops) == [-signal.SIGKILL] * 2
        assert time.monotonic() - started < 4
        assert await proc.stop() == -signal.SIGKILL  # idempotent
        assert read_stat(proc.pid) is None  # reaped: not even a zombie is left
        exited = await proc.receive()
        while not isinstance(exited, AgentExited):
            exited = await proc.receive()
        assert exited.returncode == -signal.SIGKILL

    run(scenario)


def test_stop_without_a_receiver_does_not_hang(tmp_path: Path) -> None:
    async def scenario() -> None:
        proc = await spawn_fake(tmp_path, mailbox_size=2)
        await proc.send_user_message("[[deltas:50000]]")  # more than the pipes hold
        await asyncio.sleep(0.5)  # mailbox full, reader blocked, agent blocked writing
        started = time.monotonic()
        assert await proc.stop(grace=0.5) == -signal.SIGTERM
        assert time.monotonic() - started < 6
        items = [await proc.receive() for _ in range(3)]
        assert isinstance(items[0], p.Init)
        assert isinstance(items[2], AgentExited) and items[2].returncode == -signal.SIGTERM

    run(scenario)


def test_stop_kills_the_whole_process_group(tmp_path: Path) -> None:
    async def scenario() -> None:
        proc = await spawn_fake(tmp_path)
        child = 0
        try:
            reply = texts(await turn(proc, "[[spawn-child]]"))
            child = int(re.findall(r"child pid (\d+)", reply)[0])
            assert is_running(child)
            assert await proc.stop(grace=2.0) == 0  # the agent itself exits on end of input
            assert wait_gone(child), "the agent's child outlived stop()"
        finally:
            if child and is_running(child):
                os.kill(child, signal.SIGKILL)

    run(scenario)


def test_crash_with_a_child_holding_stdout_still_ends(tmp_path: Path) -> None:
    async def scenario() -> None:
        proc = await spawn_fake(tmp_path)
        child = 0
        try:
            # Without the exit watcher the reader would wait for the child's 300 s.
            items = await turn(proc, "a b c [[spawn-child]] [[crash]]", seconds=15)
            exited = items[-1]
            assert isinstance(exited, AgentExited) and exited.returncode == 3
            child = int(re.findall(r"child pid (\d+)", exited.stderr_tail)[0])
            assert wait_gone(child), "the dead agent's child was left running"
        finally:
            await proc.stop(1.0)
            if child and is_running(child):
                os.kill(child, signal.SIGKILL)

    run(scenario)


def test_agent_dies_with_its_sigkilled_owner(tmp_path: Path) -> None:
    owner_code = (
        "import asyncio, os, sys\n"
        "from atomizerd.agents.process import AgentProcess\n"
        "async def main():\n"
        "    agent = await AgentProcess.spawn(['sleep', '300'], env=dict(os.environ), cwd='.')\n"
        "    print('AGENT_PID', agent.pid, flush=True)\n"
        "    await asyncio.sleep(300)\n"
        "asyncio.run(main())\n"
    )
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    owner = subprocess.Popen(
        [sys.executable, "-c", owner_code], stdout=subprocess.PIPE, cwd=tmp_path, env=env
    )
    agent_pid = 0
    try:
        assert owner.stdout is not None
        for line in owner.stdout:  # after the owner's own log lines
            if line.startswith(b"AGENT_PID "):
                agent_pid = int(line.split()[1])
                break
        assert is_running(agent_pid)  # `sleep` ignores stdin: only the death signal ends it
        owner.kill()
        owner.wait(10)
        assert wait_gone(agent_pid), "the agent outlived its SIGKILLed owner"
    finally:
        owner.kill()
        owner.wait(10)
        assert owner.stdout is not None
        owner.stdout.close()
        if agent_pid and is_running(agent_pid):
            os.kill(agent_pid, signal.SIGKILL)


def test_kill_group_if_same_spares_a_reused_pid() -> None:
    sleeper = subprocess.Popen(["sleep", "300"], start_new_session=True)
    try:
        start = process_start_time(sleeper.pid)
        assert start is not None
        assert not kill_group_if_same(sleeper.pid, start + 1)  # another process's start time
        assert not kill_group_if_same(sleeper.pid, start - 1)
        assert sleeper.poll() is None
        assert kill_group_if_same(sleeper.pid, start)
        assert sleeper.wait(5) == -signal.SIGKILL
        assert not kill_group_if_same(sleeper.pid, start)  # gone: nothing to signal
    finally:
        sleeper.kill()
        sleeper.wait()


def test_kill_group_if_same_reaches_members_after_the_leader_died() -> None:
    # A leader that starts a member of its group and exits at once.
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
        assert is_running(member)
        assert start is not None  # read while the leader was still an unreaped child
        assert not kill_group_if_same(leader.pid, start + 10**9)  # members older: not ours
        assert kill_group_if_same(leader.pid, start)
        assert wait_gone(member)
    finally:
        leader.stdout.close()
        if is_running(member):
            os.kill(member, signal.SIGKILL)


# --- probing ------------------------------------------------------------------------------------


def test_probe_version_of_the_fake_and_failures(tmp_path: Path) -> None:
    async def scenario() -> None:
        assert await probe_version([sys.executable, str(FAKE)]) == "0.0.0-fake (Fake Agent)"
        with pytest.raises(AgentSpawnError):
            await probe_version([str(tmp_path / "missing")])
        with pytest.raises(Exception, match="did not answer"):
            await probe_version([sys.executable, "-c", "import time; time.sleep(30)"], timeout=0.5)
        with pytest.raises(Exception, match="exited with 2"):
            await probe_version([sys.executable, "-c", "import sys; sys.exit(2)"])

    run(scenario)


@pytest.mark.skipif(not REAL_CLI.exists(), reason=f"no claude CLI at {REAL_CLI}")
def test_probe_version_of_the_real_cli() -> None:
    version = run(lambda: probe_version([str(REAL_CLI)], timeout=30))
    assert re.fullmatch(r"\d+\.\d+\.\d+ \(Claude Code\)", version), version


@pytest.mark.skipif(not REAL_CLI.exists(), reason=f"no claude CLI at {REAL_CLI}")
def test_real_cli_accepts_our_argv_and_answers_initialize(tmp_path: Path) -> None:
    """No turn (that is the end-to-end tests' job): the CLI parses every flag form we build
    and answers the initialize handshake. Nothing leaves the machine: no prompt is sent and the
    API URL points at a closed local port."""
    for name in ("home", "config", "tmp", "study"):
        (tmp_path / name).mkdir()
    mcp = tmp_path / "mcp.json"
    mcp.write_text('{"mcpServers": {}}')
    spec = AgentSpec(
        command=(str(REAL_CLI),),
        conversation_id=str(uuid.uuid4()),
        allowed_tools=("Read", "Bash(python:*)", "Write(**/STUDY_REPORT.md)"),
        permission_prompt_tool="stdio",
        mcp_config=str(mcp),
        append_system_prompt="-You are testing.\nSecond line.",
        add_dirs=(str(tmp_path / "study"),),
        model="claude-test-model",
        max_budget_usd=0.25,
    )
    env = build_env(
        {"PATH": os.environ.get("PATH", "/usr/bin:/bin")},
        {
            "HOME": str(tmp_path / "home"),
            "CLAUDE_CONFIG_DIR": str(tmp_path / "config"),  # nothing written outside tmp_path
            "TMPDIR": str(tmp_path / "tmp"),
            "ANTHROPIC_API_KEY": "test-key",
            "ANTHROPIC_BASE_URL": "http://127.0.0.1:9",
            "CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC": "1",
        },
    )

    async def scenario() -> None:
        proc = await AgentProcess.spawn(build_argv(spec), env=env, cwd=tmp_path)
        try:
            answer = await proc.initialize(timeout=30)
            assert re.fullmatch(r"\d+\.\d+\.\d+", answer["claude_code_version"])
            assert answer["pid"] == proc.pid
        finally:
            await proc.stop(3.0)
        assert not is_running(proc.pid)

    run(scenario)
