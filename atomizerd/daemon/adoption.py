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

import asyncio
import time
from dataclasses import dataclass, field
from pathlib import Path

import structlog

from atomizerd.agents import protocol as proto
from atomizerd.agents import shim_client, shim_codec
from atomizerd.agents.pool import AgentPool
from atomizerd.agents.process import AgentProcess
from atomizerd.agents.transport import PooledTransport
from atomizerd.agents.vocabulary import AgentExited
from atomizerd.config import Config
from atomizerd.sessions import events as ev
from atomizerd.sessions.journal import Resumed
from atomizerd.sessions.registry import Registry
from atomizerd.store.db import Store

log = structlog.get_logger("atomizerd.daemon.adoption")

_ATTACH_TIMEOUT = 5.0
# How long a replayed message of a stored turn may take to arrive (it is local data).
_READ_PAST_WAIT = 0.5


@dataclass
class Adopted:
    """What start-up took over from the previous daemon."""

    pgids: set[int] = field(default_factory=set)  # agents' and shims' process groups
    sessions: set[str] = field(default_factory=set)
    turns: set[str] = field(default_factory=set)  # turn ids that go on
    # What streamed of turns whose shim is gone (orphaned, killed), from the journal it left:
    # turn id -> the reply's text. Crash recovery stores these instead of the checkpoint.
    replies: dict[str, str] = field(default_factory=dict)
    # Groups of agents (and their shims) adoption stopped itself: ended, their files removed
    # (shim_client.ShimLink._end_shim); crash recovery only forgets their records.
    ended: set[int] = field(default_factory=set)
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
    pending_sessions = set(unfinished.values())
    settings = shim_settings(cfg)
    rejected: list[AgentProcess] = []
    for path in shim_client.shim_sockets(settings.sockets):
        try:
            link, replay, chunks = await shim_client.attach(path, timeout=_ATTACH_TIMEOUT)
        except shim_client.ShimError as e:
            _forget_dead_shim(path, settings, e, adopted)
            continue
        link.reap = True
        session_id = process_session(replay)
        try:
            resumed = Resumed.from_replay(session_id, replay.records, replay.inputs)
        except Exception as e:  # e.g. records of another version: the turn cannot go on
            log.warning(
                "a running turn's record cannot be read", session_id=session_id, error=str(e)
            )
            resumed, replay.hello["lost"] = None, True
        running = resumed is not None and unfinished.get(resumed.turn_id) == session_id
        # An idle agent's shim holds only what no daemon took (the previous one let go of
        # each line it read): what the agent did on its own meanwhile (a task that ended, the
        # turn it started about it) is read like anything it says while idle.
        process = shim_client.adopted_process(link, replay, chunks, settings)
        if resumed is not None and not running:
            # A turn that ended (and is stored) whose record was not let go yet (the daemon
            # died in between): what it accounted for is read past, the rest is new.
            await _read_past(process, resumed.consumed)
        if not running and session_id in pending_sessions:
            # Mid-turn, but without a record to go on from: stopped, the turn settled.
            why: str | None = "its session's turn was left running but cannot go on"
        else:
            why = _take(store, pool, registry, process, replay, resumed if running else None)
        if why is not None:
            log.info("agent left by the previous daemon stopped", pid=process.pid, reason=why)
            rejected.append(process)
            continue
        if resumed is not None and not running:
            process.forget_before(process.boundary[0])
        adopted.sessions.add(session_id)
        adopted.pgids.update(_groups_of(process))
        if running and resumed is not None:
            adopted.turns.add(resumed.turn_id)
    _take_left_journals(settings, adopted)
    # Stopped together: each may take its stop grace twice.
    await asyncio.gather(*(p.stop(cfg.agent.stop_grace) for p in rejected))
    for process in rejected:
        if not process.alive:
            adopted.ended.update(_groups_of(process))
    adopted.seconds = time.monotonic() - started
    if adopted.sessions or rejected:
        log.info(
            "agents adopted from the previous daemon",
            agents=len(adopted.sessions),
            running_turns=len(adopted.turns),
            stopped=len(rejected),
            seconds=round(adopted.seconds, 3),
        )
    return adopted


async def _read_past(process: AgentProcess, consumed: int) -> None:
    """Takes the agent's replayed messages of a stored turn, quietly: the `consumed` its record
    accounted for and, when those do not end with the turn's result (the daemon died before
    the last of its record left), on through that result. The replay is local data: a message
    that does not come at once means there is no more."""
    ended = False
    while not (ended and process.received >= consumed):
        try:
            item = await asyncio.wait_for(process.receive(), _READ_PAST_WAIT)
        except TimeoutError:
            return
        if isinstance(item, AgentExited):
            return
        ended = isinstance(item, proto.Result)
        if ended and process.received > consumed:
            return  # the stored turn's end, past its record: what follows is new


def _groups_of(process: PooledTransport) -> set[int]:
    """The agent's process group and its shim's."""
    return {process.pgid} | ({process.helper.pgid} if process.helper is not None else set())


def _forget_dead_shim(
    path: Path, settings: shim_client.ShimSettings, e: Exception, adopted: Adopted
) -> None:
    """A socket nobody answers on: its shim was killed (its agent died with it). Its turn's
    record is read, what it left removed; a shim that is alive but did not answer in time is
    left to its orphan timeout."""
    if isinstance(e.__cause__, ConnectionRefusedError | FileNotFoundError):
        name = path.stem
        _read_left_journal(settings.spools / f"{name}.out.journal", adopted)
        shim_client.remove_shim_files(path, settings.spools / f"{name}.out")
        log.info("removed what a dead agent shim left", shim=name)
    else:
        log.warning("agent shim not reachable; left to its orphan timeout", error=str(e))


def _take_left_journals(settings: shim_client.ShimSettings, adopted: Adopted) -> None:
    """Journals shims left on exit (the turn's record of an agent stopped at its orphan
    timeout): read, then removed. A journal beside a socket is a live shim's."""
    for journal in sorted(settings.spools.glob("*.out.journal")):
        name = journal.name.removesuffix(".out.journal")
        socket_path = settings.sockets / f"{name}.sock"
        if socket_path.exists():
            continue
        _read_left_journal(journal, adopted)
        shim_client.remove_shim_files(socket_path, settings.spools / f"{name}.out")


def _read_left_journal(path: Path, adopted: Adopted) -> None:
    """The reply of the turn a gone shim's journal holds, as it streamed (its text deltas:
    every event reached the journal before any client)."""
    try:
        frames, _ = shim_codec.split_frames(path.read_bytes())
        records = [payload for kind, payload in frames if kind == shim_codec.JOURNAL]
        inputs = [payload for kind, payload in frames if kind == shim_codec.INPUT]
        resumed = Resumed.from_replay("", records, inputs)
    except FileNotFoundError:
        return
    except Exception as e:  # unreadable (another version's): the checkpoint stands
        log.warning("a left turn record cannot be read", journal=path.name, error=str(e))
        return
    if resumed is not None:
        text = "".join(e.kind.text for e in resumed.events if isinstance(e.kind, ev.TextDelta))
        adopted.replies[resumed.turn_id] = text


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
    if replay.hello.get("exited") is not None:
        return "it has exited"
    if replay.lost:
        return "its turn's record was lost (over agent.spool_bytes, or unreadable)"
    record = store.get_session(session_id) if session_id else None
    if record is None or record.closed:
        return "its session is gone or closed"
    if store.host_id is not None and record.host_id != store.host_id:
        return "its session belongs to another host"
    if record.agent_session_id != replay.label.get("agent_session_id"):
        return "its session moved to another conversation"
    agent = pool.adopt(session_id, process, leased=resumed is not None)
    if agent is None:
        return "no free slot in the pool"
    registry.restore_tasks(session_id)
    if resumed is not None:
        registry.resume_turn(agent, resumed)
    return None
