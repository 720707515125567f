"""`atomizerctl chat` in a real terminal: tmux runs it, the test types and reads the screen."""

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
from atomizer_client import Client

from tests.support.daemon import RunningDaemon

CTL = Path(sys.executable).parent / "atomizerctl"
SLOW = "[[slow:300]] one two three four five six seven eight nine ten eleven twelve"

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


@pytest.fixture
def chat(daemon: RunningDaemon, short_tmp: Path) -> Iterator[tuple[Terminal, str, Path]]:
    with Client(daemon.socket) as c:
        sid = c.create_session().session_id
    state = short_tmp / "state"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("ATOMIZERD_", "TMUX"))}
    env.update(TERM="xterm-256color", XDG_STATE_HOME=str(state), NO_COLOR="1")
    cmd = f"{shlex.quote(str(CTL))} --socket {shlex.quote(str(daemon.socket))} chat {sid}"
    term = Terminal(short_tmp, f"{cmd}; echo CTL-EXIT=$?; sleep 600", env)
    try:
        yield term, sid, state
    finally:
        term.close()


def test_chat_replies_interrupts_and_quits(
    chat: tuple[Terminal, str, Path], daemon: RunningDaemon
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
    with Client(daemon.socket) as c:
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
