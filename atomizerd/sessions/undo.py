"""Undoing: the agent's file changes (RewindFiles) and the conversation itself, in place
(RollbackSession, UndoRollback).

Files: the CLI keeps a copy of every file its edit tools change, per user line (keyed by the
line's uuid), and its `rewind_files` control request restores them: a dry run lists them
(measured: docs/agent-protocol.md). It overwrites whatever is there, so a file changed by
someone else since the agent left it (sessions/filemarks.py) stops the rewind unless forced.

The conversation: the CLI goes on from an earlier reply of a conversation with `--resume
--resume-session-at=<reply>`; with `--fork-session` it does so under a new conversation id and
leaves the old one whole (measured). A rollback makes the session's next agent such a fork:
the session keeps its id, the messages from the rollback point on stay in history marked
rolled back, and the old conversation stays as it was, so the rollback can be undone (the
session goes back to it) until a turn has run on the new one.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import structlog

from atomizerd import ids
from atomizerd.errors import FailedPrecondition, InvalidArgument, NotFound
from atomizerd.model import ASIDE, AuditRecord, MessageRecord
from atomizerd.sessions import events as ev
from atomizerd.sessions import filemarks
from atomizerd.sessions.agentcalls import AgentCalls
from atomizerd.sessions.approvals import CLIENT
from atomizerd.sessions.queue import WorkQueue
from atomizerd.sessions.session import Change, Session
from atomizerd.sessions.table import SessionTable, SessionView
from atomizerd.sessions.turn import line_uuid

log = structlog.get_logger("atomizerd.sessions.undo")

EmitSession = Callable[[Session, ev.EventKind], ev.SessionEvent]


@dataclass
class Rewind:
    files: list[str] = field(default_factory=list)
    conflicts: list[str] = field(default_factory=list)
    insertions: int = 0
    deletions: int = 0
    rewound: bool = False


@dataclass
class Rollback:
    view: SessionView
    count: int
    files: list[str] = field(default_factory=list)


class Undo:
    def __init__(
        self, table: SessionTable, queue: WorkQueue, calls: AgentCalls, emit: EmitSession
    ) -> None:
        self.config = table.config
        self.store = table.store
        self.pool = table.pool
        self.table = table
        self.queue = queue
        self.calls = calls
        self.emit = emit

    # --- files ---------------------------------------------------------------------------

    async def rewind_files(
        self, session_id: str, message_id: int, *, dry_run: bool, force: bool
    ) -> Rewind:
        s = self._idle_session(session_id, "rewind files")
        message = self._user_message(s, message_id)
        return await self._rewind(s, message, dry_run=dry_run, force=force)

    async def _rewind(
        self, s: Session, message: MessageRecord, *, dry_run: bool, force: bool
    ) -> Rewind:
        line = line_uuid(message.turn_id)
        plan = await self._ask_rewind(s, message, line, dry_run=True)
        files = [str(f) for f in plan.get("filesChanged") or []]
        result = Rewind(
            files=files,
            conflicts=filemarks.conflicts(s.record.agent_files, files),
            insertions=int(plan.get("insertions") or 0),
            deletions=int(plan.get("deletions") or 0),
        )
        if dry_run or not files or (result.conflicts and not force):
            return result
        await self._ask_rewind(s, message, line, dry_run=False)
        result.rewound = True
        with self.store.atomic():
            s.record = self.table.write(
                s, agent_files=filemarks.refreshed(s.record.agent_files, files)
            )
            self._audit(s, "file_rewind", f"to before message {message.message_id}: {files}")
        self.emit(
            s,
            ev.Notice(
                ev.FILES_REWOUND,
                f"{len(files)} file(s) restored to before message {message.message_id}"
                + (f" ({len(result.conflicts)} changed by someone else, forced)" if force else "")
                + ": "
                + ", ".join(files),
            ),
        )
        log.info("files rewound", session_id=s.id, files=len(files), forced=force)
        return result

    async def _ask_rewind(
        self, s: Session, message: MessageRecord, line: str, *, dry_run: bool
    ) -> dict[str, Any]:
        answer = await self.calls.call(
            s,
            "rewind_files",
            timeout=self.config.agent.first_event_timeout,
            start=True,
            user_message_id=line,
            dry_run=dry_run,
        )
        if not answer.get("canRewind"):
            raise FailedPrecondition(
                f"the agent cannot rewind the files to before message {message.message_id}: "
                f"{answer.get('error') or 'no reason given'}"
            )
        return answer

    # --- the conversation ----------------------------------------------------------------

    async def rollback(self, session_id: str, message_id: int, *, rewind_files: bool) -> Rollback:
        s = self._idle_session(session_id, "roll back")
        message = self._user_message(s, message_id)
        if not s.record.agent_started:
            raise FailedPrecondition(f"session {s.id!r} has no conversation to roll back yet")
        running = s.tasks.running()
        if running:
            raise FailedPrecondition(
                f"session {s.id!r}'s agent runs task {running[0].task_id!r}: a rollback "
                "restarts the agent, which would stop it; stop it first (StopTask)"
            )
        files: list[str] = []
        if rewind_files:
            rewound = await self._rewind(s, message, dry_run=False, force=False)
            if rewound.conflicts:
                raise FailedPrecondition(
                    "not rolled back: files changed by someone else since the agent left them "
                    f"(rewind them with force first, or roll back without files): "
                    f"{', '.join(rewound.conflicts)}"
                )
            files = rewound.files
        prior = self.store.last_reply(s.id, before=message.message_id)
        count = 0

        async def apply() -> None:
            nonlocal count
            await self.pool.retire(s.id)  # its next agent starts from the rollback point
            undo = {
                "message_id": message.message_id,
                "agent_session_id": s.record.agent_session_id,
                "agent_started": s.record.agent_started,
                "fork_of": s.record.fork_of,
                "fork_at": s.record.fork_at,
            }
            with self.store.atomic():
                count = self.store.roll_back(s.id, message.message_id)
                s.record = self.table.write(
                    s,
                    agent_session_id=ids.new_agent_session_id(),
                    agent_started=False,
                    fork_of=s.record.agent_session_id if prior else "",
                    fork_at=prior.agent_uuid if prior else "",
                    rollback_state=json.dumps(undo),
                )
                self._audit(s, "rollback", f"to before message {message.message_id}")

        await self._in_queue(s, apply)
        self.emit(
            s,
            ev.Notice(
                ev.ROLLED_BACK,
                f"rolled back to before message {message.message_id}: {count} message(s) "
                "are no longer part of the conversation",
            ),
        )
        log.info("session rolled back", session_id=s.id, message_id=message.message_id)
        return Rollback(self.table.view(s), count, files)

    async def undo_rollback(self, session_id: str) -> tuple[SessionView, int]:
        s = self._idle_session(session_id, "undo a rollback")
        state = self._undoable(s)
        count = 0

        async def apply() -> None:
            nonlocal count
            if s.record.rollback_state != json.dumps(state):
                raise FailedPrecondition("the rollback changed meanwhile; nothing undone")
            await self.pool.retire(s.id)  # an agent started for the rolled back conversation
            with self.store.atomic():
                count = self.store.undo_roll_back(s.id, int(state["message_id"]))
                s.record = self.table.write(
                    s,
                    agent_session_id=str(state["agent_session_id"]),
                    agent_started=bool(state["agent_started"]),
                    fork_of=str(state["fork_of"]),
                    fork_at=str(state["fork_at"]),
                    rollback_state="",
                )
                self._audit(s, "rollback", f"undone: back to message {state['message_id']}")

        await self._in_queue(s, apply)
        self.emit(
            s,
            ev.Notice(ev.ROLLED_BACK, f"rollback undone: {count} message(s) are back"),
        )
        log.info("rollback undone", session_id=s.id)
        return self.table.view(s), count

    def _undoable(self, s: Session) -> dict[str, Any]:
        if not s.record.rollback_state:
            raise FailedPrecondition(
                f"session {s.id!r} has no rollback to undo (none, or a turn has run since)"
            )
        state: dict[str, Any] = json.loads(s.record.rollback_state)
        return state

    # --- shared --------------------------------------------------------------------------

    def _idle_session(self, session_id: str, what: str) -> Session:
        self.table.check_open()
        s = self.table.serving(session_id)
        self.table.require_open(s)
        if s.turn is not None or s.inbox:
            raise FailedPrecondition(
                f"cannot {what} while a turn runs or waits in session {s.id!r}; "
                "interrupt it or wait for it to end"
            )
        return s

    def _user_message(self, s: Session, message_id: int) -> MessageRecord:
        if message_id <= 0:
            raise InvalidArgument("message_id must name a message of the session")
        m = self.store.message(s.id, message_id)
        if m is None:
            raise NotFound(f"session {s.id!r} has no message {message_id}")
        if m.role != "user":
            raise InvalidArgument(f"message {message_id} is a reply: name a user message")
        if m.origin == ASIDE:
            raise InvalidArgument(f"message {message_id} was asked aside: not in the conversation")
        if m.rolled_back_at:
            raise FailedPrecondition(f"message {message_id} is rolled back already")
        if m.origin != "client" or m.status == "pending" or m.detail == "steer":
            raise FailedPrecondition(
                f"message {message_id} did not start a finished turn of a client's (the agent "
                "started it, it was steered into another turn, or it still runs)"
            )
        return m

    def _audit(self, s: Session, kind: str, detail: str) -> None:
        self.store.add_audit(
            AuditRecord(session_id=s.id, kind=kind, allow=True, decider=CLIENT, detail=detail)
        )

    async def _in_queue(self, s: Session, apply: Callable[[], Awaitable[None]]) -> None:
        """Runs `apply` as a job of the session's queue: a turn sent meanwhile runs after it."""
        change = Change(apply)
        self.queue.submit(s, change)
        await asyncio.shield(change.done)
