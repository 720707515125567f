"""A restart or a stop that lands while the pool is in the middle of something: an agent
SPAWNING, a lease waiting for a slot, an eviction under way, or a second signal. Whatever is in
flight, the daemon's shutdown sequence (`Registry.hand_over` or `drain`, then
`AgentPool.close`) finishes within a bound, leaves no agent running and no task exception
unretrieved. In process: scripted agents on a virtual clock, so each state is hit exactly.
"""

from __future__ import annotations

import asyncio
import gc
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from atomizerd.errors import Unavailable
from tests.support import virtual_time
from tests.support.core import Core, Sent, build, send, settle

# Virtual seconds the whole shutdown may take: the pool's own bound plus a hand-over's settle.
BOUND = 60.0

Shutdown = Callable[[Core], Awaitable[None]]


async def restart(core: Core) -> None:
    """What a planned restart does to the core (Daemon.shutdown with `restart`)."""
    await core.registry.hand_over()
    await core.pool.close()


async def stop(core: Core) -> None:
    """What a stop does (SIGTERM): running turns interrupted and stored, agents stopped."""
    await core.registry.drain(1.0)
    await core.pool.close()


def run(
    tmp: Path,
    test: Callable[[Core, list[dict[str, Any]]], Awaitable[None]],
    settings: dict[str, Any] | None = None,
    **spawner: Any,
) -> None:
    """Runs `test`; then checks what the loop reported: no task exception left unretrieved."""
    errors: list[dict[str, Any]] = []

    async def main() -> None:
        asyncio.get_running_loop().set_exception_handler(lambda _, ctx: errors.append(ctx))
        core = build(tmp, settings, **spawner)
        try:
            await test(core, errors)
        finally:
            for agent in core.spawner.alive():
                agent.kill()  # handed over: the next daemon's, which this test has not
            core.store.close()
        gc.collect()  # "Task exception was never retrieved" is reported when a task is freed
        await settle()

    virtual_time.run(main())
    assert errors == [], errors


async def shut_down(core: Core, how: Shutdown) -> float:
    """Runs the shutdown (failing, not hanging, if it has no end); returns its virtual time."""
    loop = asyncio.get_running_loop()
    began = loop.time()
    async with asyncio.timeout(10 * BOUND):
        await how(core)
    took = loop.time() - began
    assert took <= BOUND, f"the shutdown took {took:g} virtual seconds"
    assert core.pool.live_count == 0 and core.pool.slots_used == 0
    assert core.spawner.alive_count == len([a for a in core.spawner.agents if a.detached])
    return took


async def refused(sent: Sent) -> None:
    await sent.wait()
    assert isinstance(sent.error, Unavailable), (sent.kinds, sent.error)
    assert sent.events == [], "a message that never reached an agent has no events"


# --- an agent SPAWNING ---------------------------------------------------------------------------


def test_a_restart_while_the_turns_agent_is_spawning_ends_and_stops_it(tmp_path: Path) -> None:
    async def test(core: Core, errors: list[dict[str, Any]]) -> None:
        await core.registry.create_session(None, None, "a")
        sent = send(core, "a", "hello")
        await asyncio.sleep(0.5)  # in its handshake
        assert core.pool.state("a") == "starting"
        await shut_down(core, restart)
        await refused(sent)
        (agent,) = core.spawner.agents
        assert not agent.alive and not agent.detached and agent.user_messages == []
        assert core.store.history("a", after_id=0, limit=10) == []  # never sent, never stored

    run(tmp_path, test, handshake_seconds=30.0, durable=True)


def test_a_stop_while_the_turns_agent_is_spawning_ends_and_stops_it(tmp_path: Path) -> None:
    async def test(core: Core, errors: list[dict[str, Any]]) -> None:
        await core.registry.create_session(None, None, "a")
        sent = send(core, "a", "hello")
        await asyncio.sleep(0.5)
        took = await shut_down(core, stop)
        assert took < 5, "the spawn is abandoned, not waited for"
        await sent.wait()
        assert core.spawner.agents[0].user_messages == []

    run(tmp_path, test, handshake_seconds=30.0)


def test_a_restart_while_a_spare_is_spawning_stops_it(tmp_path: Path) -> None:
    async def test(core: Core, errors: list[dict[str, Any]]) -> None:
        core.pool.replenish_spares()
        await asyncio.sleep(0.5)
        assert core.pool.spare_count == 1 and core.spawner.agents
        await shut_down(core, restart)
        assert not core.spawner.agents[0].alive

    run(tmp_path, test, {"pool.spares": 1}, handshake_seconds=30.0, durable=True)


# --- a lease waiting for a slot ------------------------------------------------------------------


def test_a_restart_while_a_lease_waits_for_a_slot_refuses_it(tmp_path: Path) -> None:
    async def test(core: Core, errors: list[dict[str, Any]]) -> None:
        await core.registry.create_session(None, None, "a")
        await core.registry.create_session(None, None, "b")
        running = send(core, "a", "[[hold]]")
        await asyncio.sleep(1)
        waiting = send(core, "b", "hello")
        await asyncio.sleep(1)
        assert core.pool.queued == 1
        await shut_down(core, restart)
        await refused(waiting)
        # The running turn's agent is handed over with it, alive; b never got one.
        (agent,) = core.spawner.agents
        assert agent.detached and agent.alive
        running.task.cancel()
        await settle()

    run(tmp_path, test, {"pool.max_live": 1}, durable=True)


def test_a_stop_while_a_lease_waits_for_a_slot_refuses_it(tmp_path: Path) -> None:
    async def test(core: Core, errors: list[dict[str, Any]]) -> None:
        await core.registry.create_session(None, None, "a")
        await core.registry.create_session(None, None, "b")
        running = send(core, "a", "[[hold]]")
        await asyncio.sleep(1)
        waiting = send(core, "b", "hello")
        await asyncio.sleep(1)
        await shut_down(core, stop)
        await running.wait()
        await waiting.wait()
        assert waiting.error is not None or waiting.terminal is not None
        assert len(core.spawner.agents) == 1

    run(tmp_path, test, {"pool.max_live": 1})


# --- an eviction under way -----------------------------------------------------------------------


async def evicting(core: Core) -> Sent:
    """a's agent idle in the only slot; b's message evicts it (a slow stop)."""
    await core.registry.create_session(None, None, "a")
    await core.registry.create_session(None, None, "b")
    await send(core, "a", "hi").wait()
    sent = send(core, "b", "hello")
    await asyncio.sleep(0.5)
    assert core.pool.state("a") == "idle" and core.pool.agent("a") is not None  # STOPPING
    return sent


def test_a_restart_during_an_eviction_refuses_the_waiting_lease(tmp_path: Path) -> None:
    async def test(core: Core, errors: list[dict[str, Any]]) -> None:
        sent = await evicting(core)
        await shut_down(core, restart)
        await refused(sent)
        assert len(core.spawner.agents) == 1, "nothing is spawned for the refused lease"

    run(tmp_path, test, {"pool.max_live": 1}, stop_seconds=10.0, durable=True)


def test_a_restart_during_the_spawn_an_eviction_made_room_for(tmp_path: Path) -> None:
    async def test(core: Core, errors: list[dict[str, Any]]) -> None:
        sent = await evicting(core)
        await asyncio.sleep(2.0)  # a is gone; b's agent is in its handshake
        assert core.pool.agent("a") is None and core.pool.state("b") == "starting"
        await shut_down(core, restart)
        await refused(sent)
        assert [a.alive for a in core.spawner.agents] == [False, False]

    run(tmp_path, test, {"pool.max_live": 1}, handshake_seconds=5.0, stop_seconds=1.0, durable=True)


# --- a second signal -----------------------------------------------------------------------------


def test_a_second_signal_during_a_restart_still_ends_it(tmp_path: Path) -> None:
    async def test(core: Core, errors: list[dict[str, Any]]) -> None:
        await core.registry.create_session(None, None, "a")
        sent = send(core, "a", "hello")
        await asyncio.sleep(0.5)

        async def restart_then_kill(core: Core) -> None:
            shutdown = asyncio.ensure_future(restart(core))
            await settle()
            core.pool.kill_all()  # what a second SIGTERM does
            await shutdown

        await shut_down(core, restart_then_kill)
        await refused(sent)

    run(tmp_path, test, handshake_seconds=30.0, stop_seconds=30.0, durable=True)


def test_agents_that_do_not_stop_are_killed_and_the_close_still_ends(tmp_path: Path) -> None:
    async def test(core: Core, errors: list[dict[str, Any]]) -> None:
        await core.registry.create_session(None, None, "a")
        await send(core, "a", "hi").wait()
        # A stop that never returns (a process that cannot be reaped): the pool gives up.
        agent = core.spawner.agents[0]

        async def stuck(grace: float) -> int | None:
            await asyncio.get_running_loop().create_future()
            return None

        agent.stop = stuck  # type: ignore[method-assign]
        loop = asyncio.get_running_loop()
        began = loop.time()
        async with asyncio.timeout(10 * BOUND):
            await core.registry.drain(1.0)
            await core.pool.close()
        assert loop.time() - began <= core.pool.close_bound() + 1
        assert not agent.alive, "it was killed"

    run(tmp_path, test)
