"""The agent acts on its own (docs/architecture.md, "Following the agent"): turns it starts,
tasks it runs, lines taken into running turns. In process, scripted agents, a virtual clock:
each interleaving the real CLI produces only by chance is produced here on purpose.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

from atomizerd.errors import ResourceExhausted
from atomizerd.sessions import events as ev
from atomizerd.sessions.journal import Resumed
from tests.support import virtual_time
from tests.support.core import Core, build, run, send, settle, text_of


def history(core: Core, sid: str) -> list[tuple[str, str, str, str]]:
    """(role, origin, status, content) of every stored message, in order."""
    rows = core.store.history(sid, after_id=0, limit=100)
    return [(m.role, m.origin, m.status, m.content) for m in rows]


def log_of(core: Core, sid: str) -> list[ev.SessionEvent]:
    s = core.registry.loaded_session(sid)
    assert s is not None
    return list(s.log.after(0))


def started(core: Core, sid: str) -> list[ev.TurnStarted]:
    return [e.kind for e in log_of(core, sid) if isinstance(e.kind, ev.TurnStarted)]


async def until(predicate: Any, seconds: float = 30.0) -> None:
    """Waits (virtual time) until `predicate()` holds."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + seconds
    while not predicate():
        assert loop.time() < deadline, "condition not met in time"
        await asyncio.sleep(0.01)


def test_a_turn_the_agent_starts_while_idle_is_stored_with_its_origin_and_replies_stay_in_step(
    tmp_path: Path,
) -> None:
    async def test(core: Core) -> None:
        await core.registry.create_session(None, None, "a")
        first = await send(core, "a", "run it [[task:b1]]").wait()
        assert text_of(first) == "echo: run it"
        assert core.pool.agent("a") is not None and core.pool.agent("a").running_tasks == 1  # type: ignore[union-attr]

        core.spawner.agents[0].end_task("b1", reply="the solver finished")
        await until(lambda: len(history(core, "a")) == 4)
        for n in range(3):
            reply = await send(core, "a", f"next{n}").wait()
            assert text_of(reply) == f"echo: next{n}", "a reply answers its own message"

        assert history(core, "a") == [
            ("user", "client", "complete", "run it [[task:b1]]"),
            ("assistant", "client", "complete", "echo: run it"),
            ("user", "task", "complete", "b1 completed"),  # what the CLI told the agent
            ("assistant", "task", "complete", "the solver finished"),
            ("user", "client", "complete", "next0"),
            ("assistant", "client", "complete", "echo: next0"),
            ("user", "client", "complete", "next1"),
            ("assistant", "client", "complete", "echo: next1"),
            ("user", "client", "complete", "next2"),
            ("assistant", "client", "complete", "echo: next2"),
        ]
        origins = [k.origin for k in started(core, "a")]
        assert origins[:2] == [ev.TurnOrigin.CLIENT, ev.TurnOrigin.TASK]
        kinds = [type(e.kind).__name__ for e in log_of(core, "a")]
        assert kinds.index("TaskStarted") < kinds.index("TaskEnded") < kinds.index("TurnStarted", 3)
        assert core.pool.agent("a").running_tasks == 0  # type: ignore[union-attr]

    run(tmp_path, test)


def test_an_agent_turn_that_ends_just_as_a_client_writes_is_its_own_turn(tmp_path: Path) -> None:
    async def test(core: Core) -> None:
        await core.registry.create_session(None, None, "a")
        await send(core, "a", "hello").wait()
        core.spawner.agents[0].interjection = ("own words", False)
        reply = await send(core, "a", "second").wait()
        assert text_of(reply) == "echo: second"
        await settle()
        assert history(core, "a")[2:] == [
            ("user", "client", "complete", "second"),
            ("user", "task", "complete", ""),  # its result says a task ended
            ("assistant", "task", "complete", "own words"),
            ("assistant", "client", "complete", "echo: second"),
        ]

    run(tmp_path, test)


def test_a_line_taken_into_a_turn_the_agent_started_ends_that_turn_there(tmp_path: Path) -> None:
    async def test(core: Core) -> None:
        await core.registry.create_session(None, None, "a")
        await send(core, "a", "hello").wait()
        core.spawner.agents[0].interjection = ("own words", True)
        reply = await send(core, "a", "second").wait()
        assert text_of(reply) == "echo: second", "what came before the line is not its reply"
        rows = history(core, "a")
        assert ("assistant", "agent", "complete", "own words") in rows
        assert rows[-1] == ("assistant", "client", "complete", "echo: second")

    run(tmp_path, test)


def test_a_steer_is_taken_into_the_running_turn_and_stored_there(tmp_path: Path) -> None:
    async def test(core: Core) -> None:
        await core.registry.create_session(None, None, "a")
        running = send(core, "a", "[[hold]]")
        await until(lambda: core.registry.loaded_session("a").turn is not None)  # type: ignore[union-attr]
        await settle()
        steered = send(core, "a", "also this", steer=True)
        await settle()
        core.spawner.agents[0].release()
        await running.wait()
        await steered.wait()
        assert [e.seq for e in steered.events] == [e.seq for e in running.events[1:]] or (
            steered.events[-1].seq == running.events[-1].seq
        ), "the steering call streams the running turn to its end"
        messages = [e.kind for e in running.events if isinstance(e.kind, ev.UserMessage)]
        assert messages == [ev.UserMessage("also this", "")]
        rows = core.store.history("a", after_id=0, limit=10)
        assert [(m.role, m.content, m.detail) for m in rows][:2] == [
            ("user", "[[hold]]", ""),
            ("user", "also this", "steer"),
        ]
        assert rows[0].turn_id == rows[1].turn_id
        assert "steered: also this" in text_of(running)

    run(tmp_path, test)


def test_a_steer_the_agent_takes_only_after_the_turn_ended_becomes_its_own_turn(
    tmp_path: Path,
) -> None:
    async def test(core: Core) -> None:
        await core.registry.create_session(None, None, "a")
        running = send(core, "a", "[[hold]]")
        await until(lambda: core.registry.loaded_session("a").turn is not None)  # type: ignore[union-attr]
        await settle()
        agent = core.spawner.agents[0]
        agent.take_mid_turn = False  # the turn is ending: the CLI queues the line
        steered = send(core, "a", "late words", steer=True)
        await settle()
        agent.release()
        await running.wait()
        await steered.wait()
        await until(lambda: len(history(core, "a")) == 4)
        assert history(core, "a") == [
            ("user", "client", "complete", "[[hold]]"),
            ("assistant", "client", "complete", "partial done"),
            ("user", "client", "complete", "late words"),
            ("assistant", "client", "complete", "echo: late words"),
        ]
        nxt = await send(core, "a", "after").wait()
        assert text_of(nxt) == "echo: after"

    run(tmp_path, test)


def test_an_agent_with_a_running_task_keeps_its_slot_and_the_waiter_is_told_who_holds_it(
    tmp_path: Path,
) -> None:
    async def test(core: Core) -> None:
        await core.registry.create_session(None, None, "a")
        await core.registry.create_session(None, None, "b")
        await send(core, "a", "[[task:solve]]").wait()
        refused = await send(core, "b", "hi").wait()
        assert isinstance(refused.error, ResourceExhausted)
        assert "a" in str(refused.error) and "background tasks" in str(refused.error)
        assert core.spawner.agents[0].alive, "the task's agent was not evicted"
        assert core.pool.candidates() == [], "nor offered to the reaper"

        core.spawner.agents[0].end_task("solve")
        await until(lambda: len(history(core, "a")) == 4)
        served = await send(core, "b", "hi").wait()
        assert text_of(served) == "echo: hi", "once the task ended the agent may be evicted"

    run(tmp_path, test, {"pool.max_live": 1, "pool.queue_timeout": 5})


def test_tasks_of_an_agent_that_is_stopped_end_as_killed(tmp_path: Path) -> None:
    async def test(core: Core) -> None:
        await core.registry.create_session(None, None, "a")
        await send(core, "a", "[[task:solve]]").wait()
        view = core.registry.get_session("a")
        assert [t.task_id for t in view.tasks] == ["solve"]
        core.spawner.agents[0].crash()
        await until(lambda: not core.registry.get_session("a").tasks)
        ended = [e.kind for e in log_of(core, "a") if isinstance(e.kind, ev.TaskEnded)]
        assert ended == [ev.TaskEnded("solve", ev.TaskStatus.KILLED, "the agent was stopped")]

    run(tmp_path, test)


def test_a_task_running_past_the_task_timeout_is_stopped_with_a_notice(tmp_path: Path) -> None:
    async def test(core: Core) -> None:
        await core.registry.create_session(None, None, "a")
        await send(core, "a", "[[task:solve]]").wait()
        await core.registry.stop_overdue_tasks()
        assert core.spawner.agents[0].requests == [], "not before its time"
        await asyncio.sleep(61)
        await core.registry.stop_overdue_tasks()
        assert core.spawner.agents[0].requests == [("stop_task", {"task_id": "solve"})]
        await until(lambda: not core.registry.get_session("a").tasks)
        notices = [e.kind for e in log_of(core, "a") if isinstance(e.kind, ev.Notice)]
        assert [n.kind for n in notices] == [ev.TASK_TIMEOUT]
        ended = [e.kind for e in log_of(core, "a") if isinstance(e.kind, ev.TaskEnded)]
        assert [t.status for t in ended] == [ev.TaskStatus.STOPPED]

    run(tmp_path, test, {"agent.task_timeout": 60})


def test_a_scheduled_prompt_keeps_the_agent_and_its_turn_has_origin_scheduled(
    tmp_path: Path,
) -> None:
    async def test(core: Core) -> None:
        await core.registry.create_session(None, None, "a")
        await core.registry.create_session(None, None, "b")
        await send(core, "a", "later [[schedule]]").wait()
        assert core.pool.candidates() == [], "a pending wake-up keeps the agent"
        refused = await send(core, "b", "hi").wait()
        assert isinstance(refused.error, ResourceExhausted)

        core.spawner.agents[0].wake_up("checked the solver")
        await until(lambda: len(history(core, "a")) == 4)
        assert history(core, "a")[2:] == [
            ("user", "scheduled", "complete", ""),
            ("assistant", "scheduled", "complete", "checked the solver"),
        ]
        served = await send(core, "b", "hi").wait()
        assert text_of(served) == "echo: hi", "the wake-up fired: the agent may go"

    run(tmp_path, test, {"pool.max_live": 1, "pool.queue_timeout": 5})


def test_a_task_that_ends_while_its_agent_is_handed_to_the_next_daemon_ends_in_that_daemon(
    tmp_path: Path,
) -> None:
    async def main() -> None:
        first = build(tmp_path, durable=True)
        await first.registry.create_session(None, None, "a")
        await send(first, "a", "[[task:solve]]").wait()
        (agent,) = first.spawner.agents
        await first.registry.hand_over()
        await first.pool.close()
        first.store.close()
        assert agent.alive, "a planned restart lets the agent go on"

        # The task ends between the two daemons; the next one adopts the agent after that.
        agent.end_task("solve", reply="the solver finished")
        second = build(tmp_path)
        try:
            adopted = second.pool.adopt("a", agent, leased=False)
            assert adopted is not None
            second.registry.restore_tasks("a")
            await until(lambda: len(history(second, "a")) == 4)
            assert history(second, "a")[2:] == [
                ("user", "task", "complete", "solve completed"),
                ("assistant", "task", "complete", "the solver finished"),
            ]
            ended = [e.kind for e in log_of(second, "a") if isinstance(e.kind, ev.TaskEnded)]
            assert [(t.task_id, t.status) for t in ended] == [("solve", ev.TaskStatus.COMPLETED)]
            assert not second.registry.get_session("a").tasks
            assert second.store.tasks_of("a") == []
            reply = await send(second, "a", "after").wait()
            assert text_of(reply) == "echo: after"
        finally:
            await second.close()

    virtual_time.run(main())


def test_a_turn_the_agent_starts_right_after_a_result_is_not_left_unread(tmp_path: Path) -> None:
    async def test(core: Core) -> None:
        await core.registry.create_session(None, None, "a")
        await send(core, "a", "go [[then-own]]").wait()
        await until(lambda: len(history(core, "a")) == 4)
        assert history(core, "a")[3] == ("assistant", "task", "complete", "right after")
        assert text_of(await send(core, "a", "next").wait()) == "echo: next"

    run(tmp_path, test)


def test_a_turn_the_agent_began_before_a_queued_message_ran_is_stored_before_that_message(
    tmp_path: Path,
) -> None:
    async def test(core: Core) -> None:
        await core.registry.create_session(None, None, "a")
        first = send(core, "a", "first [[hold]] [[then-own]]")
        await until(lambda: core.registry.loaded_session("a").turn is not None)  # type: ignore[union-attr]
        await settle()
        second = send(core, "a", "second")  # queued behind the first
        await settle()
        core.spawner.agents[0].release()  # the first ends; the agent begins a turn at once
        await first.wait()
        assert text_of(await second.wait()) == "echo: second"
        assert [(role, origin, text) for role, origin, _, text in history(core, "a")] == [
            ("user", "client", "first [[hold]] [[then-own]]"),
            ("assistant", "client", "partial done"),
            ("user", "task", "sub1 completed"),
            ("assistant", "task", "right after"),
            ("user", "client", "second"),
            ("assistant", "client", "echo: second"),
        ]

    run(tmp_path, test)


def test_an_agent_turn_a_restart_cuts_before_the_agent_takes_a_written_line_stays_its_own(
    tmp_path: Path,
) -> None:
    """A client's line is written as a task ends: the agent first starts a turn of its own about
    the task, and a planned restart comes while that turn runs, the line still untaken. The next
    daemon reads the agent's output again from the line's turn start: the rest of the agent's
    turn is a turn of its own (same cause), and the line's reply is its own; the events the
    first daemon gave out are back in the log and no seq is given twice."""

    async def main() -> None:
        first = build(tmp_path, durable=True)
        await first.registry.create_session(None, None, "a")
        await send(first, "a", "hello").wait()
        (agent,) = first.spawner.agents
        agent.task_ends_at_next_line = ("solve", "the solver ")
        queued = send(first, "a", "are you there?")
        await until(lambda: len(history(first, "a")) == 4)  # its line, the agent's own turn
        await settle()
        seqs_before = [e.seq for e in log_of(first, "a")]
        await first.registry.hand_over()
        await queued.wait()
        await first.pool.close()
        first.store.close()

        agent.finish_own_turn("has finished")  # between the two daemons
        second = build(tmp_path)
        try:
            resumed = Resumed.from_replay("a", agent.records, [])
            assert resumed is not None
            agent.adopted_again()
            adopted = second.pool.adopt("a", agent, leased=True)
            assert adopted is not None
            second.registry.resume_turn(adopted, resumed)
            await until(lambda: len(history(second, "a")) == 8)
            assert history(second, "a") == [
                ("user", "client", "complete", "hello"),
                ("assistant", "client", "complete", "echo: hello"),
                ("user", "client", "complete", "are you there?"),
                ("user", "task", "interrupted", "solve done"),
                ("assistant", "task", "interrupted", "the solver "),  # cut by the restart
                ("user", "task", "complete", "solve done"),  # the rest: a turn of its own
                ("assistant", "task", "complete", "has finished"),
                ("assistant", "client", "complete", "echo: are you there?"),
            ]
            seqs = [e.seq for e in log_of(second, "a")]
            assert len(seqs) == len(set(seqs)), "no seq given twice"
            assert seqs[: len(seqs_before)][-1] >= max(seqs_before)
            assert min(s for s in seqs if s > max(seqs_before)) == max(seqs_before) + 1
            reply = await send(second, "a", "next").wait()
            assert text_of(reply) == "echo: next"
        finally:
            await second.close()

    virtual_time.run(main())


def test_a_message_queued_behind_the_agent_s_own_turn_is_not_written_when_a_restart_begins(
    tmp_path: Path,
) -> None:
    """The agent began a turn of its own as a client's message reached it (the message waits
    for that turn); a planned restart then begins. The message was never written to the agent:
    the client is told so (safe to send again), and the agent's turn is left to the next
    daemon, not ended here — else the rest of it would be taken for the message's reply."""

    async def main() -> None:
        core = build(tmp_path, durable=True)
        await core.registry.create_session(None, None, "a")
        first = send(core, "a", "first [[hold]] [[then-own:open]]")
        await until(lambda: core.registry.loaded_session("a").turn is not None)  # type: ignore[union-attr]
        await settle()
        queued = send(core, "a", "are you there?")  # waits behind the first
        await settle()
        (agent,) = core.spawner.agents
        agent.release()  # the first ends; the agent begins a turn of its own at once
        await first.wait()
        await until(lambda: len(history(core, "a")) == 3)
        await settle()
        await core.registry.hand_over()
        await queued.wait()
        try:
            assert "are you there?" not in agent.user_messages, "never written to the agent"
            assert queued.error is not None and "not sent" in str(queued.error)
            assert [(role, origin, status) for role, origin, status, _ in history(core, "a")] == [
                ("user", "client", "complete"),
                ("assistant", "client", "complete"),
                ("user", "task", "pending"),  # the next daemon goes on with it
            ]
        finally:
            await core.pool.close()
            core.store.close()

    virtual_time.run(main())
