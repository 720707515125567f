"""Runs the real atomizerd as a subprocess on a temporary socket, for integration tests.

with RunningDaemon(tmp_path, config={"pool": {"max_live": 2}}) as d:
    stub = session_pb2_grpc.SessionServiceStub(d.channel())

The daemon is started as what ships: the installed `atomizerd` console script next to the
venv's python (what systemd runs), not `python -m atomizerd`, which takes another import path
(`atomizerd/__main__.py`). `entry="module"` starts it with `-m` where a test needs that.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from tests.support import processes

REPO = Path(__file__).resolve().parents[2]
FAKE_AGENT = REPO / "tests" / "support" / "fake_agent.py"


def real_claude() -> str:
    """The pinned claude CLI (scripts/test links it next to the venv's python)."""
    explicit = os.environ.get("ATOMIZERD_TEST_CLAUDE")
    if explicit:
        return explicit
    return str(Path(sys.executable).parent / "claude")


def console_script() -> Path:
    """The installed `atomizerd` entry point (pip's wrapper script in the venv's bin)."""
    return Path(sys.executable).parent / "atomizerd"


EntryPoint = Literal["script", "module"]


def daemon_command(entry: EntryPoint = "script") -> list[str]:
    """How to start the daemon: the console script, or `python -m atomizerd`."""
    if entry == "module":
        return [sys.executable, "-m", "atomizerd"]
    script = console_script()
    if not script.exists():
        raise FileNotFoundError(f"no atomizerd console script at {script} (pip install -e .)")
    return [str(script)]


def fake_agent_command() -> list[str]:
    return [sys.executable, str(FAKE_AGENT)]


def _toml(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value)
    if isinstance(value, list):
        return "[" + ", ".join(_toml(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{ " + ", ".join(f"{json.dumps(k)} = {_toml(v)}" for k, v in value.items()) + " }"
    raise TypeError(type(value))


def write_config(path: Path, config: Mapping[str, Mapping[str, Any]]) -> None:
    """Writes a TOML file from {section: {key: value}}; nested sections use dotted names."""
    lines = []
    for section, values in config.items():
        lines.append(f"[{section}]")
        lines += [f"{k} = {_toml(v)}" for k, v in values.items()]
    path.write_text("\n".join(lines) + "\n")


def merge(base: dict[str, dict[str, Any]], extra: Mapping[str, Mapping[str, Any]]) -> None:
    for section, values in extra.items():
        base.setdefault(section, {}).update(values)


def health_serving(target: str) -> bool:
    """Whether the daemon at `target` answers health SERVING right now."""
    try:
        with grpc.insecure_channel(target) as ch:
            resp = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=1)
            return bool(resp.status == health_pb2.HealthCheckResponse.SERVING)
    except grpc.RpcError:
        return False


class RunningDaemon:
    """A real daemon process. `config` is merged over test defaults (fake agent, temp dirs)."""

    def __init__(
        self,
        workdir: Path,
        config: Mapping[str, Mapping[str, Any]] | None = None,
        *,
        env: Mapping[str, str] | None = None,
        extra_args: list[str] | None = None,
        entry: EntryPoint = "script",
    ) -> None:
        self.workdir = workdir
        self.entry = entry
        self.runtime_dir = workdir / "run"
        self.state_dir = workdir / "state"
        self.root = workdir / "atomizer"
        (self.root / "studies").mkdir(parents=True, exist_ok=True)
        self.socket = self.runtime_dir / "atomizerd.sock"
        self.config_path = workdir / "atomizerd.toml"
        self.log_path = workdir / "daemon.log"
        cfg: dict[str, dict[str, Any]] = {
            "daemon": {
                "runtime_dir": str(self.runtime_dir),
                "state_dir": str(self.state_dir),
                "grace_period": 2.0,
            },
            "agent": {
                "command": fake_agent_command(),
                "stop_grace": 1.0,
                # A daemon a test kills leaves its shims; they must not outlive the suite.
                "orphan_timeout": 120.0,
                "env": {"HOME": str(workdir / "home")},
            },
            "atomizer": {"root": str(self.root)},
            "logging": {"level": "debug", "format": "json"},
            # Spares change how many agents run and when: the tests that are about them turn
            # them on (tests/e2e/test_spare_agents.py); the rest count only their own agents.
            "pool": {"spares": 0},
        }
        merge(cfg, config or {})
        self.config = cfg
        (workdir / "home").mkdir(exist_ok=True)
        write_config(self.config_path, cfg)
        self.env = {k: v for k, v in os.environ.items() if not k.startswith("ATOMIZERD_")}
        self.env.update(env or {})
        self.extra_args = extra_args or []
        self.proc: subprocess.Popen[bytes] | None = None
        self._channels: list[grpc.Channel] = []

    @property
    def target(self) -> str:
        return f"unix://{self.socket}"

    def start(self, *, wait: bool = True) -> RunningDaemon:
        log = open(self.log_path, "ab")  # noqa: SIM115 - lives as long as the process
        self.proc = subprocess.Popen(
            [
                *daemon_command(self.entry),
                "--allow-root",
                "--config",
                str(self.config_path),
                *self.extra_args,
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
            env=self.env,
            cwd=self.workdir,
        )
        log.close()
        if wait:
            self.wait_serving()
        return self

    def wait_serving(self, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.proc is not None
            if self.proc.poll() is not None:
                raise RuntimeError(f"daemon exited with {self.proc.returncode}:\n{self.log()}")
            if self.socket.exists():
                try:
                    with grpc.insecure_channel(self.target) as ch:
                        stub = health_pb2_grpc.HealthStub(ch)
                        resp = stub.Check(health_pb2.HealthCheckRequest(), timeout=1.0)
                        if resp.status == health_pb2.HealthCheckResponse.SERVING:
                            return
                except grpc.RpcError:
                    pass
            time.sleep(0.05)
        raise TimeoutError(f"daemon not serving after {timeout}s:\n{self.log()}")

    def channel(self) -> grpc.Channel:
        ch = grpc.insecure_channel(self.target)
        self._channels.append(ch)
        return ch

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-20000:]
        except FileNotFoundError:
            return ""

    def log_records(self) -> list[dict[str, Any]]:
        out = []
        for line in self.log_path.read_text(errors="replace").splitlines():
            try:
                out.append(json.loads(line))
            except ValueError:
                continue
        return out

    def restart_in_place(self, timeout: float = 60.0) -> None:
        """A planned restart (SIGUSR2), waited for until the next daemon serves: the one
        that was asked may answer health for a moment more, and its socket's name stays
        (a new connection waits for the next daemon), so readiness is read from the log."""
        ready = self._ready_count()
        self.signal(signal.SIGUSR2)
        deadline = time.monotonic() + timeout
        while self._ready_count() <= ready:
            if time.monotonic() > deadline:
                raise TimeoutError(f"daemon not restarted after {timeout}s:\n{self.log()}")
            time.sleep(0.05)
        self.wait_serving(timeout)

    def _ready_count(self) -> int:
        return sum(1 for r in self.log_records() if r.get("event") == "atomizerd ready")

    def signal(self, sig: int) -> None:
        assert self.proc is not None
        self.proc.send_signal(sig)

    def stop(self, timeout: float = 30.0) -> int:
        for ch in self._channels:
            ch.close()
        self._channels.clear()
        if self.proc is None:
            return 0
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        # Shims a killed daemon left (nobody adopted them): the test is over, so are they.
        processes.end_shims(self.runtime_dir)
        return self.proc.returncode

    def kill(self) -> None:
        assert self.proc is not None
        self.proc.kill()
        self.proc.wait()

    def __enter__(self) -> RunningDaemon:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
