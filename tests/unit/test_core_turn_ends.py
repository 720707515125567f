"""Every turn ends, and what it leaves behind is right, when a write, a study or a setting
changes under it: in process, scripted agents, a virtual clock (see test_core_lifecycle.py)."""

from __future__ import annotations

import asyncio
import dataclasses
import shutil
from pathlib import Path
from typing import Any

import pytest

from atomizerd.errors import StorageFull
from atomizerd.sessions import events as ev
from tests.support import scripted_agent
from tests.support.core import Core, run, send, settle, text_of


def fail_first(calls: int, real: Any) -> Any:
    """A store method whose first `calls` calls find the disk full."""
    left = iter(range(calls))

    def flaky(*args: Any, **kwargs: Any) -> Any:
        if next(left, None) is not None:
            raise StorageFull("the disk is full")
        return real(*args, **kwargs)

    return flaky


def test_a_study_removed_before_its_context_is_sent_does_not_hang_the_turn(
    tmp_path: Path,
) -> None:
    for study in ("beam", "wing"):
        (tmp_path / "root" / "studies" / study).mkdir(parents=True)

    async def test(core: Core) -> None:
        await core.registry.create_session(None, "beam", "a")
        await send(core, "a", "first").wait()
        await core.registry.set_study("a", "wing")  # the next message carries the new context
        session = core.registry.loaded_session("a")
        assert session is not None
        await core.pool.prewarm(lambda: session.record, lambda: True)
        shutil.rmtree(tmp_path / "root" / "studies" / "wing")
        sent = await asyncio.wait_for(send(core, "a", "second").wait(), 600)
        assert sent.terminal is not None
        assert core.pool.state("a") != "busy", "the agent was released"

    run(tmp_path, test)


def test_a_full_disk_when_the_conversation_begins_still_ends_the_turn(tmp_path: Path) -> None:
    async def test(core: Core) -> None:
        await core.registry.create_session(None, None, "a")
        real = core.store.update_session

        def flaky(session_id: str, **fields: Any) -> Any:
            if fields.get("agent_started"):
                raise StorageFull("the disk is full")
            return real(session_id, **fields)

        core.store.update_session = flaky  # type: ignore[method-assign]
        sent = await asyncio.wait_for(send(core, "a", "hello").wait(), 600)
        assert isinstance(sent.terminal, ev.TurnFailed)

    run(tmp_path, test)


def test_a_prewarm_scheduled_before_a_mode_switch_starts_the_new_mode(tmp_path: Path) -> None:
    (tmp_path / "root" / "studies" / "beam").mkdir(parents=True)

    async def test(core: Core) -> None:
        await core.registry.create_session("power", None, "a")
        await settle()
        [first] = core.spawner.agents
        assert "--dangerously-skip-permissions" in first.spec.argv
        study = asyncio.ensure_future(core.registry.set_study("a", "beam"))
        await settle(1)
        mode = asyncio.ensure_future(core.registry.switch_mode("a", "user"))
        await asyncio.gather(study, mode)
        await asyncio.sleep(5)
        record = core.store.get_session("a")
        assert record is not None and record.mode == "user"
        live = core.spawner.alive()
        assert live and all("--dangerously-skip-permissions" not in a.spec.argv for a in live)

    settings = {"agent.prewarm": "true", "modes.power.enabled": "true"}
    run(tmp_path, test, settings, stop_seconds=0.5)


def test_an_outcome_stored_late_keeps_history_in_order_and_cost_counted_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    reports = iter(range(1, 100))
    plain = scripted_agent._result

    def cumulative(interrupted: bool) -> Any:  # the CLI reports the conversation's cost so far
        return dataclasses.replace(plain(interrupted), total_cost_usd=float(next(reports)))

    monkeypatch.setattr(scripted_agent, "_result", cumulative)

    async def test(core: Core) -> None:
        await core.registry.create_session(None, None, "a")
        core.store.finish_turn = fail_first(1, core.store.finish_turn)  # type: ignore[method-assign]
        for text in ("one", "two", "three"):
            await send(core, "a", text).wait()
        history = [(m.role, m.content) for m in core.store.history("a", after_id=0, limit=100)]
        assert history == [
            ("user", "one"),
            ("assistant", "echo: one"),
            ("user", "two"),
            ("assistant", "echo: two"),
            ("user", "three"),
            ("assistant", "echo: three"),
        ]
        record = core.store.get_session("a")
        assert record is not None and record.total_cost_usd == 3.0

    run(tmp_path, test)


def test_a_purged_session_does_not_stop_later_outcomes_from_being_stored(tmp_path: Path) -> None:
    async def test(core: Core) -> None:
        for sid in ("a", "b"):
            await core.registry.create_session(None, None, sid)
        real = core.store.finish_turn
        core.store.finish_turn = fail_first(1, real)  # type: ignore[method-assign]
        await send(core, "a", "one").wait()  # its outcome waits for the disk
        await core.registry.terminate_session("a", purge=True)
        await asyncio.sleep(60)
        core.store.finish_turn = fail_first(1, real)  # type: ignore[method-assign]
        await send(core, "b", "two").wait()
        await asyncio.sleep(600)
        assert [m.status for m in core.store.history("b", after_id=0, limit=10)] == [
            "complete",
            "complete",
        ]
        assert core.store.history("a", after_id=0, limit=10) == []

    run(tmp_path, test)


def test_an_answer_that_cannot_be_remembered_still_reaches_the_agent(tmp_path: Path) -> None:
    async def test(core: Core) -> None:
        await core.registry.create_session(None, None, "a")

        def disk_full(*args: Any, **kwargs: Any) -> None:
            raise StorageFull("the disk is full")

        core.store.remember_rule = disk_full  # type: ignore[method-assign]
        sent = send(core, "a", "[[ask:Bash]]")
        await asyncio.sleep(1)
        [request] = [e.kind for e in sent.events if isinstance(e.kind, ev.PermissionRequest)]
        core.registry.answers.respond_to_permission("a", request.request_id, True, "", True)
        await sent.wait()
        assert text_of(sent) == "permission Bash: allow"
        decided = [e.kind for e in sent.events if isinstance(e.kind, ev.PermissionDecided)]
        assert [d.allow for d in decided] == [True]

    run(tmp_path, test, {"agent.stall_timeout": 30})
