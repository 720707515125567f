"""A drop-in for the Atomizer web backend's original in-process `SessionManager`.

The original ran `claude` itself; this one has the same interface and is backed by atomizerd, so
the backend migrates by changing one import::

    from atomizer_client.compat import SessionManager, get_session_manager

    manager = get_session_manager()
    await manager.start()
    session = await manager.create_session(mode="user", study_id="beam")
    async for chunk in manager.send_message(session.session_id, "hello"):
        ...  # {"type": "text", "content": …}, {"type": "error", "message": …},
             # and last {"type": "done", "tool_calls": [...]}

What stays as it was: the method names, arguments and return values; `send_message` yields the
original's dicts (text chunks, an `error` when the turn fails or the agent reports one, then
`done`; an unknown session yields only `{"type": "error", "message": "Session not found"}`);
`get_session` and `get_session_info` are plain (not async) calls with the original's keys.
What is better: sessions live in the daemon, so they survive a restart of the backend (and of
the daemon) and `create_session(resume_session_id=…)` continues the same conversation;
`done.tool_calls` lists the turn's tool calls (the original's list was always empty), each
`{"id", "name", "input", "result", "is_error"}`.

Tools the agent asks to use outside the user-mode allowlist (which the original's CLI denied by
itself) are denied at once unless a `permission_handler` is given; questions the agent asks
(its AskUserQuestion tool) are declined at once unless a `question_handler` answers them.
"""

from __future__ import annotations

import contextlib
import inspect
import json
import os
from collections.abc import AsyncGenerator, Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Literal

from atomizer.v1 import session_pb2

from atomizer_client.client import DEFAULT_TIMEOUT, AsyncClient
from atomizer_client.errors import (
    AtomizerError,
    FailedPreconditionError,
    InvalidArgumentError,
    NotFoundError,
)
from atomizer_client.events import (
    PermissionRequest,
    Question,
    TextDelta,
    ToolResult,
    ToolUse,
    TurnCompleted,
    TurnFailed,
)

Mode = Literal["user", "power", "plan"]
Chunks = AsyncGenerator[dict[str, Any], None]
PermissionHandler = Callable[[PermissionRequest], bool | Awaitable[bool]]
# Question text -> answer; an empty mapping declines.
QuestionHandler = Callable[[Question], Mapping[str, str] | Awaitable[Mapping[str, str]]]

SESSION_NOT_FOUND = "Session not found"
DENIED_UNASKED = "this tool is not available in this session's mode"


def _local(ts: Any) -> datetime:
    """A daemon Timestamp as the original's naive local datetime (unset: now)."""
    if not ts.seconds and not ts.nanos:
        return datetime.now()
    value: datetime = ts.ToDatetime(tzinfo=UTC).astimezone().replace(tzinfo=None)
    return value


_MODES: dict[int, Mode] = {
    session_pb2.MODE_USER: "user",
    session_pb2.MODE_POWER: "power",
    session_pb2.MODE_PLAN: "plan",
}


@dataclass
class ClaudeSession:
    """The original's session object: its id, mode, study and times. There is no process of
    the backend's own (`process` is always None): the daemon runs the agent."""

    session_id: str
    mode: Mode
    study_id: str | None
    process: None = None
    created_at: datetime = field(default_factory=datetime.now)
    last_active: datetime = field(default_factory=datetime.now)
    record: session_pb2.Session | None = field(default=None, repr=False)

    def is_alive(self) -> bool:
        """Whether the session is open in the daemon (its agent is started on demand)."""
        return self.record is not None and self.record.state != session_pb2.SESSION_STATE_CLOSED

    def _update(self, record: session_pb2.Session) -> None:
        self.record = record
        self.mode = _MODES.get(record.mode, "user")
        self.study_id = record.study_id or None
        self.created_at = _local(record.created_at)
        self.last_active = _local(record.last_active_at)

    @classmethod
    def from_record(cls, record: session_pb2.Session) -> ClaudeSession:
        session = cls(record.session_id, "user", None)
        session._update(record)
        return session


class SessionManager:
    """The original's interface, backed by atomizerd (see the module docstring).

    `socket`: the daemon's socket (default: found as `AsyncClient` finds it, e.g. from
    $ATOMIZERD_SOCKET). `permission_handler(request) -> bool` (or an awaitable of one) answers
    the agent's requests to use tools outside the allowlist; without one they are denied.
    `question_handler(question) -> {question text: answer}` (or an awaitable of one) answers
    the agent's questions; without one (or with an empty answer) they are declined.
    """

    def __init__(
        self,
        socket: str | os.PathLike[str] | None = None,
        *,
        timeout: float = DEFAULT_TIMEOUT,
        permission_handler: PermissionHandler | None = None,
        question_handler: QuestionHandler | None = None,
    ) -> None:
        self.sessions: dict[str, ClaudeSession] = {}
        self._socket = socket
        self._timeout = timeout
        self._client: AsyncClient | None = None
        self.permission_handler = permission_handler
        self.question_handler = question_handler

    # --- lifecycle ---------------------------------------------------------------------

    async def start(self) -> None:
        """Connects to the daemon (which does its own reaping: there is no cleanup loop)."""
        self._connect()

    async def stop(self) -> None:
        """Closes the connection. The sessions stay in the daemon: `create_session` with
        `resume_session_id` continues one later, also from another process."""
        self.sessions.clear()
        client, self._client = self._client, None
        if client is not None:
            await client.close()

    def _connect(self) -> AsyncClient:
        if self._client is None:
            self._client = AsyncClient(self._socket, timeout=self._timeout)
        return self._client

    # --- sessions ----------------------------------------------------------------------

    async def create_session(
        self,
        mode: Mode = "user",
        study_id: str | None = None,
        resume_session_id: str | None = None,
    ) -> ClaudeSession:
        """Creates a session, or resumes `resume_session_id`: a session this manager holds is
        returned as it is; one the daemon knows is reopened with this mode and study (as the
        original rewrote its record); an unknown id is created with that id."""
        client = self._connect()
        if resume_session_id and resume_session_id in self.sessions:
            session = self.sessions[resume_session_id]
            if session.is_alive():
                await self._refresh(session)
                if session.is_alive():
                    return session
        record = await client.create_session(
            mode=mode, study_id=study_id or "", session_id=resume_session_id or ""
        )
        if (record.study_id or None) != (study_id or None):
            record = await client.set_study_context(record.session_id, study_id)
        session = ClaudeSession.from_record(record)
        self.sessions[session.session_id] = session
        return session

    async def send_message(self, session_id: str, message: str) -> Chunks:
        """Runs one turn and yields the original's dicts: `text` chunks as they stream, an
        `error` if the turn failed or the agent reported one, then `done` with the turn's tool
        calls. An unknown session yields only the original's "Session not found" error."""
        session = await self._find(session_id)
        if session is None:
            yield {"type": "error", "message": SESSION_NOT_FOUND}
            return
        client = self._connect()
        calls: dict[str, dict[str, Any]] = {}
        session.last_active = datetime.now()
        stream = client.send_message(session_id, message)
        try:
            async for ev in stream:
                if isinstance(ev, TextDelta):
                    if ev.text:
                        yield {"type": "text", "content": ev.text}
                elif isinstance(ev, ToolUse):
                    calls[ev.id] = _tool_call(ev)
                elif isinstance(ev, ToolResult) and ev.tool_use_id in calls:
                    calls[ev.tool_use_id].update(result=ev.content, is_error=ev.is_error)
                elif isinstance(ev, PermissionRequest):
                    await self._answer_permission(ev)
                elif isinstance(ev, Question):
                    await self._answer_question(ev)
                elif isinstance(ev, TurnFailed):
                    yield {"type": "error", "message": ev.message}
                elif isinstance(ev, TurnCompleted) and ev.is_error:
                    yield {"type": "error", "message": ev.text or ev.result_subtype}
        except NotFoundError:
            self.sessions.pop(session_id, None)
            yield {"type": "error", "message": SESSION_NOT_FOUND}
            return
        except AtomizerError as e:
            yield {"type": "error", "message": e.details or str(e)}
        finally:
            stream.cancel()
        await self._refresh(session)
        yield {"type": "done", "tool_calls": list(calls.values())}

    async def switch_mode(self, session_id: str, new_mode: Mode) -> ClaudeSession:
        """Changes the session's mode (after a running turn); ValueError if it is unknown."""
        client = self._connect()
        try:
            record = await client.switch_mode(session_id, new_mode)
        except NotFoundError:
            self.sessions.pop(session_id, None)
            raise ValueError(f"Session {session_id} not found") from None
        return self._hold(record)

    async def set_study_context(self, session_id: str, study_id: str | None) -> None:
        """Attaches a study (None detaches); the next message carries its context. An unknown
        session is ignored, as the original did; a study that does not exist is ValueError."""
        client = self._connect()
        try:
            record = await client.set_study_context(session_id, study_id)
        except (NotFoundError, FailedPreconditionError):
            return
        except InvalidArgumentError as e:
            raise ValueError(e.details) from None
        self._hold(record)

    def get_session(self, session_id: str) -> ClaudeSession | None:
        """The session this manager holds (created, resumed or used through it), or None."""
        return self.sessions.get(session_id)

    def get_session_info(self, session_id: str) -> dict[str, Any] | None:
        """The original's info dict, as of the manager's last call for the session."""
        session = self.sessions.get(session_id)
        if session is None:
            return None
        record = session.record
        info: dict[str, Any] = {
            "session_id": session.session_id,
            "mode": session.mode,
            "study_id": session.study_id,
            "is_alive": session.is_alive(),
            "created_at": session.created_at.isoformat(),
            "last_active": session.last_active.isoformat(),
            "message_count": record.message_count if record is not None else 0,
        }
        if record is not None:
            info["db_record"] = _db_record(session, record)
        return info

    # --- internals ---------------------------------------------------------------------

    async def _find(self, session_id: str) -> ClaudeSession | None:
        """The session if it is open: held here, or known to the daemon (created elsewhere)."""
        session = self.sessions.get(session_id)
        if session is not None:
            return session
        try:
            record = await self._connect().get_session(session_id)
        except (NotFoundError, InvalidArgumentError):  # unknown, or not an id it could make
            return None
        if record.state == session_pb2.SESSION_STATE_CLOSED:
            return None
        return self._hold(record)

    def _hold(self, record: session_pb2.Session) -> ClaudeSession:
        session = self.sessions.get(record.session_id)
        if session is None:
            session = self.sessions[record.session_id] = ClaudeSession.from_record(record)
        else:
            session._update(record)
        return session

    async def _refresh(self, session: ClaudeSession) -> None:
        try:
            session._update(await self._connect().get_session(session.session_id))
        except NotFoundError:
            self.sessions.pop(session.session_id, None)
            if session.record is not None:
                session.record.state = session_pb2.SESSION_STATE_CLOSED
        except AtomizerError:
            pass  # the reply is already out; the snapshot is refreshed on the next call

    async def _answer_question(self, question: Question) -> None:
        answers: Mapping[str, str] = {}
        if self.question_handler is not None:
            answer = self.question_handler(question)
            answers = await answer if inspect.isawaitable(answer) else answer
        with contextlib.suppress(NotFoundError, FailedPreconditionError):
            await self._connect().answer_question(
                question.session_id, question.request_id, dict(answers)
            )

    async def _answer_permission(self, request: PermissionRequest) -> None:
        client = self._connect()
        allow = False
        if self.permission_handler is not None:
            answer = self.permission_handler(request)
            allow = bool(await answer) if inspect.isawaitable(answer) else bool(answer)
        # Decided meanwhile (another client, the timeout, the turn's end): that stands.
        with contextlib.suppress(NotFoundError, FailedPreconditionError):
            await client.respond_to_permission(
                request.session_id,
                request.request_id,
                allow,
                message="" if allow else DENIED_UNASKED,
            )


def _tool_call(ev: ToolUse) -> dict[str, Any]:
    try:
        tool_input: Any = json.loads(ev.input_json) if ev.input_json else {}
    except ValueError:
        tool_input = ev.input_json
    return {"id": ev.id, "name": ev.name, "input": tool_input, "result": "", "is_error": False}


def _db_record(session: ClaudeSession, record: session_pb2.Session) -> dict[str, Any]:
    """What the original's store returned for a session, from the daemon's record."""
    return {
        "session_id": record.session_id,
        "mode": session.mode,
        "study_id": session.study_id,
        "created_at": session.created_at.isoformat(),
        "last_active": session.last_active.isoformat(),
        "message_count": record.message_count,
        "total_cost_usd": record.total_cost_usd,
        "state": session_pb2.SessionState.Name(record.state).removeprefix("SESSION_STATE_").lower(),
    }


_session_manager: SessionManager | None = None


def get_session_manager() -> SessionManager:
    """The process's one manager, created on first use (as the original's)."""
    global _session_manager
    if _session_manager is None:
        _session_manager = SessionManager()
    return _session_manager


__all__ = ["ClaudeSession", "SessionManager", "get_session_manager"]
