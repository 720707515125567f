"""The session / turn / pool core under the interleavings a shared pool meets: in process,
scripted agents, a virtual clock (tests/support/virtual_time.py), a real SQLite store.

Each test names the behaviour it specifies; together they are issue 11's items 2-11 and 14.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest

from atomizerd.agents.vocabulary import WriteTimeout
from atomizerd.errors import FailedPrecondition, StorageFull, Unavailable
from atomizerd.sessions import events as ev
from atomizerd.sessions.session import SessionState
from tests.support.core import Core, Sent, run, send, settle, text_of


async def create(core: Core, *ids: str) -> None:
    for sid in ids:
        await core.registry.create_session(None, None, sid)


def kinds(sent: Sent) -> list[str]:
    return sent.kinds


def failure(sent: Sent) -> ev.TurnFailed:
    assert isinstance(sent.terminal, ev.TurnFailed), sent.kinds
    return sent.terminal


def completed(sent: Sent) -> ev.TurnCompleted:
    assert isinstance(sent.terminal, ev.TurnCompleted), (sent.kinds, sent.error)
    return sent.terminal


def stored(core: Core, sid: str) -> list[tuple[str, str, str]]:
    return [(m.role, m.status, m.content) for m in core.store.history(sid, after_id=0, limit=100)]


# --- the pool's cap (item 3) -------------------------------------------------------------------


def test_the_cap_holds_at_every_instant_when_new_sessions_send_at_once(tmp_path: Path) -> None:
    async def test(core: Core) -> None:
        await create(core, "a", "b", "c", "d")
        sends = [send(core, sid, "hello") for sid in "abcd"]
        await asyncio.gather(*(s.task for s in sends))
        assert [type(s.terminal).__name__ for s in sends] == ["TurnCompleted"] * 4
        assert core.spawner.peak_alive <= 2
        assert core.pool.peak_used <= 2

    # Slow handshakes keep agents SPAWNING while others ask: the old pool counted them idle.
    run(tmp_path, test, {"pool.max_live": 2}, handshake_seconds=1.0, stop_seconds=0.5)


def test_a_spawning_agent_is_never_evicted_and_a_leased_one_never_stopped(tmp_path: Path) -> None:
    async def test(core: Core) -> None:
        await create(core, "a", "b")
        first = send(core, "a", "[[hold]]")
        await asyncio.sleep(0.5)  # a is still in its handshake
        second = send(core, "b", "hi")
        await asyncio.sleep(5)
        assert core.pool.state("a") == "busy"
        assert second.events == [], "b must wait for the slot, not take a's"
        core.spawner.agents[0].release()
        await first.wait()
        await second.wait()
        assert completed(first).interrupted is False
        assert text_of(second) == "echo: hi"
        assert core.spawner.peak_alive == 1

    run(tmp_path, test, {"pool.max_live": 1}, handshake_seconds=1.0)


def test_with_one_slot_two_sessions_sending_at_once_all_turns_complete(tmp_path: Path) -> None:
    async def test(core: Core) -> None:
        await create(core, "a", "b")
        for i in range(20):
            pair = [send(core, "a", f"a{i}"), send(core, "b", f"b{i}")]
            await asyncio.gather(*(p.task for p in pair))
            assert [text_of(p) for p in pair] == [f"echo: a{i}", f"echo: b{i}"]
        assert core.spawner.peak_alive == 1

    run(tmp_path, test, {"pool.max_live": 1}, stop_seconds=0.2)


# --- a crash before the agent saw the message (item 2) -----------------------------------------


def test_an_agent_that_dies_in_its_handshake_is_restarted_and_the_turn_completes(
    tmp_path: Path,
) -> None:
    async def test(core: Core) -> None:
        await create(core, "a")
        sent = await send(core, "a", "hello").wait()
        assert text_of(sent) == "echo: hello"
        notices = [e.kind for e in sent.events if isinstance(e.kind, ev.Notice)]
        assert [n.kind for n in notices] == [ev.AGENT_RESTARTED]
        assert "attempt 2 of 3" in notices[0].message
        assert stored(core, "a")[-1][1] == "complete"

    run(tmp_path, test, die_during_handshake=1)


def test_an_agent_that_dies_before_reading_the_message_is_restarted(tmp_path: Path) -> None:
    async def test(core: Core) -> None:
        await create(core, "a")
        sent = await send(core, "a", "hello").wait()
        assert text_of(sent) == "echo: hello"
        delivered = [m for a in core.spawner.agents for m in a.user_messages]
        assert delivered == ["hello"], "the message reaches exactly one agent"

    run(tmp_path, test, die_before_reading=2)


def test_restarts_are_bounded_and_then_the_turn_fails_clearly(tmp_path: Path) -> None:
    async def test(core: Core) -> None:
        await create(core, "a")
        sent = await send(core, "a", "hello").wait()
        failed = failure(sent)
        assert failed.code == ev.AGENT_EXITED
        assert "3 times" in failed.message and "agent.spawn_retries = 2" in failed.message
        assert len(core.spawner.agents) == 3
        assert core.pool.live_count == 0

    run(tmp_path, test, die_during_handshake=10)


# --- terminate with a queue (item 4) -----------------------------------------------------------


def test_terminate_ends_every_queued_turn_and_refuses_new_ones_at_once(tmp_path: Path) -> None:
    async def test(core: Core) -> None:
        await create(core, "a")
        running = send(core, "a", "[[hold]]")
        await asyncio.sleep(1)
        queued = [send(core, "a", f"later {i}") for i in range(3)]
        await settle()
        closing = asyncio.ensure_future(core.registry.terminate_session("a", purge=False))
        await settle()
        late = send(core, "a", "too late")
        await late.wait()
        assert isinstance(late.error, FailedPrecondition)
        await closing
        await running.wait()
        assert completed(running).interrupted  # the running turn is interrupted, then stored
        for sent in queued:
            await sent.wait()
            assert failure(sent).code == ev.SESSION_TERMINATED
        assert all(not a.user_messages[1:] for a in core.spawner.agents), "queued never ran"
        assert core.pool.agent("a") is None and core.spawner.alive_count == 0
        assert [s for _, s, _ in stored(core, "a")] == ["interrupted"] * 2 + ["failed"] * 6

    run(tmp_path, test)


def test_terminate_with_purge_leaves_nothing_of_the_session_behind(tmp_path: Path) -> None:
    async def test(core: Core) -> None:
        await create(core, "a")
        send(core, "a", "[[hold]]")
        await asyncio.sleep(1)
        queued = [send(core, "a", f"later {i}") for i in range(3)]
        await core.registry.terminate_session("a", purge=True)
        await asyncio.gather(*(q.task for q in queued))
        await asyncio.sleep(10)
        assert core.store.get_session("a") is None
        assert stored(core, "a") == []
        assert core.spawner.alive_count == 0

    run(tmp_path, test)


# --- reopening or reconfiguring mid-turn (item 5) ----------------------------------------------


def test_create_session_with_another_study_waits_for_the_running_turn(tmp_path: Path) -> None:
    (tmp_path / "root" / "studies" / "beam").mkdir(parents=True)

    async def test(core: Core) -> None:
        await create(core, "a")
        running = send(core, "a", "[[hold]]")
        await asyncio.sleep(1)
        reopen = asyncio.ensure_future(core.registry.create_session(None, "beam", "a"))
        await asyncio.sleep(5)
        assert not reopen.done(), "the change waits for the turn"
        assert core.store.get_session("a").study_id is None  # type: ignore[union-attr]
        core.spawner.agents[0].release()
        view = await reopen
        assert completed(running).interrupted is False
        assert core.spawner.agents[0].returncode == 0, "stopped after the turn, not killed in it"
        assert view.record.study_id == "beam"

    run(tmp_path, test)


# --- a turn waiting for a slot (item 6) --------------------------------------------------------


def test_interrupting_a_turn_that_waits_for_a_slot_ends_it_at_once(tmp_path: Path) -> None:
    async def test(core: Core) -> None:
        await create(core, "a", "b")
        holder = send(core, "a", "[[hold]]")
        await asyncio.sleep(1)
        waiting = send(core, "b", "hi")
        await asyncio.sleep(1)
        await core.registry.answers.interrupt("b")
        await waiting.wait()
        assert completed(waiting).interrupted
        assert kinds(waiting) == ["TurnStarted", "TurnCompleted"]
        assert not holder.task.done() and len(core.spawner.agents) == 1
        assert stored(core, "b") == [
            ("user", "interrupted", "hi"),
            ("assistant", "interrupted", ""),
        ]
        core.spawner.agents[0].release()
        await holder.wait()

    run(tmp_path, test, {"pool.max_live": 1})


def test_terminate_of_a_waiting_session_does_not_wait_for_a_slot(tmp_path: Path) -> None:
    async def test(core: Core) -> None:
        await create(core, "a", "b")
        send(core, "a", "[[hold]]")
        await asyncio.sleep(1)
        waiting = send(core, "b", "hi")
        await asyncio.sleep(1)
        began = asyncio.get_running_loop().time()
        await core.registry.terminate_session("b", purge=False)
        assert asyncio.get_running_loop().time() == began, "no slot needed to close"
        await waiting.wait()
        assert failure(waiting).code == ev.SESSION_TERMINATED
        core.spawner.agents[0].release()

    run(tmp_path, test, {"pool.max_live": 1})


def test_a_termination_whose_caller_gives_up_still_completes(tmp_path: Path) -> None:
    async def test(core: Core) -> None:
        await create(core, "a")
        send(core, "a", "[[hold]]")
        await asyncio.sleep(1)
        call = asyncio.ensure_future(core.registry.terminate_session("a", purge=False))
        await settle(3)
        call.cancel()  # the client's deadline expired
        await asyncio.sleep(30)
        session = core.registry.loaded_session("a")
        assert session is not None and session.state is SessionState.CLOSED
        assert core.spawner.alive_count == 0

    run(tmp_path, test)


def test_shutdown_refuses_queued_turns_and_records_the_waiting_one(tmp_path: Path) -> None:
    async def test(core: Core) -> None:
        await create(core, "a", "b")
        holder = send(core, "a", "[[hold]]")
        await asyncio.sleep(1)
        waiting = send(core, "b", "first")
        queued = send(core, "b", "second")
        await asyncio.sleep(1)
        await core.registry.drain(2.0)
        await asyncio.gather(holder.task, waiting.task, queued.task)
        end = holder.terminal
        assert isinstance(end, ev.TurnCompleted) and end.interrupted, "the running turn is stored"
        assert failure(waiting).code == ev.DAEMON_STOPPING
        assert isinstance(queued.error, Unavailable)
        assert [c for _, _, c in stored(core, "b")] == ["first", ""]

    run(tmp_path, test, {"pool.max_live": 1})


# --- a stuck agent's stdin (item 7) ------------------------------------------------------------


def test_a_write_the_agent_never_takes_fails_the_turn_instead_of_hanging(tmp_path: Path) -> None:
    async def test(core: Core) -> None:
        await create(core, "a")
        record = core.store.get_session("a")
        assert record is not None
        await core.pool.prewarm(lambda: record, lambda: True)
        agent = core.spawner.agents[0]

        async def stuck(text: str, uuid: str = "") -> None:
            raise WriteTimeout("the agent did not take the line within 10 s")

        agent.send_user_message = stuck  # type: ignore[method-assign]
        sent = await send(core, "a", "hello").wait()
        assert failure(sent).code == ev.STALL_TIMEOUT
        await asyncio.sleep(5)
        assert not agent.alive, "a stuck agent is stopped, not reused"

    run(tmp_path, test)


# --- withdrawn text (item 8) -------------------------------------------------------------------


def test_text_the_agent_withdraws_is_not_in_the_stored_reply(tmp_path: Path) -> None:
    async def test(core: Core) -> None:
        await create(core, "a")
        sent = await send(core, "a", "[[abandon]] x").wait()
        assert completed(sent).text == "echo: x"
        assert stored(core, "a")[-1] == ("assistant", "complete", "echo: x")

    run(tmp_path, test)


# --- permission events after the end (item 9) --------------------------------------------------


def test_a_turn_killed_while_asking_settles_the_request_before_its_terminal_event(
    tmp_path: Path,
) -> None:
    async def test(core: Core) -> None:
        await create(core, "a")
        sent = send(core, "a", "[[ask:Bash]]")
        await asyncio.sleep(1)
        assert "PermissionRequest" in kinds(sent)
        core.spawner.agents[0].crash()
        await sent.wait()
        await asyncio.sleep(60)  # anything late would have been emitted by now
        session = core.registry.loaded_session("a")
        assert session is not None
        after = session.log.after(sent.events[-1].seq)
        assert kinds(sent)[-2:] == ["PermissionDecided", "TurnFailed"] and after == []
        audit = core.store.audit_events("a", after_id=0, limit=10)
        assert [(a.kind, a.allow) for a in audit] == [("permission", False)]
        request_id = next(
            e.kind.request_id for e in sent.events if isinstance(e.kind, ev.PermissionRequest)
        )
        with pytest.raises(FailedPrecondition, match="already decided"):
            core.registry.answers.respond_to_permission("a", request_id, True, "", False)

    run(tmp_path, test)


# --- replay is bounded in bytes and gaps are reported (items 10, 11) ---------------------------


def test_a_watcher_that_falls_behind_is_told_what_it_missed(tmp_path: Path) -> None:
    async def test(core: Core) -> None:
        await create(core, "a")
        await send(core, "a", "[[deltas:2000]]").wait()
        events = []
        async for event in core.registry.watch("a", 0):
            events.append(event)
            if event.terminal:
                break
        first = events[0].kind
        assert isinstance(first, ev.Notice) and first.kind == ev.EVENTS_MISSED
        assert first.missed_from_seq == 1 and first.missed_to_seq == events[1].seq - 1
        assert "GetHistory" in first.message
        assert [e.seq for e in events[1:]] == list(range(events[1].seq, events[-1].seq + 1))

    run(tmp_path, test, {"daemon.replay_bytes": 64 * 1024})


def test_a_slow_sender_misses_nothing_within_the_lag_bound_and_is_told_beyond_it(
    tmp_path: Path,
) -> None:
    async def test(core: Core) -> None:
        await create(core, "a")
        stream = core.registry.send_message("a", "[[deltas:2000]]", "")
        first = await anext(stream)  # the sender is attached, then stops reading for a while
        await asyncio.sleep(5)
        rest = [e async for e in stream]
        deltas = [e for e in rest if isinstance(e.kind, ev.TextDelta)]
        assert isinstance(first.kind, ev.TurnStarted)
        assert len(deltas) == 2000 and rest[-1].terminal

        watcher = core.registry.watch("a", core.registry.get_session("a").last_seq)
        waiting = asyncio.ensure_future(anext(watcher))
        await settle()
        await send(core, "a", "[[deltas:4000]]").wait()  # ~800 KB of events: past the lag bound
        events = [await waiting]
        while not events[-1].terminal:
            events.append(await anext(watcher))
        missed = [e.kind for e in events if isinstance(e.kind, ev.Notice)]
        assert [n.kind for n in missed] == [ev.EVENTS_MISSED]
        await watcher.aclose()  # type: ignore[attr-defined]

    settings = {"daemon.replay_bytes": 10_000, "daemon.follower_lag_bytes": 500_000}
    run(tmp_path, test, settings)


def test_replay_memory_is_bounded_in_bytes_per_session_and_in_total(tmp_path: Path) -> None:
    async def test(core: Core) -> None:
        await create(core, "a", "b", "c")
        for sid in "abc":
            await send(core, sid, "[[big:3000000]]").wait()
            await send(core, sid, "[[deltas:100]]").wait()
        for sid in "abc":
            session = core.registry.loaded_session(sid)
            assert session is not None and session.log.bytes <= 1_000_000
        assert core.registry.replay.used <= 1_500_000

    run(tmp_path, test, {"daemon.replay_bytes": 1_000_000, "daemon.replay_bytes_total": 1_500_000})


# --- what a killed turn had streamed (item 14) -------------------------------------------------


def test_a_long_reply_is_checkpointed_in_pieces_never_rewritten_whole(tmp_path: Path) -> None:
    async def test(core: Core) -> None:
        await create(core, "a")
        writes: list[tuple[str, bool]] = []
        real = core.store.checkpoint_reply

        def record(sid: str, turn_id: str, text: str, *, replace: bool = False) -> None:
            writes.append((text, replace))
            real(sid, turn_id, text, replace=replace)

        core.store.checkpoint_reply = record  # type: ignore[method-assign, assignment]
        sent = await send(core, "a", "[[deltas:5000]]").wait()
        assert completed(sent).text == "x" * 5000
        assert len(writes) >= 2 and not any(replace for _, replace in writes)
        assert sum(len(t) for t, _ in writes) <= 5000, "each byte is stored once"

    run(tmp_path, test, {"agent.checkpoint_bytes": 1000})


def test_a_streaming_reply_is_checkpointed_and_survives_a_crash(tmp_path: Path) -> None:
    async def test(core: Core) -> None:
        await create(core, "a")
        send(core, "a", "[[hold]]")
        await asyncio.sleep(5)  # the clock passes several checkpoint intervals
        # The daemon dies here; the next one settles the turn from the same database.
        settled = core.store.settle_unfinished_turns()
        assert len(settled) == 1
        assert stored(core, "a")[-1] == ("assistant", "interrupted", "partial ")
        core.spawner.agents[0].release()

    run(tmp_path, test)


# --- a full disk at the end of a turn (item 13) ------------------------------------------------


def test_a_turn_whose_outcome_cannot_be_stored_still_ends_and_is_settled_later(
    tmp_path: Path,
) -> None:
    async def test(core: Core) -> None:
        await create(core, "a")
        real = core.store.finish_turn
        failures = iter([True, True])

        def flaky(*args: Any, **kwargs: Any) -> Any:
            if next(failures, False):
                raise StorageFull("the disk is full")
            return real(*args, **kwargs)

        core.store.finish_turn = flaky  # type: ignore[method-assign]
        sent = await send(core, "a", "hello").wait()
        assert completed(sent).text == "echo: hello"
        assert stored(core, "a")[-1][1] == "pending"
        await asyncio.sleep(30)
        assert stored(core, "a")[-1] == ("assistant", "complete", "echo: hello")

    run(tmp_path, test)


# --- spare agents (issue 14) -------------------------------------------------------------------


def test_a_new_session_adopts_a_ready_spare_and_the_spare_is_replaced(tmp_path: Path) -> None:
    async def test(core: Core) -> None:
        core.pool.replenish_spares()
        await asyncio.sleep(1)
        [spare] = core.spawner.agents
        assert spare.init_fields is not None, "a spare is initialized before anyone asks"
        view = await core.registry.create_session(None, None, None)
        assert core.pool.agent(view.record.session_id) is not None
        sent = await send(core, view.record.session_id, "hello").wait()
        assert text_of(sent) == "echo: hello"
        assert spare.user_messages == ["hello"], "the first message went to the spare"
        assert view.record.agent_session_id in spare.spec.argv[-1] or any(
            view.record.agent_session_id in arg for arg in spare.spec.argv
        )
        await asyncio.sleep(1)
        assert core.pool.spare_count == 1 and len(core.spawner.agents) == 2
        assert core.store.count_sessions() == 1, "spares are not sessions"

    run(tmp_path, test, {"pool.spares": 1})


def test_sessions_a_spare_cannot_fit_spawn_their_own_agent(tmp_path: Path) -> None:
    (tmp_path / "root" / "studies" / "beam").mkdir(parents=True)

    async def test(core: Core) -> None:
        core.pool.replenish_spares()
        await asyncio.sleep(1)
        [spare] = core.spawner.agents
        await core.registry.create_session(None, None, "chosen")  # a client-chosen id
        await core.registry.create_session(None, "beam", None)  # a study
        await send(core, "chosen", "hi").wait()
        assert spare.user_messages == [] and spare.alive
        assert core.pool.spare_count == 1

    run(tmp_path, test, {"pool.spares": 1, "pool.max_live": 4})


def test_spares_are_evicted_before_any_session_loses_its_agent(tmp_path: Path) -> None:
    async def test(core: Core) -> None:
        await create(core, "a", "b")
        await send(core, "a", "first").wait()
        core.pool.replenish_spares()
        await asyncio.sleep(1)
        assert core.pool.spare_count == 1 and core.pool.slots_used == 2
        await send(core, "b", "second").wait()
        assert core.pool.agent("a") is not None, "a's idle agent stayed; the spare went"
        assert core.pool.spare_count == 0 and core.spawner.peak_alive == 2

    run(tmp_path, test, {"pool.spares": 1, "pool.max_live": 2})


def test_a_spare_that_dies_idle_is_replaced(tmp_path: Path) -> None:
    async def test(core: Core) -> None:
        core.pool.replenish_spares()
        await asyncio.sleep(1)
        core.spawner.agents[0].crash()
        await asyncio.sleep(5)
        assert core.pool.spare_count == 1 and len(core.spawner.agents) == 2
        assert core.spawner.agents[1].alive

    run(tmp_path, test, {"pool.spares": 1})
