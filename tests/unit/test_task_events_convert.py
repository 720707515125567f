"""Turn origins, steers and tasks on the wire: the daemon's domain values to atomizer.v1
(api/convert.py), and the client's typed events decoded from that (atomizer_client.events)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any, cast

import pytest
from atomizer.v1 import session_pb2 as pb
from atomizer_client import events as cev

from atomizerd.api import convert
from atomizerd.api.session import SessionServicer
from atomizerd.model import MessageRecord, SessionRecord
from atomizerd.sessions import events as ev
from atomizerd.sessions.registry import SessionView
from atomizerd.sessions.tasks import TaskInfo


def wrap(kind: ev.EventKind, seq: int = 7) -> ev.SessionEvent:
    return ev.SessionEvent(seq=seq, turn_id="t1", session_id="s1", time=1_700_000_000.5, kind=kind)


def roundtrip(kind: ev.EventKind) -> tuple[pb.SessionEvent, cev.Event]:
    """The event as the daemon sends it, and as the client reads the bytes it sent."""
    msg = convert.event_to_pb(wrap(kind))
    return msg, cev.from_proto(pb.SessionEvent.FromString(msg.SerializeToString()))


@pytest.mark.parametrize(
    ("origin", "wire", "word"),
    [
        (ev.TurnOrigin.CLIENT, pb.TURN_ORIGIN_CLIENT, "client"),
        (ev.TurnOrigin.TASK, pb.TURN_ORIGIN_TASK, "task"),
        (ev.TurnOrigin.SCHEDULED, pb.TURN_ORIGIN_SCHEDULED, "scheduled"),
        (ev.TurnOrigin.AGENT, pb.TURN_ORIGIN_AGENT, "agent"),
    ],
)
def test_a_turns_origin_reaches_the_client(origin: ev.TurnOrigin, wire: int, word: str) -> None:
    msg, got = roundtrip(ev.TurnStarted("the task ended", origin=origin))
    assert msg.WhichOneof("kind") == "turn_started"
    assert msg.turn_started.origin == wire
    assert isinstance(got, cev.TurnStarted)
    assert (got.origin, got.text, got.seq, got.turn_id) == (word, "the task ended", 7, "t1")
    assert got.by_agent == (origin is not ev.TurnOrigin.CLIENT)


def test_a_turn_started_by_an_older_daemon_is_neither_the_clients_nor_the_agents() -> None:
    got = cev.from_proto(pb.SessionEvent(seq=1, turn_started=pb.TurnStarted(text="hi")))
    assert isinstance(got, cev.TurnStarted)
    assert got.origin == "unspecified"
    assert not got.by_agent


def test_a_steer_is_a_user_message() -> None:
    msg, got = roundtrip(ev.UserMessage("also check the mesh", request_id="r9"))
    assert msg.WhichOneof("kind") == "user_message"
    assert got == cev.UserMessage(
        seq=7,
        turn_id="t1",
        session_id="s1",
        time=got.time,
        text="also check the mesh",
        request_id="r9",
    )
    assert got.to_dict()["type"] == "user_message"


def test_a_subagents_tool_calls_carry_the_task_tool_use_that_runs_it() -> None:
    msg, use = roundtrip(ev.ToolUse("tu2", "Read", '{"path": "a"}', parent_tool_use_id="tu1"))
    assert msg.tool_use.parent_tool_use_id == "tu1"
    assert isinstance(use, cev.ToolUse)
    assert (use.id, use.name, use.parent_tool_use_id) == ("tu2", "Read", "tu1")
    msg, result = roundtrip(ev.ToolResult("tu2", "ok", False, parent_tool_use_id="tu1"))
    assert msg.tool_result.parent_tool_use_id == "tu1"
    assert isinstance(result, cev.ToolResult)
    assert (result.tool_use_id, result.content, result.parent_tool_use_id) == ("tu2", "ok", "tu1")


def test_the_main_agents_tool_calls_have_no_parent() -> None:
    _, use = roundtrip(ev.ToolUse("tu1", "Bash", "{}"))
    assert isinstance(use, cev.ToolUse)
    assert use.parent_tool_use_id == ""


@pytest.mark.parametrize(
    ("kind", "wire", "word"),
    [
        (ev.TaskKind.BASH, pb.TASK_KIND_BASH, "bash"),
        (ev.TaskKind.SUBAGENT, pb.TASK_KIND_SUBAGENT, "subagent"),
        (ev.TaskKind.OTHER, pb.TASK_KIND_OTHER, "other"),
    ],
)
def test_task_started(kind: ev.TaskKind, wire: int, word: str) -> None:
    msg, got = roundtrip(ev.TaskStarted("b1", "tu1", kind, "run the solver", True))
    assert msg.WhichOneof("kind") == "task_started"
    assert msg.task_started.kind == wire
    assert isinstance(got, cev.TaskStarted)
    assert (got.task_id, got.tool_use_id, got.kind, got.description, got.background) == (
        "b1",
        "tu1",
        word,
        "run the solver",
        True,
    )


def test_task_output() -> None:
    msg, got = roundtrip(ev.TaskOutput("b1", "step 1\nstep 2\n"))
    assert msg.WhichOneof("kind") == "task_output"
    assert isinstance(got, cev.TaskOutput)
    assert (got.task_id, got.text) == ("b1", "step 1\nstep 2\n")


@pytest.mark.parametrize(
    ("status", "wire", "word"),
    [
        (ev.TaskStatus.COMPLETED, pb.TASK_STATUS_COMPLETED, "completed"),
        (ev.TaskStatus.FAILED, pb.TASK_STATUS_FAILED, "failed"),
        (ev.TaskStatus.STOPPED, pb.TASK_STATUS_STOPPED, "stopped"),
        (ev.TaskStatus.KILLED, pb.TASK_STATUS_KILLED, "killed"),
    ],
)
def test_task_ended(status: ev.TaskStatus, wire: int, word: str) -> None:
    msg, got = roundtrip(ev.TaskEnded("b1", status, "exit 0"))
    assert msg.WhichOneof("kind") == "task_ended"
    assert msg.task_ended.status == wire
    assert isinstance(got, cev.TaskEnded)
    assert (got.task_id, got.status, got.summary) == ("b1", word, "exit 0")
    assert got.to_dict() | {"time": None} == {
        "type": "task_ended",
        "seq": 7,
        "turn_id": "t1",
        "session_id": "s1",
        "time": None,
        "task_id": "b1",
        "status": word,
        "summary": "exit 0",
    }


def test_every_domain_event_kind_has_its_own_oneof_member() -> None:
    # A kind event_to_pb does not know would reach clients as an empty SessionEvent.
    samples: list[ev.EventKind] = [
        ev.UserMessage("x"),
        ev.TaskStarted("b1", "tu1", ev.TaskKind.BASH, "d", False),
        ev.TaskOutput("b1", "x"),
        ev.TaskEnded("b1", ev.TaskStatus.COMPLETED, ""),
    ]
    names = [convert.event_to_pb(wrap(k)).WhichOneof("kind") for k in samples]
    assert names == ["user_message", "task_started", "task_output", "task_ended"]


def test_a_kind_from_a_newer_daemon_is_kept_as_its_number() -> None:
    got = cev.from_proto(
        pb.SessionEvent(task_ended=pb.TaskEnded(task_id="b1", status=99))  # type: ignore[arg-type]
    )
    assert isinstance(got, cev.TaskEnded)
    assert got.status == "99"


def session_record() -> SessionRecord:
    return SessionRecord(
        session_id="s1",
        mode="user",
        study_id=None,
        agent_session_id="a1",
        agent_started=True,
        closed=False,
        created_at=1.0,
        last_active_at=2.0,
        message_count=0,
        total_cost_usd=0.0,
        agent_cost_usd=0.0,
        seq_reserved=0,
    )


def test_a_session_lists_its_running_tasks() -> None:
    tasks = [
        TaskInfo("b1", "tu1", ev.TaskKind.BASH, "solver", True, 1_700_000_000.0, "/x", 120),
        TaskInfo("a1", "tu2", ev.TaskKind.SUBAGENT, "review", False, 1_700_000_001.0),
    ]
    s = convert.session_to_pb(SessionView(session_record(), "ready", 3, tasks=tasks))
    assert [(t.task_id, t.tool_use_id, t.kind, t.background, t.output_bytes) for t in s.tasks] == [
        ("b1", "tu1", pb.TASK_KIND_BASH, True, 120),
        ("a1", "tu2", pb.TASK_KIND_SUBAGENT, False, 0),
    ]
    assert s.tasks[0].description == "solver"
    assert s.tasks[0].started_at.seconds == 1_700_000_000


def test_a_session_without_tasks_lists_none() -> None:
    assert list(convert.session_to_pb(SessionView(session_record(), "idle", 0)).tasks) == []


@pytest.mark.parametrize(
    ("stored", "wire"),
    [
        ("client", pb.TURN_ORIGIN_CLIENT),
        ("task", pb.TURN_ORIGIN_TASK),
        ("scheduled", pb.TURN_ORIGIN_SCHEDULED),
        ("agent", pb.TURN_ORIGIN_AGENT),
        ("something newer", pb.TURN_ORIGIN_UNSPECIFIED),
    ],
)
def test_a_stored_messages_origin(stored: str, wire: int) -> None:
    m = MessageRecord(
        message_id=1,
        session_id="s1",
        turn_id="t1",
        role="user",
        content="a task ended",
        status="complete",
        request_id=None,
        tool_calls=[],
        cost_usd=0.0,
        usage={},
        detail="",
        created_at=1.0,
    )
    m.origin = stored
    assert convert.message_to_pb(m).origin == wire


# --- the servicer passes the new calls through ---------------------------------------------


@dataclass
class Page:
    data: bytes
    next_offset: int
    size: int
    running: bool


class FakeRegistry:
    def __init__(self) -> None:
        self.calls: list[tuple[Any, ...]] = []
        self.schemas: list[str] = []

    async def stop_task(self, session_id: str, task_id: str) -> None:
        self.calls.append(("stop_task", session_id, task_id))

    def task_output(self, session_id: str, task_id: str, offset: int, limit: int) -> Page:
        self.calls.append(("task_output", session_id, task_id, offset, limit))
        return Page(b"abc", offset + 3, 40, True)

    async def send_message(
        self,
        session_id: str,
        text: str,
        request_id: str,
        files: Any,
        *,
        steer: bool = False,
        output_schema: str = "",
    ) -> AsyncIterator[ev.SessionEvent]:
        self.calls.append(("send_message", session_id, text, request_id, steer))
        self.schemas.append(output_schema)
        yield wrap(ev.UserMessage(text, request_id))


def servicer() -> tuple[SessionServicer, FakeRegistry]:
    registry = FakeRegistry()
    return SessionServicer(cast(Any, registry)), registry


def test_stop_task_is_passed_to_the_registry() -> None:
    service, registry = servicer()
    req = pb.StopTaskRequest(session_id="s1", task_id="b1")
    assert asyncio.run(service.StopTask(req, cast(Any, None))) == pb.StopTaskResponse()
    assert registry.calls == [("stop_task", "s1", "b1")]


def test_get_task_output_returns_the_registrys_page() -> None:
    service, registry = servicer()
    req = pb.GetTaskOutputRequest(session_id="s1", task_id="b1", offset=10, limit=3)
    resp: pb.GetTaskOutputResponse = asyncio.run(service.GetTaskOutput(req, cast(Any, None)))
    assert resp == pb.GetTaskOutputResponse(data=b"abc", next_offset=13, size=40, running=True)
    assert registry.calls == [("task_output", "s1", "b1", 10, 3)]


@pytest.mark.parametrize("steer", [False, True])
def test_send_message_passes_steer(steer: bool) -> None:
    service, registry = servicer()
    req = pb.SendMessageRequest(session_id="s1", text="also", request_id="r1", steer=steer)

    async def collect() -> list[pb.SendMessageResponse]:
        return [r async for r in service.SendMessage(req, cast(Any, None))]

    (resp,) = asyncio.run(collect())
    assert resp.event.user_message.text == "also"
    assert registry.calls == [("send_message", "s1", "also", "r1", steer)]
    assert registry.schemas == [""]


def test_send_message_passes_the_output_schema() -> None:
    service, registry = servicer()
    req = pb.SendMessageRequest(session_id="s1", text="x", output_schema='{"type": "object"}')

    async def collect() -> list[pb.SendMessageResponse]:
        return [r async for r in service.SendMessage(req, cast(Any, None))]

    asyncio.run(collect())
    assert registry.schemas == ['{"type": "object"}']
