"""Session events: what a turn emits, numbered per session, and the log clients follow.

A `SessionEvent` is the domain form of `atomizer.v1.SessionEvent` (the one event vocabulary:
the agent protocol's messages are mapped onto it in `sessions/turns.py`, the API converts it in
`api/convert.py`). An `EventLog` lets any number of followers read from a position and then wait
for more, without a queue per follower: a slow client holds a cursor, not a copy.

Memory is bounded in bytes (docs/architecture.md, "Replay"): each session's log keeps
`max_bytes` of events for clients that re-attach, more while a connected follower still has to
read them (up to `lag_bytes`), and all logs together at most a shared `ReplayBudget`; the oldest
events go first, the newest one always stays. A follower whose cursor fell behind what is kept
gets an `EVENTS_MISSED` notice with the range it missed (the stored history has the
conversation), never a silent gap.
"""

from __future__ import annotations

import asyncio
import enum
import time
from collections import deque
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field

from atomizerd.model import PermissionDenial


@dataclass(frozen=True, slots=True)
class AttachmentInfo:
    """A file sent with the message (its bytes: GetAttachment by sha256)."""

    name: str
    media_type: str
    size: int
    sha256: str


class TurnOrigin(enum.Enum):
    """Who started a turn: a client's message, or the agent on its own (a background task or
    subagent that ended, a prompt it scheduled, anything else it began without being asked)."""

    CLIENT = "client"
    TASK = "task"
    SCHEDULED = "scheduled"
    AGENT = "agent"


@dataclass(frozen=True, slots=True)
class TurnStarted:
    text: str
    request_id: str = ""
    attachments: tuple[AttachmentInfo, ...] = ()
    origin: TurnOrigin = TurnOrigin.CLIENT


@dataclass(frozen=True, slots=True)
class UserMessage:
    """A client's text taken into a running turn (a steer), at the point the agent took it."""

    text: str
    request_id: str = ""


@dataclass(frozen=True, slots=True)
class TextDelta:
    text: str


@dataclass(frozen=True, slots=True)
class ThinkingDelta:
    text: str


@dataclass(frozen=True, slots=True)
class ToolUse:
    id: str
    name: str
    input_json: str
    parent_tool_use_id: str = ""  # a subagent's call: the Task tool use that runs it


@dataclass(frozen=True, slots=True)
class ToolResult:
    tool_use_id: str
    content: str
    is_error: bool
    parent_tool_use_id: str = ""


class TaskKind(enum.Enum):
    BASH = "bash"
    SUBAGENT = "subagent"
    OTHER = "other"


class TaskStatus(enum.Enum):
    COMPLETED = "completed"
    FAILED = "failed"
    STOPPED = "stopped"
    KILLED = "killed"


@dataclass(frozen=True, slots=True)
class TaskStarted:
    """The agent started a task: a background or long Bash command, a subagent."""

    task_id: str
    tool_use_id: str
    kind: TaskKind
    description: str
    background: bool


@dataclass(frozen=True, slots=True)
class TaskOutput:
    """More of a task's output: a background command's new output, a subagent's progress."""

    task_id: str
    text: str


@dataclass(frozen=True, slots=True)
class TaskEnded:
    task_id: str
    status: TaskStatus
    summary: str


@dataclass(frozen=True, slots=True)
class TurnCompleted:
    text: str
    stop_reason: str = ""
    is_error: bool = False
    cost_usd: float = 0.0
    usage: dict[str, int] = field(default_factory=dict)
    duration_ms: int = 0
    num_turns: int = 0
    interrupted: bool = False
    permission_denials: tuple[PermissionDenial, ...] = ()
    result_subtype: str = ""
    # A turn with an output schema: the answer as JSON text ("" when the agent gave none).
    structured_output: str = ""


# Failure codes mirror atomizer.v1.FailureCode (without the prefix).
SPAWN_FAILED = "SPAWN_FAILED"
AGENT_EXITED = "AGENT_EXITED"
FIRST_EVENT_TIMEOUT = "FIRST_EVENT_TIMEOUT"
STALL_TIMEOUT = "STALL_TIMEOUT"
TURN_TIMEOUT = "TURN_TIMEOUT"
LINE_TOO_LONG = "LINE_TOO_LONG"
SESSION_TERMINATED = "SESSION_TERMINATED"
DAEMON_STOPPING = "DAEMON_STOPPING"
RESUME_FAILED = "RESUME_FAILED"
INTERNAL = "INTERNAL"


@dataclass(frozen=True, slots=True)
class TurnFailed:
    code: str
    message: str
    stderr_tail: str = ""


# Notice kinds mirror atomizer.v1.NoticeKind.
API_RETRY = "API_RETRY"
CONTEXT_RESEEDED = "CONTEXT_RESEEDED"
AGENT_STARTED = "AGENT_STARTED"
# The agent died before it received the message; it is started again (safe: nothing was sent).
AGENT_RESTARTED = "AGENT_RESTARTED"
# Events a follower fell behind on were dropped from the replay buffer.
EVENTS_MISSED = "EVENTS_MISSED"
# The agent compacted the conversation (the CLI's compact_boundary).
CONTEXT_COMPACTED = "CONTEXT_COMPACTED"
# The session's budget is spent: a turn the agent started by itself is interrupted.
BUDGET_EXHAUSTED = "BUDGET_EXHAUSTED"
# An MCP server of the agent failed while a turn ran.
MCP_SERVER_FAILED = "MCP_SERVER_FAILED"
# A task ran longer than agent.task_timeout: it was stopped.
TASK_TIMEOUT = "TASK_TIMEOUT"
# RewindFiles restored the agent's file changes.
FILES_REWOUND = "FILES_REWOUND"
# RollbackSession or UndoRollback moved where the conversation goes on.
ROLLED_BACK = "ROLLED_BACK"


@dataclass(frozen=True, slots=True)
class Notice:
    kind: str
    message: str
    attempt: int = 0
    max_retries: int = 0
    retry_delay_ms: int = 0
    error_status: int = 0
    # EVENTS_MISSED: the range of sequence numbers the follower did not get.
    missed_from_seq: int = 0
    missed_to_seq: int = 0
    # CONTEXT_COMPACTED: the conversation's tokens before and after.
    tokens_before: int = 0
    tokens_after: int = 0


@dataclass(frozen=True, slots=True)
class PermissionRule:
    tool_name: str
    rule_content: str = ""


@dataclass(frozen=True, slots=True)
class PermissionSuggestion:
    """One of the CLI's `permission_suggestions` (sessions/rules.py)."""

    type: str
    rules: tuple[PermissionRule, ...] = ()
    behavior: str = ""
    mode: str = ""
    directories: tuple[str, ...] = ()
    destination: str = ""


@dataclass(frozen=True, slots=True)
class PermissionRequest:
    request_id: str
    tool_name: str
    input_json: str
    description: str
    tool_use_id: str
    deadline: float
    suggestions: tuple[PermissionSuggestion, ...] = ()
    plan: str = ""  # ExitPlanMode: the plan the agent asks to carry out


@dataclass(frozen=True, slots=True)
class PermissionDecided:
    request_id: str
    tool_name: str
    allow: bool
    decider: str  # client | rule | timeout | policy | mode
    message: str


@dataclass(frozen=True, slots=True)
class QuestionOption:
    label: str
    description: str = ""


@dataclass(frozen=True, slots=True)
class QuestionItem:
    question: str
    header: str = ""
    options: tuple[QuestionOption, ...] = ()
    multi_select: bool = False


@dataclass(frozen=True, slots=True)
class Question:
    """The agent asks the user (AskUserQuestion); see sessions/questions.py."""

    request_id: str
    questions: tuple[QuestionItem, ...]
    tool_use_id: str
    deadline: float


@dataclass(frozen=True, slots=True)
class QuestionAnswered:
    request_id: str
    answers: tuple[tuple[str, str], ...]  # (question text, answer), in the questions' order
    answered: bool
    decider: str  # client | timeout | policy
    message: str = ""


@dataclass(frozen=True, slots=True)
class LiveUsage:
    """Usage as the agent reports it during a turn: the latest model call's tokens (input
    apart from the cache's), how full the context is, and at the turn's end its cost."""

    input_tokens: int = 0
    output_tokens: int = 0
    cache_creation_input_tokens: int = 0
    cache_read_input_tokens: int = 0
    context_tokens: int = 0
    context_window: int = 0
    turn_cost_usd: float = 0.0
    # The turn's cost so far by the daemon's estimate (sessions/spend.py): caps act on it.
    estimated_turn_cost_usd: float = 0.0


@dataclass(frozen=True, slots=True)
class PlanUpdated:
    """The agent's plan changed: Session.plan is `plan` now."""

    plan: str


EventKind = (
    TurnStarted
    | TextDelta
    | ThinkingDelta
    | ToolUse
    | ToolResult
    | TurnCompleted
    | TurnFailed
    | Notice
    | PermissionRequest
    | PermissionDecided
    | Question
    | QuestionAnswered
    | UserMessage
    | TaskStarted
    | TaskOutput
    | TaskEnded
    | LiveUsage
    | PlanUpdated
)
TERMINAL = (TurnCompleted, TurnFailed)


@dataclass(frozen=True, slots=True)
class SessionEvent:
    seq: int
    session_id: str
    turn_id: str
    time: float
    kind: EventKind

    @property
    def terminal(self) -> bool:
        return isinstance(self.kind, TERMINAL)


# Fixed cost counted per event on top of its text: the objects around the text.
_EVENT_OVERHEAD = 200


def event_bytes(kind: EventKind) -> int:
    """What an event holds in memory, roughly: its text fields plus a fixed overhead."""
    size = _EVENT_OVERHEAD
    for name in kind.__slots__:
        value = getattr(kind, name)
        if isinstance(value, str):
            size += len(value)
    return size


class ReplayBudget:
    """The bytes all session logs may hold together; over it, the logs appended to least
    recently give up their oldest events first."""

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self.used = 0
        self._logs: dict[EventLog, None] = {}  # least recently appended first

    def touched(self, log: EventLog) -> None:
        self._logs.pop(log, None)
        self._logs[log] = None

    def forget(self, log: EventLog) -> None:
        self._logs.pop(log, None)

    def enforce(self) -> None:
        if self.used <= self.max_bytes:
            return
        for log in list(self._logs):
            log.trim_to(0, spare_followers=False)
            if self.used <= self.max_bytes:
                return


class EventLog:
    """A session's recent events, bounded in bytes, that followers read by sequence number.

    Sequence numbers are contiguous within one log (a session's events in this daemon's life),
    so what a follower missed is exactly the range between its cursor and the oldest event kept.
    """

    def __init__(
        self,
        session_id: str,
        max_bytes: int,
        budget: ReplayBudget | None = None,
        *,
        lag_bytes: int | None = None,
        max_events: int | None = None,
    ) -> None:
        self.session_id = session_id
        self._events: deque[tuple[SessionEvent, int]] = deque()
        self.max_bytes = max_bytes
        self.lag_bytes = max(lag_bytes or max_bytes, max_bytes)
        self.max_events = max_events
        # Cursors of the connected followers: what they have not read is kept (to lag_bytes).
        self._cursors: dict[object, int] = {}
        self.bytes = 0
        self._budget = budget
        self._waiter: asyncio.Future[None] | None = None
        # The newest sequence number dropped to stay within the bounds (0: none yet).
        self.dropped_upto = 0
        self.first_seq = 0  # of the first event ever appended
        self.closed = False

    def __len__(self) -> int:
        return len(self._events)

    @property
    def last_seq(self) -> int:
        return self._events[-1][0].seq if self._events else self.dropped_upto

    def append(self, event: SessionEvent) -> None:
        size = event_bytes(event.kind)
        if not self.first_seq:
            self.first_seq = event.seq
        self._events.append((event, size))
        self._grow(size)
        if self.bytes > self.max_bytes or (
            self.max_events is not None and len(self._events) > self.max_events
        ):
            self.trim_to(self.max_bytes)
        if self._budget is not None:
            self._budget.touched(self)
            self._budget.enforce()
        self._wake()

    def trim_to(self, max_bytes: int, *, spare_followers: bool = True) -> None:
        """Drops the oldest events until at most `max_bytes` are held; keeps the newest one,
        and (with `spare_followers`, up to `lag_bytes`) what a connected follower has not read."""
        slowest = min(self._cursors.values(), default=None) if spare_followers else None
        most = self.max_events if self.max_events is not None else len(self._events)
        while (self.bytes > max_bytes or len(self._events) > most) and len(self._events) > 1:
            oldest = self._events[0][0].seq
            if slowest is not None and oldest > slowest and self.bytes <= self.lag_bytes:
                return
            event, size = self._events.popleft()
            self._grow(-size)
            self.dropped_upto = event.seq

    def _grow(self, delta: int) -> None:
        self.bytes += delta
        if self._budget is not None:
            self._budget.used += delta

    def close(self) -> None:
        """No more events will come: followers end after what is kept."""
        self.closed = True
        self.release()
        self._wake()

    def release(self) -> None:
        """Gives the log's bytes back to the shared budget (the log is being forgotten)."""
        if self._budget is not None:
            self._budget.forget(self)
            self._budget.used -= self.bytes
            self._budget = None

    def attach(self, cursor: int) -> object:
        """Registers a connected follower at `cursor`; returns its token."""
        token = object()
        self._cursors[token] = cursor
        return token

    def advance(self, token: object, cursor: int) -> None:
        self._cursors[token] = cursor

    def detach(self, token: object) -> None:
        self._cursors.pop(token, None)

    def poke(self) -> None:
        """Wakes followers so they re-check their own stop conditions."""
        self._wake()

    def _wake(self) -> None:
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)
        self._waiter = None

    def missed_after(self, seq: int) -> tuple[int, int] | None:
        """The range of dropped events a follower at `seq` never got, if any."""
        if seq >= self.dropped_upto:
            return None
        return max(seq + 1, self.first_seq), self.dropped_upto

    def after(self, seq: int) -> list[SessionEvent]:
        """Kept events with a sequence number greater than `seq`."""
        events = self._events
        if not events or events[-1][0].seq <= seq:
            return []
        first = events[0][0].seq
        if seq < first:
            return [e for e, _ in events]
        # Contiguous numbers: the index is the distance from the first kept event.
        return [events[i][0] for i in range(seq - first + 1, len(events))]

    async def wait_past(self, seq: int) -> None:
        """Returns once an event past `seq` exists, the log is closed, or it is poked."""
        if self.closed or self.last_seq > seq:
            return
        if self._waiter is None:
            self._waiter = asyncio.get_running_loop().create_future()
        await asyncio.shield(self._waiter)

    async def follow(
        self, after_seq: int, until: Callable[[SessionEvent], bool] | None = None
    ) -> AsyncIterator[SessionEvent]:
        """Yields events after `after_seq`, then live ones, until `until(event)` is true or
        the log closes. A gap (events dropped before this follower read them) is reported
        with one `EVENTS_MISSED` notice in their place."""
        cursor = after_seq
        token = self.attach(cursor)
        try:
            while True:
                gap = self.missed_after(cursor)
                if gap is not None:
                    yield missed_notice(self, gap)
                    cursor = gap[1]
                batch = self.after(cursor)
                for event in batch:
                    yield event
                    self._cursors[token] = cursor = event.seq
                    if until is not None and until(event):
                        return
                if batch:
                    continue
                if self.closed:
                    return
                await self.wait_past(cursor)
        finally:
            self.detach(token)


def missed_notice(log: EventLog, gap: tuple[int, int]) -> SessionEvent:
    """The notice a follower gets in place of events it fell too far behind to receive. It
    carries the last missed seq, so a client that re-attaches from it continues after them."""
    first, last = gap
    return SessionEvent(
        last,
        log.session_id,
        "",
        time.time(),
        Notice(
            EVENTS_MISSED,
            f"{last - first + 1} events (seq {first} to {last}) were dropped from the replay "
            "buffer before this stream read them; GetHistory has the stored conversation",
            missed_from_seq=first,
            missed_to_seq=last,
        ),
    )
