"""The agent's plan: kept in Session.plan and announced with plan_updated, from the agent's
`get_plan` after a turn that wrote it and from ExitPlanMode's request. In process, scripted
agents, a virtual clock (see test_core_lifecycle.py)."""

from __future__ import annotations

import asyncio
from pathlib import Path

from atomizerd.sessions import events as ev
from atomizerd.sessions import planning
from tests.support.core import Core, run, send


def plans(sent_events: list[ev.SessionEvent]) -> list[str]:
    return [e.kind.plan for e in sent_events if isinstance(e.kind, ev.PlanUpdated)]


def test_a_turn_that_writes_the_plan_updates_it_before_the_turn_ends(tmp_path: Path) -> None:
    async def test(core: Core) -> None:
        await core.registry.create_session(None, None, "a")
        sent = await asyncio.wait_for(send(core, "a", "[[plan:1. mesh 2. solve]]").wait(), 600)
        assert plans(sent.events) == ["1. mesh 2. solve"]
        kinds = [type(e.kind) for e in sent.events]
        assert kinds.index(ev.PlanUpdated) < kinds.index(ev.TurnCompleted)
        assert core.store.get_session("a").plan == "1. mesh 2. solve"  # type: ignore[union-attr]
        view = core.registry.loaded_session("a")
        assert view is not None and view.record.plan == "1. mesh 2. solve"
        # Unchanged: not announced again; a turn that wrote nothing does not ask.
        again = await asyncio.wait_for(send(core, "a", "[[plan:1. mesh 2. solve]]").wait(), 600)
        assert plans(again.events) == []
        [agent] = core.spawner.alive()
        asked = sum(1 for subtype, _ in agent.requests if subtype == "get_plan")
        await asyncio.wait_for(send(core, "a", "just talk").wait(), 600)
        assert sum(1 for subtype, _ in agent.requests if subtype == "get_plan") == asked

    run(tmp_path, test)


def test_a_long_plan_is_cut() -> None:
    long = "x" * (planning.MAX_PLAN_CHARS + 10)
    cut = planning.cut(long)
    assert cut.startswith("x" * planning.MAX_PLAN_CHARS) and cut.endswith("(cut at 16 KiB)")
    assert planning.cut("short") == "short"
