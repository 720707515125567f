"""Session events: what a turn emits, numbered per session, and the logs clients follow.

A `SessionEvent` is the domain form of `atomizer.v1.SessionEvent`. An `EventLog` hands out
sequence numbers and lets any number of followers read from a position and then wait for
more, without a queue per follower: a slow client holds a cursor, not a copy.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field


@dataclass(frozen=True, slots=True)
class TurnStarted:
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


@dataclass(frozen=True, slots=True)
class ToolResult:
    tool_use_id: str
    content: str
    is_error: bool


@dataclass(frozen=True, slots=True)
class PermissionDenial:
    tool_name: str
    tool_use_id: str
    input_json: str


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


@dataclass(frozen=True, slots=True)
class Notice:
    kind: str
    message: str
    attempt: int = 0
    max_retries: int = 0
    retry_delay_ms: int = 0
    error_status: int = 0


@dataclass(frozen=True, slots=True)
class PermissionRequest:
    request_id: str
    tool_name: str
    input_json: str
    description: str
    tool_use_id: str
    deadline: float


@dataclass(frozen=True, slots=True)
class PermissionDecided:
    request_id: str
    tool_name: str
    allow: bool
    decider: str  # client | rule | timeout | policy | mode
    message: str


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


class EventLog:
    """An append-only run of events that followers read by sequence number.

    With `maxlen`, only the newest events are kept (a session's replay buffer); followers that
    fall further behind than that skip ahead to the oldest kept event.
    """

    def __init__(self, maxlen: int | None = None) -> None:
        self._events: deque[SessionEvent] = deque(maxlen=maxlen)
        self._waiter: asyncio.Future[None] | None = None
        self.closed = False

    def __len__(self) -> int:
        return len(self._events)

    @property
    def last_seq(self) -> int:
        return self._events[-1].seq if self._events else 0

    def append(self, event: SessionEvent) -> None:
        self._events.append(event)
        self._wake()

    def close(self) -> None:
        self.closed = True
        self._wake()

    def _wake(self) -> None:
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)
        self._waiter = None

    def after(self, seq: int) -> list[SessionEvent]:
        """Kept events with a sequence number greater than `seq`."""
        events = self._events
        if not events or events[-1].seq <= seq:
            return []
        first = events[0].seq
        if seq < first:
            return list(events)
        # Sequence numbers in one log are increasing but not contiguous (a turn's log holds
        # only its own events): binary search for the first one past `seq`.
        lo, hi = 0, len(events)
        while lo < hi:
            mid = (lo + hi) // 2
            if events[mid].seq <= seq:
                lo = mid + 1
            else:
                hi = mid
        return [events[i] for i in range(lo, len(events))]

    async def wait_past(self, seq: int) -> None:
        """Returns once an event past `seq` exists or the log is closed."""
        while not self.closed and self.last_seq <= seq:
            if self._waiter is None:
                self._waiter = asyncio.get_running_loop().create_future()
            await asyncio.shield(self._waiter)

    async def follow(
        self, after_seq: int, until: Callable[[SessionEvent], bool] | None = None
    ) -> AsyncIterator[SessionEvent]:
        """Yields events after `after_seq`, then live ones, until `until(event)` is true or
        the log closes."""
        cursor = after_seq
        while True:
            batch = self.after(cursor)
            for event in batch:
                yield event
                if until is not None and until(event):
                    return
            if batch:
                cursor = batch[-1].seq
                continue
            if self.closed:
                return
            await self.wait_past(cursor)
