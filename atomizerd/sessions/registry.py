"""The session registry: the domain API the servicers call.

A facade over the parts of a session's life, each in a module of its own: the loaded sessions
and who serves them (table.py), their events (streams.py), their work queue (queue.py), changes
of their settings (settings.py), clients' answers (answers.py), what the agent does on its own
(autonomy.py), and the checks of what clients send (checks.py). What works beside the
conversation is called as the registry's parts: `asides` (aside.py), `titles` (titles.py),
`mcp` (mcp.py), `undo` (undo.py) and `importer` (importing.py). Here: creating, reopening,
forking, listing and closing sessions, sending a message, and the daemon's own start-up and
shutdown steps (docs/architecture.md, "Session").
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable, Collection, Mapping, Sequence

import structlog

from atomizerd import ids
from atomizerd.agents.pool import Agent, AgentPool
from atomizerd.atomizer.planfiles import remove_plans
from atomizerd.atomizer.studies import Studies
from atomizerd.config import Config
from atomizerd.errors import (
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    ResourceExhausted,
    Unavailable,
)
from atomizerd.model import (
    AttachmentRecord,
    Mode,
    SessionRecord,
)
from atomizerd.sessions import checks
from atomizerd.sessions import events as ev
from atomizerd.sessions.agentcalls import AgentCalls
from atomizerd.sessions.answers import Answers
from atomizerd.sessions.aside import Asides, AsideStep
from atomizerd.sessions.attachments import check as check_attachments
from atomizerd.sessions.attachments import check_sha256
from atomizerd.sessions.autonomy import AgentWork, TaskOutputPage
from atomizerd.sessions.catalog import Catalog
from atomizerd.sessions.context import AgentContext
from atomizerd.sessions.importing import Importer
from atomizerd.sessions.journal import Resumed, TurnJournal
from atomizerd.sessions.mcp import McpServer, McpServers
from atomizerd.sessions.queue import WorkQueue
from atomizerd.sessions.session import Session, SessionState
from atomizerd.sessions.settings import SettingChanges
from atomizerd.sessions.streams import Streams, replay_stored
from atomizerd.sessions.table import SessionTable, SessionView
from atomizerd.sessions.titles import Titles
from atomizerd.sessions.turn import Turn, TurnState
from atomizerd.sessions.turns import TurnRunner
from atomizerd.sessions.undo import Undo
from atomizerd.store.db import Store
from atomizerd.telemetry import NULL, Telemetry

__all__ = [
    "AsideStep",
    "McpServer",
    "Registry",
    "SessionView",
    "TaskOutputPage",
    "spare_record",
]

log = structlog.get_logger("atomizerd.sessions.registry")

# After killing the agents at shutdown: how long their turns get to be stored.
KILL_SETTLE = 5.0
# A planned restart: how long what was written to the agents' shims gets to leave before they
# are let go.
HAND_OVER_SETTLE = 2.0


class Registry:
    def __init__(
        self,
        config: Config,
        store: Store,
        pool: AgentPool,
        studies: Studies,
        context_text: Callable[[SessionRecord], str],
        telemetry: Telemetry = NULL,
    ) -> None:
        self.config = config
        self.store = store
        self.pool = pool
        self.studies = studies
        self.table = SessionTable(config, store, pool)
        self.streams = Streams(self.table, store)
        context = AgentContext(config, store, pool, context_text)
        self.runner = TurnRunner(config, store, pool, context, self.streams.emit, telemetry)
        self.notices = self.runner.notices = self.streams.notices
        self.queue = WorkQueue(config, self.runner, self.streams)
        self.settings = SettingChanges(studies, self.table, self.queue)
        # Listing, labels, archiving and search (catalog), and clients' answers (answers): the
        # servicers call these parts directly, not through a method here repeating each one.
        self.answers = Answers(self.table)
        self.catalog = Catalog(self.table)
        self.agent_work = AgentWork(self.table, self.streams, self.queue, self.runner.follower)
        self.replay = self.table.replay
        self.calls = AgentCalls(config, pool, self.queue)
        self.asides = Asides(config, store, self.table, self.calls)
        self.titles = Titles(config, self.table, self.calls)
        self.mcp = McpServers(config, self.table, self.calls)
        self.undo = Undo(
            self.table, self.queue, self.calls, lambda s, kind: self.streams.emit(s, None, kind)
        )
        self.runner.after_turn = self.titles.after_turn
        self.importer = Importer(config, store, studies, self.table, self._check_session_limit)

    # --- daemon lifecycle ----------------------------------------------------------------

    def reconcile(
        self,
        keep: Collection[str] = (),
        replies: Mapping[str, str] | None = None,
        sessions: Collection[str] = (),
    ) -> None:
        """At start-up: settle turns a previous daemon left running, but those in `keep`
        (adopted with their agents: they go on); `replies`: what streamed of a turn, from
        the record its shim left (else its last checkpoint is stored). The tasks of agents
        not adopted (`sessions` were) are forgotten: their agents were killed, so were they."""
        for session_id, task_id in self.store.forget_tasks_except(sessions):
            log.warning(
                "task of an agent not adopted ended (killed)",
                session_id=session_id,
                task_id=task_id,
            )
        for session_id, turn_id in self.store.settle_unfinished_turns(keep, replies or {}):
            log.warning(
                "turn left running by a previous daemon marked interrupted",
                session_id=session_id,
                turn_id=turn_id,
            )

    def resume_turn(self, agent: Agent, resumed: Resumed) -> None:
        """A turn the previous daemon left running on `agent` (adopted at start-up) goes on
        here: its events so far are back in the session's log with their own numbers, and
        the runner reads the agent's output on from where they end (sessions/journal.py)."""
        s = self.table.load(agent.session_id)
        first = resumed.events[0].seq
        turn = Turn(resumed.turn_id, resumed.started.text, resumed.started.request_id, first - 1)
        turn.audience = lambda: turn.listeners + s.watchers
        turn.resumed = (agent, resumed)
        turn.origin = resumed.started.origin
        turn.follows_agent = resumed.follows_agent
        turn.journal = TurnJournal(agent.transport_or_fail(), 0)
        turn.journal.handled_upto(resumed.consumed)
        for event in sorted(resumed.events + resumed.others, key=lambda e: e.seq):
            s.log.append(event)
        s.next_seq = resumed.last_seq + 1
        if turn.request_id:
            s.by_request[turn.request_id] = turn
        self.queue.submit(s, turn)
        log.info(
            "turn resumed after a restart",
            session_id=s.id,
            turn_id=turn.turn_id,
            events=len(resumed.events),
            last_seq=s.next_seq - 1,
        )

    async def hand_over(self) -> None:
        """A planned restart: no new work is taken; queued turns are refused (never sent, safe
        to retry); running turns are left to their agents, which the next daemon adopts with
        them. Streams end with UNAVAILABLE; clients re-attach from their last seq."""
        self.table.draining = True
        not_sent = Unavailable("atomizerd is restarting; the message was not sent")
        # Answers clients gave a moment ago are written to the agents first.
        await self.runner.control.hand_over()
        workers = []
        for s in self.table.sessions.values():
            self.queue.refuse_all(s, not_sent)
            turn = s.turn
            if turn is not None and turn.state in (TurnState.QUEUED, TurnState.WAITING):
                turn.reject(not_sent)  # it never reached an agent: nothing is stored
            if s.worker is not None:
                workers.append(s.worker)
            if turn is not None and turn.journal is not None:
                turn.journal.flush()  # everything emitted is with the shim before it is let go
        await self.pool.hand_over(HAND_OVER_SETTLE)
        for worker in workers:
            worker.cancel()
        await asyncio.gather(*workers, return_exceptions=True)
        for s in self.table.sessions.values():
            s.log.close()
        self.settings.cancel_background()
        self.titles.cancel()
        self.asides.cancel()

    async def drain(self, grace: float) -> None:
        """Stops accepting work: queued turns are refused (never sent, safe to retry), running
        ones interrupted and stored; agents still running after `grace` are killed so their
        turns end (and are stored)."""
        self.table.draining = True
        workers = []
        for s in self.table.sessions.values():
            self.queue.refuse_all(
                s, Unavailable("atomizerd is shutting down; the message was not sent")
            )
            if s.turn is not None:
                s.turn.stop(ev.DAEMON_STOPPING, "the daemon is shutting down")
            if s.worker is not None:
                workers.append(s.worker)
        if not await _all_done(workers, grace):
            log.warning(
                "turns still running after the grace period; killing their agents",
                turns=sum(1 for w in workers if not w.done()),
            )
            self.pool.kill_all()
            await _all_done(workers, KILL_SETTLE)
        for s in self.table.sessions.values():
            s.log.close()
        self.settings.cancel_background()
        self.titles.cancel()
        self.asides.cancel()

    def restore_tasks(self, session_id: str) -> None:
        self.agent_work.restore_tasks(session_id)

    # --- sessions ------------------------------------------------------------------------

    async def create_session(
        self,
        mode: str | None,
        study_id: str | None,
        session_id: str | None,
        budget_usd: float = 0.0,
        turn_budget_usd: float = 0.0,
        model: str = "",
        labels: Mapping[str, str] | None = None,
    ) -> SessionView:
        """A new session, or the one named reopened (`labels` are a new session's: SetLabels
        changes an existing one's)."""
        self.table.check_open()
        labels = checks.check_labels(dict(labels or {}))
        mode = checks.check_mode(self.config, mode) if mode else None
        model = checks.check_model(self.config, model) if model else ""
        if study_id:
            self.studies.resolve(study_id)
        if session_id:
            ids.check_session_id(session_id)
            record = self.store.get_session(session_id)
            if record is not None:
                cached = self.table.sessions.get(session_id)
                if cached is not None and cached.idle and not self.table.owns(record):
                    self.table.forget(cached)  # moved to another host after it was closed here
                s = self.table.load(session_id)
                self.table.require_own(s)
                view = await self._reopen(s, mode, study_id)
                if model and model != s.record.model:
                    await self.settings.change_model(s, model)
                    view = self.table.view(s)
                return view
        self._check_session_limit()
        budget = checks.cap("budget_usd", budget_usd, self.config.budget.session_usd)
        turn_budget = checks.cap("turn_budget_usd", turn_budget_usd, self.config.budget.turn_usd)
        mode = mode or Mode.USER
        agent_session_id = ids.new_agent_session_id()
        if not session_id:
            spare = None
            if not budget_usd and not turn_budget_usd and not study_id and not model:
                spare = self.pool.adopt_spare(mode)
            # A spare was started for a session id reserved in advance: the session takes it.
            session_id, agent_session_id = spare or (ids.new_session_id(), agent_session_id)
            # Every later log line of this request (and of the prewarm it starts) names it.
            structlog.contextvars.bind_contextvars(session_id=session_id)
        self.store.create_session(
            session_id,
            mode,
            study_id or None,
            agent_session_id,
            budget_usd=budget,
            turn_budget_usd=turn_budget,
            model=model,
            labels=labels,
        )
        s = self.table.load(session_id)
        log.info("session created", session_id=session_id, mode=s.record.mode, study_id=study_id)
        self.settings.prewarm(s)
        return self.table.view(s)

    def _check_session_limit(self) -> None:
        if self.store.count_open_sessions() >= self.config.daemon.max_sessions:
            raise ResourceExhausted(
                f"the daemon already holds {self.config.daemon.max_sessions} open sessions "
                "(daemon.max_sessions); terminate some first"
            )

    async def _reopen(self, s: Session, mode: str | None, study_id: str | None) -> SessionView:
        """CreateSession with the id of an existing session: reopens a closed one; a changed
        mode or study is applied like SwitchMode/SetStudyContext, after the running turn."""
        if s.state is SessionState.CLOSING:
            raise FailedPrecondition(
                f"session {s.id!r} is being terminated; retry when it is closed"
            )
        if s.state is SessionState.CLOSED:
            self._check_session_limit()
            s.record = self.table.write(s, closed=False, last_active_at=time.time())
            s.lifecycle.move(SessionState.OPEN)
            if s.log.closed:
                s.log = self.table.new_log(s.id)
            log.info("session reopened", session_id=s.id)
        await self.settings.reconfigure(s, mode, study_id, audit=False)
        self.settings.prewarm(s)
        return self.table.view(s)

    async def switch_mode(self, session_id: str, mode: str) -> SessionView:
        return await self.settings.switch_mode(session_id, mode)

    async def set_study(self, session_id: str, study_id: str) -> SessionView:
        return await self.settings.set_study(session_id, study_id)

    async def set_model(self, session_id: str, model: str) -> SessionView:
        return await self.settings.set_model(session_id, model)

    async def fork_session(
        self, session_id: str, new_session_id: str, at_message_id: int
    ) -> SessionView:
        """A new session continuing `session_id`'s conversation up to a stored reply (the
        last one when `at_message_id` is 0). Its first agent forks the CLI's conversation
        (--resume --fork-session, --resume-session-at that reply); the original is untouched."""
        self.table.check_open()
        s = self.table.load(session_id)
        self.table.require_own(s)
        if at_message_id < 0:
            raise InvalidArgument("at_message_id must not be negative")
        if at_message_id:
            reply = self.store.message(s.id, at_message_id)
            if reply is None:
                raise NotFound(f"session {s.id!r} has no message {at_message_id}")
            if reply.role != "assistant":
                raise InvalidArgument(
                    f"message {at_message_id} is the user's: at_message_id names a reply "
                    "(an assistant message), after which the fork goes on"
                )
            if not reply.agent_uuid:
                raise FailedPrecondition(
                    f"reply {at_message_id} cannot be forked at: it was interrupted or failed"
                )
            if reply.rolled_back_at:
                raise FailedPrecondition(
                    f"reply {at_message_id} cannot be forked at: it was rolled back"
                )
        else:
            reply = self.store.last_reply(s.id)
            if reply is None:
                raise FailedPrecondition(f"session {s.id!r} has no finished reply to fork")
        if new_session_id:
            ids.check_session_id(new_session_id)
            if self.store.get_session(new_session_id) is not None:
                raise FailedPrecondition(f"session {new_session_id!r} already exists")
        else:
            new_session_id = ids.new_session_id()
        self._check_session_limit()
        self.store.fork_session(
            s.record, new_session_id, ids.new_agent_session_id(), reply.message_id
        )
        fork = self.table.load(new_session_id)
        log.info(
            "session forked", session_id=fork.id, forked_from=s.id, at_message=reply.message_id
        )
        self.settings.prewarm(fork)
        return self.table.view(fork)

    def get_attachment(self, session_id: str, sha256: str) -> tuple[AttachmentRecord, bytes]:
        """A file sent in the session, by its sha256."""
        s = self.table.load(session_id)
        found = self.store.attachment(s.id, check_sha256(sha256))
        if found is None:
            raise NotFound(f"session {s.id!r} has no attachment {sha256}")
        return found

    def get_session(self, session_id: str) -> SessionView:
        return self.table.view(self.table.load(session_id))

    async def terminate_session(self, session_id: str, purge: bool) -> SessionView | None:
        """OPEN → CLOSING → CLOSED (or purged). Runs to its end whatever happens to the caller
        (its deadline, a disconnect): a termination is never left half done."""
        s = self.table.load(session_id)
        self.table.require_own(s)
        if s.closing is None:
            if s.state is SessionState.CLOSED and not purge:
                return self.table.view(s)
            s.lifecycle.move(SessionState.CLOSING)
            s.closing = asyncio.ensure_future(self._close(s, purge))
        await asyncio.shield(s.closing)
        if purge or s.id not in self.table.sessions:
            return None
        return self.table.view(s)

    async def _close(self, s: Session, purge: bool) -> None:
        try:
            queued = self.queue.take_queue(s)
            if s.turn is not None:
                s.turn.stop(ev.SESSION_TERMINATED, "the session was terminated")
            if s.worker is not None:
                await asyncio.shield(s.worker)
            for job in queued:  # in order, after the turn that ran: history stays in order
                self.queue.cancel(s, job, None)
            await self.pool.retire(s.id)
            self.studies.remove_session_files(s.id)
            if purge:
                remove_plans(self.config, s.id)
                self.runner.outcomes.forget(s)
                self.store.delete_session(s.id)
                self.table.forget(s)
                log.info("session purged", session_id=s.id)
            else:
                s.record = self.table.write(s, closed=True)
                log.info("session terminated", session_id=s.id)
            s.log.close()  # watchers of a closed session are done
        finally:
            s.closing = None
            if s.state is SessionState.CLOSING:
                s.lifecycle.move(SessionState.CLOSED)

    # --- turns and their events ----------------------------------------------------------

    async def send_message(
        self,
        session_id: str,
        text: str,
        request_id: str,
        attachments: Sequence[tuple[str, str, bytes]] = (),
        *,
        steer: bool = False,
        output_schema: str = "",
    ) -> AsyncIterator[ev.SessionEvent]:
        """Starts (or re-attaches to) a turn and yields its events up to the terminal one.
        With `steer`, while a turn runs the text goes into it now and the running turn is
        streamed to its end; with no turn running it is an ordinary message. With
        `output_schema` (a JSON Schema) the turn's answer is structured: steer is ignored."""
        self.table.check_open()
        ids.check_request_id(request_id)
        files = check_attachments(attachments, self.config.attachments)
        checks.check_text(self.config, text, empty_ok=bool(files))
        schema = checks.check_output_schema(output_schema)
        s = self.table.load(session_id)
        self.table.require_own(s)
        self.table.require_open(s)
        turn = s.by_request.get(request_id) if request_id else None
        if turn is None:
            stored = self.store.find_turn_by_request(s.id, request_id) if request_id else []
            if stored:
                for event in replay_stored(s, stored):
                    yield event
                return
            checks.check_budget(s.record)
            self.catalog.take_out_of_archive(s)
            running = s.turn
            if steer and not files and schema is None and running is not None and not s.inbox:
                if await self.runner.follower.steer(s, running, text, request_id):
                    turn = running
                else:
                    turn = self.queue.enqueue(s, text, request_id)
            else:
                turn = self.queue.enqueue(s, text, request_id)
                turn.attachments = files
                turn.output_schema = schema
        turn.listeners += 1
        try:
            async for event in self.streams.follow_turn(s, turn):
                yield event
        finally:
            turn.listeners -= 1
            if turn.listeners == 0:
                # Who is left to answer its permission requests: its watchers, or the policy.
                log.debug("the turn's sender left", session_id=s.id, turn_id=turn.turn_id)

    def watch(self, session_id: str, after_seq: int) -> AsyncIterator[ev.SessionEvent]:
        return self.streams.watch(session_id, after_seq)

    # --- tasks ---------------------------------------------------------------------------

    async def stop_task(self, session_id: str, task_id: str) -> None:
        await self.agent_work.stop_task(session_id, task_id)

    def task_output(self, session_id: str, task_id: str, offset: int, limit: int) -> TaskOutputPage:
        return self.agent_work.task_output(session_id, task_id, offset, limit)

    async def stop_overdue_tasks(self) -> None:
        await self.agent_work.stop_overdue_tasks()

    # --- status and memory ---------------------------------------------------------------

    def counts(self) -> dict[str, int]:
        return self.table.counts()

    def loaded_session(self, session_id: str) -> Session | None:
        return self.table.sessions.get(session_id)

    def unload_idle(self, older_than: float) -> int:
        return self.table.unload_idle(older_than)

    @property
    def draining(self) -> bool:
        return self.table.draining


def spare_record(config: Config, mode: Mode) -> SessionRecord:
    """The record a spare agent of `mode` is started for: what a new session of that mode
    with no study, the default model and the default budgets will be, under ids reserved now."""
    now = time.time()
    return SessionRecord(
        session_id=ids.new_session_id(),
        mode=mode,
        study_id=None,
        agent_session_id=ids.new_agent_session_id(),
        agent_started=False,
        closed=False,
        created_at=now,
        last_active_at=now,
        message_count=0,
        total_cost_usd=0.0,
        agent_cost_usd=0.0,
        seq_reserved=0,
        budget_usd=config.budget.session_usd,
        turn_budget_usd=config.budget.turn_usd,
    )


async def _all_done(tasks: list[asyncio.Task[None]], timeout: float) -> bool:
    if not tasks:
        return True
    _, pending = await asyncio.wait(tasks, timeout=timeout)
    return not pending
