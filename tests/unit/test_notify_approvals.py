"""The no-client policy with webhooks: a permission request nobody is attached to, in a session
a webhook is told about, waits for its notification's delivery and then `approvals.timeout`
from then (virtual clock)."""

from __future__ import annotations

import asyncio
from typing import Any

from atomizerd.agents.messages import ControlRequest
from atomizerd.sessions import events as ev
from atomizerd.sessions.approvals import CLIENT, POLICY, TIMEOUT, Approvals, Decision
from atomizerd.sessions.questions import NoticeWait
from tests.support import virtual_time

TIMEOUT_S = 60.0
WAIT_S = 120.0


class StubStore:
    def __init__(self) -> None:
        self.audit: list[Any] = []

    def add_audit(self, rec: Any) -> None:
        self.audit.append(rec)

    def find_rule(self, *a: Any) -> None:
        return None


class Told:
    """The notifier's side: delivered after `after` seconds (None: never)."""

    def __init__(self, after: float | None) -> None:
        self.after = after
        self.asked: list[str] = []

    async def delivered(self, request_id: str, bound: float) -> bool:
        self.asked.append(request_id)
        if self.after is None or self.after > bound:
            await asyncio.sleep(bound)
            return False
        await asyncio.sleep(self.after)
        return True


def approvals(told: Told | None, events: list[ev.EventKind]) -> Approvals:
    def emit(kind: ev.EventKind) -> ev.SessionEvent:
        events.append(kind)
        return ev.SessionEvent(len(events), "s1", "t1", 0.0, kind)

    return Approvals(
        StubStore(),  # type: ignore[arg-type]
        "s1",
        "t1",
        TIMEOUT_S,
        emit,
        audience=lambda: 0,
        notice=NoticeWait(lambda: told is not None, told.delivered if told else None, WAIT_S),
        question_notice=NoticeWait(
            lambda: told is not None, told.delivered if told else None, WAIT_S
        ),
    )


def request() -> ControlRequest:
    return ControlRequest("r1", "can_use_tool", {"tool_name": "Bash", "input": {"command": "ls"}})


def test_without_a_webhook_nobody_attached_is_denied_at_once() -> None:
    events: list[ev.EventKind] = []

    async def test() -> tuple[Decision, float]:
        loop = asyncio.get_running_loop()
        d = await approvals(None, events).decide(request())
        return d, loop.time()

    d, took = virtual_time.run(test())
    assert (d.allow, d.decider, took) == (False, POLICY, 0.0)
    assert not any(isinstance(k, ev.PermissionRequest) for k in events)


def test_the_timeout_counts_from_the_delivery() -> None:
    events: list[ev.EventKind] = []
    told = Told(after=30.0)

    async def test() -> tuple[Decision, float]:
        loop = asyncio.get_running_loop()
        d = await approvals(told, events).decide(request())
        return d, loop.time()

    d, took = virtual_time.run(test())
    assert (d.allow, d.decider) == (False, TIMEOUT)
    assert took == 30.0 + TIMEOUT_S  # delivered at 30 s, then the whole approvals.timeout
    assert told.asked == ["r1"]
    assert isinstance(events[0], ev.PermissionRequest)


def test_a_person_told_can_allow_it() -> None:
    events: list[ev.EventKind] = []

    async def test() -> Decision:
        a = approvals(Told(after=5.0), events)
        pending = asyncio.ensure_future(a.decide(request()))
        await asyncio.sleep(5.0 + TIMEOUT_S - 1)  # just inside the window after delivery
        a.answer("r1", Decision(True, CLIENT))
        return await pending

    d = virtual_time.run(test())
    assert (d.allow, d.decider) == (True, CLIENT)


def test_an_undelivered_notification_is_denied_after_delivery_wait() -> None:
    events: list[ev.EventKind] = []

    async def test() -> tuple[Decision, float]:
        loop = asyncio.get_running_loop()
        d = await approvals(Told(after=None), events).decide(request())
        return d, loop.time()

    d, took = virtual_time.run(test())
    assert (d.allow, d.decider, took) == (False, POLICY, WAIT_S)
    assert "notify.delivery_wait" in d.message


def question() -> ControlRequest:
    ask = {"questions": [{"question": "Which mesh?", "options": [{"label": "fine"}]}]}
    return ControlRequest("q1", "can_use_tool", {"tool_name": "AskUserQuestion", "input": ask})


def test_a_question_told_by_webhook_waits_from_its_delivery_and_can_be_answered() -> None:
    events: list[ev.EventKind] = []

    async def test() -> tuple[Decision, float, Decision, float]:
        loop = asyncio.get_running_loop()
        a = approvals(Told(after=20.0), events)
        timed_out = await a.decide(question())
        took = loop.time()
        b = approvals(Told(after=20.0), events)
        pending = asyncio.ensure_future(b.decide(question()))
        await asyncio.sleep(20.0 + TIMEOUT_S - 1)
        b.questions.answer("q1", {"Which mesh?": "fine"})
        answered = await pending
        return timed_out, took, answered, loop.time() - took

    timed_out, took, answered, took2 = virtual_time.run(test())
    assert (timed_out.allow, timed_out.decider, took) == (False, TIMEOUT, 20.0 + TIMEOUT_S)
    assert (answered.allow, answered.decider) == (True, CLIENT)
    assert took2 == 20.0 + TIMEOUT_S - 1


def test_without_a_webhook_a_question_nobody_attached_to_ends_at_once() -> None:
    events: list[ev.EventKind] = []

    async def test() -> tuple[Decision, float]:
        d = await approvals(None, events).decide(question())
        return d, asyncio.get_running_loop().time()

    d, took = virtual_time.run(test())
    assert (d.allow, d.decider, took) == (False, POLICY, 0.0)
