"""Adopting an idle agent whose shim still holds the record of a turn that ended (the daemon
died before letting it go): the turn's messages are read past, what came after them is new
(the agent's own work while no daemon was there) and stays to be read."""

from __future__ import annotations

import asyncio
from collections import deque

from atomizerd.agents import protocol as proto
from atomizerd.agents.vocabulary import AgentItem
from atomizerd.daemon.adoption import _read_past
from tests.support.scripted_agent import _result


class Replayed:
    """The part of an adopted agent `_read_past` uses: replayed messages, counted as taken."""

    def __init__(self, items: list[AgentItem]) -> None:
        self.items = deque(items)
        self.received = 0

    async def receive(self) -> AgentItem:
        if not self.items:
            await asyncio.sleep(3600)  # nothing more was replayed
        self.received += 1
        return self.items.popleft()


ENDED_TURN: list[AgentItem] = [
    proto.UserReplay("u1", "hello"),
    proto.TextDelta("echo: hello", None, "m1", 0),
    _result(False),
]
AFTERWARDS: list[AgentItem] = [
    proto.TaskNotification("t1", "tu_t1", "completed", "t1 completed", ""),
    proto.TextDelta("the solver finished", None, "m2", 0),
    _result(False, "task-notification"),
]


def read_past(agent: Replayed, consumed: int) -> None:
    asyncio.run(asyncio.wait_for(_read_past(agent, consumed), 10))  # type: ignore[arg-type]


def test_a_record_that_reaches_the_turn_s_end_is_read_past_exactly() -> None:
    agent = Replayed(ENDED_TURN + AFTERWARDS)
    read_past(agent, consumed=len(ENDED_TURN))
    assert list(agent.items) == AFTERWARDS


def test_a_record_short_of_the_turn_s_end_is_read_past_through_that_end() -> None:
    agent = Replayed(ENDED_TURN + AFTERWARDS)
    read_past(agent, consumed=1)  # the last records never left the daemon
    assert list(agent.items) == AFTERWARDS


def test_less_replayed_than_the_record_accounted_for_is_no_wait_for_more() -> None:
    agent = Replayed(ENDED_TURN[:1])
    read_past(agent, consumed=5)
    assert not agent.items
