"""At start-up: the agents a previous daemon left running under their shims join this one.

Each shim socket in `<runtime_dir>/agents/` is an agent that outlived its daemon (a planned
restart, a crash). Its label names the session it serves; if that session is this host's, open,
and on the same conversation, the agent is adopted: READY in the pool, or LEASED to the turn it
is running, which goes on where it was (`Registry.resume_turn`, sessions/journal.py). Anything
else (a session gone or closed since, a spare, no free slot, a turn whose record was lost) is
stopped, and its turn, if any, is settled as interrupted like any turn of a crashed daemon.

What is adopted is returned, so crash recovery leaves exactly these processes and turns alone.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import structlog

from atomizerd.agents import shim_client
from atomizerd.agents.pool import AgentPool
from atomizerd.agents.process import AgentProcess
from atomizerd.daemon.config import Config
from atomizerd.sessions.journal import Resumed
from atomizerd.sessions.registry import Registry
from atomizerd.store.db import Store

log = structlog.get_logger("atomizerd.daemon.adoption")

_ATTACH_TIMEOUT = 5.0


@dataclass
class Adopted:
    """What start-up took over from the previous daemon."""

    pgids: set[int] = field(default_factory=set)  # agents' and shims' process groups
    sessions: set[str] = field(default_factory=set)
    turns: set[str] = field(default_factory=set)  # turn ids that go on
    seconds: float = 0.0  # from the first attach to the last adoption


def shim_settings(cfg: Config) -> shim_client.ShimSettings:
    a = cfg.agent
    return shim_client.ShimSettings(
        sockets=cfg.runtime_dir / "agents",
        spools=cfg.state_dir / "agent-spool",
        orphan_timeout=a.orphan_timeout,
        spool_bytes=a.spool_bytes,
        stop_grace=a.stop_grace,
        max_line_bytes=a.max_line_bytes,
        stderr_tail_bytes=a.stderr_tail_bytes,
        write_timeout=a.write_timeout,
    )


async def adopt_agents(cfg: Config, store: Store, pool: AgentPool, registry: Registry) -> Adopted:
    adopted = Adopted()
    started = time.monotonic()
    unfinished = store.unfinished_turns()
    settings = shim_settings(cfg)
    for path in shim_client.shim_sockets(settings.sockets):
        try:
            link, replay, chunks = await shim_client.attach(path, timeout=_ATTACH_TIMEOUT)
        except shim_client.ShimError as e:
            log.warning("agent shim not reachable; left to its orphan timeout", error=str(e))
            continue
        resumed = Resumed.from_replay(
            str(replay.label.get("session_id", "")), replay.records, replay.inputs
        )
        running = resumed is not None and resumed.turn_id in unfinished
        if not running:
            # An idle agent: what the shim still holds is of turns that ended (and are
            # stored); this daemon reads on from after it.
            replay.hello["base"] = replay.base + sum(len(c) for c in chunks)
            chunks = []
        link.reap = True
        process = shim_client.adopted_process(
            link,
            replay,
            chunks,
            max_line_bytes=settings.max_line_bytes,
            stderr_tail_bytes=settings.stderr_tail_bytes,
            write_timeout=settings.write_timeout,
        )
        if not running:
            process.forget_before(replay.base)
        why = _take(store, pool, registry, process, replay, resumed if running else None)
        if why is None:
            adopted.sessions.add(process_session(replay))
            adopted.pgids.add(process.pgid)
            if process.helper is not None:
                adopted.pgids.add(process.helper.pgid)
            if running and resumed is not None:
                adopted.turns.add(resumed.turn_id)
        else:
            log.info("agent left by the previous daemon stopped", pid=process.pid, reason=why)
            await process.stop(cfg.agent.stop_grace)
    adopted.seconds = time.monotonic() - started
    if adopted.sessions:
        log.info(
            "agents adopted from the previous daemon",
            agents=len(adopted.sessions),
            running_turns=len(adopted.turns),
            seconds=round(adopted.seconds, 3),
        )
    return adopted


def process_session(replay: shim_client.Replay) -> str:
    return str(replay.label.get("session_id", ""))


def _take(
    store: Store,
    pool: AgentPool,
    registry: Registry,
    process: AgentProcess,
    replay: shim_client.Replay,
    resumed: Resumed | None,
) -> str | None:
    """Adopts the agent (and resumes its running turn); or why not (the caller stops it)."""
    session_id = process_session(replay)
    if not process.alive:
        return "it has exited"
    record = store.get_session(session_id) if session_id else None
    if record is None or record.closed:
        return "its session is gone or closed"
    if store.host_id is not None and record.host_id != store.host_id:
        return "its session belongs to another host"
    if record.agent_session_id != replay.label.get("agent_session_id"):
        return "its session moved to another conversation"
    if resumed is not None and replay.lost:
        return "its turn wrote more than agent.spool_bytes while no daemon read it"
    agent = pool.adopt(session_id, process, leased=resumed is not None)
    if agent is None:
        return "no free slot in the pool"
    if resumed is not None:
        registry.resume_turn(agent, resumed)
    return None
