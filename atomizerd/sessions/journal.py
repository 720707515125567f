"""A running turn's record, left with the agent's shim, so the next daemon can finish the turn.

While a turn runs on an agent that outlives the daemon (`agent.survive_restart`), every event
the turn emits is also sent to the agent's shim (`TurnJournal`), before any client can see it:
the shim then holds, from the turn's first byte on, what the agent said (its stdout), what it
was told (its stdin) and what the daemon made of it (the events, each record carrying how many
of the agent's messages had been taken when it was written). A daemon that starts while the
turn is still running reads that back (`Resumed.from_replay`) and

- puts the recorded events back into the session's log, with their own sequence numbers, so a
  client that re-attaches from its last seq misses nothing and sees nothing twice (the turn's
  own, and every other event of the session while it ran: a turn the agent started beside
  it, its tasks);
- feeds the agent's output again through the same code, quietly up to the messages already
  accounted for (rebuilding the reply, the tool calls, the pending permission requests, and
  which turn the output belonged to at the restart: the job's line may not have been taken
  yet), and live from there on;
- knows which permission requests the agent already got an answer to (from its stdin), so no
  request is answered twice, and a request still open is offered to clients again.

Records are flushed at the end of each agent message's handling, before a write to the agent,
and otherwise on the next turn of the event loop: each goes to the shim before the event
reaches a follower, so nothing a client saw can be missing from the record.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import enum
import json
import types
import typing
from dataclasses import dataclass, field
from typing import Any

import structlog

from atomizerd.agents.vocabulary import AgentError
from atomizerd.sessions import events as ev

log = structlog.get_logger("atomizerd.sessions.journal")

_KINDS: dict[str, type] = {cls.__name__: cls for cls in typing.get_args(ev.EventKind)}


# --- events as JSON ----------------------------------------------------------------------------


def encode_event(event: ev.SessionEvent) -> dict[str, Any]:
    return {
        "seq": event.seq,
        "turn": event.turn_id,
        "t": event.time,
        "kind": type(event.kind).__name__,
        "f": _plain(event.kind),
    }


def decode_event(data: dict[str, Any], session_id: str) -> ev.SessionEvent:
    cls = _KINDS[data["kind"]]
    kind = _build(cls, data["f"])
    return ev.SessionEvent(int(data["seq"]), session_id, str(data["turn"]), float(data["t"]), kind)


# Each event of a running turn is encoded (a text delta among them): the field names of each
# event class are looked up once, and plain values are returned at once.
_FIELD_NAMES: dict[type, tuple[str, ...]] = {}
_SCALARS = frozenset({str, int, float, bool, type(None)})


def _plain(value: Any) -> Any:
    cls = type(value)
    if cls in _SCALARS:
        return value
    names = _FIELD_NAMES.get(cls)
    if names is None and dataclasses.is_dataclass(value) and not isinstance(value, type):
        names = _FIELD_NAMES[cls] = tuple(f.name for f in dataclasses.fields(value))
    if names is not None:
        return {name: _plain(getattr(value, name)) for name in names}
    if isinstance(value, tuple | list):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, enum.Enum):
        return value.value
    return value


def _build(hint: Any, value: Any) -> Any:
    """`value` (plain JSON) as the type `hint` says: dataclasses and tuples rebuilt."""
    if isinstance(hint, type) and issubclass(hint, enum.Enum):
        return hint(value)
    if isinstance(hint, type) and dataclasses.is_dataclass(hint):
        hints = typing.get_type_hints(hint)
        return hint(**{k: _build(hints[k], v) for k, v in value.items() if k in hints})
    origin = typing.get_origin(hint)
    if origin is tuple:
        args = typing.get_args(hint)
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_build(args[0], v) for v in value)
        return tuple(_build(a, v) for a, v in zip(args, value, strict=False))
    if origin in (typing.Union, types.UnionType):
        return value
    return value


# --- writing -----------------------------------------------------------------------------------


class Recorder(typing.Protocol):
    """The part of an agent transport the journal needs."""

    @property
    def boundary(self) -> tuple[int, int]: ...

    def record(self, payload: bytes) -> None: ...

    def forget_before(self, offset: int) -> None: ...


class TurnJournal:
    """The running turn's events, left with the agent's shim as they are emitted."""

    def __init__(self, agent: Recorder, base: int) -> None:
        self._agent = agent
        self._base = base  # the index of the turn's first message in the agent's output
        # The turn's messages whose events have all been emitted (see `handled_upto`).
        self._handled = 0
        self._pending: list[dict[str, Any]] = []
        self._scheduled = False
        self._follows_agent = False

    @classmethod
    def begin(
        cls, agent: Recorder, opening: list[ev.SessionEvent], *, follows_agent: bool = False
    ) -> TurnJournal:
        """A turn starts on `agent`: what the shim held for earlier turns is let go, and the
        turn's events so far (its start, notices) are the first record. `follows_agent`: the
        turn is one the agent started (the job wrote no line of its own)."""
        offset, base = agent.boundary
        agent.forget_before(offset)
        journal = cls(agent, base)
        journal._pending = [encode_event(event) for event in opening]
        journal._follows_agent = follows_agent
        journal.flush()
        return journal

    def handled_upto(self, received: int) -> None:
        """Every message up to the agent's `received` count has been relayed: its events are
        emitted. (A message is counted as received when it is taken from the agent, which may
        be a moment before it is relayed: records in between must not count it yet.)"""
        self._handled = max(self._handled, received - self._base)

    def note(self, event: ev.SessionEvent) -> None:
        self._pending.append(encode_event(event))
        if not self._scheduled:
            self._scheduled = True
            asyncio.get_running_loop().call_soon(self.flush)

    def flush(self) -> None:
        self._scheduled = False
        if not self._pending:
            return
        record: dict[str, Any] = {"c": self._handled, "e": self._pending}
        if self._follows_agent:
            record["a"] = 1
        self._pending = []
        try:
            self._agent.record(json.dumps(record, separators=(",", ":")).encode())
        except (AgentError, OSError) as e:  # the agent is gone: nothing to resume anyway
            log.debug("turn record not left with the shim", error=str(e))

    def end(self) -> None:
        """The turn's outcome is stored: its record is no longer needed."""
        self.flush()
        with contextlib.suppress(AgentError, OSError):
            self._agent.forget_before(self._agent.boundary[0])


# --- reading back ------------------------------------------------------------------------------


@dataclass
class Resumed:
    """A running turn as the previous daemon left it."""

    turn_id: str
    started: ev.TurnStarted
    events: list[ev.SessionEvent]  # every event of the turn so far, in seq order
    consumed: int  # the agent messages (from the turn's start) those events account for
    answered: set[str] = field(default_factory=set)  # requests the agent got an answer to
    interrupted: bool = False  # the previous daemon asked the agent to stop the turn
    # The session's other events while it ran (a turn the agent started beside it, tasks).
    others: list[ev.SessionEvent] = field(default_factory=list)
    follows_agent: bool = False  # a turn the agent started: the job wrote no line

    @property
    def last_seq(self) -> int:
        return max(e.seq for e in self.events + self.others)

    @classmethod
    def from_replay(
        cls, session_id: str, records: list[bytes], inputs: list[bytes]
    ) -> Resumed | None:
        """None when the shim holds no turn (the agent was idle)."""
        events: list[ev.SessionEvent] = []
        consumed = 0
        follows_agent = False
        for payload in records:
            record = json.loads(payload)
            consumed = max(consumed, int(record["c"]))
            follows_agent = follows_agent or bool(record.get("a"))
            events.extend(decode_event(e, session_id) for e in record["e"])
        if not events or not isinstance(events[0].kind, ev.TurnStarted):
            return None
        events.sort(key=lambda e: e.seq)
        turn_id = events[0].turn_id
        own = [e for e in events if e.turn_id == turn_id]
        others = [e for e in events if e.turn_id != turn_id]
        resumed = cls(turn_id, events[0].kind, own, consumed, others=others)
        resumed.follows_agent = follows_agent
        for line in b"".join(inputs).splitlines():
            resumed._saw_input(line)
        return resumed

    def _saw_input(self, line: bytes) -> None:
        with contextlib.suppress(ValueError, AttributeError, TypeError):
            message = json.loads(line)
            if message.get("type") == "control_response":
                self.answered.add(str(message["response"]["request_id"]))
            elif (
                message.get("type") == "control_request"
                and message["request"].get("subtype") == "interrupt"
            ):
                self.interrupted = True

    @property
    def terminal(self) -> bool:
        return any(e.terminal for e in self.events)

    def asked(self) -> dict[str, ev.PermissionRequest | ev.Question]:
        """The requests clients were asked and that no recorded event settled."""
        open_: dict[str, ev.PermissionRequest | ev.Question] = {}
        for event in self.events:
            kind = event.kind
            if isinstance(kind, ev.PermissionRequest | ev.Question):
                open_[kind.request_id] = kind
            elif isinstance(kind, ev.PermissionDecided | ev.QuestionAnswered):
                open_.pop(kind.request_id, None)
        return open_

    def settled(self) -> set[str]:
        return {
            e.kind.request_id
            for e in self.events
            if isinstance(e.kind, ev.PermissionDecided | ev.QuestionAnswered)
        }
