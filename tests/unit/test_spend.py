"""Spending caps act mid-turn: a turn whose estimated cost crosses the turn's or the session's
cap is stopped with a notice, not only the next turn refused. In process, scripted agents, a
virtual clock (see test_core_lifecycle.py)."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from atomizerd.model import Mode, SessionRecord
from atomizerd.sessions import events as ev
from atomizerd.sessions import spend
from tests.support.core import Core, run, send, settle

# One Opus call of 100k input and 10k output tokens: 0.5 + 0.25 USD at list prices.
CALL = "[[spend:100000]]"


def test_a_call_is_priced_by_its_model_family_and_unknown_models_at_the_dearest() -> None:
    usage = ev.LiveUsage(
        input_tokens=1_000_000,
        output_tokens=1_000_000,
        cache_creation_input_tokens=1_000_000,
        cache_read_input_tokens=1_000_000,
    )
    assert spend.call_cost(usage, "claude-sonnet-9") == pytest.approx(3 + 15 + 3.75 + 0.3)
    assert spend.call_cost(usage, "claude-haiku-9") == pytest.approx(1 + 5 + 1.25 + 0.1)
    assert spend.call_cost(usage, "someone-elses-model") == spend.call_cost(usage, "claude-opus")


def test_over_cap_names_the_cap_that_was_crossed() -> None:
    record = SessionRecord(
        session_id="a",
        mode=Mode.USER,
        study_id=None,
        agent_session_id="x",
        agent_started=True,
        closed=False,
        created_at=0.0,
        last_active_at=0.0,
        message_count=0,
        total_cost_usd=0.0,
        agent_cost_usd=0.0,
        seq_reserved=0,
    )
    assert spend.over_cap(record, 100.0) is None  # no caps
    record.turn_budget_usd = 0.5
    assert spend.over_cap(record, 0.49) is None
    assert "turn_budget_usd" in (spend.over_cap(record, 0.5) or "")
    record.turn_budget_usd, record.budget_usd, record.total_cost_usd = 0.0, 2.0, 1.5
    assert spend.over_cap(record, 0.4) is None
    assert "session's" in (spend.over_cap(record, 0.5) or "")


def test_a_turn_that_crosses_its_cap_is_stopped_with_a_notice(tmp_path: Path) -> None:
    async def test(core: Core) -> None:
        await core.registry.create_session(None, None, "a", turn_budget_usd=0.5)
        sent = await asyncio.wait_for(send(core, "a", f"{CALL} [[hold]]").wait(), 600)
        notices = [e.kind for e in sent.events if isinstance(e.kind, ev.Notice)]
        assert [n.kind for n in notices] == [ev.BUDGET_EXHAUSTED]
        assert "0.5 USD (turn_budget_usd)" in notices[0].message
        usage = [e.kind for e in sent.events if isinstance(e.kind, ev.LiveUsage)]
        assert usage[-2].estimated_turn_cost_usd == pytest.approx(0.75)
        assert isinstance(sent.terminal, ev.TurnCompleted)
        assert sent.terminal.interrupted, "the held turn ended only because it was stopped"

    run(tmp_path, test)


def test_a_turn_that_crosses_the_session_budget_is_stopped(tmp_path: Path) -> None:
    async def test(core: Core) -> None:
        await core.registry.create_session(None, None, "a", budget_usd=0.7)
        sent = await asyncio.wait_for(send(core, "a", f"{CALL} [[hold]]").wait(), 600)
        assert [e.kind.kind for e in sent.events if isinstance(e.kind, ev.Notice)] == [
            ev.BUDGET_EXHAUSTED
        ]
        assert isinstance(sent.terminal, ev.TurnCompleted) and sent.terminal.interrupted

    run(tmp_path, test)


def test_a_turn_under_its_caps_runs_on(tmp_path: Path) -> None:
    async def test(core: Core) -> None:
        await core.registry.create_session(None, None, "a", budget_usd=5.0, turn_budget_usd=1.0)
        sent = send(core, "a", f"{CALL} [[hold]]")
        await settle()
        assert not sent.events or not sent.events[-1].terminal, "running: nothing stopped it"
        [agent] = core.spawner.alive()
        agent.release()
        await asyncio.wait_for(sent.wait(), 600)
        assert not [e for e in sent.events if isinstance(e.kind, ev.Notice)]
        assert isinstance(sent.terminal, ev.TurnCompleted) and not sent.terminal.interrupted

    run(tmp_path, test)
