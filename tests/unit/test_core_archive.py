"""Labels, the archive and search through the registry: in process, scripted agents, a virtual
clock, a real SQLite store (the store's own tests run both engines)."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest

from atomizerd.errors import FailedPrecondition, InvalidArgument, NotFound
from atomizerd.model import SessionFilter
from atomizerd.sessions.reaper import Reaper
from tests.support.core import Core, run, send, text_of


async def until(predicate: Any, seconds: float = 30.0) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + seconds
    while not predicate():
        assert loop.time() < deadline, "condition not met in time"
        await asyncio.sleep(0.01)


def listed(core: Core, **filters: Any) -> list[str]:
    views, _ = core.registry.catalog.list_sessions(
        0, "", None, None, filters=SessionFilter(**filters)
    )
    return [v.record.session_id for v in views]


def test_labels_are_checked_set_merged_and_replaced(tmp_path: Path) -> None:
    async def test(core: Core) -> None:
        r = core.registry
        view = await r.create_session(None, None, "a", labels={"example.com/team": "cfd"})
        assert view.record.label_map() == {"example.com/team": "cfd"}
        for bad in ("-x", "a/", "UPPER.Case.COM/x", "x" * 64, "", "a b"):
            with pytest.raises(InvalidArgument, match=r"a label key \(as in Kubernetes\) is"):
                await r.create_session(None, None, "b", labels={bad: "v"})
        with pytest.raises(InvalidArgument, match="1-256"):
            r.catalog.set_labels("a", {"k": "v" * 257}, replace=False)
        with pytest.raises(InvalidArgument, match="at most 64 labels"):
            r.catalog.set_labels("a", {f"k{i}": "v" for i in range(65)}, replace=True)
        view = r.catalog.set_labels("a", {"env": "prod"}, replace=False)
        assert view.record.label_map() == {"env": "prod", "example.com/team": "cfd"}
        view = r.catalog.set_labels("a", {"env": ""}, replace=False)  # an empty value removes
        assert view.record.label_map() == {"example.com/team": "cfd"}
        view = r.catalog.set_labels("a", {"x": "1"}, replace=True)
        assert view.record.label_map() == {"x": "1"}
        assert listed(core, labels={"x": "1"}) == ["a"]
        with pytest.raises(NotFound):
            r.catalog.set_labels("nope", {"x": "1"}, replace=True)

    run(tmp_path, test)


def test_archive_stops_the_agent_hides_the_session_and_a_message_unarchives_it(
    tmp_path: Path,
) -> None:
    async def test(core: Core) -> None:
        r = core.registry
        await r.create_session(None, None, "a")
        await r.create_session(None, None, "b")
        assert text_of(await send(core, "a", "hello").wait()) == "echo: hello"
        agent = core.spawner.agents[0]
        assert agent.alive is True
        view = await r.catalog.archive_session("a")
        assert view.record.archived and view.state == "idle"
        assert core.spawner.agents[0].alive is False, "the archived session's agent was stopped"
        assert listed(core) == ["b"]
        assert listed(core, archived=None) == ["b", "a"]
        assert listed(core, archived=True) == ["a"]
        # History stays.
        assert [m.content for m in core.store.history("a", after_id=0, limit=10)] == [
            "hello",
            "echo: hello",
        ]
        # A message takes it out of the archive and runs.
        assert text_of(await send(core, "a", "again").wait()) == "echo: again"
        assert not core.registry.get_session("a").record.archived
        await r.catalog.archive_session("a")
        assert not r.catalog.unarchive_session("a").record.archived
        assert listed(core) == ["b", "a"]

    run(tmp_path, test)


def test_a_message_to_an_archived_session_is_refused_when_configured(tmp_path: Path) -> None:
    async def test(core: Core) -> None:
        await core.registry.create_session(None, None, "a")
        await core.registry.catalog.archive_session("a")
        sent = await send(core, "a", "hello").wait()
        assert isinstance(sent.error, FailedPrecondition)
        assert 'daemon.archived_send = "refuse"' in str(sent.error)
        assert core.store.history("a", after_id=0, limit=10) == []
        assert core.registry.get_session("a").record.archived

    run(tmp_path, test, {"daemon.archived_send": "refuse"})


def test_archive_is_refused_while_the_agent_runs_a_task_naming_it(tmp_path: Path) -> None:
    async def test(core: Core) -> None:
        await core.registry.create_session(None, None, "a")
        await send(core, "a", "[[task:solve]]").wait()
        with pytest.raises(FailedPrecondition, match="runs task 'solve'"):
            await core.registry.catalog.archive_session("a")
        assert core.spawner.agents[0].alive
        assert not core.registry.get_session("a").record.archived
        core.spawner.agents[0].end_task("solve")
        await until(lambda: not core.registry.get_session("a").tasks)
        await until(lambda: core.registry.loaded_session("a").idle)  # type: ignore[union-attr]
        assert (await core.registry.catalog.archive_session("a")).record.archived

    run(tmp_path, test)


def test_the_purge_spares_archived_sessions_unless_purge_archived(tmp_path: Path) -> None:
    for purge_archived in (False, True):

        async def test(core: Core, purge_archived: bool = purge_archived) -> None:
            for sid in ("kept", "old"):
                await core.registry.create_session(None, None, sid)
            await core.registry.catalog.archive_session("kept")
            for sid in ("kept", "old"):
                core.store.update_session(sid, last_active_at=1.0)
                core.registry.loaded_session(sid).record.last_active_at = 1.0  # type: ignore[union-attr]
            reaper = Reaper(core.config, core.store, core.registry, core.pool)
            await reaper.run_once()
            assert core.store.get_session("old") is None
            assert (core.store.get_session("kept") is None) == purge_archived

        run(tmp_path / str(purge_archived), test, {"reaper.purge_archived": purge_archived})


def test_search_through_the_registry(tmp_path: Path) -> None:
    async def test(core: Core) -> None:
        r = core.registry
        await r.create_session(None, None, "a", labels={"team": "cfd"})
        await send(core, "a", "the turbine blade").wait()
        hits, token = r.catalog.search_messages("turbine", None, {}, 0, "")
        assert sorted((h.session_id, h.role) for h in hits) == [("a", "assistant"), ("a", "user")]
        assert all("[turbine]" in h.snippet for h in hits)
        assert token == ""
        first, token = r.catalog.search_messages("turbine", None, {"team": "cfd"}, 1, "")
        assert len(first) == 1 and token
        second, token = r.catalog.search_messages("turbine", None, {}, 1, token)
        assert len(second) == 1 and token == ""
        assert first[0].message_id != second[0].message_id
        assert r.catalog.search_messages("turbine", None, {"team": "x"}, 0, "")[0] == []
        for bad, why in (("", "empty"), ("x" * 1001, "at most 1000"), ('"open', "malformed")):
            with pytest.raises(InvalidArgument, match=why):
                r.catalog.search_messages(bad, None, {}, 0, "")
        with pytest.raises(InvalidArgument, match="page_token"):
            r.catalog.search_messages("turbine", None, {}, 0, "garbage")
        with pytest.raises(NotFound):
            r.catalog.search_messages("turbine", "nope", {}, 0, "")

    run(tmp_path, test)
