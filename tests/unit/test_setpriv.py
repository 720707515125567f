"""The start-up check for `setpriv --pdeathsig`, which every agent spawn goes through."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from atomizerd.agents import procgroup
from atomizerd.daemon.main import EXIT_STARTUP, main

PACKAGE = Path(__file__).resolve().parents[2] / "atomizerd"


@pytest.fixture
def no_setpriv(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    """Nothing at the fixed paths, PATH is only `tmp_path`, nothing remembered."""
    monkeypatch.setattr(procgroup, "SETPRIV_CANDIDATES", (str(tmp_path / "none" / "setpriv"),))
    monkeypatch.setattr(procgroup, "_setpriv", None)
    monkeypatch.setenv("PATH", str(tmp_path))
    return tmp_path


def test_setpriv_is_found_and_sets_a_parent_death_signal(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(procgroup, "_setpriv", None)
    path = procgroup.check_setpriv()
    assert Path(path).name == "setpriv"
    assert procgroup.pdeathsig_argv() == [path, "--pdeathsig", "KILL", "--"]


def test_check_config_fails_clearly_without_setpriv(
    no_setpriv: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["--check-config"]) == EXIT_STARTUP
    captured = capsys.readouterr()
    assert "cannot start agents: setpriv not found" in captured.err
    assert "util-linux" in captured.err
    assert captured.out == ""  # no effective configuration printed as if all were well


def test_a_setpriv_without_pdeathsig_is_refused(no_setpriv: Path) -> None:
    old = no_setpriv / "setpriv"
    old.write_text("#!/bin/sh\necho \"setpriv: unrecognized option '--pdeathsig'\" >&2\nexit 1\n")
    old.chmod(0o755)
    with pytest.raises(procgroup.SetprivMissing, match="unrecognized option"):
        procgroup.check_setpriv()


def test_no_python_runs_between_fork_and_exec() -> None:
    """No `preexec_fn` anywhere in the daemon: in a process full of gRPC threads, Python in
    the forked child crashed it (the parent-death signal is set by setpriv instead)."""
    offenders = [
        f"{path.relative_to(PACKAGE.parent)}:{node.lineno}"
        for path in sorted(PACKAGE.rglob("*.py"))
        for node in ast.walk(ast.parse(path.read_text(), str(path)))
        if isinstance(node, ast.keyword) and node.arg == "preexec_fn"
    ]
    assert offenders == []
