"""The daemon's own components: resolved once from the configuration, and refused when an
agent (or another user) could have put them there."""

from __future__ import annotations

from pathlib import Path

import pytest

from atomizerd.atomizer import components
from tests.unit.test_sandbox_policy import make_config


def test_without_a_server_at_start_up_there_is_none_and_its_path_is_still_protected(
    tmp_path: Path,
) -> None:
    cfg = make_config(tmp_path)
    found = components.resolve(cfg, create=True)
    assert found.atomizer_mcp == ()
    assert components.default_mcp_script(cfg) in found.paths
    plans = cfg.atomizer_root / ".atomizerd" / "plans"
    assert found.plans_root == plans and plans.is_dir()
    assert (plans.stat().st_mode & 0o777) == 0o700


def test_the_default_server_found_at_start_up_is_used(tmp_path: Path) -> None:
    cfg = make_config(tmp_path)
    script = components.default_mcp_script(cfg)
    script.parent.mkdir(parents=True)
    script.write_text("//\n")
    assert components.resolve(cfg, create=False).atomizer_mcp == ("node", str(script))


@pytest.mark.parametrize("what", ["group-writable file", "world-writable folder", "symlink"])
def test_an_unsafe_server_is_refused(tmp_path: Path, what: str) -> None:
    cfg = make_config(tmp_path)
    script = components.default_mcp_script(cfg)
    script.parent.mkdir(parents=True)
    if what == "symlink":
        (tmp_path / "elsewhere.js").write_text("//\n")
        script.symlink_to(tmp_path / "elsewhere.js")
    else:
        script.write_text("//\n")
        if what == "group-writable file":
            script.chmod(0o664)
        else:
            (cfg.atomizer_root / "mcp-server").chmod(0o777)
    with pytest.raises(components.ComponentError) as err:
        components.resolve(cfg, create=False)
    assert ("symbolic link" if what == "symlink" else "writable by group or others") in str(
        err.value
    )


def test_a_symlinked_plans_folder_is_refused(tmp_path: Path) -> None:
    cfg = make_config(tmp_path)
    (tmp_path / "study").mkdir()
    (cfg.atomizer_root / ".atomizerd").symlink_to(tmp_path / "study")
    with pytest.raises(components.ComponentError, match="symbolic link"):
        components.resolve(cfg, create=True)
    assert not (tmp_path / "study" / "plans").exists()  # nothing made through the link


def test_a_configured_server_file_is_checked_too(tmp_path: Path) -> None:
    server = tmp_path / "srv" / "server.js"
    server.parent.mkdir()
    server.write_text("//\n")
    server.chmod(0o666)
    cfg = make_config(tmp_path, **{"mcp.atomizer_command": f"node {server}"})
    with pytest.raises(components.ComponentError, match=r"mcp\.atomizer_command"):
        components.resolve(cfg, create=False)
