"""The daemon is inspectable with the real grpcurl: reflection, describe, and unary calls."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from tests.support.daemon import RunningDaemon

GRPCURL = str(Path(sys.executable).parent / "grpcurl")


def grpcurl(
    d: RunningDaemon, *args: str, data: str | None = None
) -> subprocess.CompletedProcess[str]:
    cmd = [GRPCURL, "-plaintext", "-unix"]
    if data is not None:
        cmd += ["-d", data]
    return subprocess.run([*cmd, str(d.socket), *args], capture_output=True, text=True, timeout=30)


def test_list_and_describe_show_the_contract(shared_daemon: RunningDaemon) -> None:
    listed = grpcurl(shared_daemon, "list")
    assert listed.returncode == 0, listed.stderr
    for name in (
        "atomizer.v1.SessionService",
        "atomizer.v1.DaemonService",
        "grpc.health.v1.Health",
    ):
        assert name in listed.stdout.split()
    described = grpcurl(shared_daemon, "describe", "atomizer.v1.SessionService")
    assert (
        "rpc SendMessage ( .atomizer.v1.SendMessageRequest ) returns ( stream" in described.stdout
    )


def test_create_then_get_session(shared_daemon: RunningDaemon) -> None:
    made = grpcurl(
        shared_daemon,
        "atomizer.v1.SessionService/CreateSession",
        data='{"mode": "MODE_USER", "session_id": "curl1"}',
    )
    assert made.returncode == 0, made.stderr
    assert json.loads(made.stdout)["session"]["session_id"] == "curl1"
    got = grpcurl(
        shared_daemon, "atomizer.v1.SessionService/GetSession", data='{"session_id": "curl1"}'
    )
    assert json.loads(got.stdout)["session"]["mode"] == "MODE_USER"


def test_errors_come_back_readable(shared_daemon: RunningDaemon) -> None:
    missing = grpcurl(
        shared_daemon, "atomizer.v1.SessionService/GetSession", data='{"session_id": "zz"}'
    )
    assert missing.returncode != 0
    assert "NotFound" in missing.stderr and "does not exist" in missing.stderr


def test_health_check(shared_daemon: RunningDaemon) -> None:
    health = grpcurl(shared_daemon, "grpc.health.v1.Health/Check")
    assert json.loads(health.stdout)["status"] == "SERVING"
