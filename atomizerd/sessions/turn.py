"""One turn and what it said: the turn lifecycle and its transcript.

The turn lifecycle (docs/architecture.md, "Turn"):

    QUEUED ──▶ WAITING ──▶ RUNNING ──▶ ENDING ──▶ DONE
       │          │                      ▲          ▲
       │          └──────────────────────┤          │
       └─────────────────────────────────┴──────────┘ (rejected: nothing stored)

QUEUED: behind the session's earlier work. WAITING: leasing an agent from the pool (a spawn,
or a bounded wait for a slot); an interrupt, termination or shutdown ends it here at once.
RUNNING: the user message is committed (before the agent sees it) and announced; the agent's
output becomes session events until its `result` line. ENDING: pending permission requests
are settled, the outcome is stored. DONE: the terminal event is out; nothing of this turn is
emitted after it. A client going away changes none of this. The transitions are in one place,
`TURN_TRANSITIONS`; the turn runner (sessions/turns.py) makes them.
"""

from __future__ import annotations

import asyncio
import enum
import uuid as uuidlib
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from atomizerd.errors import AtomizerError
from atomizerd.model import ToolCallRecord
from atomizerd.sessions import events as ev
from atomizerd.sessions.attachments import Attachment
from atomizerd.statemachine import Lifecycle

if TYPE_CHECKING:
    from atomizerd.agents.pool import Agent
    from atomizerd.sessions.approvals import Approvals
    from atomizerd.sessions.journal import Resumed, TurnJournal
    from atomizerd.sessions.session import Session

Emit = Callable[[ev.EventKind], ev.SessionEvent]
# The registry's numbering of an event of a session, for a turn or (None) for none.
EmitFor = Callable[["Session", "Turn | None", ev.EventKind], ev.SessionEvent]

# The uuids of the lines the daemon writes are derived from their turn's id, so a daemon that
# adopts a running turn after a restart knows which replay answers it.
_LINE_NAMESPACE = uuidlib.UUID("6f1d3c1e-6a0b-4d2b-9a57-3b0f0d9e2c11")


def line_uuid(turn_id: str) -> str:
    """The uuid of the user line of turn `turn_id` (the CLI keys its file checkpoints by it)."""
    return str(uuidlib.uuid5(_LINE_NAMESPACE, turn_id))


# Events a turn emits before its message reaches the agent: its start and a few notices.
_OPENING_MAX = 16


class TurnState(enum.Enum):
    QUEUED = "queued"
    WAITING = "waiting"
    RUNNING = "running"
    ENDING = "ending"
    DONE = "done"


T = TurnState
TURN_TRANSITIONS: dict[TurnState, frozenset[TurnState]] = {
    T.QUEUED: frozenset({T.WAITING, T.ENDING, T.DONE}),
    T.WAITING: frozenset({T.RUNNING, T.ENDING, T.DONE}),
    T.RUNNING: frozenset({T.ENDING}),
    T.ENDING: frozenset({T.DONE}),
    T.DONE: frozenset(),
}


class Turn:
    """One message's turn. Its events are in the session's log; the sender follows them from
    `start_cursor` (the session's last seq when the turn was accepted)."""

    def __init__(self, turn_id: str, text: str, request_id: str, start_cursor: int) -> None:
        self.turn_id = turn_id
        self.text = text
        self.request_id = request_id
        self.start_cursor = start_cursor
        self.lifecycle: Lifecycle[TurnState] = Lifecycle(
            f"turn {turn_id}", T.QUEUED, TURN_TRANSITIONS
        )
        self.done = asyncio.Event()
        # Set when the turn was refused before its message was stored (the pool is full, the
        # disk is full, the daemon is stopping): the sender gets it as its status.
        self.rejected: AtomizerError | None = None
        self.stop_requested = asyncio.Event()
        # Why the turn is being ended early, when it is not a user's interrupt (termination,
        # shutdown): its terminal event is then TurnFailed with this code.
        self.stop_reason: tuple[str, str] | None = None
        self.terminal: ev.SessionEvent | None = None
        # How many clients follow the turn (its sender, the session's watchers): a permission
        # request with nobody to answer it is denied at once.
        self.listeners = 0
        self.audience: Callable[[], int] = lambda: self.listeners
        self.approvals: Approvals | None = None
        # Files sent with the message (checked: sessions/attachments.py).
        self.attachments: tuple[Attachment, ...] = ()
        # The JSON Schema its answer must satisfy (SendMessageRequest.output_schema): the
        # agent takes it at start-up, so the turn gets an agent of its own.
        self.output_schema: dict[str, object] | None = None
        # The mode an allowed ExitPlanMode switched the session to during this turn.
        self.left_plan: str | None = None
        # Its events left with the agent's shim, when the agent outlives the daemon; before the
        # message reaches such an agent, the events so far wait in `opening`.
        self.journal: TurnJournal | None = None
        self.opening: list[ev.SessionEvent] = []
        # A turn a previous daemon left running, adopted with its agent at start-up.
        self.resumed: tuple[Agent, Resumed] | None = None
        # Who started it; a turn the agent started runs on the agent it started in, leased
        # the moment its output was seen (`leased`).
        self.origin = ev.TurnOrigin.CLIENT
        self.leased: Agent | None = None
        # True for a job that follows a turn the agent started (it writes no line).
        self.follows_agent = False

    @property
    def line_uuid(self) -> str:
        """The uuid of the user line this turn writes (replayed when the agent takes it)."""
        return line_uuid(self.turn_id)

    def noted(self, event: ev.SessionEvent) -> None:
        """Every event of the turn passes here before any client can see it."""
        if self.journal is not None:
            self.journal.note(event)
        elif self.state is T.RUNNING and len(self.opening) < _OPENING_MAX:
            self.opening.append(event)

    @property
    def state(self) -> TurnState:
        return self.lifecycle.state

    def interrupt(self) -> None:
        """A user's interrupt: the turn ends as interrupted, with what was said so far."""
        self.stop_requested.set()

    def stop(self, code: str, message: str) -> None:
        """Ends the turn early for the daemon's reasons (termination, shutdown)."""
        if self.stop_reason is None:
            self.stop_reason = (code, message)
        self.stop_requested.set()

    def reject(self, error: AtomizerError) -> None:
        """Refuses a turn whose message was never stored."""
        self.rejected = error
        self.lifecycle.move(T.DONE)
        self.done.set()
        self.stop_requested.set()  # whatever still works for it (a lease, a retry) gives up


@dataclass
class Transcript:
    """What the turn said so far, to store however it ends."""

    # (API message id, content block index, text): a block the CLI withdraws is dropped.
    parts: list[tuple[str, int, str]] = field(default_factory=list)
    # Messages whose text came as deltas; their whole assistant lines repeat it.
    streamed: set[str] = field(default_factory=set)
    tool_calls: dict[str, ToolCallRecord] = field(default_factory=dict)
    agent_cost_usd: float | None = None  # the CLI's cumulative cost at the turn's end
    # How full the context is (the last model call, or a compaction) and its window; 0: unknown.
    context_tokens: int = 0
    context_window: int = 0
    context_input: int = 0  # the last model call's input tokens
    # The usage last reported to clients (a usage event), and of which model call.
    usage: ev.LiveUsage | None = None
    usage_message: str = ""
    # The turn's model (as its calls name it) and each call's estimated cost, by message id.
    model: str = ""
    call_costs: dict[str, float] = field(default_factory=dict)
    agent_uuid: str = ""  # the CLI's uuid of the reply's last assistant line
    origin_kind: str = ""  # who the CLI says started the turn (its result's `origin.kind`)
    unsaved: int = 0  # text bytes since the last checkpoint
    saved_parts: int = 0  # parts already in the stored checkpoint
    rewrite: bool = False  # text was withdrawn: the next checkpoint stores the whole reply

    def estimated_cost(self) -> float:
        return sum(self.call_costs.values())

    def add(self, message_id: str, index: int, text: str) -> None:
        self.parts.append((message_id, index, text))
        self.unsaved += len(text)

    def withdraw(self, message_id: str, from_index: int) -> None:
        self.parts = [p for p in self.parts if p[0] != message_id or p[1] < from_index]
        self.rewrite = True
        self.unsaved += 1  # the stored checkpoint must follow

    def unsaved_text(self) -> tuple[str, bool]:
        """What the next checkpoint stores, and whether it replaces the earlier ones."""
        start = 0 if self.rewrite else self.saved_parts
        text = "".join(p[2] for p in self.parts[start:])
        replace, self.rewrite = self.rewrite, False
        self.saved_parts, self.unsaved = len(self.parts), 0
        return text, replace

    def full_text(self) -> str:
        return "".join(p[2] for p in self.parts)
