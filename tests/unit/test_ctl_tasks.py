"""atomizerctl's task commands and how it shows origins, steers and task events (no daemon:
the commands get a stand-in client, the renderer an Output on in-memory streams)."""

from __future__ import annotations

import io
import json
from dataclasses import dataclass, field
from typing import Any

import pytest
from atomizer.v1 import session_pb2 as pb
from atomizer_client import ctl, ctl_output, ctl_render, ctl_tasks
from atomizer_client.client import _send_request, _task_output_request
from atomizer_client.events import (
    Event,
    TaskEnded,
    TaskOutput,
    TaskStarted,
    ToolUse,
    TurnStarted,
    UserMessage,
)

BASE: dict[str, Any] = {"seq": 1, "turn_id": "t1", "session_id": "s1", "time": None}


def parse(*argv: str) -> Any:
    return ctl._parse(list(argv))


def output(as_json: bool = False) -> tuple[ctl_output.Output, io.StringIO, io.StringIO]:
    out, err = io.StringIO(), io.StringIO()
    return ctl_output.Output(as_json, out=out, err=err), out, err


# --- parsing -------------------------------------------------------------------------------


def test_tasks_takes_a_session() -> None:
    args = parse("tasks", "s1")
    assert (args.func, args.id) == (ctl_tasks.cmd_tasks, "s1")


def test_stop_task_takes_a_session_and_a_task() -> None:
    args = parse("stop-task", "s1", "b1", "--json")
    assert (args.func, args.id, args.task_id, args.json) == (
        ctl_tasks.cmd_stop_task,
        "s1",
        "b1",
        True,
    )


def test_task_output_reads_everything_from_the_start_by_default() -> None:
    args = parse("task-output", "s1", "b1")
    assert (args.func, args.id, args.task_id, args.offset, args.limit) == (
        ctl_tasks.cmd_task_output,
        "s1",
        "b1",
        0,
        0,
    )


def test_task_output_takes_an_offset_and_a_limit() -> None:
    args = parse("task-output", "s1", "b1", "--offset", "100", "--limit", "10")
    assert (args.offset, args.limit) == (100, 10)


@pytest.mark.parametrize("bad", [["--offset", "-1"], ["--limit", "x"], []])
def test_task_output_refuses_bad_arguments(bad: list[str]) -> None:
    argv = ["task-output", "s1", *bad] if bad else ["task-output", "s1"]  # [] lacks TASK_ID
    if bad:
        argv.insert(2, "b1")
    with pytest.raises(SystemExit) as exit:
        parse(*argv)
    assert exit.value.code == ctl_output.EXIT_USAGE


@pytest.mark.parametrize(("flag", "steer"), [([], False), (["--steer"], True)])
def test_send_steers_only_when_asked(flag: list[str], steer: bool) -> None:
    args = parse("send", "s1", "also this", *flag)
    assert args.steer is steer


# --- the commands --------------------------------------------------------------------------


@dataclass
class FakeClient:
    """Answers as the daemon would; notes what was asked."""

    session: pb.Session = field(default_factory=lambda: pb.Session(session_id="s1"))
    output: bytes = b""
    running: bool = False
    calls: list[tuple[Any, ...]] = field(default_factory=list)

    def get_session(self, session_id: str) -> pb.Session:
        return self.session

    def stop_task(self, session_id: str, task_id: str) -> None:
        self.calls.append(("stop_task", session_id, task_id))

    def get_task_output(
        self, session_id: str, task_id: str, *, offset: int = 0, limit: int = 0
    ) -> pb.GetTaskOutputResponse:
        self.calls.append(("get_task_output", offset, limit))
        data = self.output[offset : offset + limit]
        return pb.GetTaskOutputResponse(
            data=data, next_offset=offset + len(data), size=len(self.output), running=self.running
        )


def run(client: FakeClient, *argv: str, as_json: bool = False) -> tuple[int, str, str]:
    args = parse(*argv)
    out, stdout, stderr = output(as_json)
    code = args.func(client, args, out)
    return code, stdout.getvalue(), stderr.getvalue()


def test_tasks_shows_the_running_tasks() -> None:
    client = FakeClient()
    client.session.tasks.add(
        task_id="b1",
        tool_use_id="tu1",
        kind=pb.TASK_KIND_BASH,
        description="run the solver",
        background=True,
        output_bytes=2048,
    )
    code, stdout, _ = run(client, "tasks", "s1")
    assert code == ctl_output.EXIT_OK
    header, row = stdout.splitlines()
    assert header.split() == ["TASK", "KIND", "BACKGROUND", "STARTED", "OUTPUT", "DESCRIPTION"]
    assert row.split() == ["b1", "bash", "yes", "-", "2,048", "run", "the", "solver"]


def test_tasks_as_json_is_one_record_per_task() -> None:
    client = FakeClient()
    client.session.tasks.add(task_id="b1", kind=pb.TASK_KIND_SUBAGENT)
    _, stdout, _ = run(client, "tasks", "s1", as_json=True)
    record = json.loads(stdout)
    assert (record["task_id"], record["kind"]) == ("b1", "TASK_KIND_SUBAGENT")


def test_tasks_says_when_none_runs() -> None:
    code, stdout, stderr = run(FakeClient(), "tasks", "s1")
    assert (code, stdout) == (ctl_output.EXIT_OK, "")
    assert "no running tasks" in stderr


def test_stop_task_stops_it() -> None:
    client = FakeClient()
    code, stdout, _ = run(client, "stop-task", "s1", "b1")
    assert (code, stdout, client.calls) == (
        ctl_output.EXIT_OK,
        "stopped b1\n",
        [("stop_task", "s1", "b1")],
    )


def test_task_output_prints_every_page_and_a_split_character_whole(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(ctl_tasks, "PAGE_BYTES", 3)
    client = FakeClient(output="añb\nc\n".encode())  # "ñ" is two bytes: page 1 ends inside it
    code, stdout, stderr = run(client, "task-output", "s1", "b1")
    assert (code, stdout, stderr) == (ctl_output.EXIT_OK, "añb\nc\n", "")
    assert [c[1] for c in client.calls] == [0, 3, 6]


def test_task_output_with_a_limit_prints_one_page_and_where_to_go_on() -> None:
    client = FakeClient(output=b"0123456789", running=True)
    code, stdout, stderr = run(client, "task-output", "s1", "b1", "--offset", "2", "--limit", "3")
    assert (code, stdout) == (ctl_output.EXIT_OK, "234\n")
    assert client.calls == [("get_task_output", 2, 3)]
    assert "still runs: 10 bytes so far; read on with --offset 5" in stderr


def test_task_output_as_json() -> None:
    client = FakeClient(output=b"done\n")
    _, stdout, _ = run(client, "task-output", "s1", "b1", as_json=True)
    record = json.loads(stdout)
    assert record == {
        "task_id": "b1",
        "offset": 0,
        "next_offset": 5,
        "size": 5,
        "running": False,
        "text": "done\n",
    }


# --- watching ------------------------------------------------------------------------------


def shown(*events: Event, show_prompt: bool = True) -> tuple[str, str]:
    out, stdout, stderr = output()
    renderer = ctl_render.TurnRenderer(out, show_prompt=show_prompt)
    for ev in events:
        renderer.show(ev)
    return stdout.getvalue(), stderr.getvalue()


def test_a_turn_the_agent_started_says_so_and_why() -> None:
    stdout, stderr = shown(TurnStarted(**BASE, text="<task-notification>", origin="task"))
    assert stdout == ""
    assert stderr.splitlines() == ["[turn started by the agent: task]", "  <task-notification>"]


def test_a_clients_turn_shows_its_prompt_as_before() -> None:
    stdout, stderr = shown(TurnStarted(**BASE, text="hello", origin="client"))
    assert (stdout, stderr) == ("> hello\n", "")


def test_a_steer_shows_the_text_taken_into_the_turn() -> None:
    stdout, _ = shown(UserMessage(**BASE, text="also this"))
    assert stdout == ">> also this\n"


def test_task_events_are_activity_lines() -> None:
    _, stderr = shown(
        TaskStarted(**BASE, task_id="b1", kind="bash", description="solve", background=True),
        TaskOutput(**BASE, task_id="b1", text="step 1\nstep 2\n"),
        TaskEnded(**BASE, task_id="b1", status="completed", summary="exit 0"),
    )
    assert stderr.splitlines() == [
        "⧗ background bash task b1 started: solve",
        "  [b1] step 1",
        "  [b1] step 2",
        "✓ task b1 completed: exit 0",
    ]


def test_a_subagents_tool_call_is_marked() -> None:
    _, stderr = shown(
        ToolUse(**BASE, id="tu2", name="Read", input_json="{}", parent_tool_use_id="tu1")
    )
    assert stderr == "  ⏺ [subagent] Read {}\n"


def test_with_json_every_new_event_is_a_record() -> None:
    out, stdout, _ = output(as_json=True)
    renderer = ctl_render.TurnRenderer(out, show_prompt=True)
    renderer.show(TurnStarted(**BASE, text="x", origin="scheduled"))
    renderer.show(TaskEnded(**BASE, task_id="b1", status="killed"))
    records = [json.loads(line) for line in stdout.getvalue().splitlines()]
    assert [(r["type"], r.get("origin"), r.get("status")) for r in records] == [
        ("turn_started", "scheduled", None),
        ("task_ended", None, "killed"),
    ]


# --- the requests --------------------------------------------------------------------------


@pytest.mark.parametrize("steer", [False, True])
def test_send_message_asks_for_a_steer_only_when_told(steer: bool) -> None:
    assert _send_request("s1", "also", "r1", (), steer).steer is steer


def test_task_output_refuses_a_negative_offset_before_asking() -> None:
    assert _task_output_request("s1", "b1", 5, 0).offset == 5
    with pytest.raises(ValueError, match="negative"):
        _task_output_request("s1", "b1", -1, 0)
