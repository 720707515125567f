"""The real ``claude`` CLI in stream-json mode against the project's fake Messages API.

These tests check the fake and the CLI protocol facts documented in docs/agent-protocol.md.
The CLI is ``$ATOMIZERD_TEST_CLAUDE``, else the ``claude`` next to ``sys.executable``. Each test
runs the CLI with a private HOME, CLAUDE_CONFIG_DIR and TMPDIR under tmp_path, in its own process
group, and kills the group at the end.
"""

from __future__ import annotations

import contextlib
import json
import os
import queue
import re
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.support.fake_messages_api import FakeMessagesAPI, parse_directives, prompt_text_of

STREAM_JSON_ARGS = [
    "-p",
    "--input-format",
    "stream-json",
    "--output-format",
    "stream-json",
    "--verbose",
    "--include-partial-messages",
]
LINE_TIMEOUT = 30.0

Line = dict[str, Any]


def claude_path() -> Path:
    configured = os.environ.get("ATOMIZERD_TEST_CLAUDE")
    return Path(configured) if configured else Path(sys.executable).parent / "claude"


class CliProcess:
    """One ``claude`` process: JSON lines in on stdin, JSON lines out on stdout."""

    def __init__(self, argv: list[str], cwd: Path, env: dict[str, str]) -> None:
        self.proc = subprocess.Popen(
            argv,
            cwd=cwd,
            env=env,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            start_new_session=True,  # own process group, killed as a whole in close()
        )
        self.lines: queue.Queue[Line | None] = queue.Queue()
        self.stderr = bytearray()
        threading.Thread(target=self._read_stdout, daemon=True).start()
        threading.Thread(target=self._read_stderr, daemon=True).start()

    def _read_stdout(self) -> None:
        assert self.proc.stdout is not None
        for raw in self.proc.stdout:  # whole lines: multi-byte characters are never split
            text = raw.decode("utf-8").strip()
            if text.startswith("{"):
                self.lines.put(json.loads(text))
        self.lines.put(None)

    def _read_stderr(self) -> None:
        assert self.proc.stderr is not None
        for raw in self.proc.stderr:
            if len(self.stderr) < 64 * 1024:
                self.stderr += raw

    def send(self, obj: Line) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write((json.dumps(obj, ensure_ascii=False) + "\n").encode("utf-8"))
        self.proc.stdin.flush()

    def send_user(self, text: str) -> None:
        self.send(
            {
                "type": "user",
                "message": {"role": "user", "content": text},
                "parent_tool_use_id": None,
                "session_id": "",
            }
        )

    def read_until(self, pred: Callable[[Line], bool], timeout: float = LINE_TIMEOUT) -> list[Line]:
        """Lines up to and including the first one matching pred."""
        deadline = time.monotonic() + timeout
        seen: list[Line] = []
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"no matching line in {timeout}s; saw {summarize(seen)}")
            try:
                line = self.lines.get(timeout=left)
            except queue.Empty:
                continue
            if line is None:
                raise EOFError(f"stdout closed; saw {summarize(seen)}; stderr={self.stderr!r}")
            seen.append(line)
            if pred(line):
                return seen

    def turn(self, text: str) -> list[Line]:
        """Send one user message; return its lines up to and including the result line."""
        self.send_user(text)
        return self.read_until(lambda line: line.get("type") == "result")

    def close(self) -> int | None:
        """Close stdin and wait briefly for the exit, then SIGKILL whatever is left in the group."""
        with contextlib.suppress(OSError):
            if self.proc.stdin is not None:
                self.proc.stdin.close()
        try:
            return self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            return None
        finally:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(timeout=5)


def summarize(lines: list[Line]) -> list[str]:
    return [f"{line.get('type')}/{line.get('subtype', '')}" for line in lines[-20:]]


def text_deltas(lines: list[Line]) -> list[str]:
    return [
        line["event"]["delta"]["text"]
        for line in lines
        if line.get("type") == "stream_event"
        and line["event"].get("type") == "content_block_delta"
        and line["event"]["delta"].get("type") == "text_delta"
    ]


def result_of(lines: list[Line]) -> Line:
    assert lines and lines[-1].get("type") == "result", summarize(lines)
    return lines[-1]


def tool_results(lines: list[Line]) -> list[Line]:
    return [
        block
        for line in lines
        if line.get("type") == "user" and isinstance(line["message"].get("content"), list)
        for block in line["message"]["content"]
        if block.get("type") == "tool_result"
    ]


@pytest.fixture
def fake_api() -> Iterator[FakeMessagesAPI]:
    with FakeMessagesAPI() as api:
        yield api


@pytest.fixture
def workdir(tmp_path: Path) -> Path:
    cwd = tmp_path / "work"
    cwd.mkdir()
    return cwd


@pytest.fixture
def cli_env(tmp_path: Path, fake_api: FakeMessagesAPI) -> dict[str, str]:
    """A minimal child environment: nothing from the real home, no IS_SANDBOX, no CLAUDECODE."""
    for name in ("home", "config", "tmp"):
        (tmp_path / name).mkdir()
    return {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "LANG": "C.UTF-8",
        "HOME": str(tmp_path / "home"),
        "CLAUDE_CONFIG_DIR": str(tmp_path / "config"),
        "TMPDIR": str(tmp_path / "tmp"),
        **fake_api.env(),
    }


@pytest.fixture
def spawn(workdir: Path, cli_env: dict[str, str]) -> Iterator[Callable[..., CliProcess]]:
    cli = claude_path()
    if not cli.exists():
        pytest.skip(f"claude CLI not found at {cli} (set ATOMIZERD_TEST_CLAUDE)")
    procs: list[CliProcess] = []

    def _spawn(*extra: str) -> CliProcess:
        proc = CliProcess([str(cli), *STREAM_JSON_ARGS, *extra], workdir, cli_env)
        procs.append(proc)
        return proc

    yield _spawn
    for proc in procs:
        proc.close()


# --------------------------------------------------------------------------------------------
# The directive parser (no CLI needed)
# --------------------------------------------------------------------------------------------


def test_parse_directives() -> None:
    d = parse_directives(
        'run [[tool:Bash {"command": "echo ]] x"}]] [[slow:20]][[chunks:3]] [[error:529:2]] done'
    )
    assert [(t.name, t.input) for t in d.tools] == [("Bash", {"command": "echo ]] x"})]
    assert (d.slow_ms, d.chunks, d.error_status, d.error_times) == (20, 3, 529, 2)
    assert d.clean_text == "run done"
    assert parse_directives("[[nope]]").unknown == ["[[nope]]"]


def test_prompt_text_skips_cli_notes() -> None:
    body = {
        "messages": [
            {"role": "user", "content": "old turn"},
            {"role": "assistant", "content": [{"type": "text", "text": "echo: old turn"}]},
            {
                "role": "user",
                "content": [
                    {"type": "text", "text": "<system-reminder>\nnote\n</system-reminder>\n"},
                    {"type": "text", "text": "[Request interrupted by user]\n"},
                    {"type": "text", "text": "the prompt [[reply:x]]"},
                ],
            },
            {"role": "system", "content": "# Environment\n..."},
        ]
    }
    assert prompt_text_of(body) == "the prompt [[reply:x]]"


# --------------------------------------------------------------------------------------------
# The real CLI
# --------------------------------------------------------------------------------------------


@pytest.mark.e2e
def test_text_streams_back(spawn: Callable[..., CliProcess], fake_api: FakeMessagesAPI) -> None:
    proc = spawn()
    lines = proc.turn("hello there [[chunks:4]]")

    deltas = text_deltas(lines)
    assert len(deltas) == 4
    assert "".join(deltas) == "echo: hello there"
    result = result_of(lines)
    assert result["subtype"] == "success"
    assert result["is_error"] is False
    assert result["result"] == "echo: hello there"
    init = next(line for line in lines if line.get("subtype") == "init")
    assert init["session_id"] == result["session_id"]

    (req,) = fake_api.requests
    assert req.stream
    assert req.prompt_text == "hello there [[chunks:4]]"
    assert "Claude" in req.system_text


@pytest.mark.e2e
def test_second_turn_sends_earlier_turns(
    spawn: Callable[..., CliProcess], fake_api: FakeMessagesAPI
) -> None:
    proc = spawn()
    first = result_of(proc.turn("first words"))
    second = result_of(proc.turn("second words"))

    assert first["result"] == "echo: first words"
    assert second["result"] == "echo: second words"
    assert first["session_id"] == second["session_id"]
    req = fake_api.requests[-1]
    assert req.prompt_text == "second words"
    assert "first words" in req.texts("user")
    assert "echo: first words" in req.texts("assistant")


@pytest.mark.e2e
def test_tool_use_denied_in_default_mode(
    spawn: Callable[..., CliProcess], fake_api: FakeMessagesAPI, workdir: Path
) -> None:
    proc = spawn()
    lines = proc.turn('make it [[tool:Bash {"command": "touch made-by-tool"}]]')

    assert not (workdir / "made-by-tool").exists()
    (block,) = tool_results(lines)
    assert block["is_error"] is True
    result = result_of(lines)
    assert [d["tool_name"] for d in result["permission_denials"]] == ["Bash"]
    assert result["result"].startswith("tool_result Bash is_error=true: ")
    # What the model saw: the denial came back as an error tool_result.
    (seen,) = fake_api.requests[-1].tool_results
    assert seen["is_error"] is True
    assert seen["tool_use_id"] == block["tool_use_id"]


@pytest.mark.e2e
def test_allowed_tool_runs(
    spawn: Callable[..., CliProcess], fake_api: FakeMessagesAPI, workdir: Path
) -> None:
    proc = spawn("--allowedTools", "Bash")
    lines = proc.turn('[[tool:Bash {"command": "touch made-by-tool && echo done"}]]')

    assert (workdir / "made-by-tool").exists()
    (block,) = tool_results(lines)
    assert block.get("is_error") is False
    assert result_of(lines)["result"] == "tool_result Bash is_error=false: done"


@pytest.mark.e2e
def test_permission_prompt_over_stdio(
    spawn: Callable[..., CliProcess], fake_api: FakeMessagesAPI, workdir: Path
) -> None:
    proc = spawn("--permission-prompt-tool", "stdio")
    proc.send_user('[[tool:Bash {"command": "touch asked-for"}]]')
    lines = proc.read_until(lambda line: line.get("type") == "control_request")
    request = lines[-1]
    assert request["request"]["subtype"] == "can_use_tool"
    assert request["request"]["tool_name"] == "Bash"
    assert request["request"]["input"] == {"command": "touch asked-for"}
    proc.send(
        {
            "type": "control_response",
            "response": {
                "subtype": "success",
                "request_id": request["request_id"],
                "response": {
                    "behavior": "allow",
                    "updatedInput": {"command": "touch rewritten && echo rewritten"},
                },
            },
        }
    )
    lines = proc.read_until(lambda line: line.get("type") == "result")

    assert (workdir / "rewritten").exists()
    assert not (workdir / "asked-for").exists()
    assert result_of(lines)["result"] == "tool_result Bash is_error=false: rewritten"


@pytest.mark.e2e
def test_interrupt_ends_turn_and_process_stays_usable(
    spawn: Callable[..., CliProcess], fake_api: FakeMessagesAPI
) -> None:
    proc = spawn()
    proc.send_user("wait forever [[hang]]")
    proc.read_until(lambda line: bool(text_deltas([line])))
    proc.send(
        {"type": "control_request", "request_id": "int-1", "request": {"subtype": "interrupt"}}
    )
    lines = proc.read_until(lambda line: line.get("type") == "result", timeout=10)

    (ack,) = [line for line in lines if line.get("type") == "control_response"]
    assert ack["response"]["subtype"] == "success"
    assert ack["response"]["request_id"] == "int-1"
    result = result_of(lines)
    assert result["is_error"] is True
    assert result["subtype"] == "error_during_execution"

    after = result_of(proc.turn("still there? [[reply:yes]]"))
    assert after["result"] == "yes"
    assert fake_api.requests[-1].prompt_text == "still there? [[reply:yes]]"


@pytest.mark.e2e
def test_multibyte_text_round_trips(
    spawn: Callable[..., CliProcess], fake_api: FakeMessagesAPI
) -> None:
    text = "é 世界 🎉 naïve – ñ 👩‍💻"
    proc = spawn()
    lines = proc.turn(f"{text} [[chunks:9]]")

    assert "".join(text_deltas(lines)) == f"echo: {text}"
    assert result_of(lines)["result"] == f"echo: {text}"
    assert fake_api.requests[-1].prompt_text == f"{text} [[chunks:9]]"


@pytest.mark.e2e
def test_resume_continues_the_conversation_in_a_new_process(
    spawn: Callable[..., CliProcess],
    fake_api: FakeMessagesAPI,
    workdir: Path,
    cli_env: dict[str, str],
) -> None:
    session_id = str(uuid.uuid4())
    first = spawn(f"--session-id={session_id}")
    assert result_of(first.turn("remember banana"))["session_id"] == session_id
    assert first.close() == 0

    project = re.sub(r"[^A-Za-z0-9]", "-", str(workdir.resolve()))
    transcript = Path(cli_env["CLAUDE_CONFIG_DIR"]) / "projects" / project / f"{session_id}.jsonl"
    assert transcript.is_file()

    second = spawn(f"--resume={session_id}")
    result = result_of(second.turn("what was it?"))
    assert result["session_id"] == session_id
    req = fake_api.requests[-1]
    assert "remember banana" in req.texts("user")
    assert "echo: remember banana" in req.texts("assistant")


@pytest.mark.e2e
def test_resume_of_a_missing_transcript_fails_at_once(
    spawn: Callable[..., CliProcess], fake_api: FakeMessagesAPI
) -> None:
    missing = str(uuid.uuid4())
    proc = spawn(f"--resume={missing}")
    result = result_of(proc.read_until(lambda line: line.get("type") == "result"))
    assert result["is_error"] is True
    assert result["subtype"] == "error_during_execution"
    assert proc.proc.wait(timeout=10) == 1
    time.sleep(0.2)  # let the stderr reader catch up
    assert f"No conversation found with session ID: {missing}" in proc.stderr.decode()
    assert fake_api.requests == []


@pytest.mark.e2e
def test_overloaded_is_retried_and_announced(
    spawn: Callable[..., CliProcess], fake_api: FakeMessagesAPI
) -> None:
    proc = spawn()
    lines = proc.turn("busy? [[error:529:1]]")

    (retry,) = [line for line in lines if line.get("subtype") == "api_retry"]
    assert retry["error_status"] == 529
    assert retry["attempt"] == 1
    assert retry["max_retries"] == 1  # CLAUDE_CODE_MAX_RETRIES=1 from fake_api.env()
    result = result_of(lines)
    assert result["is_error"] is False
    assert result["result"] == "echo: busy?"

    failed = result_of(proc.turn("down [[error:529]]"))
    assert failed["is_error"] is True
    assert failed["subtype"] == "success"  # an API failure is not flagged by the subtype
    assert failed["api_error_status"] == 529

    # The failed turn's text is merged into the next user message; the fake answers the last one.
    recovered = result_of(proc.turn("recovered?"))
    assert recovered["result"] == "echo: recovered?"
    last_user = [m for m in fake_api.requests[-1].messages if m["role"] == "user"][-1]
    texts = [b["text"].strip() for b in last_user["content"] if b.get("type") == "text"]
    assert texts[-2:] == ["down [[error:529]]", "recovered?"]
