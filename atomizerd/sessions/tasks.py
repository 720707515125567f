"""The tasks an agent runs on its own: background or long Bash commands and subagents.

The CLI announces a task with `system/task_started`, and its end with `system/task_notification`
(docs/agent-protocol.md, "The agent acts on its own"). A session's `TaskTable` is the one record
of its running tasks: the turn or the idle reader that reads the agent's output keeps it (they
never read at once), the pool learns from it that the agent is busy (never evicted or reaped),
and GetSession lists it. A background Bash writes its output to a file the CLI names; the table
remembers where, so the output can be streamed (`TaskTail`) and paged (GetTaskOutput) without
ever holding it whole.
"""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Callable
from dataclasses import dataclass

from atomizerd.agents import protocol as proto
from atomizerd.sessions import events as ev

_KINDS = {"local_bash": ev.TaskKind.BASH, "local_agent": ev.TaskKind.SUBAGENT}
_STATUSES = {
    "completed": ev.TaskStatus.COMPLETED,
    "failed": ev.TaskStatus.FAILED,
    "stopped": ev.TaskStatus.STOPPED,
    "killed": ev.TaskStatus.KILLED,
}


@dataclass
class TaskInfo:
    """A running task, as GetSession shows it."""

    task_id: str
    tool_use_id: str
    kind: ev.TaskKind
    description: str
    background: bool
    started_at: float
    output_file: str = ""
    output_bytes: int = 0  # streamed so far as task_output
    deadline: float = 0.0  # loop time after which agent.task_timeout stops it; 0: none


class TaskTable:
    """The running tasks of one session's agent; maps the CLI's task lines to events."""

    def __init__(
        self,
        on_change: Callable[[int], None] = lambda _n: None,
        on_output_file: Callable[[str, str], None] = lambda _t, _p: None,
        on_record: Callable[[str, TaskInfo | None], None] = lambda _t, _i: None,
    ) -> None:
        self._running: dict[str, TaskInfo] = {}
        self.scheduled = 0  # wake-ups and cron jobs the agent has pending
        # Output files of ended tasks, for GetTaskOutput after the end (the oldest go first).
        self._ended_files: dict[str, str] = {}
        # Told the number of running tasks whenever it changes (the pool's busy mark), and
        # where a running task's output goes once the CLI names it (streamed from there).
        self._on_change = on_change
        self._on_output_file = on_output_file
        # Told each running task as it is now, or (None) that it ended: kept in the store, so
        # a daemon that adopts the agent after a restart knows what it runs.
        self._on_record = on_record

    def restore(self, tasks: list[TaskInfo], now: float) -> None:
        """The tasks of an agent a previous daemon left running (from the store)."""
        for info in tasks:
            info.deadline = now + max(0.0, info.deadline - (time.time() - info.started_at))
            self._running[info.task_id] = info
            if info.output_file:
                self._on_output_file(info.task_id, info.output_file)
        self._on_change(len(self._running) + self.scheduled)

    def __len__(self) -> int:
        return len(self._running)

    @property
    def busy(self) -> bool:
        """Tasks run, or prompts are scheduled: the agent must live on for them."""
        return bool(self._running) or self.scheduled > 0

    def schedule(self, change: int) -> None:
        """A wake-up was scheduled (+1) or fired or was cancelled (-1); a cron job likewise.
        Scheduled prompts live in the agent's process: it is busy while any is pending."""
        self.scheduled = max(0, self.scheduled + change)
        self._on_change(len(self._running) + self.scheduled)

    def running(self) -> list[TaskInfo]:
        return sorted(self._running.values(), key=lambda t: t.started_at)

    def get(self, task_id: str) -> TaskInfo | None:
        return self._running.get(task_id)

    def started(self, item: proto.TaskStarted, deadline: float = 0.0) -> ev.TaskStarted:
        info = TaskInfo(
            task_id=item.task_id,
            tool_use_id=item.tool_use_id,
            kind=_KINDS.get(item.task_type, ev.TaskKind.OTHER),
            description=item.description,
            background=item.background,
            started_at=time.time(),
            deadline=deadline,
        )
        self._running[item.task_id] = info
        self._on_record(info.task_id, info)
        self._on_change(len(self._running) + self.scheduled)
        return ev.TaskStarted(
            info.task_id, info.tool_use_id, info.kind, info.description, info.background
        )

    def output_file_named(self, task_id: str, path: str) -> None:
        """The tool result of a background Bash names the file its output goes to."""
        info = self._running.get(task_id)
        if info is not None and not info.output_file:
            info.output_file = path
            self._on_record(task_id, info)
            self._on_output_file(task_id, path)

    def ended(self, item: proto.TaskNotification) -> ev.TaskEnded | None:
        """The task's end; None for a task this table never saw start (told twice)."""
        info = self._running.pop(item.task_id, None)
        if info is None:
            return None
        if item.output_file and not info.output_file:
            info.output_file = item.output_file
        self._keep_file(item.task_id, info.output_file)
        self._on_record(item.task_id, None)
        self._on_change(len(self._running) + self.scheduled)
        status = _STATUSES.get(item.status, ev.TaskStatus.FAILED)
        return ev.TaskEnded(item.task_id, status, item.summary)

    def forget_all(self, status: ev.TaskStatus, why: str) -> list[ev.TaskEnded]:
        """The agent is gone (stopped, or died): its tasks went with it."""
        ended = [ev.TaskEnded(t, status, why) for t in self._running]
        for task_id, info in self._running.items():
            self._keep_file(task_id, info.output_file)
            self._on_record(task_id, None)
        self._running.clear()
        self.scheduled = 0
        self._on_change(0)
        return ended

    def output_file(self, task_id: str) -> str:
        """Where a task's output is (running, or among the last ended ones); "" if unknown."""
        info = self._running.get(task_id)
        if info is not None:
            return info.output_file
        return self._ended_files.get(task_id, "")

    def _keep_file(self, task_id: str, path: str) -> None:
        self._ended_files[task_id] = path
        while len(self._ended_files) > _ENDED_KEPT:
            self._ended_files.pop(next(iter(self._ended_files)))


_ENDED_KEPT = 64
_STORED = ("task_id", "tool_use_id", "description", "background", "started_at", "output_file")


def to_row(info: TaskInfo) -> dict[str, object]:
    return {**{f: getattr(info, f) for f in _STORED}, "kind": info.kind.value}


def from_row(row: dict[str, object], timeout: float) -> TaskInfo:
    """A stored task; its deadline (for `restore`) is the timeout, counted from its start."""
    fields = {f: row[f] for f in _STORED}
    return TaskInfo(kind=ev.TaskKind(str(row["kind"])), deadline=timeout, **fields)  # type: ignore[arg-type]


def read_output(path: str, offset: int, limit: int) -> tuple[bytes, int]:
    """Up to `limit` bytes of a task's output file from `offset`, and the file's size now.
    Never reads more than `limit`: the output of a solver run can be large."""
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        f.seek(min(offset, size))
        return f.read(max(0, limit)), size


# How often a running background command's output file is looked at for more.
TAIL_INTERVAL = 1.0


async def tail_output(
    path: str, bytes_per_s: int, *, running: Callable[[], bool], emit: Callable[[str], None]
) -> None:
    """Streams what a background command appends to its output file, at most `bytes_per_s`
    a second (a fast writer falls behind here, never in memory), until the task has ended and
    its last output was read. Text is decoded leniently: a solver's output need not be UTF-8,
    and a character cut at a read's edge is completed by the next read."""
    offset = 0
    pending = b""
    while True:
        alive = running()
        try:
            data, _size = read_output(path, offset, bytes_per_s)
        except OSError:
            data = b""
        offset += len(data)
        pending += data
        cut = _complete_utf8(pending)
        if cut:
            emit(pending[:cut].decode("utf-8", errors="replace"))
            pending = pending[cut:]
        if not alive and not data:
            return
        await asyncio.sleep(TAIL_INTERVAL)


def _complete_utf8(data: bytes) -> int:
    """How many leading bytes of `data` end on a character boundary."""
    for back in range(1, min(4, len(data)) + 1):
        byte = data[-back]
        if byte < 0x80:
            return len(data)
        if byte >= 0xC0:  # a lead byte: is its character complete?
            need = 2 if byte < 0xE0 else 3 if byte < 0xF0 else 4
            return len(data) if back >= need else len(data) - back
    return len(data)
