"""Following the agent within a job: which turn each of its messages belongs to.

A job reads its agent's output (docs/architecture.md, "Following the agent"); `Router`
(sessions/conversation.py) says what each message means, and the `Follower` acts on it: opens a
turn the agent started by itself beside the job's own (stored and announced like any turn) and
ends it, stores a steered line where the agent took it, keeps the session's task table, and
hands everything else to the turn it belongs to. A job that follows a turn the agent started
while idle (sessions/idle.py) begins here too (`open_agent_turn`).
"""

from __future__ import annotations

import asyncio
import re
import uuid as uuidlib
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

import structlog

from atomizerd import ids
from atomizerd.agents import protocol as proto
from atomizerd.agents.pool import Agent, AgentPool
from atomizerd.agents.vocabulary import AgentError, AgentExited, AgentItem
from atomizerd.config import Config
from atomizerd.errors import AtomizerError, Unavailable
from atomizerd.sessions import events as ev
from atomizerd.sessions.approvals import Approvals, json_or_text
from atomizerd.sessions.control import AgentControl, Replay, quiet
from atomizerd.sessions.conversation import (
    Open,
    Router,
    Step,
    is_turn_content,
    subagent_events,
    taken_line,
)
from atomizerd.sessions.journal import TurnJournal
from atomizerd.sessions.mcphealth import mcp_failures
from atomizerd.sessions.relay import Terminal, cut_short
from atomizerd.sessions.turn import Emit, EmitFor, T, Transcript, Turn
from atomizerd.store.db import Store

if TYPE_CHECKING:
    from atomizerd.sessions.session import Session

log = structlog.get_logger("atomizerd.sessions.following")

# Where a background Bash's tool result says its output goes.
_OUTPUT_FILE = re.compile(r"Output is being written to: (\S+\.output)")


class TurnOps(Protocol):
    """What the follower needs of the turn runner: opening and ending turns."""

    def open_turn(self, s: Session, turn: Turn, emit: Emit, reseeded: bool) -> bool: ...

    def approvals_for(self, s: Session, turn: Turn, emit: Emit) -> Approvals: ...

    def finish(
        self, s: Session, turn: Turn, emit: Emit, transcript: Transcript, terminal: Terminal
    ) -> None: ...


@dataclass
class _Side:
    """A turn the agent started while a job waited for its own line's turn."""

    turn: Turn
    emit: Emit
    transcript: Transcript

    @property
    def pair(self) -> tuple[Emit, Transcript]:
        return self.emit, self.transcript


@dataclass
class Reading:
    """One job's reading of its agent: its own turn, and an agent turn met on the way."""

    s: Session
    turn: Turn
    agent: Agent
    emit: Emit
    transcript: Transcript
    router: Router
    side: _Side | None = None
    # Read again after a restart: the agent's own turn open at the restart, if any, and the
    # origin and prompt it had (the previous daemon stored what it had said so far).
    replayed_side: tuple[ev.TurnOrigin, str] | None = None


# The CLI's tools that run a prompt later in the same process (docs/agent-protocol.md).
_SCHEDULING = {"ScheduleWakeup": 1, "CronCreate": 1, "CronDelete": -1}


def note_scheduling(s: Session, item: proto.AssistantMessage) -> None:
    for tu in item.tool_uses:
        change = _SCHEDULING.get(tu.name, 0)
        args = json_or_text(tu.input_json)
        if tu.name == "ScheduleWakeup" and isinstance(args, dict) and args.get("stop") is True:
            change = -1  # ends the loop: cancels the pending wake-up
        if change:
            s.tasks.schedule(change)
        if change > 0 and isinstance(args, dict) and tu.name == "ScheduleWakeup":
            s.causes.scheduled(str(args.get("prompt", "")))


class Follower:
    def __init__(
        self,
        config: Config,
        store: Store,
        pool: AgentPool,
        emit_for: EmitFor,
        turns: TurnOps,
        control: AgentControl,
    ) -> None:
        self.config = config
        self.store = store
        self.pool = pool
        self.emit_for = emit_for
        self._turns = turns
        self._control = control

    def reading(
        self,
        s: Session,
        turn: Turn,
        agent: Agent,
        emit: Emit,
        transcript: Transcript,
    ) -> Reading:
        """A job's reading of its agent: its own turn is the one answering its line, or (a
        job following a turn the agent started) open already. A job adopted after a restart
        reads the agent's output again from its start (`replay`), so it too starts here."""
        router = Router(
            "" if turn.follows_agent else turn.line_uuid,
            s.untaken,
            Open.OWN if turn.follows_agent else Open.NONE,
        )
        return Reading(s, turn, agent, emit, transcript, router)

    def replay(
        self, r: Reading, item: AgentItem, interrupted: bool, held: list[proto.ControlRequest]
    ) -> Terminal | None:
        """An item a previous daemon handled already (its events are back in the log): routed
        again, so the reading stands where it stood at the restart. Only the job's own turn
        is rebuilt, quietly; an agent turn met on the way was stored by that daemon (ended
        where the restart cut it), and its permission requests are taken up with the job's."""
        step = r.router.step(item)
        if step is Step.TASK:
            self.task_item(r.s, item, quiet)  # idempotent: the table is the store's already
            return None
        if step is Step.OPEN_AGENT:
            r.replayed_side = r.s.causes.next()
        if step in (Step.RELAY, Step.OPEN_AGENT) and r.router.open is Open.AGENT:
            if isinstance(item, proto.ControlRequest):
                held.append(item)
            elif isinstance(item, proto.Result | AgentExited):
                r.router.ended()
                r.replayed_side = None
            return None
        if r.router.open is not Open.OWN or step is not Step.RELAY:
            return None
        outcome = self._control.relay_item(
            r.agent,
            item,
            quiet,
            r.transcript,
            interrupted,
            r.s.record.agent_cost_usd,
            r.turn.approvals,
            r.turn.journal,
            held,
        )
        if outcome is not None:
            r.router.ended()
        return outcome

    def replayed(self, r: Reading, replay: Replay) -> None:
        """Once the output read again is behind: an agent turn the restart cut goes on as a
        turn of its own (the rest of what the agent says in it), with the cause it had."""
        if replay.done and r.router.open is Open.AGENT and r.side is None:
            origin, text = r.replayed_side or (ev.TurnOrigin.AGENT, "")
            self._open_side(r, origin, text)

    def close(self, r: Reading) -> None:
        """The job's turn ended inside an agent turn: that one ends with it."""
        if r.side is not None:
            self._end_side(r, cut_short(r.side.transcript))

    def take(
        self, r: Reading, item: AgentItem, interrupted: bool
    ) -> ev.TurnCompleted | ev.TurnFailed | None:
        """One item of the agent's output, routed to the turn it belongs to. Returns the job
        turn's end when this item is it."""
        step = r.router.step(item)
        if step is Step.OWN_TAKEN:
            if r.side is not None:  # the CLI took our line into the turn it had started
                self._end_side(r, cut_short(r.side.transcript, taken_over=True))
            return None
        if step in (Step.LINE_TAKEN, Step.LATE_LINE):
            line = taken_line(item)
            assert line is not None
            self._line_taken(r, line, late=step is Step.LATE_LINE)
            return None
        if step is Step.TASK:
            self.task_item(r.s, item, self._current_emit(r))
            return None
        if step is Step.SUBAGENT:
            for kind in subagent_events(item):
                self._current_emit(r)(kind)
            return None
        if step is Step.QUIET:
            if isinstance(item, proto.Init):  # each turn opens with one: servers' health
                for notice in mcp_failures(r.agent.mcp_servers, item.mcp_servers):
                    self._current_emit(r)(notice)
                r.agent.mcp_servers = list(item.mcp_servers)
            return None
        if step is Step.OPEN_AGENT:
            self._open_side(r, *r.s.causes.next())
        if isinstance(item, proto.ToolResult):
            self._note_output_file(r.s, item)
        elif isinstance(item, proto.AssistantMessage):
            note_scheduling(r.s, item)
        own = r.router.open is Open.OWN
        side = r.side
        target_emit, transcript = (r.emit, r.transcript) if own or side is None else side.pair
        outcome = self._control.relay_item(
            r.agent,
            item,
            target_emit,
            transcript,
            interrupted and own,
            r.s.record.agent_cost_usd,
            r.turn.approvals if own or side is None else side.turn.approvals,
            r.turn.journal if own else None,
        )
        if outcome is None:
            return None
        if r.router.ended() is Open.AGENT:
            self._end_side(r, outcome)
            if not isinstance(item, proto.Result):  # the agent is gone: the job's turn too
                return outcome
            return None
        return outcome

    def _current_emit(self, r: Reading) -> Emit:
        """Events that belong to whichever turn is open (the session's, if none is)."""
        if r.router.open is Open.OWN:
            return r.emit
        if r.side is not None:
            return r.side.emit
        return lambda kind: self.emit_for(r.s, None, kind)

    def _open_side(self, r: Reading, origin: ev.TurnOrigin, text: str) -> None:
        """The agent started a turn while this job's own line waits: it becomes a turn of
        the session like any other, beside the job's turn."""
        turn = Turn(ids.new_turn_id(), text, "", r.s.next_seq - 1)
        turn.origin = origin
        turn.audience = lambda: r.s.watchers
        turn.lifecycle.move(T.WAITING)
        emit: Emit = lambda kind: self.emit_for(r.s, turn, kind)  # noqa: E731
        if not self._turns.open_turn(r.s, turn, emit, False):
            log.error("an agent turn could not be stored", session_id=r.s.id)
        turn.approvals = self._turns.approvals_for(r.s, turn, emit)
        r.side = _Side(turn, emit, Transcript())
        log.info(
            "the agent started a turn", session_id=r.s.id, turn_id=turn.turn_id, origin=origin.value
        )

    def _end_side(self, r: Reading, terminal: ev.TurnCompleted | ev.TurnFailed) -> None:
        side, r.side = r.side, None
        if side is not None and side.turn.state is T.RUNNING:
            self._turns.finish(r.s, side.turn, side.emit, side.transcript, terminal)

    def _line_taken(self, r: Reading, line_uuid: str, *, late: bool) -> None:
        """A client's line written into a running turn (a steer) was taken by the agent: a
        user message of the turn open now, stored at this point; or, taken only after that
        turn ended, a turn of its own as if just sent."""
        taken = r.s.untaken.take(line_uuid)
        if taken is None:
            return
        text, request_id = taken
        if late:
            self._open_side(r, ev.TurnOrigin.CLIENT, text)
            return
        turn = r.turn if r.router.open is Open.OWN or r.side is None else r.side.turn
        try:
            _, r.s.record = self.store.add_user_message(
                r.s.id, turn.turn_id, text, request_id or None, detail="steer"
            )
        except AtomizerError as e:
            log.error("a steered message was not stored", session_id=r.s.id, error=str(e))
        self._current_emit(r)(ev.UserMessage(text, request_id))

    def _note_output_file(self, s: Session, item: proto.ToolResult) -> None:
        """A background command's tool result names the file its output goes to."""
        match = _OUTPUT_FILE.search(item.content)
        if match is None:
            return
        for task in s.tasks.running():
            if task.tool_use_id == item.tool_use_id:
                s.tasks.output_file_named(task.task_id, match.group(1))

    def task_item(self, s: Session, item: AgentItem, emit: Emit) -> None:
        """The CLI's task bookkeeping, kept in the session's task table and shown."""
        match item:
            case proto.TaskStarted():
                deadline = asyncio.get_running_loop().time() + self.config.agent.task_timeout
                emit(s.tasks.started(item, deadline))
                log.info("task started", session_id=s.id, task_id=item.task_id, kind=item.task_type)
            case proto.TaskProgress():
                text = item.summary or " ".join(
                    p for p in (item.description, item.last_tool_name) if p
                )
                if s.tasks.get(item.task_id) is not None and text:
                    emit(ev.TaskOutput(item.task_id, text))
            case proto.TaskNotification():
                ended = s.tasks.ended(item)
                if ended is not None:
                    emit(ended)
                log.info(
                    "task ended",
                    session_id=s.id,
                    task_id=item.task_id,
                    status=item.status,
                    known=ended is not None,
                )
                # The CLI starts a turn of its own to tell the model: that turn's cause.
                s.causes.task_ended(item.summary)
            case proto.CommandLifecycle(state="started") if item.wakeup_source:
                # A scheduled prompt fires: the turn that follows is the agent's own.
                s.tasks.schedule(-1)
                s.causes.woke()

    @staticmethod
    def spoke_first(s: Session, agent: Agent) -> bool:
        """Whether the agent has begun a turn of its own that nobody has read yet."""
        head = agent.transport_or_fail().peek()
        if head is None:
            return False
        line = taken_line(head)
        return line in s.untaken if line is not None else is_turn_content(head)

    def open_agent_turn(self, s: Session, turn: Turn, emit: Emit) -> Agent | None:
        """A job for a turn the agent started while idle: it runs on the agent it started in
        (leased when its output was seen), stored and announced before its first event."""
        agent, turn.leased = turn.leased, None
        if agent is None:
            turn.lifecycle.move(T.DONE)
            turn.done.set()
            return None
        head = agent.transport_or_fail().peek()
        line = taken_line(head) if head is not None else None
        if line is not None and line in s.untaken:
            agent.transport_or_fail().receive_nowait()  # a steer taken late: its own turn
            taken = s.untaken.take(line)
            turn.text, turn.request_id = taken if taken is not None else ("", "")
            turn.origin = ev.TurnOrigin.CLIENT
        if not self._turns.open_turn(s, turn, emit, False):
            self.pool.release(agent, reusable=True)
            return None
        transport = agent.transport_or_fail()
        if transport.durable:  # recorded with the shim like a client's turn (restarts)
            turn.journal = TurnJournal.begin(transport, turn.opening, follows_agent=True)
        if s.record.budget_usd and s.record.total_cost_usd >= s.record.budget_usd:
            emit(
                ev.Notice(
                    ev.BUDGET_EXHAUSTED,
                    f"the session's budget of {s.record.budget_usd:g} USD is spent: the turn "
                    "the agent started is interrupted",
                )
            )
            turn.interrupt()
        return agent

    async def steer(self, s: Session, turn: Turn, text: str, request_id: str) -> bool:
        """Writes `text` into the running turn now; False if no turn is running on an agent
        (the caller sends it as an ordinary message). It is stored when the agent takes it."""
        agent = self.pool.agent(s.id)
        if turn.state is not T.RUNNING or agent is None or agent.transport is None:
            return False
        line_uuid = str(uuidlib.uuid4())
        s.untaken.add(line_uuid, text, request_id)
        try:
            await agent.transport.send_user_message(text, line_uuid)
        except AgentError as e:
            s.untaken.take(line_uuid)
            raise Unavailable(f"the message could not be written to the agent: {e}") from None
        return True
