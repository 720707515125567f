"""User mode, round two: what a user-mode agent once could plant or schedule for later agents,
tried end to end with the real CLI and real bubblewrap, and what holds now.

- the daemon's own components (the Atomizer MCP server, the plans folder) are resolved at
  start-up and cannot be planted or redirected by an agent;
- instruction and settings files the CLI loads cannot be written by user mode, and power mode
  does not load them from the project unless `modes.power.study_instructions`;
- user mode has no scheduling tools unless `modes.user.scheduled_prompts`;
- "remember" with an edited input remembers the call that ran, not the one asked for.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from atomizer.v1 import daemon_pb2
from atomizer.v1 import session_pb2 as pb

from tests.conftest import Stubs
from tests.e2e.conftest import E2E
from tests.e2e.test_governance import audit, decided, send_answering
from tests.e2e.test_sandbox import POWER, bash, make_study, py, read, recorded_calls
from tests.support.turns import send

pytestmark = pytest.mark.e2e


def ran(call: pb.ToolCall) -> bool:
    return not call.is_error and "WROTE" in call.result


def plant(path: Path) -> str:
    """Python in Bash that creates `path` (and its folders) and says so."""
    return py(
        "import os; p = " + repr(str(path)) + "; os.makedirs(os.path.dirname(p), exist_ok=True); "
        'open(p, "w").write("PLANTED-BY-USER-MODE"); print("WROTE")'
    )


def check_config(e2e: E2E) -> subprocess.CompletedProcess[str]:
    assert e2e.daemon is not None
    config = str(e2e.daemon.config_path)
    return subprocess.run(
        [sys.executable, "-m", "atomizerd", "--check-config", "--config", config],
        capture_output=True,
        text=True,
        env={k: v for k, v in os.environ.items() if not k.startswith("ATOMIZERD_")},
        timeout=60,
    )


# --- 1. the daemon's components ---------------------------------------------------------------


MCP_SERVER = Path("mcp-server/atomizer-tools/dist/index.js")


def node_server(marker: Path) -> str:
    """An MCP 'server' that only proves it was started (as whom: the daemon's user)."""
    return f"require('fs').writeFileSync({json.dumps(str(marker))}, 'RAN');\n"


def test_user_mode_cannot_plant_the_atomizer_mcp_server(e2e: E2E) -> None:
    stubs = e2e.start(POWER)
    assert e2e.daemon is not None
    root = e2e.daemon.root
    make_study(root, "beam")
    marker = e2e.workdir / "mcp-server-ran"
    stubs.sessions.CreateSession(pb.CreateSessionRequest(session_id="u", study_id="beam"))
    send(stubs, "u", plant(root / MCP_SERVER))
    (call,) = recorded_calls(stubs, "u")
    assert call.is_error and not (root / "mcp-server").exists()

    # Even a server that appears later (by any way at all) is not probed at spawn time: what
    # start-up found (none) holds until the next start.
    (root / MCP_SERVER).parent.mkdir(parents=True)
    (root / MCP_SERVER).write_text(node_server(marker))
    for sid, mode in (("later", pb.MODE_USER), ("power", pb.MODE_POWER)):
        stubs.sessions.CreateSession(pb.CreateSessionRequest(session_id=sid, mode=mode))
        send(stubs, sid, "hello")
    assert not marker.exists()
    assert all("mcp__atomizer" not in json.dumps(r.data.get("tools")) for r in e2e.api.requests)


def test_an_unsafe_atomizer_mcp_server_stops_the_daemon_from_starting(e2e: E2E) -> None:
    stubs = e2e.start()
    assert e2e.daemon is not None
    script = e2e.daemon.root / MCP_SERVER
    script.parent.mkdir(parents=True)
    script.write_text("// the server\n")
    script.chmod(0o664)  # group-writable: a group member could replace what the daemon runs
    stubs.daemon.GetStatus(daemon_pb2.GetStatusRequest())
    check = check_config(e2e)
    assert check.returncode != 0
    assert "REFUSED" in check.stdout and "writable by group or others" in check.stdout
    e2e.stop()
    with pytest.raises(RuntimeError) as err:
        e2e.start()
    assert "cannot start" in str(err.value) and str(script) in str(err.value)

    script.chmod(0o644)
    (script.parent / "link.js").symlink_to(script)
    script.unlink()
    (script.parent / "link.js").rename(script)  # now a symlink to a missing file
    check = check_config(e2e)
    assert check.returncode != 0 and "symbolic link" in check.stdout


# --- 2. instructions planted for later agents -------------------------------------------------


LOADED = (
    *("CLAUDE.md", "CLAUDE.local.md", "AGENTS.md", ".mcp.json", ".claude/settings.json"),
    *(".claude/skills/s/SKILL.md", ".claude/commands/c.md", ".claude/agents/a.md"),
)


def test_user_mode_cannot_write_what_the_cli_loads(e2e: E2E) -> None:
    stubs = e2e.start()
    assert e2e.daemon is not None
    root = e2e.daemon.root
    study = make_study(root, "beam")
    (study / "sub").mkdir()
    targets = [folder / name for folder in (study, root, root / "studies") for name in LOADED]
    targets += [root / ".git" / "config", study / "sub" / "CLAUDE.md"]
    stubs.sessions.CreateSession(pb.CreateSessionRequest(session_id="u", study_id="beam"))
    send(stubs, "u", " ".join(plant(t) for t in targets))
    calls = recorded_calls(stubs, "u")
    assert len(calls) == len(targets)
    # The study's own top level and everything above it: refused, nothing created.
    for target, call in zip(targets[:-1], calls[:-1], strict=True):
        assert not ran(call), target
        assert not target.exists(), target
    # The Write tool neither, at any depth (deny rules: no approval opens them).
    write = {"file_path": str(study / "sub" / ".claude" / "settings.json"), "content": "{}"}
    send(stubs, "u", "[[tool:Write " + json.dumps(write) + "]]")
    (call,) = recorded_calls(stubs, "u")
    assert call.is_error and "denied" in call.result
    assert not (study / "sub" / ".claude").exists()


def power_reads_the_study(e2e: E2E, stubs: Stubs, study: Path) -> str:
    """What a power-mode agent on the study sent the model after reading a file in it."""
    stubs.sessions.CreateSession(
        pb.CreateSessionRequest(session_id="p", study_id="beam", mode=pb.MODE_POWER)
    )
    send(stubs, "p", read(study / "sub" / "data.txt"))
    return "\n".join(json.dumps(r.body) for r in e2e.api.requests)


def plant_instructions(root: Path, study: Path) -> None:
    """Files left in the study (by a user-mode agent before this fix, or by anyone)."""
    (study / "sub").mkdir()
    (study / "sub" / "data.txt").write_text("data\n")
    for folder, mark in ((study, "STUDY"), (study / "sub", "NESTED")):
        (folder / "CLAUDE.md").write_text(f"PLANTED-{mark}-CLAUDE-MD\n")
    skill = study / ".claude" / "skills" / "s" / "SKILL.md"
    skill.parent.mkdir(parents=True)
    skill.write_text("---\nname: s\ndescription: PLANTED-STUDY-SKILL\n---\nbody\n")
    (study / "CLAUDE.local.md").write_text("PLANTED-STUDY-LOCAL-MD\n")


def test_power_mode_does_not_load_instructions_from_the_study(e2e: E2E) -> None:
    stubs = e2e.start(POWER)
    assert e2e.daemon is not None
    study = make_study(e2e.daemon.root, "beam")
    plant_instructions(e2e.daemon.root, study)
    sent = power_reads_the_study(e2e, stubs, study)
    assert "data" in sent  # the file was read
    assert "PLANTED-" not in sent


def test_study_instructions_on_power_mode_loads_them(e2e: E2E) -> None:
    stubs = e2e.start({**POWER, "modes.power": {"enabled": True, "study_instructions": True}})
    assert e2e.daemon is not None
    study = make_study(e2e.daemon.root, "beam")
    plant_instructions(e2e.daemon.root, study)
    sent = power_reads_the_study(e2e, stubs, study)
    for mark in ("STUDY-CLAUDE-MD", "NESTED-CLAUDE-MD", "STUDY-SKILL"):
        assert f"PLANTED-{mark}" in sent, mark


# --- 3. scheduling ----------------------------------------------------------------------------


SCHEDULING = ("ScheduleWakeup", "CronCreate", "CronDelete", "CronList")


def tools_offered(e2e: E2E) -> set[str]:
    return {t["name"] for t in e2e.api.requests[-1].data.get("tools", [])}


def test_user_and_plan_mode_cannot_schedule_prompts(e2e: E2E) -> None:
    stubs = e2e.start(POWER)
    for sid, mode in (("u", pb.MODE_USER), ("plan", pb.MODE_PLAN), ("p", pb.MODE_POWER)):
        stubs.sessions.CreateSession(pb.CreateSessionRequest(session_id=sid, mode=mode))
        send(stubs, sid, "hello")
        offered = tools_offered(e2e)
        assert "Bash" in offered
        if mode == pb.MODE_POWER:
            assert "ScheduleWakeup" in offered  # what the CLI offers when nothing is taken away
        else:
            assert not offered & set(SCHEDULING), (sid, offered)
    # Called anyway, it does not exist for the agent.
    wake = {"delaySeconds": 60, "prompt": "wake up", "reason": "later"}
    send(stubs, "u", "[[tool:ScheduleWakeup " + json.dumps(wake) + "]]")
    (result,) = e2e.api.requests[-1].tool_results
    assert result.get("is_error")


def test_scheduled_prompts_on_gives_user_mode_the_tools(e2e: E2E) -> None:
    stubs = e2e.start({"modes.user": {"scheduled_prompts": True}})
    stubs.sessions.CreateSession(pb.CreateSessionRequest(session_id="u"))
    send(stubs, "u", "hello")
    assert "ScheduleWakeup" in tools_offered(e2e)


# --- 4. remember with an edited input ---------------------------------------------------------


def write(path: Path, content: str) -> str:
    return "[[tool:Write " + json.dumps({"file_path": str(path), "content": content}) + "]]"


def test_remembering_an_edited_allow_remembers_the_edited_call(e2e: E2E) -> None:
    stubs = e2e.start()
    stubs.sessions.CreateSession(pb.CreateSessionRequest(session_id="e"))
    asked, edited = e2e.workdir / "asked.txt", e2e.workdir / "edited.txt"
    new = {"file_path": str(edited), "content": "safe"}
    seen: list[str] = []

    def edit_and_remember(req: pb.PermissionRequest) -> None:
        seen.append(req.input_json)
        stubs.sessions.RespondToPermission(
            pb.RespondToPermissionRequest(
                session_id="e",
                request_id=req.request_id,
                allow=True,
                remember=True,
                updated_input_json=json.dumps(new),
            ),
            timeout=10,
        )

    send_answering(stubs, "e", write(asked, "danger"), edit_and_remember)
    assert edited.read_text() == "safe" and not asked.exists()

    def deny(req: pb.PermissionRequest) -> None:
        seen.append(req.input_json)
        stubs.sessions.RespondToPermission(
            pb.RespondToPermissionRequest(session_id="e", request_id=req.request_id, allow=False),
            timeout=10,
        )

    # The original call asks again (and is denied); the edited one runs without asking.
    events = send_answering(stubs, "e", write(asked, "danger") + write(edited, "safe"), deny)
    assert not asked.exists()
    assert [json.loads(s)["file_path"] for s in seen] == [str(asked), str(asked)]
    assert [(d.allow, d.decider) for d in decided(events)] == [
        (False, pb.DECIDER_CLIENT),
        (True, pb.DECIDER_RULE),
    ]
    first = audit(stubs, "e")[0]
    assert "remembered for the rest of the session: Write with exactly the edited input" in (
        first.detail
    )
    assert "is allowed without asking" in first.detail


# --- 5. the plans folder ----------------------------------------------------------------------


def test_user_mode_cannot_redirect_or_read_other_plans(e2e: E2E) -> None:
    stubs = e2e.start()
    assert e2e.daemon is not None
    root = e2e.daemon.root
    study = make_study(root, "beam")
    plans = root / ".atomizerd" / "plans"
    assert plans.is_dir() and (plans.stat().st_mode & 0o777) == 0o700  # made at start-up
    stubs.sessions.CreateSession(pb.CreateSessionRequest(session_id="planner", mode=pb.MODE_PLAN))

    def keep_planning(req: pb.PermissionRequest) -> None:
        stubs.sessions.RespondToPermission(
            pb.RespondToPermissionRequest(
                session_id="planner", request_id=req.request_id, allow=False
            ),
            timeout=10,
        )

    send_answering(stubs, "planner", "[[plan:SECRET-PLAN-TEXT]]", keep_planning)
    (plan_file,) = (plans / "planner").glob("*.md")
    assert "SECRET-PLAN-TEXT" in plan_file.read_text()

    stubs.sessions.CreateSession(pb.CreateSessionRequest(session_id="u", study_id="beam"))
    redirect = f"rm -rf {root}/.atomizerd; ln -s {study} {root}/.atomizerd && echo WROTE"
    send(stubs, "u", bash(redirect) + " " + bash(f"cat {plan_file}"))
    link, peek = recorded_calls(stubs, "u")
    assert not ran(link) and not (root / ".atomizerd").is_symlink()
    assert "SECRET-PLAN-TEXT" not in peek.result
    assert plan_file.exists()


def test_plan_mode_runs_no_command_that_changes_anything_before_the_plan_is_approved(
    e2e: E2E,
) -> None:
    # Held by the CLI's plan mode itself (sandboxed commands are auto-allowed otherwise): it
    # runs only commands it finds read-only, in the foreground or the background.
    stubs = e2e.start()
    assert e2e.daemon is not None
    study = make_study(e2e.daemon.root, "beam")
    target = study / "3_results" / "before-approval.md"
    stubs.sessions.CreateSession(
        pb.CreateSessionRequest(session_id="p", study_id="beam", mode=pb.MODE_PLAN)
    )
    background = {"command": f"touch {target}", "run_in_background": True}
    calls = plant(target) + " " + bash(f"touch {target}")
    calls += " [[tool:Bash " + json.dumps(background) + "]]"
    send(stubs, "p", calls)
    recorded = recorded_calls(stubs, "p")
    assert len(recorded) == 3 and all(c.is_error for c in recorded), recorded
    assert not target.exists()


# --- running as root --------------------------------------------------------------------------


@pytest.mark.skipif(os.geteuid() != 0, reason="about a daemon run as root")
def test_a_daemon_run_as_root_says_so(e2e: E2E) -> None:
    stubs = e2e.start()
    status = stubs.daemon.GetStatus(daemon_pb2.GetStatusRequest())
    assert any("runs as root" in w for w in status.warnings)
    check = check_config(e2e)
    assert check.returncode == 0 and "# warning: the daemon runs as root" in check.stdout
