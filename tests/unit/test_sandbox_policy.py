"""The user-mode policy an agent is started with: sandbox settings, file-tool rules, the
launch spec (nothing secret in argv, a private TMPDIR, the umask), and failing closed."""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import pytest

import atomizerd.config as config_mod
from atomizerd.agents.argv import build_env
from atomizerd.atomizer import sandbox
from atomizerd.atomizer.launcher import Launcher, expand_rules
from atomizerd.atomizer.prompt import ContextBuilder
from atomizerd.atomizer.studies import Studies
from atomizerd.errors import FailedPrecondition
from atomizerd.model import SessionRecord

CID = "3f2b8c1e-6a4d-4e0b-9f51-2c7d8e9a0b1c"


def make_config(tmp_path: Path, **overrides: str) -> config_mod.Config:
    root = tmp_path / "atomizer"
    (root / "studies").mkdir(parents=True, exist_ok=True)
    keys = {
        "atomizer.root": str(root),
        "daemon.state_dir": str(tmp_path / "state"),
        "daemon.runtime_dir": str(tmp_path / "run"),
        "agent.env": json.dumps({"HOME": str(tmp_path / "home")}),
        **overrides,
    }
    return config_mod.load(None, environ={}, overrides=keys)


def make_study(cfg: config_mod.Config, name: str) -> Path:
    study = cfg.studies_root / name
    (study / "3_results").mkdir(parents=True)
    (study / "STUDY_REPORT.md").write_text(f"# {name}\n")
    return study.resolve()


def record(mode: str = "user", study_id: str | None = None) -> SessionRecord:
    return SessionRecord(
        session_id="s1",
        mode=mode,
        study_id=study_id,
        agent_session_id=CID,
        agent_started=False,
        closed=False,
        created_at=0.0,
        last_active_at=0.0,
        message_count=0,
        total_cost_usd=0.0,
        agent_cost_usd=0.0,
        seq_reserved=0,
    )


class FakeProbe(sandbox.SandboxProbe):
    def __init__(self, available: bool) -> None:
        super().__init__()
        self.available = available
        self.paths: list[str] = []

    def status(self, enabled: bool, path: str) -> sandbox.SandboxStatus:
        self.paths.append(path)
        if not enabled:
            return sandbox.SandboxStatus(False, False, "off")
        if self.available:
            return sandbox.SandboxStatus(True, True, "bwrap /x, socat /y")
        return sandbox.SandboxStatus(True, False, "bubblewrap (bwrap) not found")


def launcher(cfg: config_mod.Config, *, available: bool = True) -> Launcher:
    return Launcher(cfg, Studies(cfg), ContextBuilder(), probe=FakeProbe(available))


# --- writes ---------------------------------------------------------------------------------


def test_writes_are_denied_everywhere_in_the_root_but_on_the_way_to_the_study(
    tmp_path: Path,
) -> None:
    cfg = make_config(tmp_path)
    root = cfg.atomizer_root
    (root / "optimization_engine").mkdir()
    (root / "README.md").write_text("x")
    (root / ".claude").mkdir()
    beam, wing = make_study(cfg, "beam"), make_study(cfg, "wing")
    denied = sandbox.write_denials(root, [beam])
    loaded = ("AGENTS.md", "CLAUDE.md", "CLAUDE.local.md", ".claude", ".mcp.json")
    assert sorted(p.relative_to(root) for p in denied) == sorted(
        Path(p)
        for p in (
            *loaded,
            ".git",  # the CLI runs git in its working dir
            "README.md",
            "optimization_engine",
            *(f"studies/{name}" for name in loaded),
            "studies/wing",
            # Inside the study too: what the CLI loads from a folder it adds or reads in.
            *(f"studies/beam/{name}" for name in loaded),
        )
    )
    assert beam not in denied and wing in denied


def test_without_a_study_in_the_root_the_whole_root_is_read_only(tmp_path: Path) -> None:
    cfg = make_config(tmp_path)
    assert sandbox.write_denials(cfg.atomizer_root, []) == [cfg.atomizer_root.resolve()]
    outside = tmp_path / "elsewhere" / "beam"
    outside.mkdir(parents=True)
    assert sandbox.write_denials(cfg.atomizer_root, [outside]) == [
        cfg.atomizer_root.resolve(),
        *(
            outside / name
            for name in ("CLAUDE.md", "CLAUDE.local.md", "AGENTS.md", ".claude", ".mcp.json")
        ),
    ]


def test_the_daemons_components_are_write_denied_even_before_they_exist(tmp_path: Path) -> None:
    cfg = make_config(tmp_path)
    root = cfg.atomizer_root.resolve()
    beam = make_study(cfg, "beam")
    script = root / "mcp-server" / "atomizer-tools" / "dist" / "index.js"
    denied = sandbox.write_denials(root, [beam], [script, root / ".atomizerd" / "plans"])
    assert root / "mcp-server" in denied and root / ".atomizerd" in denied


def test_a_link_in_the_root_to_the_study_is_not_denied(tmp_path: Path) -> None:
    # The CLI denies where a link points: that would make the study itself read-only.
    cfg = make_config(tmp_path)
    beam = make_study(cfg, "beam")
    (cfg.atomizer_root / "current").symlink_to(beam)
    (tmp_path / "data").mkdir()
    (cfg.atomizer_root / "data").symlink_to(tmp_path / "data")
    (cfg.atomizer_root / "up").symlink_to(tmp_path)  # holds the study
    denied = sandbox.write_denials(cfg.atomizer_root, [beam])
    root = cfg.atomizer_root.resolve()
    assert root / "current" not in denied and root / "up" not in denied
    assert root / "data" in denied


# --- the whole policy -----------------------------------------------------------------------


def test_the_policy_of_a_user_mode_agent(tmp_path: Path) -> None:
    cfg = make_config(tmp_path, **{"sandbox.allowed_domains": "pypi.org"})
    beam = make_study(cfg, "beam")
    tmp = Path(cfg.sandbox.tmp_dir) / "s1"
    env = {
        "HOME": str(tmp_path / "home"),
        "ANTHROPIC_API_KEY": "sk-secret",
        "ANTHROPIC_BASE_URL": "http://127.0.0.1:1",
        "SOME_TOKEN": "t",
        "PATH": "/usr/bin",
    }
    policy = sandbox.user_policy(cfg, env=env, study=beam, tmp=tmp)
    sb = policy.settings["sandbox"]
    assert sb["enabled"] and sb["failIfUnavailable"] and not sb["allowUnsandboxedCommands"]
    assert sb["autoAllowBashIfSandboxed"] is True
    assert sb["network"] == {"allowedDomains": ["pypi.org"], "strictAllowlist": True}
    fs = sb["filesystem"]
    assert fs["allowWrite"] == [str(beam), str(tmp)]
    state, run, home = cfg.state_dir, cfg.runtime_dir, tmp_path / "home"
    # HOME, the state dir (the database, the agents' temporary dirs), the runtime dir (the
    # socket); nested entries already covered are left out.
    # Run as root, the files only root may read are hidden too (the filesystem no longer is).
    root_only = [p for p in sandbox.ROOT_ONLY if os.path.lexists(p)] if os.geteuid() == 0 else []
    assert sorted(fs["denyRead"]) == sorted([str(state), str(run), str(home), *root_only])
    assert {str(cfg.atomizer_root), str(beam), str(tmp)} <= set(fs["allowRead"])
    assert sb["credentials"]["envVars"] == [
        {"name": "ANTHROPIC_API_KEY", "mode": "deny"},
        {"name": "SOME_TOKEN", "mode": "deny"},
    ]
    rules = policy.settings["permissions"]["deny"]
    assert rules == policy.deny_rules
    for folder in (state, run, home):
        assert f"Read(/{folder}/**)" in rules
    assert f"Edit(/{home}/.claude/**)" in rules  # the transcripts
    assert f"Edit(/{state}/atomizerd.db)" in rules
    assert not any(r.startswith("Edit") and r.endswith(f"{state})") for r in rules)
    # No Write or Edit creates a file the CLI would load, at any depth of the root or study.
    for folder in (cfg.atomizer_root, beam):
        for name in ("CLAUDE.md", "AGENTS.md", ".mcp.json"):
            assert f"Edit(/{folder}/**/{name})" in rules
        assert f"Edit(/{folder}/**/.claude/**)" in rules
    assert f"Edit(/{cfg.atomizer_root}/.git/**)" in rules  # git runs in the working dir


def test_bash_reads_only_its_own_plans_folder(tmp_path: Path) -> None:
    cfg = make_config(tmp_path)
    plans = cfg.atomizer_root / ".atomizerd" / "plans"
    daemon = sandbox.DaemonPaths(components=(plans,), plans_root=plans, own_plans=plans / "s1")
    policy = sandbox.user_policy(
        cfg, env={"HOME": str(tmp_path / "home")}, study=None, tmp=tmp_path / "t", daemon=daemon
    )
    fs = policy.settings["sandbox"]["filesystem"]
    assert str(plans) in fs["denyRead"] and str(plans / "s1") in fs["allowRead"]
    # No file-tool rule on it: that would close the plan-mode agent's own plan file to it.
    assert not any(str(plans) in r for r in policy.deny_rules)


def test_a_denied_folder_holding_the_root_is_left_to_the_allowlist_for_the_file_tools(
    tmp_path: Path,
) -> None:
    # Read rules: deny beats allow whatever the nesting; the sandbox: the most specific wins.
    home = tmp_path / "home"
    cfg = make_config(tmp_path, **{"atomizer.root": str(home / "atomizer")})
    (home / "atomizer" / "studies").mkdir(parents=True)
    policy = sandbox.user_policy(cfg, env={"HOME": str(home)}, study=None, tmp=tmp_path / "t")
    assert str(home) in policy.settings["sandbox"]["filesystem"]["denyRead"]
    assert str(home / "atomizer") in policy.settings["sandbox"]["filesystem"]["allowRead"]
    assert not any(
        r.startswith(f"Read(/{home})") or f"Read(/{home}/**)" == r for r in policy.deny_rules
    )
    # The rest of HOME is left to the allowlist and asking; the transcripts stay denied.
    assert f"Read(/{home}/.claude/**)" in policy.deny_rules
    assert f"Edit(/{home}/.claude/**)" in policy.deny_rules


def test_allowlist_placeholders_name_the_root_and_the_study(tmp_path: Path) -> None:
    root, study = tmp_path / "root", tmp_path / "root" / "studies" / "beam"
    study.mkdir(parents=True)
    rules = ["Read({root}/**)", "Edit({study}/STUDY_REPORT.md)", "Bash(python:*)"]
    assert expand_rules(rules, root, study) == [
        f"Read(/{root}/**)",
        f"Edit(/{study}/STUDY_REPORT.md)",
        "Bash(python:*)",
    ]
    assert expand_rules(rules, root, None) == [f"Read(/{root}/**)", "Bash(python:*)"]


def test_the_default_allowlist_writes_only_the_studys_report_and_results() -> None:
    rules = config_mod.Config().modes.user.allowed_tools
    assert [r for r in rules if r.startswith(("Edit", "Write"))] == [
        "Edit({study}/STUDY_REPORT.md)",
        "Edit({study}/3_results/*.md)",
    ]
    assert "Read" not in rules  # reads are scoped to the root and the study


# --- the launch spec ------------------------------------------------------------------------


def test_a_user_mode_spec_has_its_policy_in_a_private_file_and_its_prompt_off_argv(
    tmp_path: Path,
) -> None:
    cfg = make_config(tmp_path)
    make_study(cfg, "beam")
    spec = launcher(cfg).spec_for(record(study_id="beam"), resume=False, seed="MARK-SEED")
    assert not any("append-system-prompt" in a for a in spec.argv)
    assert not any("MARK-SEED" in a or "You are assisting" in a for a in spec.argv)
    prompt = spec.initialize["appendSystemPrompt"]
    assert "You are assisting" in prompt and "beam" in prompt and prompt.endswith("MARK-SEED")
    settings = [a.split("=", 1)[1] for a in spec.argv if a.startswith("--settings=")]
    assert len(settings) == 1
    path = Path(settings[0])
    assert (
        stat.S_IMODE(path.stat().st_mode) == 0o600 and path.parent == cfg.runtime_dir / "sessions"
    )
    assert json.loads(path.read_text())["sandbox"]["enabled"] is True
    tmp = Path(spec.env["TMPDIR"])
    assert tmp == Path(cfg.sandbox.tmp_dir) / "s1" and stat.S_IMODE(tmp.stat().st_mode) == 0o700
    assert spec.umask == 0o027
    assert spec.cwd == str(cfg.atomizer_root)  # unchanged: the CLI keys transcripts by it
    Studies(cfg).remove_session_files("s1")
    assert not path.exists() and not tmp.exists()


def test_power_mode_is_not_sandboxed(tmp_path: Path) -> None:
    cfg = make_config(tmp_path)
    probe = FakeProbe(available=False)
    spec = Launcher(cfg, Studies(cfg), ContextBuilder(), probe=probe).spec_for(
        record(mode="power"), resume=False
    )
    assert "--dangerously-skip-permissions" in spec.argv
    assert not any(a.startswith(("--settings", "--allowedTools")) for a in spec.argv)
    assert probe.paths == []  # not even asked
    assert "appendSystemPrompt" in spec.initialize


def test_without_a_sandbox_a_user_mode_agent_is_refused_and_nothing_is_written(
    tmp_path: Path,
) -> None:
    cfg = make_config(tmp_path)
    with pytest.raises(FailedPrecondition) as err:
        launcher(cfg, available=False).spec_for(record(), resume=False)
    message = str(err.value)
    assert "apt-get install bubblewrap socat" in message and "sandbox.enabled = false" in message
    assert not (cfg.runtime_dir / "sessions").exists()
    assert not (Path(cfg.sandbox.tmp_dir) / "s1").exists()


def test_sandbox_off_is_advisory_user_mode(tmp_path: Path) -> None:
    cfg = make_config(tmp_path, **{"sandbox.enabled": "false"})
    spec = launcher(cfg, available=False).spec_for(record(), resume=False)
    assert not any(a.startswith("--settings") for a in spec.argv)
    assert any(a.startswith("--allowedTools=") for a in spec.argv)


def test_the_agent_environment_does_not_lead_to_the_daemon_unless_configured() -> None:
    base = {"PATH": "/bin", "XDG_RUNTIME_DIR": "/run/user/1000", "XDG_CONFIG_HOME": "/c"}
    assert "XDG_RUNTIME_DIR" not in build_env(base)
    assert build_env(base)["XDG_CONFIG_HOME"] == "/c"
    assert build_env(base, {"XDG_RUNTIME_DIR": "/r"})["XDG_RUNTIME_DIR"] == "/r"


def test_a_tmp_parent_that_is_not_ours_alone_is_refused_or_closed(tmp_path: Path) -> None:
    cfg = make_config(tmp_path)
    studies = Studies(cfg)
    parent = Path(cfg.sandbox.tmp_dir)
    parent.mkdir(parents=True, mode=0o755)
    os.chmod(parent, 0o755)
    studies.session_tmp("s1")
    assert stat.S_IMODE(parent.stat().st_mode) == 0o700  # closed to others again
    studies.remove_session_files("s1")
    parent.rmdir()
    parent.symlink_to(tmp_path)
    with pytest.raises(FailedPrecondition, match=r"sandbox\.tmp_dir"):
        studies.session_tmp("s1")


# --- configuration and probing --------------------------------------------------------------


@pytest.mark.parametrize(
    ("key", "value", "words"),
    [
        ("agent.umask", "0999", "agent.umask: expected an octal mask"),
        ("agent.umask", "7777", "agent.umask: expected an octal mask"),
        ("sandbox.allow_write", "relative/path", "must be an absolute path"),
        ("sandbox.deny_read", "~user", "must be an absolute path"),
    ],
)
def test_bad_sandbox_configuration_is_refused(key: str, value: str, words: str) -> None:
    with pytest.raises(config_mod.ConfigError, match=words):
        config_mod.load(None, environ={}, overrides={key: value})


def test_the_probe_names_what_is_missing_on_the_agents_path(tmp_path: Path) -> None:
    status = sandbox.SandboxProbe().status(True, str(tmp_path))
    assert not status.available
    assert status.detail.startswith("bubblewrap (bwrap) and socat not found on the agent's PATH")
    assert "apt-get install bubblewrap socat" in status.refusal()
    assert sandbox.SandboxProbe().status(False, str(tmp_path)).summary().startswith("off")


def test_a_bubblewrap_that_cannot_sandbox_counts_as_unavailable(tmp_path: Path) -> None:
    for name, body in (
        ("bwrap", "echo 'bwrap: No permissions to create new namespace' >&2; exit 1"),
        ("socat", "exit 0"),
        ("true", "exit 0"),
    ):
        program = tmp_path / name
        program.write_text(f"#!/bin/sh\n{body}\n")
        program.chmod(0o755)
    status = sandbox.SandboxProbe().status(True, f"{tmp_path}:/bin:/usr/bin")
    assert not status.available
    assert "No permissions to create new namespace" in status.detail


@pytest.mark.parametrize(
    ("mode", "overrides", "sources", "scheduling"),
    [
        ("user", {}, None, False),
        ("plan", {}, None, False),
        ("plan", {"modes.power.enabled": "true"}, "user", False),  # may go on in power mode
        ("power", {"modes.power.enabled": "true"}, "user", True),
        (
            "power",
            {"modes.power.enabled": "true", "modes.power.study_instructions": "true"},
            None,
            True,
        ),
        ("user", {"modes.user.scheduled_prompts": "true"}, None, True),
    ],
)
def test_what_each_mode_loads_and_may_schedule(
    tmp_path: Path, mode: str, overrides: dict[str, str], sources: str | None, scheduling: bool
) -> None:
    cfg = make_config(tmp_path, **overrides)
    argv = launcher(cfg).spec_for(record(mode=mode), resume=False).argv
    given = [a.split("=", 1)[1] for a in argv if a.startswith("--setting-sources=")]
    assert given == ([sources] if sources else [])
    disallowed = ",".join(a for a in argv if a.startswith("--disallowedTools="))
    for tool in ("ScheduleWakeup", "CronCreate", "CronDelete", "CronList"):
        assert (tool not in disallowed) is scheduling, tool
