"""The systemd units, sysusers entry, sample config and installer in systemd/ and scripts/."""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import tomllib
from pathlib import Path
from typing import Any

import pytest

from atomizerd import config
from atomizerd.daemon import server
from tests.support.daemon import RunningDaemon

REPO = Path(__file__).resolve().parents[2]
SYSTEM_UNIT = REPO / "systemd" / "atomizerd.service"
USER_UNIT = REPO / "systemd" / "atomizerd-user.service"
SAMPLE = REPO / "systemd" / "atomizerd.toml.sample"
SYSUSERS = REPO / "systemd" / "atomizerd.sysusers"
INSTALL = REPO / "scripts" / "install"
# An executable that exists, for ExecStart= (verify checks that the binary is there).
DAEMON_BIN = Path(sys.executable).parent / "atomizerd"

needs_systemd = pytest.mark.skipif(
    shutil.which("systemd-analyze") is None,
    reason="systemd-analyze missing (apt-get install systemd)",
)


def directives(unit: Path) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for line in unit.read_text().splitlines():
        if "=" in line and not line.startswith(("#", ";", "[")):
            key, value = line.split("=", 1)
            out.setdefault(key.strip(), []).append(value.strip())
    return out


def verify(unit: Path, tmp: Path, *, user: bool, exec_start: Path = DAEMON_BIN) -> str:
    """Runs `systemd-analyze verify` on a copy whose ExecStart= binary is `exec_start`.

    Returns the problems found: verify's exit status is not enough, because it only warns
    (exit 0) about unknown directives and unparsable values.
    """
    copy = tmp / "atomizerd.service"
    text = re.sub(r"^ExecStart=\S+", f"ExecStart={exec_start}", unit.read_text(), flags=re.M)
    copy.write_text(text)
    env = {**os.environ, "HOME": str(tmp), "XDG_RUNTIME_DIR": str(tmp / "run")}
    (tmp / "run").mkdir(mode=0o700, exist_ok=True)
    args = ["systemd-analyze", *(["--user"] if user else []), "verify", "--man=no", str(copy)]
    done = subprocess.run(args, capture_output=True, text=True, env=env, timeout=60)
    problems = [line for line in done.stderr.splitlines() if "atomizerd" in line]
    if done.returncode != 0:
        problems.append(f"exit status {done.returncode}: {done.stderr.strip()}")
    return "\n".join(problems)


@needs_systemd
def test_the_system_unit_verifies(tmp_path: Path) -> None:
    assert verify(SYSTEM_UNIT, tmp_path, user=False) == ""


@needs_systemd
def test_the_user_unit_verifies(tmp_path: Path) -> None:
    assert verify(USER_UNIT, tmp_path, user=True) == ""


@needs_systemd
def test_verify_does_catch_a_broken_unit(tmp_path: Path) -> None:
    assert "not executable" in verify(SYSTEM_UNIT, tmp_path, user=False, exec_start=tmp_path / "x")
    broken = tmp_path / "broken.service"
    broken.write_text(SYSTEM_UNIT.read_text().replace("KillMode=process", "KillMode=sometimes"))
    assert "kill mode" in verify(broken, tmp_path, user=False).lower()


@pytest.mark.parametrize("unit", [SYSTEM_UNIT, USER_UNIT], ids=["system", "user"])
def test_units_run_the_daemon_as_a_notify_service_under_a_watchdog(unit: Path) -> None:
    d = directives(unit)
    assert d["Type"] == ["notify"] and d["NotifyAccess"] == ["main"]
    assert d["Restart"] == ["on-failure"]
    assert d["WatchdogSec"] and d["TimeoutStopSec"]
    assert d["RuntimeDirectory"] == ["atomizerd"] and d["StateDirectory"] == ["atomizerd"]
    assert d["NoNewPrivileges"] == ["yes"]
    assert set(d["RestrictAddressFamilies"][0].split()) == {"AF_UNIX", "AF_INET", "AF_INET6"}
    assert "MemoryDenyWriteExecute" not in d  # node's JIT needs W+X memory
    assert "--config" in d["ExecStart"][0]


@pytest.mark.parametrize("unit", [SYSTEM_UNIT, USER_UNIT], ids=["system", "user"])
def test_units_let_agents_and_their_sockets_outlive_a_restart_of_the_daemon(unit: Path) -> None:
    d = directives(unit)
    # Only the daemon is signalled: its agents' shims (own sessions, same cgroup) live on.
    assert d["KillMode"] == ["process"]
    assert d["RuntimeDirectoryPreserve"] == ["restart"]  # the shims' sockets are in it
    # `systemctl reload` is a planned restart: SIGUSR2, then the exit status that restarts it.
    assert d["ExecReload"] == ["/bin/kill -USR2 $MAINPID"]
    status = str(server.RESTART_EXIT_STATUS)
    assert d["RestartForceExitStatus"] == [status] and d["SuccessExitStatus"] == [status]


def test_a_planned_restart_under_systemd_exits_with_the_status_the_unit_restarts_on(
    short_tmp: Path,
) -> None:
    daemon = RunningDaemon(short_tmp, env={"INVOCATION_ID": "0" * 32}).start()
    daemon.signal(signal.SIGUSR2)
    assert daemon.proc is not None
    assert daemon.proc.wait(30) == server.RESTART_EXIT_STATUS


def test_the_system_unit_runs_as_the_sysusers_user_with_hardening() -> None:
    d = directives(SYSTEM_UNIT)
    assert d["User"] == ["atomizerd"]
    assert d["ExecStart"] == ["/usr/bin/atomizerd --config /etc/atomizerd/atomizerd.toml"]
    assert d["RuntimeDirectoryMode"] == ["0750"]
    assert d["ProtectSystem"] == ["strict"] and d["ReadWritePaths"]
    assert d["ProtectHome"] == ["read-only"] and d["PrivateTmp"] == ["yes"]
    for key in ("ProtectKernelTunables", "ProtectKernelModules", "ProtectControlGroups"):
        assert d[key] == ["yes"]
    assert d["LockPersonality"] == ["yes"]
    user_line = next(line for line in SYSUSERS.read_text().splitlines() if line.startswith("u "))
    assert user_line.split()[1] == "atomizerd"


@pytest.mark.skipif(shutil.which("systemd-sysusers") is None, reason="systemd-sysusers missing")
def test_sysusers_creates_the_user_with_its_state_dir_as_home(tmp_path: Path) -> None:
    (tmp_path / "etc").mkdir()
    done = subprocess.run(
        ["systemd-sysusers", f"--root={tmp_path}", str(SYSUSERS)],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert done.returncode == 0, done.stderr
    entry = next(
        line.split(":")
        for line in (tmp_path / "etc" / "passwd").read_text().splitlines()
        if line.startswith("atomizerd:")
    )
    assert entry[5] == "/var/lib/atomizerd"


def uncommented_sample() -> str:
    """The sample with every `# key = value` line switched on."""
    return re.sub(r"^# ?([a-z_]+ = .*)$", r"\1", SAMPLE.read_text(), flags=re.M)


def dotted_keys(table: dict[str, Any], known: set[str], prefix: str = "") -> set[str]:
    out: set[str] = set()
    for key, value in table.items():
        name = prefix + key
        if isinstance(value, dict) and name not in known:
            out |= dotted_keys(value, known, name + ".")
        else:
            out.add(name)
    return out


def test_the_sample_config_loads_as_shipped() -> None:
    cfg = config.load(SAMPLE, environ={})
    assert cfg.atomizer.root == "/srv/atomizer"


def test_every_key_the_sample_shows_is_a_real_key_with_a_valid_value(tmp_path: Path) -> None:
    text = uncommented_sample()
    (tmp_path / "all.toml").write_text(text)
    config.load(tmp_path / "all.toml", environ={})  # unknown keys and bad values raise
    known = {key for key, _ in config.iter_keys()}
    shown = dotted_keys(tomllib.loads(text), known)
    assert shown <= known
    assert len(shown) > 30  # the uncommenting did switch the keys on


def test_installer_dry_run_shows_the_plan_and_changes_nothing(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("XDG_")}
    env["HOME"] = str(tmp_path)
    done = subprocess.run(
        [str(INSTALL), "--user", "--dry-run", "--atomizer-root", "/srv/study-root"],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    venv = tmp_path / ".local" / "share" / "atomizerd" / "venv"
    assert f"ExecStart={venv}/bin/atomizerd --config" in done.stdout
    assert 'root = "/srv/study-root"' in done.stdout
    assert f"{tmp_path}/.config/systemd/user/atomizerd.service" in done.stdout
    assert list(tmp_path.iterdir()) == []  # a dry run writes nothing


def test_installer_requires_a_mode() -> None:
    done = subprocess.run([str(INSTALL)], capture_output=True, text=True, timeout=30)
    assert done.returncode == 2 and "--user or --system" in done.stderr
