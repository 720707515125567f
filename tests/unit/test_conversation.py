"""Which turn each message of the agent belongs to (sessions/conversation.py): the router is
pure, so every order the CLI can write things in is specified here, line by line."""

from __future__ import annotations

from atomizerd.agents import protocol as proto
from atomizerd.sessions.conversation import Causes, Open, Router, Step, UntakenLines
from atomizerd.sessions.events import TurnOrigin

OWN = "own-uuid"
INIT = proto.Init("c", "m", (), (), "default", {})
TEXT = proto.TextDelta("hi", None, "m1", 0)
SUB_TEXT = proto.TextDelta("sub", "toolu_task", "m2", 0)
RESULT = proto.Result("success", False, "", 0.0, {}, 1, 1, "c", None, ())


def replay(uuid: str) -> proto.UserReplay:
    return proto.UserReplay(uuid, "text")


def started(uuid: str, source: str = "") -> proto.CommandLifecycle:
    return proto.CommandLifecycle(uuid, "started", source)


def steps(router: Router, *items: object) -> list[Step]:
    out = []
    for item in items:
        out.append(router.step(item))  # type: ignore[arg-type]
        if isinstance(item, proto.Result):
            router.ended()
    return out


def client_job(untaken: UntakenLines | None = None) -> Router:
    return Router(OWN, untaken or UntakenLines())


def test_in_lockstep_the_replay_opens_the_turn_its_result_ends() -> None:
    router = client_job()
    assert steps(router, INIT, replay(OWN), TEXT, RESULT) == [
        Step.QUIET,
        Step.OWN_TAKEN,
        Step.RELAY,
        Step.RELAY,
    ]
    assert router.own_ended


def test_output_before_our_replay_is_a_turn_the_agent_started_and_its_result_ends_only_it() -> None:
    router = client_job()
    assert steps(router, INIT, TEXT, RESULT) == [Step.QUIET, Step.OPEN_AGENT, Step.RELAY]
    assert not router.own_ended, "that result was the agent's turn's, not the answer to us"
    assert steps(router, replay(OWN), TEXT) == [Step.OWN_TAKEN, Step.RELAY]


def test_our_line_taken_into_the_agents_turn_ends_that_turn_there() -> None:
    router = client_job()
    assert steps(router, TEXT) == [Step.OPEN_AGENT]
    opened = router.open
    assert steps(router, replay(OWN)) == [Step.OWN_TAKEN]
    assert (opened, router.open) == (Open.AGENT, Open.OWN)


def test_a_slash_commands_start_is_the_lifecycle_line_its_replay_comes_after_its_output() -> None:
    router = client_job()
    compacted = proto.CompactBoundary("manual", 100, 10)
    assert steps(router, started(OWN), compacted, replay(OWN), RESULT) == [
        Step.OWN_TAKEN,
        Step.RELAY,
        Step.QUIET,
        Step.RELAY,
    ]


def test_a_steer_is_taken_into_the_open_turn_or_after_it_as_a_turn_of_its_own() -> None:
    untaken = UntakenLines()
    untaken.add("steer-1", "also this", "")
    untaken.add("steer-2", "and this", "")
    router = client_job(untaken)
    assert steps(router, replay(OWN), replay("steer-1"), RESULT) == [
        Step.OWN_TAKEN,
        Step.LINE_TAKEN,
        Step.RELAY,
    ]
    assert steps(router, replay("steer-2")) == [Step.LATE_LINE]


def test_task_lines_and_a_subagents_messages_never_open_a_turn() -> None:
    router = client_job()
    task = proto.TaskStarted("b1", "tu1", "local_bash", "bg", True)
    ended = proto.TaskNotification("b1", "tu1", "completed", "done", "")
    assert steps(router, task, SUB_TEXT, ended, started("wake", "loop_wakeup")) == [
        Step.TASK,
        Step.SUBAGENT,
        Step.TASK,
        Step.TASK,
    ]
    assert router.open is Open.NONE


def test_the_causes_of_the_agents_turns_are_taken_in_order() -> None:
    causes = Causes()
    causes.scheduled("check the solver")
    causes.task_ended("Background command done")
    causes.woke()
    assert causes.next() == (TurnOrigin.TASK, "Background command done")
    assert causes.next() == (TurnOrigin.SCHEDULED, "check the solver")
    assert causes.next() == (TurnOrigin.AGENT, "")
