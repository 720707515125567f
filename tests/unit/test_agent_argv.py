"""The agent's command line and environment."""

from __future__ import annotations

import pytest

from atomizerd.agents.argv import STREAM_JSON_FLAGS, AgentSpec, ArgvError, build_argv, build_env

CID = "3f2b8c1e-6a4d-4e0b-9f51-2c7d8e9a0b1c"


def spec(**kw: object) -> AgentSpec:
    kw.setdefault("command", ("claude",))
    kw.setdefault("conversation_id", CID)
    return AgentSpec(**kw)  # type: ignore[arg-type]


def test_first_spawn_then_resume() -> None:
    assert build_argv(spec()) == ["claude", *STREAM_JSON_FLAGS, f"--session-id={CID}"]
    assert build_argv(spec(resume=True)) == ["claude", *STREAM_JSON_FLAGS, f"--resume={CID}"]


def test_fixed_flags() -> None:
    assert STREAM_JSON_FLAGS == (
        "-p",
        "--input-format=stream-json",
        "--output-format=stream-json",
        "--verbose",
        "--include-partial-messages",
        "--replay-user-messages",
    )


def test_command_prefix_is_kept() -> None:
    argv = build_argv(spec(command=["python3", "/x/fake_agent.py"]))
    assert argv[:3] == ["python3", "/x/fake_agent.py", "-p"]


@pytest.mark.parametrize(
    "bad", ["", "not-a-uuid", "--resume", "3f2b8c1e6a4d4e0b9f512c7d8e9a0b1c", f"{CID}\n", "../x"]
)
def test_conversation_id_must_be_a_canonical_uuid(bad: str) -> None:
    with pytest.raises(ArgvError):
        build_argv(spec(conversation_id=bad))


def test_every_value_is_one_token_even_when_it_looks_like_a_flag() -> None:
    argv = build_argv(
        spec(
            model="-weird-model",
            add_dirs=("/tmp/-a", "/srv/studies/beam 1"),
            mcp_config="/run/atomizerd/-mcp.json",
            append_system_prompt="--dangerously-skip-permissions\nsecond line",
            permission_mode="acceptEdits",
            permission_prompt_tool="stdio",
            max_budget_usd=0.5,
        )
    )
    assert argv[len(STREAM_JSON_FLAGS) + 2 :] == [
        "--permission-mode=acceptEdits",
        "--permission-prompt-tool=stdio",
        "--mcp-config=/run/atomizerd/-mcp.json",
        "--strict-mcp-config",
        "--append-system-prompt=--dangerously-skip-permissions\nsecond line",
        "--add-dir=/tmp/-a",
        "--add-dir=/srv/studies/beam 1",
        "--model=-weird-model",
        "--max-budget-usd=0.5",
    ]
    assert "--dangerously-skip-permissions" not in argv


def test_allowed_tools_are_one_comma_joined_token() -> None:
    argv = build_argv(
        spec(
            allowed_tools=["Read", "Write(**/STUDY_REPORT.md)", "Bash(git commit -m *)"],
            disallowed_tools=["WebSearch"],
        )
    )
    assert "--allowedTools=Read,Write(**/STUDY_REPORT.md),Bash(git commit -m *)" in argv
    assert "--disallowedTools=WebSearch" in argv


@pytest.mark.parametrize("rule", ["", "Read Write", "Read,Write", "Bash(git", "Bash)x(", " Read"])
def test_tool_rules_that_would_split_are_refused(rule: str) -> None:
    with pytest.raises(ArgvError):
        build_argv(spec(allowed_tools=[rule]))


def test_skip_permissions_and_non_strict_mcp() -> None:
    argv = build_argv(spec(skip_permissions=True, mcp_config="/m.json", strict_mcp_config=False))
    assert "--dangerously-skip-permissions" in argv
    assert "--mcp-config=/m.json" in argv
    assert "--strict-mcp-config" not in argv


def test_append_system_prompt_file() -> None:
    argv = build_argv(spec(append_system_prompt_file="/run/atomizerd/p.md"))
    assert argv[-1] == "--append-system-prompt-file=/run/atomizerd/p.md"


def test_extra_args_come_last() -> None:
    argv = build_argv(spec(model="m", extra_args=["--betas", "x", "--debug"]))
    assert argv[-4:] == ["--model=m", "--betas", "x", "--debug"]


@pytest.mark.parametrize("budget", [0.0, -1.0, float("nan"), float("inf")])
def test_budget_must_be_positive(budget: float) -> None:
    with pytest.raises(ArgvError):
        build_argv(spec(max_budget_usd=budget))


def test_unsafe_arguments_are_refused() -> None:
    with pytest.raises(ArgvError):
        build_argv(spec(model="a\x00b"))
    with pytest.raises(ArgvError):
        build_argv(spec(append_system_prompt="x" * 200_000))
    with pytest.raises(ArgvError):
        build_argv(spec(command=()))
    with pytest.raises(ArgvError):
        build_argv(spec(add_dirs=("",)))


def test_spec_is_immutable_and_hashable() -> None:
    s = spec(command=["claude"], add_dirs=["/a"])
    assert s.command == ("claude",) and s.add_dirs == ("/a",)
    assert hash(s) == hash(spec(command=("claude",), add_dirs=("/a",)))


def test_build_env_is_an_allowlist() -> None:
    base = {
        "PATH": "/usr/bin",
        "HOME": "/home/u",
        "LANG": "C.UTF-8",
        "LC_ALL": "C.UTF-8",
        "TERM": "xterm",
        "TMPDIR": "/tmp",
        "USER": "u",
        "XDG_RUNTIME_DIR": "/run/user/1000",
        "ANTHROPIC_BASE_URL": "http://127.0.0.1:1",
        "CLAUDE_CODE_MAX_RETRIES": "1",
        "CLAUDECODE": "1",
        "AWS_SECRET_ACCESS_KEY": "s3cr3t",
        "PYTHONPATH": "/x",
        "ATOMIZERD_STATE_DIR": "/var/lib/atomizerd",
    }
    env = build_env(base, {"IS_SANDBOX": "1", "ANTHROPIC_API_KEY": "k", "HOME": "/other"})
    assert env == {
        "PATH": "/usr/bin",
        "HOME": "/other",
        "LANG": "C.UTF-8",
        "LC_ALL": "C.UTF-8",
        "TERM": "xterm",
        "TMPDIR": "/tmp",
        "USER": "u",
        "ANTHROPIC_BASE_URL": "http://127.0.0.1:1",
        "CLAUDE_CODE_MAX_RETRIES": "1",
        "IS_SANDBOX": "1",
        "ANTHROPIC_API_KEY": "k",
    }


def test_claudecode_is_removed_even_from_extra() -> None:
    assert "CLAUDECODE" not in build_env({"CLAUDECODE": "1"}, {"CLAUDECODE": "1"})


@pytest.mark.parametrize("name", ["", "A=B", "1X", "A B"])
def test_build_env_refuses_bad_names(name: str) -> None:
    with pytest.raises(ArgvError):
        build_env({}, {name: "v"})


def test_build_env_refuses_nul_values() -> None:
    with pytest.raises(ArgvError):
        build_env({}, {"X": "a\x00b"})


def test_settings_are_one_token_after_the_mcp_flags() -> None:
    argv = build_argv(spec(mcp_config="/run/m.json", settings="/run/atomizerd/s1.settings.json"))
    assert argv[-3:] == [
        "--mcp-config=/run/m.json",
        "--strict-mcp-config",
        "--settings=/run/atomizerd/s1.settings.json",
    ]
