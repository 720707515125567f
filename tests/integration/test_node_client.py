"""A Node.js client (@grpc/grpc-js + @grpc/proto-loader, protos loaded at run time) against the
real daemon: the contract is usable from a second language over the Unix socket."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest

from tests.support.daemon import RunningDaemon

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "tests" / "support" / "node_client.js"
GRPC_JS = REPO / "tools" / "node_modules" / "@grpc" / "grpc-js"

pytestmark = [
    pytest.mark.skipif(shutil.which("node") is None, reason="node is not installed"),
    pytest.mark.skipif(
        not GRPC_JS.exists(), reason="tools/node_modules is missing (npm ci --prefix tools)"
    ),
]


def run_node(daemon: RunningDaemon, text: str) -> tuple[int, list[dict[str, object]], str]:
    done = subprocess.run(
        ["node", str(SCRIPT), daemon.target, text],
        capture_output=True,
        text=True,
        timeout=60,
    )
    events = [json.loads(line) for line in done.stdout.splitlines()]
    return done.returncode, events, done.stderr


def test_node_client_streams_a_turn_to_its_terminal_event(shared_daemon: RunningDaemon) -> None:
    code, events, err = run_node(shared_daemon, "hello")
    assert code == 0, err
    kinds = [e["kind"] for e in events]
    assert kinds[0] == "turn_started" and kinds[-1] == "turn_completed"
    assert kinds.count("turn_completed") + kinds.count("turn_failed") == 1
    deltas = [e["text_delta"]["text"] for e in events if e["kind"] == "text_delta"]  # type: ignore[index]
    assert "".join(deltas) == "echo: hello"
    assert len({e["turn_id"] for e in events}) == 1
    seqs = [int(str(e["seq"])) for e in events]  # int64 arrives as a string in JS
    assert seqs == sorted(seqs)


def test_node_client_sees_a_failed_turn_as_terminal(shared_daemon: RunningDaemon) -> None:
    code, events, err = run_node(shared_daemon, "[[crash]] boom")
    assert code == 0, err
    assert events[-1]["kind"] == "turn_failed"
    assert events[-1]["turn_failed"]["code"] == "FAILURE_CODE_AGENT_EXITED"  # type: ignore[index]
