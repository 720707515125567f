"""What the agent does on its own, at the session level: the turns it starts while idle, its
tasks (kept in the store while they run, streamed, stopped, paged), and what goes when the
agent does (docs/architecture.md, "Following the agent" and "A task").

The pool calls in here (`IdleReader` on a READY agent, `agent_gone`); the registry's API calls
`stop_task` and `task_output`; the reaper calls `stop_overdue_tasks`.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

import structlog

from atomizerd import ids
from atomizerd.agents.pool import Agent
from atomizerd.agents.vocabulary import AgentError
from atomizerd.errors import AtomizerError, FailedPrecondition, InvalidArgument, NotFound
from atomizerd.sessions import events as ev
from atomizerd.sessions.following import Follower
from atomizerd.sessions.idle import IdleReader
from atomizerd.sessions.queue import WorkQueue
from atomizerd.sessions.session import Session, SessionState
from atomizerd.sessions.streams import Streams
from atomizerd.sessions.table import SessionTable
from atomizerd.sessions.tasks import (
    TaskInfo,
    TaskTable,
    from_row,
    read_output,
    tail_output,
    to_row,
)
from atomizerd.sessions.turn import Turn

log = structlog.get_logger("atomizerd.sessions.autonomy")

# A page of a task's output (GetTaskOutput) holds at most this many bytes.
MAX_TASK_PAGE = 1 << 20
# Background commands whose output is streamed at once, per session.
MAX_TAILS = 16


@dataclass(frozen=True)
class TaskOutputPage:
    """A page of a task's output file (GetTaskOutput)."""

    data: bytes
    next_offset: int
    size: int
    running: bool


class AgentWork:
    def __init__(
        self, table: SessionTable, streams: Streams, queue: WorkQueue, follower: Follower
    ) -> None:
        self.config = table.config
        self.store = table.store
        self.pool = table.pool
        self.table = table
        self.streams = streams
        self.queue = queue
        table.task_table = self._task_table
        self.pool.idle_reader = IdleReader(
            self.pool,
            self._session_of,
            self._start_agent_turn,
            lambda s, kind: streams.emit(s, None, kind),
            follower.task_item,
        ).follow
        self.pool.agent_gone = self._agent_gone

    # --- the pool's hooks ----------------------------------------------------------------

    def _session_of(self, session_id: str) -> Session | None:
        try:
            s = self.table.load(session_id)
        except AtomizerError:
            return None
        return s if s.state is SessionState.OPEN and self.table.owns(s.record) else None

    def _start_agent_turn(self, s: Session, agent: Agent) -> None:
        """The agent started a turn while idle: a job of the session runs it (stored,
        announced, governed like any turn); a client's message queues behind it."""
        origin, prompt = s.causes.next()
        turn = Turn(ids.new_turn_id(), prompt, "", s.next_seq - 1)
        turn.origin = origin
        turn.leased = agent
        turn.follows_agent = True
        turn.audience = lambda: turn.listeners + s.watchers
        self.queue.submit(s, turn)

    def _agent_gone(self, session_id: str) -> None:
        """The session's agent is gone (stopped, evicted, died): its tasks went with it."""
        s = self.table.sessions.get(session_id)
        if s is None:
            return
        s.untaken.clear()
        s.causes.clear()
        for tail in s.tails.values():
            tail.cancel()
        s.tails.clear()
        for ended in s.tasks.forget_all(ev.TaskStatus.KILLED, "the agent was stopped"):
            self.streams.emit(s, None, ended)

    # --- a session's task table ----------------------------------------------------------

    def _task_table(self, s: Session) -> TaskTable:
        sid = s.id
        return TaskTable(
            lambda n: self.pool.set_running_tasks(sid, n),
            lambda task_id, path: self._tail(s, task_id, path),
            lambda task_id, info: self._record_task(sid, task_id, info),
        )

    def _record_task(self, session_id: str, task_id: str, info: TaskInfo | None) -> None:
        try:
            if info is None:
                self.store.forget_task(session_id, task_id)
            else:
                self.store.record_task(session_id, to_row(info))
        except AtomizerError as e:  # a full disk: only a restart would miss the task
            log.warning("task not recorded", session_id=session_id, error=str(e))

    def restore_tasks(self, session_id: str) -> None:
        """An adopted agent's tasks, as the previous daemon recorded them: it is busy."""
        s = self._session_of(session_id)
        if s is None:
            return
        timeout = self.config.agent.task_timeout
        tasks = [from_row(row, timeout) for row in self.store.tasks_of(session_id)]
        if tasks:
            s.tasks.restore(tasks, asyncio.get_running_loop().time())
            log.info(
                "tasks of an adopted agent restored",
                session_id=session_id,
                tasks=[t.task_id for t in tasks],
            )

    def _tail(self, s: Session, task_id: str, path: str) -> None:
        """Streams a background command's new output as task_output while it runs."""
        if task_id in s.tails or len(s.tails) >= MAX_TAILS:
            return
        task = asyncio.ensure_future(
            tail_output(
                path,
                self.config.agent.task_output_bytes,
                running=lambda: s.tasks.get(task_id) is not None,
                emit=lambda text: self._task_output(s, task_id, text),
            )
        )
        s.tails[task_id] = task
        task.add_done_callback(lambda _t: s.tails.pop(task_id, None))

    def _task_output(self, s: Session, task_id: str, text: str) -> None:
        info = s.tasks.get(task_id)
        if info is not None:
            info.output_bytes += len(text.encode())
        self.streams.emit(s, None, ev.TaskOutput(task_id, text))

    # --- the API and the reaper ----------------------------------------------------------

    async def stop_overdue_tasks(self) -> None:
        """Stops every task that has run longer than agent.task_timeout, with a notice: an
        agent with a running task keeps its pool slot, a forgotten one must not keep it."""
        now = asyncio.get_running_loop().time()
        limit = self.config.agent.task_timeout
        for s in list(self.table.sessions.values()):
            for task in s.tasks.running():
                if not task.deadline or now < task.deadline:
                    continue
                task.deadline = 0.0  # asked once; its end comes as task_ended
                why = (
                    f"task {task.task_id} ({task.description}) ran longer than "
                    f"{limit:g} s (agent.task_timeout): stopping it"
                )
                self.streams.emit(s, None, ev.Notice(ev.TASK_TIMEOUT, why))
                try:
                    await self.stop_task(s.id, task.task_id)
                except AtomizerError as e:
                    log.warning(
                        "an overdue task was not stopped", task_id=task.task_id, error=str(e)
                    )

    async def stop_task(self, session_id: str, task_id: str) -> None:
        """Stops one of the agent's running tasks (the CLI's stop_task)."""
        s = self.table.serving(session_id)
        ids.check_task_id(task_id)
        if s.tasks.get(task_id) is None:
            raise NotFound(f"session {s.id!r} has no running task {task_id!r}")
        agent = self.pool.agent(s.id)
        if agent is None or agent.transport is None:
            raise FailedPrecondition(f"session {s.id!r} has no live agent")
        try:
            await agent.transport.request(
                "stop_task", timeout=self.config.agent.stop_grace, task_id=task_id
            )
        except AgentError as e:
            raise FailedPrecondition(f"the agent did not stop task {task_id!r}: {e}") from None

    def task_output(self, session_id: str, task_id: str, offset: int, limit: int) -> TaskOutputPage:
        """A page of a task's output file, never read whole."""
        s = self.table.serving(session_id)
        ids.check_task_id(task_id)
        if offset < 0 or limit < 0:
            raise InvalidArgument("offset and limit must not be negative")
        path = s.tasks.output_file(task_id)
        if not path:
            raise NotFound(f"session {s.id!r} has no output of task {task_id!r}")
        limit = min(limit or MAX_TASK_PAGE, MAX_TASK_PAGE)
        try:
            data, size = read_output(path, offset, limit)
        except OSError as e:
            raise NotFound(f"the output of task {task_id!r} is gone: {e.strerror}") from None
        return TaskOutputPage(data, offset + len(data), size, s.tasks.get(task_id) is not None)
