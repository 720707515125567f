"""The daemon's core assembled in process: registry, turn runner and pool over a real SQLite
store and the real launcher, with scripted agents and (with `virtual_time.run`) a virtual
clock. No sockets, no subprocesses: every interleaving is reproducible."""

from __future__ import annotations

import asyncio
import functools
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import atomizerd.config as config_mod
from atomizerd.agents.pool import AgentPool
from atomizerd.atomizer.launcher import Launcher
from atomizerd.atomizer.prompt import ContextBuilder
from atomizerd.atomizer.studies import Studies
from atomizerd.errors import AtomizerError
from atomizerd.sessions import events as ev
from atomizerd.sessions.registry import Registry, spare_record
from atomizerd.store.db import Store
from tests.support import virtual_time
from tests.support.scripted_agent import ScriptedSpawner


@dataclass
class Core:
    config: config_mod.Config
    store: Store
    pool: AgentPool
    registry: Registry
    spawner: ScriptedSpawner

    async def close(self) -> None:
        await self.registry.drain(1.0)
        await self.pool.close()
        self.store.close()


def build(tmp: Path, settings: Mapping[str, Any] | None = None, **spawner: Any) -> Core:
    overrides = {
        "daemon.runtime_dir": str(tmp / "run"),
        "daemon.state_dir": str(tmp / "state"),
        "atomizer.root": str(tmp / "root"),
        "agent.prewarm": "false",
        "agent.stop_grace": "1",
        # A title is asked for with a control request of its own; the tests that count the
        # agent's requests do not expect it (titles have tests of their own).
        "agent.titles": "false",
        "pool.spares": "0",
        # Scripted agents run no Bash: the sandbox (and its probe of bubblewrap) is not theirs.
        "sandbox.enabled": "false",
    }
    overrides.update({k: str(v) for k, v in (settings or {}).items()})
    (tmp / "root" / "studies").mkdir(parents=True, exist_ok=True)
    cfg = config_mod.load(None, environ={}, overrides=overrides)
    store = Store(cfg.daemon.database)
    studies = Studies(cfg)
    launcher = Launcher(cfg, studies, ContextBuilder())
    scripted = ScriptedSpawner(**spawner)
    pool = AgentPool(
        cfg, store, launcher, scripted, spare_record=functools.partial(spare_record, cfg)
    )
    registry = Registry(cfg, store, pool, studies, launcher.context_text)
    return Core(cfg, store, pool, registry, scripted)


@dataclass
class Sent:
    """A SendMessage in flight: its events as they arrive, and its error if it was refused."""

    events: list[ev.SessionEvent]
    task: asyncio.Task[None]
    error: AtomizerError | None = None

    @property
    def kinds(self) -> list[str]:
        return [type(e.kind).__name__ for e in self.events]

    @property
    def terminal(self) -> ev.EventKind | None:
        return self.events[-1].kind if self.events and self.events[-1].terminal else None

    async def wait(self) -> Sent:
        await self.task
        return self


def send(
    core: Core, session_id: str, text: str, request_id: str = "", *, steer: bool = False
) -> Sent:
    """Starts a SendMessage like a client would; the stream is read in the background."""
    events: list[ev.SessionEvent] = []
    sent = Sent(events, None)  # type: ignore[arg-type]

    async def read() -> None:
        try:
            stream = core.registry.send_message(session_id, text, request_id, steer=steer)
            async for event in stream:
                events.append(event)
        except AtomizerError as e:
            sent.error = e

    sent.task = asyncio.ensure_future(read())
    return sent


async def settle(rounds: int = 50) -> None:
    """Lets every task that can run, run (without moving the clock)."""
    for _ in range(rounds):
        await asyncio.sleep(0)


def run(
    tmp: Path,
    test: Callable[[Core], Awaitable[None]],
    settings: Mapping[str, Any] | None = None,
    **spawner: Any,
) -> None:
    """Runs `test` on a core built in `tmp`, on the virtual clock, and closes the core (within
    a minute of virtual time: a close that hangs fails the test instead of stalling the run)."""

    async def main() -> None:
        core = build(tmp, settings, **spawner)
        try:
            await test(core)
        finally:
            await asyncio.wait_for(core.close(), 60)

    virtual_time.run(main())


def text_of(sent: Sent) -> str:
    return "".join(e.kind.text for e in sent.events if isinstance(e.kind, ev.TextDelta))
