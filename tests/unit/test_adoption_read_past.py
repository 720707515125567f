"""Adopting an idle agent whose shim still holds the record of a turn that ended (the daemon
died before letting it go): the turn's messages are read past, what came after them is new
(the agent's own work while no daemon was there) and stays to be read."""

from __future__ import annotations

import asyncio
from collections import deque

from atomizerd.agents import protocol as proto
from atomizerd.agents.vocabulary import AgentItem
from atomizerd.daemon.adoption import _read_past


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


def test_a_stored_turn_s_messages_are_read_past_and_the_rest_is_kept() -> None:
    ended_turn: list[AgentItem] = [
        proto.UserReplay("u1", "hello"),
        proto.TextDelta("echo: hello", None, "m1", 0),
    ]
    afterwards: list[AgentItem] = [
        proto.TaskNotification("t1", "tu_t1", "completed", "t1 completed", ""),
        proto.TextDelta("the solver finished", None, "m2", 0),
    ]
    agent = Replayed(ended_turn + afterwards)
    asyncio.run(_read_past(agent, consumed=len(ended_turn)))  # type: ignore[arg-type]
    assert list(agent.items) == afterwards


def test_less_replayed_than_the_record_accounted_for_is_no_wait_for_more() -> None:
    agent = Replayed([proto.UserReplay("u1", "hello")])
    asyncio.run(asyncio.wait_for(_read_past(agent, consumed=5), 5))  # type: ignore[arg-type]
    assert not agent.items
