"""atomizerctl, run as a subprocess against the real daemon."""

from __future__ import annotations

import json
import os
import select
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from atomizer.v1 import session_pb2
from atomizer_client import Client

from tests.support.daemon import RunningDaemon

CTL = Path(sys.executable).parent / "atomizerctl"
# The fake agent answers "echo: <text>" one delta per word; [[slow:MS]] waits before each delta.
SLOW = "[[slow:300]] one two three four five six seven eight nine ten eleven twelve"


def ctl_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("ATOMIZERD_")}
    env.update(NO_COLOR="1", **extra)
    return env


def ctl(d: RunningDaemon, *args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(CTL), "--socket", str(d.socket), *args],
        input=stdin,
        capture_output=True,
        text=True,
        env=ctl_env(),
        timeout=60,
    )


def ok(d: RunningDaemon, *args: str, stdin: str | None = None) -> str:
    """Runs a command that must succeed; its stdout."""
    done = ctl(d, *args, stdin=stdin)
    assert done.returncode == 0, f"atomizerctl {' '.join(args)}: {done.returncode} {done.stderr}"
    return done.stdout


def records(out: str) -> list[dict[str, Any]]:
    return [json.loads(line) for line in out.splitlines()]


def test_the_console_script_is_installed() -> None:
    assert CTL.exists(), "pip install -e client/ provides the atomizerctl console script"
    help_text = subprocess.run([str(CTL), "--help"], capture_output=True, text=True).stdout
    for code in ("0 ", "1 ", "2 ", "3 ", "4 ", "5 ", "6 ", "7 ", "130"):
        assert f"\n  {code}" in help_text  # the exit codes are documented


def test_new_ls_show_rm(daemon: RunningDaemon) -> None:
    (daemon.root / "studies" / "beam").mkdir()
    new = ctl(daemon, "new", "--study", "beam", "--id", "c1")
    assert (new.returncode, new.stdout) == (0, "c1\n")
    generated = ok(daemon, "new").strip()
    lines = ok(daemon, "ls").splitlines()
    assert lines[0].split()[:3] == ["SESSION", "MODE", "STATE"]
    assert [line.split()[0] for line in lines[1:]] == [generated, "c1"]  # newest first
    assert "beam" in lines[2]
    assert ctl(daemon, "ls", "--study", "beam").stdout.count("\n") == 2
    show = ok(daemon, "show", "c1")
    assert "beam" in show and "user" in show
    assert ok(daemon, "rm", "c1") == "closed c1\n"
    closed = ok(daemon, "ls", "--state", "closed").splitlines()
    assert [line.split()[0] for line in closed[1:]] == ["c1"]
    ok(daemon, "rm", "c1", "--purge")
    assert ctl(daemon, "show", "c1").returncode == 3


def test_mode_and_study(shared_daemon: RunningDaemon) -> None:
    (shared_daemon.root / "studies" / "wing").mkdir()
    ok(shared_daemon, "new", "--id", "m1")
    assert ctl(shared_daemon, "study", "m1", "wing").stdout == "m1: study wing\n"
    assert ctl(shared_daemon, "study", "m1", "--none").stdout == "m1: study (none)\n"
    assert ctl(shared_daemon, "study", "m1").returncode == 2  # neither a study nor --none
    assert ctl(shared_daemon, "mode", "m1", "user").stdout == "m1: mode user\n"
    denied = ctl(shared_daemon, "mode", "m1", "power")
    assert denied.returncode == 6 and "PERMISSION_DENIED" in denied.stderr


def test_send_streams_the_reply_to_stdout_and_activity_to_stderr(
    shared_daemon: RunningDaemon,
) -> None:
    sid = ok(shared_daemon, "new").strip()
    sent = ctl(shared_daemon, "send", sid, "[[tool:Read]] hello")
    assert sent.returncode == 0, sent.stderr
    assert sent.stdout == "echo: hello\n"
    assert "⏺ Read" in sent.stderr
    assert "tokens" in sent.stderr and "$" in sent.stderr
    from_stdin = ctl(shared_daemon, "send", sid, "-", stdin="from stdin")
    assert from_stdin.stdout == "echo: from stdin\n"
    history = ctl(shared_daemon, "history", sid)
    assert history.returncode == 0
    assert "from stdin" in history.stdout and "echo: hello" in history.stdout
    assert history.stdout.count("── user") == 2 and history.stdout.count("── assistant") == 2


def test_json_prints_one_object_per_event_or_record(daemon: RunningDaemon) -> None:
    new = records(ctl(daemon, "--json", "new", "--id", "j1").stdout)
    assert [r["session_id"] for r in new] == ["j1"] and new[0]["mode"] == "MODE_USER"
    events = records(ok(daemon, "--json", "send", "j1", "hello"))
    types = [e["type"] for e in events]
    assert types[0] == "turn_started" and types[-1] == "turn_completed"
    assert sum(t in ("turn_completed", "turn_failed") for t in types) == 1
    assert "".join(e["text"] for e in events if e["type"] == "text_delta") == "echo: hello"
    assert events[-1]["usage"]["output_tokens"] > 0
    listed = records(ctl(daemon, "ls", "--json").stdout)  # --json after the command works too
    assert [r["session_id"] for r in listed] == ["j1"] and listed[0]["message_count"] == 2
    history = records(ctl(daemon, "--json", "history", "j1").stdout)
    assert [m["role"] for m in history] == ["ROLE_USER", "ROLE_ASSISTANT"]
    status = records(ctl(daemon, "--json", "status").stdout)
    assert status[0]["version"] and status[0]["sessions_known"] == 1


def test_status(shared_daemon: RunningDaemon) -> None:
    status = ctl(shared_daemon, "status")
    assert status.returncode == 0
    assert "version" in status.stdout and "live processes" in status.stdout


def test_exit_codes(shared_daemon: RunningDaemon, tmp_path: Path) -> None:
    sid = ok(shared_daemon, "new").strip()
    unknown = ctl(shared_daemon, "show", "no-such-session")
    assert unknown.returncode == 3 and "NOT_FOUND" in unknown.stderr
    bad_id = ctl(shared_daemon, "show", "../etc")
    assert bad_id.returncode == 4 and "INVALID_ARGUMENT" in bad_id.stderr
    failed = ctl(shared_daemon, "send", sid, "[[crash]] boom")
    assert failed.returncode == 1 and "AGENT_EXITED" in failed.stderr
    agent_error = ctl(shared_daemon, "send", sid, "[[error-result]] hi")
    assert agent_error.returncode == 1
    no_turn = ctl(shared_daemon, "rm", sid)
    assert no_turn.returncode == 0
    closed = ctl(shared_daemon, "send", sid, "hello")
    assert closed.returncode == 4 and "FAILED_PRECONDITION" in closed.stderr
    as_json = ctl(shared_daemon, "--json", "show", "no-such-session")
    assert as_json.returncode == 3
    assert json.loads(as_json.stderr)["error"]["code"] == "NOT_FOUND"
    usage = subprocess.run([str(CTL)], capture_output=True, text=True, env=ctl_env())
    assert usage.returncode == 2
    gone = subprocess.run(
        [str(CTL), "--socket", str(tmp_path / "none.sock"), "status"],
        capture_output=True,
        text=True,
        env=ctl_env(),
    )
    assert gone.returncode == 5 and "none.sock" in gone.stderr


def test_resource_exhausted_exit_code(short_tmp: Path) -> None:
    with RunningDaemon(short_tmp, {"daemon": {"max_sessions": 1}}) as d:
        assert ctl(d, "new").returncode == 0
        full = ctl(d, "new")
        assert full.returncode == 7 and "RESOURCE_EXHAUSTED" in full.stderr


def test_the_socket_is_found_through_the_environment(shared_daemon: RunningDaemon) -> None:
    found = subprocess.run(
        [str(CTL), "status"],
        capture_output=True,
        text=True,
        env=ctl_env(ATOMIZERD_SOCKET=str(shared_daemon.socket)),
        timeout=30,
    )
    assert found.returncode == 0, found.stderr


def read_until(
    proc: subprocess.Popen[bytes], needle: bytes, seen: bytes = b"", timeout: float = 20
) -> bytes:
    """Reads proc's stdout as it comes until `needle` shows up; returns all of it so far."""
    assert proc.stdout is not None
    fd = proc.stdout.fileno()
    deadline = time.monotonic() + timeout
    while needle not in seen:
        left = deadline - time.monotonic()
        assert left > 0, f"{needle!r} not seen in {seen!r}"
        ready, _, _ = select.select([fd], [], [], left)
        chunk = os.read(fd, 4096) if ready else b""
        assert chunk or not ready, f"stdout closed before {needle!r}: {seen!r}"
        seen += chunk
    return seen


def test_ctrl_c_during_send_interrupts_the_turn(shared_daemon: RunningDaemon) -> None:
    sid = ok(shared_daemon, "new").strip()
    proc = subprocess.Popen(
        [str(CTL), "--socket", str(shared_daemon.socket), "send", sid, SLOW],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=ctl_env(),
    )
    try:
        before = read_until(proc, b"one")
        proc.send_signal(signal.SIGINT)
        rest, err = proc.communicate(timeout=20)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130, err
    assert b"twelve" not in before + rest  # the turn stopped, not just the output
    assert b"interrupted" in err
    with Client(shared_daemon.socket) as c:
        reply = list(c.get_history(sid))[-1]
        assert reply.role == session_pb2.ROLE_ASSISTANT
        assert reply.status == session_pb2.MESSAGE_STATUS_INTERRUPTED
        assert c.get_session(sid).state != session_pb2.SESSION_STATE_BUSY
    assert "── assistant (interrupted)" in ctl(shared_daemon, "history", sid).stdout


def test_watch_follows_turns_until_ctrl_c(shared_daemon: RunningDaemon) -> None:
    sid = ok(shared_daemon, "new").strip()
    ok(shared_daemon, "send", sid, "before")
    proc = subprocess.Popen(
        [str(CTL), "--socket", str(shared_daemon.socket), "--json", "watch", sid, "--after", "0"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=ctl_env(),
    )
    try:
        seen = read_until(proc, b'"text": "before"')
        ok(shared_daemon, "send", sid, "live one")
        seen = read_until(proc, b"echo: live one", seen)
        time.sleep(0.2)
        proc.send_signal(signal.SIGINT)
        rest, _ = proc.communicate(timeout=10)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130
    events = [json.loads(line) for line in (seen + rest).decode().splitlines() if line]
    started = [e["text"] for e in events if e["type"] == "turn_started"]
    assert started == ["before", "live one"]


@pytest.mark.parametrize("args", [["send"], ["mode", "x", "root"], ["ls", "--state", "odd"]])
def test_usage_errors_exit_2(shared_daemon: RunningDaemon, args: list[str]) -> None:
    assert ctl(shared_daemon, *args).returncode == 2


def test_daemon_restart_hands_a_running_turn_to_the_next_daemon(daemon: RunningDaemon) -> None:
    sid = ok(daemon, "new").strip()
    proc = subprocess.Popen(
        [str(CTL), "--socket", str(daemon.socket), "--json", "send", sid, SLOW],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=ctl_env(),
    )
    try:
        seen = read_until(proc, b"echo:")
        out = ok(daemon, "daemon", "restart")
        rest, err = proc.communicate(timeout=20)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 5, err  # UNAVAILABLE: the stream ended with the old daemon
    assert out.splitlines()[:2] == ["agents adopted  1", "turns resumed   1"]
    before = [json.loads(line) for line in (seen + rest).decode().splitlines() if line]
    watch = subprocess.Popen(
        [
            str(CTL),
            "--socket",
            str(daemon.socket),
            "--json",
            "watch",
            sid,
            "--after",
            str(before[-1]["seq"]),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=ctl_env(),
    )
    try:
        after = read_until(watch, b'"turn_completed"')
    finally:
        watch.kill()
        watch.communicate()
    events = before + [json.loads(line) for line in after.decode().splitlines() if line]
    text = "".join(e.get("text", "") for e in events if e["type"] == "text_delta")
    assert text == "echo: " + SLOW.removeprefix("[[slow:300]] ")
    assert [e["seq"] for e in events] == list(range(events[0]["seq"], events[-1]["seq"] + 1))
