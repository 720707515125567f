"""A session loaded in memory: its stored record, its lifecycle, its queue of work, its events.

The session lifecycle (docs/architecture.md, "Session"):

    OPEN ──▶ CLOSING ──▶ CLOSED ──▶ OPEN (CreateSession with its id reopens it)

CLOSING refuses new work at once; the running turn is stopped, queued turns end with
SESSION_TERMINATED, the agent is stopped, then the session is CLOSED (or purged).

Work for a session runs one job at a time, in order: turns and changes of its mode or study
(a change waits for the turn before it, so a running turn finishes under the settings it
started with). The registry owns these objects; `record` is replaced only by what the store
returns after a write, never edited by hand.
"""

from __future__ import annotations

import asyncio
import enum
from collections import OrderedDict, deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

from atomizerd.model import SessionRecord
from atomizerd.sessions import events as ev
from atomizerd.sessions.approvals import Decision
from atomizerd.sessions.conversation import Causes, UntakenLines
from atomizerd.sessions.tasks import TaskTable
from atomizerd.sessions.turns import Turn
from atomizerd.statemachine import Lifecycle

# Answers to permission requests of finished turns remembered per session, so a late answer is
# told it came too late (FAILED_PRECONDITION) instead of "unknown request".
RECENT_DECISIONS = 256


class SessionState(enum.Enum):
    OPEN = "open"
    CLOSING = "closing"
    CLOSED = "closed"


SESSION_TRANSITIONS: dict[SessionState, frozenset[SessionState]] = {
    SessionState.OPEN: frozenset({SessionState.CLOSING}),
    SessionState.CLOSING: frozenset({SessionState.CLOSED}),
    SessionState.CLOSED: frozenset({SessionState.OPEN, SessionState.CLOSING}),
}


@dataclass(eq=False)
class Change:
    """A change of the session's settings, run in order with its turns."""

    apply: Callable[[], Awaitable[None]]
    done: asyncio.Future[None] = field(
        default_factory=lambda: asyncio.get_running_loop().create_future()
    )


Job = Turn | Change


@dataclass(eq=False)
class Session:
    record: SessionRecord
    log: ev.EventLog
    next_seq: int
    lifecycle: Lifecycle[SessionState]
    inbox: deque[Job] = field(default_factory=deque)
    current: Job | None = None
    worker: asyncio.Task[None] | None = None
    closing: asyncio.Task[None] | None = None
    watchers: int = 0
    # Unfinished turns by their client's request_id (finished ones are found in the store).
    by_request: dict[str, Turn] = field(default_factory=dict)
    decisions: OrderedDict[str, Decision] = field(default_factory=OrderedDict)
    # What the agent runs on its own, and the client lines written into running turns whose
    # replay has not come yet (sessions/conversation.py); both live as long as its agent.
    tasks: TaskTable = field(default_factory=TaskTable)
    # The usage the agent reported last (a usage event), newer than the stored one mid-turn.
    usage: ev.LiveUsage | None = None
    untaken: UntakenLines = field(default_factory=UntakenLines)
    # Why the agent will start turns of its own (tasks that ended, wake-ups that fired).
    causes: Causes = field(default_factory=Causes)
    # Background commands whose output is being streamed, by task id.
    tails: dict[str, asyncio.Task[None]] = field(default_factory=dict)

    @property
    def id(self) -> str:
        return self.record.session_id

    @property
    def state(self) -> SessionState:
        return self.lifecycle.state

    @property
    def turn(self) -> Turn | None:
        """The turn being run now (waiting for an agent or running), if any."""
        return self.current if isinstance(self.current, Turn) else None

    @property
    def queued_turns(self) -> int:
        return sum(1 for job in self.inbox if isinstance(job, Turn))

    @property
    def idle(self) -> bool:
        return self.current is None and not self.inbox and self.closing is None

    def remember_decisions(self, turn: Turn) -> None:
        if turn.approvals is None:
            return
        for request_id, decision in turn.approvals.decided.items():
            self.decisions[request_id] = decision
        while len(self.decisions) > RECENT_DECISIONS:
            self.decisions.popitem(last=False)
