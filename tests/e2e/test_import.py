"""ImportSession end to end (issue 25): a conversation had with the plain `claude` CLI (the
pinned one, against the fake Messages API, in another folder) becomes a daemon session that
resumes it. Checked in history, on disk and in what the fake model received.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import grpc
import pytest
from atomizer.v1 import session_pb2 as pb

from tests.e2e.conftest import E2E
from tests.integration.test_ctl import ctl
from tests.support.daemon import real_claude
from tests.support.turns import send

pytestmark = pytest.mark.e2e


def plain_claude(e2e: E2E, prompt: str) -> str:
    """One `claude -p` conversation in a folder of its own; its conversation id."""
    home = e2e.workdir / "home"
    cwd = e2e.workdir / "elsewhere"
    cwd.mkdir(exist_ok=True)
    env = {
        "PATH": "/usr/bin:/bin",
        "HOME": str(home),
        "CLAUDE_CONFIG_DIR": str(home / ".claude"),
        "TMPDIR": str(e2e.workdir),
        **e2e.api.env(),
    }
    done = subprocess.run(
        [real_claude(), "-p", prompt, "--output-format", "json"],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    return str(json.loads(done.stdout)["session_id"])


def code_of(call: object) -> grpc.StatusCode:
    with pytest.raises(grpc.RpcError) as caught:
        call()  # type: ignore[operator]
    return caught.value.code()


def test_a_plain_cli_conversation_is_imported_and_resumed(e2e: E2E) -> None:
    stubs = e2e.start()
    conversation = plain_claude(e2e, "remember the word kiwi")
    projects = e2e.workdir / "home" / ".claude" / "projects"
    (original,) = projects.glob(f"*/{conversation}.jsonl")
    before = original.read_bytes()

    done = stubs.sessions.ImportSession(
        pb.ImportSessionRequest(agent_session_id=conversation, session_id="imp")
    )
    assert done.imported_messages == 2
    assert done.session.agent_session_id == conversation
    assert done.session.title == "remember the word kiwi"
    rows = stubs.sessions.GetHistory(pb.GetHistoryRequest(session_id="imp")).messages
    assert [(m.role, m.content) for m in rows] == [
        (pb.ROLE_USER, "remember the word kiwi"),
        (pb.ROLE_ASSISTANT, "echo: remember the word kiwi"),
    ]
    events = send(stubs, "imp", "which word?")
    assert events[-1].turn_completed.text == "echo: which word?"
    asked = next(r for r in e2e.api.requests if r.prompt_text == "which word?")
    assert "remember the word kiwi" in json.dumps(asked.data["messages"])
    assert original.read_bytes() == before  # the original was copied, never changed
    assert len(list(projects.glob(f"*/{conversation}.jsonl"))) == 2

    # The same conversation twice is refused; so is anything outside the projects folder.
    again = pb.ImportSessionRequest(agent_session_id=conversation)
    assert (
        code_of(lambda: stubs.sessions.ImportSession(again)) == grpc.StatusCode.FAILED_PRECONDITION
    )


def test_bad_imports_get_the_right_codes_and_create_nothing(e2e: E2E) -> None:
    stubs = e2e.start()
    conversation = plain_claude(e2e, "hello")
    projects = e2e.workdir / "home" / ".claude" / "projects"
    (original,) = projects.glob(f"*/{conversation}.jsonl")
    broken = original.parent / "00000000-0000-4000-8000-000000000000.jsonl"
    broken.write_text("{not json\n")
    outside = e2e.workdir / f"{conversation}.jsonl"
    outside.write_bytes(original.read_bytes())

    def imported(**kw: str) -> grpc.StatusCode:
        return code_of(lambda: stubs.sessions.ImportSession(pb.ImportSessionRequest(**kw)))

    assert imported(transcript_path=str(broken)) == grpc.StatusCode.INVALID_ARGUMENT
    assert imported(transcript_path=str(outside)) == grpc.StatusCode.PERMISSION_DENIED
    assert imported(transcript_path=str(original.parent / ".." / ".." / outside.name)) == (
        grpc.StatusCode.PERMISSION_DENIED
    )
    assert imported(agent_session_id="not-a-uuid") == grpc.StatusCode.INVALID_ARGUMENT
    assert (
        imported(agent_session_id="11111111-2222-4333-8444-555555555555")
        == grpc.StatusCode.NOT_FOUND
    )
    assert imported() == grpc.StatusCode.INVALID_ARGUMENT
    assert imported(agent_session_id=conversation, session_id="../x") == (
        grpc.StatusCode.INVALID_ARGUMENT
    )
    listed = stubs.sessions.ListSessions(pb.ListSessionsRequest()).sessions
    assert list(listed) == []


def test_atomizerctl_import(e2e: E2E) -> None:
    e2e.start()
    assert e2e.daemon is not None
    conversation = plain_claude(e2e, "the span is 4 m")
    (path,) = (e2e.workdir / "home" / ".claude" / "projects").glob(f"*/{conversation}.jsonl")
    done = ctl(e2e.daemon, "import", str(path), "--id", "ci")
    assert done.returncode == 0 and done.stdout.strip() == "ci", done.stderr
    assert "2 message(s) imported" in done.stderr
    assert "the span is 4 m" in ctl(e2e.daemon, "history", "ci").stdout
    assert Path(path).exists()
