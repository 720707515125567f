"""`atomizerctl chat` (and `send`) in a real terminal: tmux runs it, the test types and reads
the screen."""

from __future__ import annotations

import os
import shlex
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from atomizer.v1 import session_pb2
from atomizer_client import Client, PermissionRequest

from tests.support.daemon import RunningDaemon

CTL = Path(sys.executable).parent / "atomizerctl"
SLOW = "[[slow:300]] one two three four five six seven eight nine ten eleven twelve"
ASKED = "allow? [y/N/a(lways)]"

pytestmark = pytest.mark.skipif(
    shutil.which("tmux") is None, reason="tmux is not installed (apt-get install tmux)"
)


class Terminal:
    """One tmux session on a private server, 120x40, running a command."""

    def __init__(self, workdir: Path, command: str, env: dict[str, str]) -> None:
        self.server = str(workdir / "tmux.sock")
        self.env = env
        self.tmux("new-session", "-d", "-s", "t", "-x", "120", "-y", "40", command)

    def tmux(self, *args: str) -> str:
        done = subprocess.run(
            ["tmux", "-S", self.server, *args],
            capture_output=True,
            text=True,
            env=self.env,
            timeout=10,
            check=True,
        )
        return done.stdout

    def type(self, text: str) -> None:
        self.tmux("send-keys", "-t", "t", "-l", text)
        self.tmux("send-keys", "-t", "t", "Enter")

    def key(self, name: str) -> None:
        self.tmux("send-keys", "-t", "t", name)

    def screen(self) -> str:
        return self.tmux("capture-pane", "-p", "-J", "-t", "t", "-S", "-")

    def wait_for(self, check: Callable[[str], bool], what: str, timeout: float = 20) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            text = self.screen()
            if check(text):
                return text
            time.sleep(0.1)
        raise AssertionError(f"timed out waiting for {what}; the screen:\n{self.screen()}")

    def close(self) -> None:
        subprocess.run(["tmux", "-S", self.server, "kill-server"], capture_output=True, timeout=10)


def at_prompt(text: str) -> bool:
    lines = [line for line in text.splitlines() if line.strip()]
    return bool(lines) and lines[-1].rstrip() == "you>"


def asking(text: str) -> bool:
    """The last line is the approval prompt, waiting for an answer."""
    lines = [line for line in text.splitlines() if line.strip()]
    return bool(lines) and lines[-1].rstrip() == ASKED


def run_in_terminal(daemon: RunningDaemon, workdir: Path, *args: str) -> Terminal:
    """atomizerctl ARGS in a terminal that stays open after it exits (printing CTL-EXIT=N)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("ATOMIZERD_", "TMUX"))}
    env.update(TERM="xterm-256color", XDG_STATE_HOME=str(workdir / "state"), NO_COLOR="1")
    cmd = shlex.join([str(CTL), "--socket", str(daemon.socket), *args])
    return Terminal(workdir, f"{cmd}; echo CTL-EXIT=$?; sleep 600", env)


@pytest.fixture
def chat(shared_daemon: RunningDaemon, short_tmp: Path) -> Iterator[tuple[Terminal, str, Path]]:
    with Client(shared_daemon.socket) as c:
        sid = c.create_session().session_id
    term = run_in_terminal(shared_daemon, short_tmp, "chat", sid)
    try:
        yield term, sid, short_tmp / "state"
    finally:
        term.close()


def test_chat_replies_interrupts_and_quits(
    chat: tuple[Terminal, str, Path], shared_daemon: RunningDaemon
) -> None:
    term, sid, state = chat
    term.wait_for(at_prompt, "the first prompt")

    term.type("hello")
    screen = term.wait_for(lambda s: "echo: hello" in s and at_prompt(s), "the reply")
    assert "tokens" in screen  # the cost and token line after the reply

    term.type(SLOW)
    term.wait_for(lambda s: "echo: one" in s, "the slow reply to begin")
    term.key("C-c")
    screen = term.wait_for(
        lambda s: "interrupted" in s.split("echo: one")[-1] and at_prompt(s),
        "the interrupted turn and a new prompt",
    )
    assert "twelve" not in screen.split("echo: one")[-1]  # the reply stopped early
    with Client(shared_daemon.socket) as c:
        last = list(c.get_history(sid))[-1]
    assert last.status == session_pb2.MESSAGE_STATUS_INTERRUPTED

    term.type("/quit")
    term.wait_for(lambda s: "CTL-EXIT=0" in s, "atomizerctl to exit 0")
    history = (state / "atomizerctl" / "history").read_text()
    assert "hello" in history  # readline history kept under $XDG_STATE_HOME/atomizerctl/


def test_ctrl_d_leaves_the_chat(chat: tuple[Terminal, str, Path]) -> None:
    term, _, _ = chat
    term.wait_for(at_prompt, "the first prompt")
    term.key("C-d")
    term.wait_for(lambda s: "CTL-EXIT=0" in s, "atomizerctl to exit 0 on Ctrl-D")


def test_chat_asks_before_a_tool_runs_and_the_answer_is_taken(
    chat: tuple[Terminal, str, Path], shared_daemon: RunningDaemon
) -> None:
    term, sid, _ = chat
    term.wait_for(at_prompt, "the first prompt")

    term.type("[[ask:Bash]] first")
    screen = term.wait_for(asking, "the approval prompt")
    assert "? permission for Bash" in screen and "use Bash" in screen
    term.type("y")
    screen = term.wait_for(
        lambda s: "permission Bash: allow" in s and at_prompt(s), "the allowed reply"
    )
    assert "✓ allowed Bash by client" in screen

    term.type("[[ask:Bash]] second")  # a(lways): allowed, and not asked again
    term.wait_for(lambda s: asking(s.split("second")[-1]), "the second approval prompt")
    term.type("a")
    term.wait_for(lambda s: s.count("permission Bash: allow") == 2 and at_prompt(s), "reply 2")
    term.type("[[ask:Bash]] third")
    screen = term.wait_for(lambda s: "echo: third" in s and at_prompt(s), "the third reply")
    third = screen.split("you> [[ask:Bash]] third")[-1]
    assert "✓ allowed Bash by rule" in third and ASKED not in third

    with Client(shared_daemon.socket) as c:
        deciders = [a.decider for a in c.list_audit_events(sid)]
    assert deciders == [session_pb2.DECIDER_CLIENT] * 2 + [session_pb2.DECIDER_RULE]


def test_a_prompt_answered_elsewhere_is_withdrawn(
    chat: tuple[Terminal, str, Path], shared_daemon: RunningDaemon
) -> None:
    term, sid, _ = chat
    term.wait_for(at_prompt, "the first prompt")
    term.type("[[ask:Read]] elsewhere")
    term.wait_for(asking, "the approval prompt")
    term.tmux("send-keys", "-t", "t", "-l", "yyy")  # typed, but not sent, at the prompt
    with Client(shared_daemon.socket) as c, c.watch_session(sid) as watch:
        request = next(e for e in watch if isinstance(e, PermissionRequest))
        c.respond_to_permission(sid, request.request_id, False, message="nope")
    screen = term.wait_for(
        lambda s: "permission Read: deny (nope)" in s and at_prompt(s), "the denied reply"
    )
    assert "✗ denied Read by client: nope" in screen
    term.type("hello")  # what was typed at the withdrawn prompt is gone
    screen = term.wait_for(lambda s: "echo: hello" in s and at_prompt(s), "the next reply")
    assert "yyy" not in screen.split("nope")[-1]


def test_send_asks_on_a_terminal(shared_daemon: RunningDaemon, short_tmp: Path) -> None:
    with Client(shared_daemon.socket) as c:
        sid = c.create_session().session_id
    term = run_in_terminal(shared_daemon, short_tmp, "send", sid, "[[ask:Bash]] hi")
    try:
        term.wait_for(asking, "the approval prompt")
        term.type("n")
        screen = term.wait_for(lambda s: "CTL-EXIT=0" in s, "send to exit 0")
    finally:
        term.close()
    assert "permission Bash: deny (the user denied this tool use)" in screen
    assert "✗ denied Bash by client" in screen
