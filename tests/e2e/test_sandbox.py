"""User mode in Claude Code's sandbox, with the real CLI and real bubblewrap.

From inside a user-mode session every way around the policy fails, and the daemon records each
attempt; the same calls work in power mode where its policy allows; no agent's command line or
environment holds the system prompt or leads to the daemon; and a machine where the sandbox
cannot run gets a clear FAILED_PRECONDITION instead of an unsandboxed agent.
"""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from atomizer.v1 import daemon_pb2
from atomizer.v1 import session_pb2 as pb

from tests.conftest import Stubs, stubs_for
from tests.e2e.conftest import E2E, real_cli_config
from tests.support.daemon import RunningDaemon
from tests.support.fake_messages_api import FakeMessagesAPI
from tests.support.turns import kinds, send

pytestmark = pytest.mark.e2e

POWER = {"modes.power": {"enabled": True}, "agent": {"env": {"IS_SANDBOX": "1"}}}


def bash(command: str) -> str:
    return "[[tool:Bash " + json.dumps({"command": command}) + "]]"


def py(code: str) -> str:
    """A Bash tool call running Python (an exception makes the command fail)."""
    return bash("python3 -c " + shlex.quote(code))


def read(path: Path) -> str:
    return "[[tool:Read " + json.dumps({"file_path": str(path)}) + "]]"


def make_study(root: Path, name: str, report: str = "# Study\n") -> Path:
    study = root / "studies" / name
    (study / "3_results").mkdir(parents=True)
    (study / "STUDY_REPORT.md").write_text(report)
    return study


def recorded_calls(stubs: Stubs, sid: str) -> list[pb.ToolCall]:
    """The tool calls of the session's last reply, as the daemon stored them."""
    history = stubs.sessions.GetHistory(pb.GetHistoryRequest(session_id=sid)).messages
    return list(history[-1].tool_calls)


def agent_processes(api: FakeMessagesAPI) -> dict[int, tuple[str, dict[str, str]]]:
    """pid -> (command line, environment) of every process started for this test's agents (they
    all carry the fake API's address)."""
    mark = f"ANTHROPIC_BASE_URL={api.base_url}".encode()
    found: dict[int, tuple[str, dict[str, str]]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            environ = (entry / "environ").read_bytes()
            cmdline = (entry / "cmdline").read_bytes()
        except OSError:
            continue
        variables = environ.split(b"\0")
        if mark not in variables:
            continue
        env = dict(v.decode(errors="replace").partition("=")[::2] for v in variables if v)
        found[int(entry.name)] = (cmdline.replace(b"\0", b" ").decode(errors="replace"), env)
    return found


class Attempts:
    """Tool calls that try to step around the user-mode policy, and what each one touches."""

    def __init__(self, daemon: RunningDaemon, study: Path, other_study: Path, transcript: Path):
        tag = uuid.uuid4().hex[:8]
        self.home_file = daemon.workdir / "home" / f"escape-{tag}.txt"
        self.tmp_file = Path("/tmp") / f"azd-escape-{tag}.txt"
        self.root_file = daemon.root / "README.md"  # an existing entry of the Atomizer root
        self.root_memory = daemon.root / "CLAUDE.md"  # instructions every later agent loads
        self.other_study_file = other_study / "STUDY_REPORT.md"
        self.state_file = daemon.state_dir / f"escape-{tag}.txt"
        self.database = daemon.state_dir / "atomizerd.db"
        self.transcript = transcript
        self.study_file = study / "3_results" / f"ok-{tag}.md"
        self.calls = {
            "socket": py(
                "import socket; s = socket.socket(socket.AF_UNIX); "
                f's.connect("{daemon.socket}"); print("CONNECTED")'
            ),
            "home": self.write(self.home_file),
            "tmp": self.write(self.tmp_file),
            "root": self.write(self.root_file, mode="a"),
            "root memory": self.write(self.root_memory),
            "other study": self.write(self.other_study_file, mode="a"),
            "state": self.write(self.state_file),
            "database by bash": py(f'print(open("{self.database}", "rb").read(16))'),
            "transcript by bash": py(f'print(open("{transcript}").read())'),
            "database by read": read(self.database),
            "transcript by read": read(transcript),
            "network": py(
                "import urllib.request; "
                'print(urllib.request.urlopen("http://example.com", timeout=20).status)'
            ),
            # What the policy allows, so a refusal above is the policy's and not a broken tool.
            "study": self.write(self.study_file),
            "own tmp": py(
                'import os; p = os.environ["TMPDIR"] + "/ok.txt"; open(p, "w").write("x"); print(p)'
            ),
            "study by read": read(study / "STUDY_REPORT.md"),
        }

    @staticmethod
    def write(path: Path, mode: str = "w") -> str:
        return py(f'open("{path}", "{mode}").write("planted"); print("WROTE")')

    def message(self) -> str:
        return " ".join(self.calls.values())

    def results(self, calls: list[pb.ToolCall]) -> dict[str, pb.ToolCall]:
        """Each attempt's recorded call, found by its input."""
        by_input = {c.input_json: c for c in calls}
        out = {}
        for name, directive in self.calls.items():
            tool_input = directive[len("[[tool:") : -2].split(" ", 1)[1]
            matches = [
                c for key, c in by_input.items() if json.loads(key) == json.loads(tool_input)
            ]
            assert len(matches) == 1, (name, [c.input_json for c in calls])
            out[name] = matches[0]
        return out


def setup_sessions(e2e: E2E, stubs: Stubs, mode: pb.Mode.ValueType) -> Attempts:
    """Another session that leaves a transcript, two studies, and the attempts of a session
    "s" in `mode` working on one of them."""
    assert e2e.daemon is not None
    root = e2e.daemon.root
    (root / "README.md").write_text("the Atomizer checkout\n")
    study = make_study(root, "beam")
    other = make_study(root, "wing", "# Wing: someone else's work\n")
    stubs.sessions.CreateSession(pb.CreateSessionRequest(session_id="other"))
    send(stubs, "other", "the password is zebra-4242")
    projects = e2e.workdir / "home" / ".claude" / "projects"
    transcript = next(p for p in projects.glob("*/*.jsonl") if "zebra-4242" in p.read_text())
    stubs.sessions.CreateSession(
        pb.CreateSessionRequest(session_id="s", study_id="beam", mode=mode)
    )
    return Attempts(e2e.daemon, study, other, transcript)


def test_in_user_mode_every_way_around_the_policy_fails_and_is_recorded(e2e: E2E) -> None:
    stubs = e2e.start()
    attempts = setup_sessions(e2e, stubs, pb.MODE_USER)
    root_before = attempts.root_file.read_text()
    events = send(stubs, "s", attempts.message())
    assert kinds(events)[-1] == "turn_completed"
    r = attempts.results(recorded_calls(stubs, "s"))

    # No Unix socket at all (seccomp), so not the daemon's.
    assert r["socket"].is_error and "Operation not permitted" in r["socket"].result
    # Read-only outside the study and the private TMPDIR: the Atomizer root, other studies, /tmp.
    for name in ("tmp", "root", "other study"):
        assert r[name].is_error and "Read-only file system" in r[name].result, name
    assert r["root memory"].is_error and "Permission denied" in r["root memory"].result
    # HOME and the state dir are hidden behind a throwaway tmpfs: what lands there is gone.
    for path in (attempts.home_file, attempts.tmp_file, attempts.state_file):
        assert not path.exists(), path
    assert attempts.root_file.read_text() == root_before
    assert not attempts.root_memory.exists()
    assert "planted" not in attempts.other_study_file.read_text()
    # Neither Bash nor the Read tool reads the database or another session's transcript.
    for name in ("database by bash", "transcript by bash"):
        assert "SQLite format 3" not in r[name].result and "zebra-4242" not in r[name].result
    assert attempts.database.read_bytes().startswith(b"SQLite format 3")
    for name in ("database by read", "transcript by read"):
        assert r[name].is_error and "denied by your permission settings" in r[name].result, name
    # The sandbox's proxy refuses the host: a refusal, not a name lookup that failed.
    assert r["network"].is_error
    assert "403" in r["network"].result and "not on the allow list" in r["network"].result
    # While the study, the agent's own TMPDIR and reading the study work.
    assert not r["study"].is_error and attempts.study_file.read_text() == "planted"
    assert e2e.daemon is not None
    assert not r["own tmp"].is_error and str(e2e.daemon.state_dir) in r["own tmp"].result
    assert not r["study by read"].is_error and "# Study" in r["study by read"].result

    # Every attempt is in the audit trail: the reads the rules denied as denials.
    trail = stubs.sessions.ListAuditEvents(pb.ListAuditEventsRequest(session_id="s")).events
    assert len(trail) == len(attempts.calls)
    denied = sorted(a.tool_name for a in trail if not a.allow)
    assert denied == ["Read", "Read"]


def test_in_power_mode_the_same_calls_work_where_its_policy_allows(e2e: E2E) -> None:
    stubs = e2e.start(POWER)
    attempts = setup_sessions(e2e, stubs, pb.MODE_POWER)
    try:
        send(stubs, "s", attempts.message())
        r = attempts.results(recorded_calls(stubs, "s"))
        assert not r["socket"].is_error and "CONNECTED" in r["socket"].result
        for name in ("home", "tmp", "root", "root memory", "other study", "state", "study"):
            assert not r[name].is_error and "WROTE" in r[name].result, name
        for path in (attempts.home_file, attempts.tmp_file, attempts.state_file):
            assert path.read_text() == "planted"
        assert "SQLite format 3" in r["database by bash"].result
        assert "zebra-4242" in r["transcript by bash"].result
        assert (
            not r["transcript by read"].is_error and "zebra-4242" in r["transcript by read"].result
        )
        # Read takes no binary file whatever the mode; what matters is that no rule stops it.
        assert "denied by your permission settings" not in r["database by read"].result
        # No proxy in the way: whatever happens is the machine's network (none here).
        assert "not on the allow list" not in r["network"].result
        assert "403" not in r["network"].result
    finally:
        attempts.tmp_file.unlink(missing_ok=True)


def test_no_agent_has_the_system_prompt_in_argv_or_a_way_to_the_daemon_in_its_environment(
    short_tmp: Path, api: FakeMessagesAPI
) -> None:
    marker, seeded = f"STUDY-MARK-{uuid.uuid4().hex}", f"SEED-MARK-{uuid.uuid4().hex}"
    xdg = short_tmp / "xdg"
    (xdg / "atomizerd").mkdir(parents=True)

    def start() -> tuple[RunningDaemon, Stubs]:
        d = RunningDaemon(
            short_tmp, real_cli_config(short_tmp, api, POWER), env={"XDG_RUNTIME_DIR": str(xdg)}
        )
        d.start()
        return d, stubs_for(d.channel())

    daemon, stubs = start()
    try:
        make_study(daemon.root, "beam", f"# Beam\n{marker}\n")
        stubs.sessions.CreateSession(pb.CreateSessionRequest(session_id="seeded"))
        send(stubs, "seeded", f"remember {seeded}")
        daemon.stop()
        for transcript in (short_tmp / "home" / ".claude" / "projects").glob("*/*.jsonl"):
            transcript.unlink()  # lost: the next agent is seeded with the stored messages
        daemon, stubs = start()
        send(stubs, "seeded", "what did I ask you to remember?")
        assert seeded in api.requests[-1].system_text  # the seed did reach the model
        for sid, mode in (("u", pb.MODE_USER), ("p", pb.MODE_POWER)):
            stubs.sessions.CreateSession(
                pb.CreateSessionRequest(session_id=sid, study_id="beam", mode=mode)
            )
            send(stubs, sid, "hello")
            assert marker in api.requests[-1].system_text

        agents = agent_processes(api)
        assert len(agents) >= 3  # three live agents, and whatever they started
        ps = subprocess.run(["ps", "-eo", "args"], capture_output=True, text=True, check=True)
        assert marker not in ps.stdout and seeded not in ps.stdout
        for pid, (cmdline, env) in agents.items():
            assert marker not in cmdline and seeded not in cmdline, pid
            assert not any(marker in v or seeded in v for v in env.values()), pid
            assert "XDG_RUNTIME_DIR" not in env, pid
            assert not [k for k in env if k.startswith("ATOMIZERD_")], pid
            assert str(daemon.runtime_dir) not in env.get("TMPDIR", ""), pid
    finally:
        daemon.stop()
        log = daemon.log_path
        if log.exists():
            print(log.read_text(errors="replace")[-6000:])


@pytest.fixture
def no_bwrap(short_tmp: Path) -> Iterator[Path]:
    """A PATH for agents with everything but bubblewrap."""
    bin_dir = short_tmp / "bin-without-bwrap"
    bin_dir.mkdir()
    for folder in os.environ.get("PATH", "").split(":"):
        if not folder or not Path(folder).is_dir():
            continue
        for program in Path(folder).iterdir():
            target = bin_dir / program.name
            if program.name != "bwrap" and not target.exists() and os.access(program, os.X_OK):
                target.symlink_to(program)
    yield bin_dir


def test_without_bubblewrap_user_mode_is_refused_clearly_and_no_agent_starts(
    e2e: E2E, no_bwrap: Path
) -> None:
    config = {
        "modes.power": {"enabled": True},
        "agent": {"env": {"PATH": str(no_bwrap), "IS_SANDBOX": "1"}},
    }
    stubs = e2e.start(config)
    stubs.sessions.CreateSession(pb.CreateSessionRequest(session_id="u"))
    with pytest.raises(grpc.RpcError) as err:
        send(stubs, "u", "hello")
    assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    details = err.value.details() or ""
    assert "bubblewrap" in details and "apt-get install bubblewrap socat" in details
    assert "sandbox.enabled" in details
    # (The daemon's `claude --version` probe may be running: it is no agent.)
    agents = {pid: cmd for pid, (cmd, _) in agent_processes(e2e.api).items()}
    assert api_calls(e2e) == 0
    assert [cmd for cmd in agents.values() if not cmd.rstrip().endswith("--version")] == []

    status = stubs.daemon.GetStatus(daemon_pb2.GetStatusRequest())
    assert status.sandbox_enabled and not status.sandbox_available
    assert "bubblewrap (bwrap) not found" in status.sandbox_detail

    # Power mode is not sandboxed: it still runs there.
    stubs.sessions.CreateSession(pb.CreateSessionRequest(session_id="p", mode=pb.MODE_POWER))
    assert kinds(send(stubs, "p", "hello"))[-1] == "turn_completed"

    assert e2e.daemon is not None
    check = subprocess.run(
        [
            sys.executable,
            "-m",
            "atomizerd",
            "--config",
            str(e2e.daemon.config_path),
            "--check-config",
        ],
        capture_output=True,
        text=True,
        env={k: v for k, v in os.environ.items() if not k.startswith("ATOMIZERD_")},
        timeout=60,
    )
    assert check.returncode == 0, check.stderr
    assert "# sandbox (user mode): UNAVAILABLE: bubblewrap (bwrap) not found" in check.stdout


def test_where_the_sandbox_works_get_status_and_check_config_say_so(e2e: E2E) -> None:
    stubs = e2e.start()
    status = stubs.daemon.GetStatus(daemon_pb2.GetStatusRequest())
    assert status.sandbox_enabled and status.sandbox_available
    assert "bwrap /" in status.sandbox_detail and "socat /" in status.sandbox_detail


def api_calls(e2e: E2E) -> int:
    return len(e2e.api.requests)
