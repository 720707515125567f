"""The sessions loaded in memory, and which of them this daemon serves.

Sessions are loaded lazily (the daemon starts in constant time however many are stored, and no
request scans them all) and forgotten when nobody uses them (`unload_idle`). This table is the
one owner of the `Session` objects; a session's record is replaced only by what the store
returns after a write (`write`).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field

from atomizerd import ids
from atomizerd.agents.pool import AgentPool
from atomizerd.config import Config
from atomizerd.errors import FailedPrecondition, NotFound, Unavailable
from atomizerd.model import SessionRecord
from atomizerd.sessions import events as ev
from atomizerd.sessions.session import SESSION_TRANSITIONS, Session, SessionState
from atomizerd.sessions.tasks import TaskInfo, TaskTable
from atomizerd.statemachine import Lifecycle
from atomizerd.store.db import Store


@dataclass
class SessionView:
    """A snapshot of one session for the API."""

    record: SessionRecord
    state: str
    last_seq: int
    queued_turns: int = 0
    mcp_servers: list[tuple[str, str]] = field(default_factory=list)
    tasks: list[TaskInfo] = field(default_factory=list)
    usage: ev.LiveUsage | None = None  # the last usage reported (None: none yet)


class SessionTable:
    def __init__(self, config: Config, store: Store, pool: AgentPool) -> None:
        self.config = config
        self.store = store
        self.pool = pool
        self.replay = ev.ReplayBudget(config.daemon.replay_bytes_total)
        self.sessions: dict[str, Session] = {}
        self.draining = False
        # Builds a loaded session's task table (its hooks live with the agent's work).
        self.task_table: Callable[[Session], TaskTable] = lambda _s: TaskTable()

    def check_open(self) -> None:
        if self.draining:
            raise Unavailable("atomizerd is shutting down; retry in a moment")

    def load(self, session_id: str) -> Session:
        ids.check_session_id(session_id)
        s = self.sessions.get(session_id)
        if s is not None:
            return s
        record = self.store.get_session(session_id)
        if record is None:
            raise NotFound(f"session {session_id!r} does not exist")
        initial = SessionState.CLOSED if record.closed else SessionState.OPEN
        s = Session(
            record=record,
            log=self.new_log(session_id),
            next_seq=record.seq_reserved + 1,
            lifecycle=Lifecycle(f"session {session_id}", initial, SESSION_TRANSITIONS),
        )
        s.tasks = self.task_table(s)
        if not self.owns(record):
            # Another host's session: read as stored, never kept (its own daemon changes it).
            return s
        self.sessions[session_id] = s
        return s

    def owns(self, record: SessionRecord) -> bool:
        """Whether this daemon serves the session (its host's; a store without a host: all)."""
        return self.store.host_id is None or record.host_id == self.store.host_id

    def require_own(self, s: Session) -> None:
        """Work that needs the session's agent or its live events runs on its own host only."""
        if self.owns(s.record):
            return
        owner = s.record.host_id
        raise FailedPrecondition(
            f"session {s.id!r} belongs to host {owner!r}, not to this daemon's host "
            f"{self.store.host_id!r}: use the atomizerd on {owner!r} (its socket there), or move "
            "the session (docs/operations.md)"
        )

    def require_open(self, s: Session) -> None:
        if s.state is SessionState.CLOSING:
            raise FailedPrecondition(f"session {s.id!r} is being terminated")
        if s.state is SessionState.CLOSED:
            raise FailedPrecondition(
                f"session {s.id!r} is closed; CreateSession with session_id={s.id!r} reopens it"
            )

    def serving(self, session_id: str) -> Session:
        """A session of this host for work on it (its agent, its events)."""
        s = self.load(session_id)
        self.require_own(s)
        return s

    def new_log(self, session_id: str) -> ev.EventLog:
        d = self.config.daemon
        return ev.EventLog(
            session_id,
            d.replay_bytes,
            self.replay,
            lag_bytes=d.follower_lag_bytes,
            max_events=d.event_buffer,
        )

    def write(self, s: Session, **fields: object) -> SessionRecord:
        record = self.store.update_session(s.id, **fields)
        if record is None:  # purged meanwhile
            raise NotFound(f"session {s.id!r} does not exist")
        return record

    def state_of(self, s: Session) -> str:
        if s.state is not SessionState.OPEN:
            return "closed"
        if s.turn is not None:
            return "busy"
        return self.pool.state(s.id)

    def view(self, s: Session) -> SessionView:
        return SessionView(
            record=s.record,
            state=self.state_of(s),
            last_seq=s.next_seq - 1,
            queued_turns=s.queued_turns,
            mcp_servers=self.pool.mcp_servers(s.id),
            tasks=s.tasks.running(),
            usage=s.usage or stored_usage(s.record),
        )

    def view_record(self, record: SessionRecord) -> SessionView:
        s = self.sessions.get(record.session_id)
        if s is not None:  # loaded: its in-memory record is the current one
            return self.view(s)
        state = "closed" if record.closed else "idle"
        return SessionView(
            record=record, state=state, last_seq=record.seq_reserved, usage=stored_usage(record)
        )

    def counts(self) -> dict[str, int]:
        busy = sum(1 for s in self.sessions.values() if s.turn is not None)
        queued = sum(s.queued_turns for s in self.sessions.values())
        return {"busy": busy, "queued": queued + self.pool.queued}

    def unload_idle(self, older_than: float) -> int:
        """Forgets the in-memory state of sessions nobody uses (no work, no watcher, no live
        agent, inactive since `older_than`): memory stays bounded however many sessions a
        long-running daemon has served. They load again from the store on demand."""
        idle = [
            s
            for s in self.sessions.values()
            if s.idle
            and not s.watchers
            and self.pool.agent(s.id) is None
            and s.record.last_active_at < older_than
        ]
        for s in idle:
            self.forget(s)
        return len(idle)

    def forget(self, s: Session) -> None:
        if self.sessions.get(s.id) is s:
            del self.sessions[s.id]
        s.log.close()


def stored_usage(record: SessionRecord) -> ev.LiveUsage | None:
    """The usage stored at the last turn's end (None: no turn has reported one)."""
    try:
        fields = json.loads(record.last_usage or "{}")
        return ev.LiveUsage(**fields) if fields else None
    except (ValueError, TypeError):  # a shape from another version
        return None
