"""The Atomizer layer with the real CLI: study context in the system prompt, modes, the
per-session MCP config, and recovery when the agent's transcript is gone."""

from __future__ import annotations

import json
import os
import shutil
import stat
from pathlib import Path

import grpc
import pytest
from atomizer.v1 import session_pb2 as pb

from tests.e2e.conftest import E2E
from tests.support.turns import kinds, reply_text, send

pytestmark = pytest.mark.e2e


def make_study(root: Path, name: str, report: str) -> Path:
    study = root / "studies" / name
    (study / "1_setup").mkdir(parents=True)
    (study / "1_setup" / "optimization_config.json").write_text('{"objective": "mass"}')
    (study / "3_results").mkdir()
    (study / "STUDY_REPORT.md").write_text(report)
    return study


def test_the_system_prompt_carries_the_study_and_follows_set_study_context(e2e: E2E) -> None:
    stubs = e2e.start()
    assert e2e.daemon is not None
    make_study(e2e.daemon.root, "bracket", "# Bracket study\nbest mass 1.23 kg")
    make_study(e2e.daemon.root, "wingbox", "# Wingbox study\nbest mass 9.87 kg")
    stubs.sessions.CreateSession(pb.CreateSessionRequest(session_id="st", study_id="bracket"))
    send(stubs, "st", "hi")
    system = e2e.api.requests[-1].system_text
    assert "bracket" in system and "best mass 1.23 kg" in system
    assert '"objective": "mass"' in system
    stubs.sessions.SetStudyContext(pb.SetStudyContextRequest(session_id="st", study_id="wingbox"))
    send(stubs, "st", "and now?")
    request = e2e.api.requests[-1]
    assert "best mass 9.87 kg" in request.system_text + " ".join(request.texts("user"))
    assert "hi" in " ".join(request.texts("user"))  # same conversation


def test_a_study_set_before_a_daemon_restart_still_reaches_the_model(e2e: E2E) -> None:
    stubs = e2e.start()
    assert e2e.daemon is not None
    make_study(e2e.daemon.root, "flange", "# Flange study\nbest mass 4.56 kg")
    stubs.sessions.CreateSession(pb.CreateSessionRequest(session_id="rs"))
    send(stubs, "rs", "hello")
    stubs.sessions.SetStudyContext(pb.SetStudyContextRequest(session_id="rs", study_id="flange"))
    e2e.stop()
    stubs = e2e.start()
    send(stubs, "rs", "which study?")
    request = e2e.api.requests[-1]
    assert "best mass 4.56 kg" in request.system_text + " ".join(request.texts("user"))
    send(stubs, "rs", "and again?")  # told once: not repeated in every message
    assert "best mass 4.56 kg" not in e2e.api.requests[-1].texts("user")[-1]


def test_user_mode_denies_a_bash_write_outside_the_allowlist(e2e: E2E) -> None:
    # Without live approval the CLI denies on its own (approval: tests/e2e/test_governance.py).
    # The permission layer alone, with the sandbox off (advisory user mode); the sandbox, on by
    # default, confines even allowed commands: tests/e2e/test_sandbox.py.
    stubs = e2e.start({"approvals": {"enabled": False}, "sandbox": {"enabled": False}})
    assert e2e.daemon is not None
    target = e2e.workdir / "pwned.txt"
    stubs.sessions.CreateSession(pb.CreateSessionRequest(session_id="safe"))
    events = send(stubs, "safe", f'[[tool:Bash {{"command": "touch {target}"}}]]')
    assert not target.exists()
    results = [e.tool_result for e in events if e.WhichOneof("kind") == "tool_result"]
    assert results and results[0].is_error
    done = events[-1].turn_completed
    assert [d.tool_name for d in done.permission_denials] == ["Bash"]


def test_study_ids_that_escape_the_root_are_refused(e2e: E2E) -> None:
    stubs = e2e.start({"agent": {"prewarm": False}})
    assert e2e.daemon is not None
    outside = e2e.workdir / "outside"
    outside.mkdir()
    os.symlink(outside, e2e.daemon.root / "studies" / "sneaky")
    for bad in ("../x", "a/b", "/etc", "sneaky", ".."):
        with pytest.raises(grpc.RpcError) as err:
            stubs.sessions.CreateSession(pb.CreateSessionRequest(study_id=bad))
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT, bad


def test_the_mcp_config_lives_exactly_as_long_as_the_session(e2e: E2E) -> None:
    stubs = e2e.start()
    assert e2e.daemon is not None
    stubs.sessions.CreateSession(pb.CreateSessionRequest(session_id="mcp"))
    send(stubs, "mcp", "hi")
    path = e2e.daemon.runtime_dir / "sessions" / "mcp.mcp.json"
    assert path.exists()
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700
    stubs.sessions.TerminateSession(pb.TerminateSessionRequest(session_id="mcp"))
    assert not path.exists()


def test_a_lost_transcript_is_reseeded_from_the_store(e2e: E2E) -> None:
    stubs = e2e.start()
    assert e2e.daemon is not None
    stubs.sessions.CreateSession(pb.CreateSessionRequest(session_id="lost"))
    send(stubs, "lost", "the secret word is walrus")
    e2e.stop()
    projects = e2e.workdir / "home" / ".claude" / "projects"
    assert projects.exists()
    shutil.rmtree(projects)
    stubs = e2e.start()
    events = send(stubs, "lost", "what was the word?")
    assert "notice" in kinds(events)
    assert kinds(events)[-1] == "turn_completed"
    assert reply_text(events) == "echo: what was the word?"
    request = e2e.api.requests[-1]
    assert "walrus" in request.system_text + " ".join(request.texts("user"))


def test_the_atomizer_mcp_server_gets_the_session_context(e2e: E2E) -> None:
    import sys

    server = [sys.executable, str(Path(__file__).parents[1] / "support" / "fake_mcp_server.py")]
    stubs = e2e.start(
        {
            "mcp": {
                "atomizer_command": server,
                "servers": {"extra": json.dumps({"command": server[0], "args": server[1:]})},
            },
            "modes.user": {"allowed_tools": ["Read", "mcp__atomizer__study_info"]},
        }
    )
    assert e2e.daemon is not None
    make_study(e2e.daemon.root, "truss", "# Truss")
    stubs.sessions.CreateSession(pb.CreateSessionRequest(session_id="mcp2", study_id="truss"))
    events = send(stubs, "mcp2", "[[tool:mcp__atomizer__study_info {}]]")
    text = reply_text(events)
    assert '"ATOMIZER_MODE": "user"' in text and '"ATOMIZER_STUDY": "truss"' in text
    session = stubs.sessions.GetSession(pb.GetSessionRequest(session_id="mcp2")).session
    assert sorted((m.name, m.status) for m in session.mcp_servers) == [
        ("atomizer", "connected"),
        ("extra", "connected"),
    ]


def test_a_crashing_mcp_server_degrades_the_session_but_never_breaks_it(e2e: E2E) -> None:
    import sys

    stubs = e2e.start({"mcp": {"atomizer_command": [sys.executable, "-c", "raise SystemExit(3)"]}})
    stubs.sessions.CreateSession(pb.CreateSessionRequest(session_id="broken"))
    assert reply_text(send(stubs, "broken", "still works?")) == "echo: still works?"
    session = stubs.sessions.GetSession(pb.GetSessionRequest(session_id="broken")).session
    assert [(m.name, m.status) for m in session.mcp_servers] == [("atomizer", "failed")]
