"""Python clients for atomizerd: `Client` (blocking) and `AsyncClient` (asyncio, grpc.aio).

    with Client() as c:                       # finds the socket (see discovery.py)
        s = c.create_session(study_id="beam")
        for ev in c.send_message(s.session_id, "hello"):
            if isinstance(ev, TextDelta):
                print(ev.text, end="")

Every unary call has a deadline (`timeout`, default 10 s). The read-only calls (GetSession,
ListSessions, GetHistory, ListAuditEvents, GetStatus) are retried on UNAVAILABLE with
exponential backoff by gRPC itself, through the channel's service config; nothing else is
retried, because a repeated write is not safe without an idempotency key (RespondToPermission
included: a repeated answer is refused as already decided). Failures raise the `errors` classes.

Tool approval: in user mode, a `PermissionRequest` event asks to run a tool outside the
allowlist; answer it with `respond_to_permission` (the first answer wins), and read every
outcome back with `list_audit_events`.

Tasks: the agent runs background commands and subagents (`Session.tasks`, the `TaskStarted` /
`TaskOutput` / `TaskEnded` events); `stop_task` stops one, `get_task_output` pages through its
output. `send_message(..., steer=True)` puts text into the running turn instead of queueing it.

Records (sessions, messages, status) are the generated protobuf messages, typed by their .pyi;
stream events are the dataclasses of `events`.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Mapping, Sequence
from types import TracebackType
from typing import Any, Self, Unpack

import grpc
from atomizer.v1 import daemon_pb2, daemon_pb2_grpc, session_pb2, session_pb2_grpc

from atomizer_client.client_async import AsyncClient, AsyncEventStream
from atomizer_client.client_base import (
    DEFAULT_RETRY,
    DEFAULT_TIMEOUT,
    AsidePart,
    AttachmentLike,
    AuditEvent,
    CreateOptions,
    Decision,
    HistoryOptions,
    ListOptions,
    McpServerStatus,
    Message,
    ModeLike,
    QuestionOutcome,
    Req,
    Resp,
    RespondOptions,
    Restart,
    RetryPolicy,
    SearchOptions,
    SendOptions,
    Session,
    Status,
    Task,
    TaskOutputPage,
    _Base,
    _create_request,
    _history_request,
    _list_request,
    _respond_request,
    _search_request,
    _send,
    _send_request,
    _task_output_request,
    attachment_from_path,
    channel_options,
    mode_value,
    new_request_id,
    service_config,
    state_value,
)
from atomizer_client.errors import from_rpc_error
from atomizer_client.events import Event, from_proto


class EventStream(Iterator[Event]):
    """The events of a SendMessage or WatchSession call, as they arrive.

    The call is already running when this is returned. `cancel()` abandons it (the turn itself
    goes on: stop it with `Client.interrupt`); iteration then ends quietly.
    """

    def __init__(self, call: grpc.CallIterator[Any], request_id: str = "") -> None:
        self._call = call
        self.request_id = request_id
        self._cancelled = False
        self._events = self._iterate()

    def __next__(self) -> Event:
        return next(self._events)

    def _iterate(self) -> Iterator[Event]:
        try:
            for resp in self._call:
                yield from_proto(resp.event)
        except grpc.RpcError as e:
            if self._cancelled:
                return
            raise from_rpc_error(e) from e

    def cancel(self) -> None:
        self._cancelled = True
        self._call.cancel()  # type: ignore[no-untyped-call]  # grpc-stubs leaves it untyped

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.cancel()


class Client(_Base):
    """Blocking client. Thread-safe: share one per process."""

    def __init__(
        self,
        socket: str | os.PathLike[str] | None = None,
        *,
        timeout: float = DEFAULT_TIMEOUT,
        retry: RetryPolicy | None = DEFAULT_RETRY,
        options: Sequence[tuple[str, Any]] = (),
    ) -> None:
        target = self._locate(socket, timeout, retry, options)
        self._attach(grpc.insecure_channel(target, options=self._options))

    @classmethod
    def from_channel(cls, channel: grpc.Channel, *, timeout: float = DEFAULT_TIMEOUT) -> Self:
        """A client over a channel opened elsewhere (another transport, interceptors, a test
        double), which it then owns: `close()` closes it. The channel's own options apply, so
        the read-only calls are retried only if it was made with `channel_options(retry)`."""
        client = cls.__new__(cls)
        client.socket, client.target, client.timeout = None, None, timeout
        client._attach(channel)
        return client

    def _attach(self, channel: grpc.Channel) -> None:
        self._channel = channel
        self._sessions = session_pb2_grpc.SessionServiceStub(channel)
        self._daemon = daemon_pb2_grpc.DaemonServiceStub(channel)

    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self, t: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def _call(
        self, method: grpc.UnaryUnaryMultiCallable[Req, Resp], req: Req, timeout: float | None
    ) -> Resp:
        try:
            return method(req, timeout=self._deadline(timeout))
        except grpc.RpcError as e:
            raise from_rpc_error(e) from e

    def create_session(
        self, *, timeout: float | None = None, **options: Unpack[CreateOptions]
    ) -> Session:
        """Creates a session, or reopens `session_id` if it exists (mode None: unchanged).

        `budget_usd` caps what the session may spend in all, `turn_budget_usd` one turn; 0
        keeps the daemon's caps (`budget.session_usd`, `budget.turn_usd`), which these may only
        lower (a higher one is InvalidArgumentError). A session at its cap refuses messages
        with ResourceExhaustedError. `model` picks the session's model (one of the daemon's
        `agent.models` when it lists them); empty: the daemon's default (unchanged when
        reopening). `labels`: a new session's labels (SetLabels changes them later).
        """
        req = _create_request(options)
        return self._call(self._sessions.CreateSession, req, timeout).session

    def get_session(self, session_id: str, *, timeout: float | None = None) -> Session:
        req = session_pb2.GetSessionRequest(session_id=session_id)
        return self._call(self._sessions.GetSession, req, timeout).session

    def list_sessions(
        self, *, timeout: float | None = None, **options: Unpack[ListOptions]
    ) -> Iterator[Session]:
        """Every matching session, newest first, fetching pages as the iteration goes;
        `host_id`: only that host's (daemons sharing one database); `labels`: only sessions
        carrying all of them; archived sessions only with `include_archived` (or only them,
        `archived_only`)."""
        req = _list_request(options)
        return self._pages(self._sessions.ListSessions, req, "sessions", timeout)

    def set_labels(
        self,
        session_id: str,
        labels: Mapping[str, str],
        *,
        replace: bool = False,
        timeout: float | None = None,
    ) -> Session:
        """Merges `labels` into the session's (an empty value removes that key), or with
        `replace` makes them the session's labels."""
        req = session_pb2.SetLabelsRequest(
            session_id=session_id, labels=dict(labels), replace=replace
        )
        return self._call(self._sessions.SetLabels, req, timeout).session

    def archive_session(self, session_id: str, *, timeout: float | None = None) -> Session:
        """Archives the session (its agent stops; FailedPreconditionError while a task or a
        turn runs)."""
        req = session_pb2.ArchiveSessionRequest(session_id=session_id)
        return self._call(self._sessions.ArchiveSession, req, timeout).session

    def unarchive_session(self, session_id: str, *, timeout: float | None = None) -> Session:
        req = session_pb2.UnarchiveSessionRequest(session_id=session_id)
        return self._call(self._sessions.UnarchiveSession, req, timeout).session

    def search_messages(
        self, query: str, *, timeout: float | None = None, **options: Unpack[SearchOptions]
    ) -> Iterator[session_pb2.SearchHit]:
        """Stored messages matching `query`, best first, fetching pages as the iteration goes;
        InvalidArgumentError for a malformed query."""
        req = _search_request(query, options)
        return self._pages(self._sessions.SearchMessages, req, "hits", timeout)

    def terminate_session(
        self, session_id: str, *, purge: bool = False, timeout: float | None = None
    ) -> Session | None:
        """Closes the session; returns it as closed, or None when purged."""
        req = session_pb2.TerminateSessionRequest(session_id=session_id, purge=purge)
        resp = self._call(self._sessions.TerminateSession, req, timeout)
        return resp.session if resp.HasField("session") else None

    def switch_mode(
        self, session_id: str, mode: ModeLike, *, timeout: float | None = None
    ) -> Session:
        req = session_pb2.SwitchModeRequest(session_id=session_id, mode=mode_value(mode))
        return self._call(self._sessions.SwitchMode, req, timeout).session

    def set_study_context(
        self, session_id: str, study_id: str | None, *, timeout: float | None = None
    ) -> Session:
        """Attaches a study; None or "" detaches."""
        req = session_pb2.SetStudyContextRequest(session_id=session_id, study_id=study_id or "")
        return self._call(self._sessions.SetStudyContext, req, timeout).session

    def fork_session(
        self,
        session_id: str,
        *,
        new_session_id: str = "",
        at_message_id: int = 0,
        timeout: float | None = None,
    ) -> Session:
        """A new session that goes on from `session_id`'s conversation: up to the reply
        `at_message_id` (an assistant `Message.message_id`), or its last reply (0). The
        original is unchanged. Never retried."""
        req = session_pb2.ForkSessionRequest(
            session_id=session_id, new_session_id=new_session_id, at_message_id=at_message_id
        )
        return self._call(self._sessions.ForkSession, req, timeout).session

    def set_model(self, session_id: str, model: str, *, timeout: float | None = None) -> Session:
        """Changes the session's model ("" : the daemon's default) once its running turn has
        finished; InvalidArgumentError for a model the daemon does not offer."""
        req = session_pb2.SetModelRequest(session_id=session_id, model=model)
        return self._call(self._sessions.SetModel, req, timeout).session

    def get_attachment(
        self, session_id: str, sha256: str, *, timeout: float | None = None
    ) -> session_pb2.Attachment:
        """The bytes of a file sent in the session (`Message.attachments[i].sha256`)."""
        req = session_pb2.GetAttachmentRequest(session_id=session_id, sha256=sha256)
        return self._call(self._sessions.GetAttachment, req, timeout).attachment

    def get_history(
        self, session_id: str, *, timeout: float | None = None, **options: Unpack[HistoryOptions]
    ) -> Iterator[Message]:
        """Every stored message, oldest first, fetching pages as the iteration goes
        (`page_size`; `hide_asides`, `hide_rolled_back`: see HistoryOptions)."""
        req = _history_request(session_id, options)
        return self._pages(self._sessions.GetHistory, req, "messages", timeout)

    def ask_aside(
        self, session_id: str, text: str, *, timeout: float | None = None
    ) -> Iterator[AsidePart]:
        """Asks a question aside: answered from the conversation so far, never added to it
        (also while a turn runs). Yields the answer as it comes: the first part names the
        stored question, the last (`done`) the stored answer; join the parts' `text`.
        `timeout` bounds the whole call (default: none). Never retried."""
        req = session_pb2.AskAsideRequest(session_id=session_id, text=text)
        try:
            yield from self._sessions.AskAside(req, timeout=timeout)
        except grpc.RpcError as e:
            raise from_rpc_error(e) from e

    def rewind_files(
        self,
        session_id: str,
        message_id: int,
        *,
        dry_run: bool = False,
        force: bool = False,
        timeout: float | None = None,
    ) -> session_pb2.RewindFilesResponse:
        """Restores the files the agent's edit tools changed since user message `message_id`
        to their state before it. A file changed by someone else since the agent left it is
        listed in `conflicts` and stops the rewind unless `force`; `dry_run` only lists.
        Never retried."""
        req = session_pb2.RewindFilesRequest(
            session_id=session_id, message_id=message_id, dry_run=dry_run, force=force
        )
        return self._call(self._sessions.RewindFiles, req, timeout)

    def rollback_session(
        self,
        session_id: str,
        message_id: int,
        *,
        rewind_files: bool = False,
        timeout: float | None = None,
    ) -> session_pb2.RollbackSessionResponse:
        """The session goes on as it stood before user message `message_id`: that message
        and the later ones stay in history marked `rolled_back`. Never retried."""
        req = session_pb2.RollbackSessionRequest(
            session_id=session_id, message_id=message_id, rewind_files=rewind_files
        )
        return self._call(self._sessions.RollbackSession, req, timeout)

    def undo_rollback(
        self, session_id: str, *, timeout: float | None = None
    ) -> session_pb2.UndoRollbackResponse:
        """Undoes the last rollback while no turn has run since."""
        req = session_pb2.UndoRollbackRequest(session_id=session_id)
        return self._call(self._sessions.UndoRollback, req, timeout)

    def import_session(
        self,
        *,
        agent_session_id: str = "",
        transcript_path: str = "",
        mode: ModeLike | None = None,
        study_id: str = "",
        session_id: str = "",
        timeout: float | None = None,
    ) -> session_pb2.ImportSessionResponse:
        """A conversation started with the plain `claude` CLI becomes a session that resumes
        it: name it by its id or its transcript's path (in the CLI's projects folder)."""
        req = session_pb2.ImportSessionRequest(
            agent_session_id=agent_session_id,
            transcript_path=transcript_path,
            mode=session_pb2.MODE_UNSPECIFIED if mode is None else mode_value(mode),
            study_id=study_id,
            session_id=session_id,
        )
        return self._call(self._sessions.ImportSession, req, timeout)

    def rename_session(
        self, session_id: str, title: str, *, timeout: float | None = None
    ) -> Session:
        """Sets the session's title (one line, at most 256 characters)."""
        req = session_pb2.RenameSessionRequest(session_id=session_id, title=title)
        return self._call(self._sessions.RenameSession, req, timeout).session

    def get_mcp_status(
        self, session_id: str, *, timeout: float | None = None
    ) -> list[McpServerStatus]:
        """The MCP servers of the session's live agent, with their health now."""
        req = session_pb2.GetMcpStatusRequest(session_id=session_id)
        return list(self._call(self._sessions.GetMcpStatus, req, timeout).servers)

    def reconnect_mcp_server(
        self, session_id: str, name: str, *, timeout: float | None = None
    ) -> McpServerStatus:
        req = session_pb2.ReconnectMcpServerRequest(session_id=session_id, name=name)
        return self._call(self._sessions.ReconnectMcpServer, req, timeout).server

    def set_mcp_server_enabled(
        self, session_id: str, name: str, enabled: bool, *, timeout: float | None = None
    ) -> McpServerStatus:
        """Enables or disables one of the live agent's MCP servers (until it restarts)."""
        req = session_pb2.SetMcpServerEnabledRequest(
            session_id=session_id, name=name, enabled=enabled
        )
        return self._call(self._sessions.SetMcpServerEnabled, req, timeout).server

    def _pages(
        self,
        method: grpc.UnaryUnaryMultiCallable[Any, Any],
        req: Any,
        field: str,
        timeout: float | None,
    ) -> Iterator[Any]:
        while True:
            resp = self._call(method, req, timeout)
            yield from getattr(resp, field)
            if not resp.next_page_token:
                return
            req.page_token = resp.next_page_token

    def send_message(
        self, session_id: str, text: str, **options: Unpack[SendOptions]
    ) -> EventStream:
        """Starts a turn and returns its events; the last one is TurnCompleted or TurnFailed.

        `request_id` defaults to a fresh id (`stream.request_id`); pass it again to re-attach
        to the same turn after a broken connection instead of starting a second one.
        `timeout` bounds the whole turn (default: none; the daemon has its own turn timeout).
        `attachments`: files for the model (`attachment_from_path(path)`, or `(name,
        media_type, data)`): images, PDFs, text; the daemon's `attachments` limits apply.
        `steer`: while a turn runs, the text goes into it now (a `UserMessage` event shows when
        the agent took it) and the stream follows that turn to its end; with no turn running
        it starts one as usual. `output_schema`: a JSON Schema (JSON text) the answer must
        satisfy; the `TurnCompleted` then carries it as JSON text in `structured_output`.
        """
        req, rid = _send(session_id, text, options)
        return EventStream(self._sessions.SendMessage(req, timeout=options.get("timeout")), rid)

    def watch_session(self, session_id: str, *, after_seq: int = 0) -> EventStream:
        """Buffered events with seq > after_seq, then the session live, until cancelled."""
        req = session_pb2.WatchSessionRequest(session_id=session_id, after_seq=after_seq)
        return EventStream(self._sessions.WatchSession(req))

    def interrupt(self, session_id: str, *, timeout: float | None = None) -> str:
        """Interrupts the running turn and returns its id; FailedPreconditionError if none."""
        req = session_pb2.InterruptRequest(session_id=session_id)
        return self._call(self._sessions.Interrupt, req, timeout).turn_id

    def respond_to_permission(
        self,
        session_id: str,
        request_id: str,
        allow: bool,
        *,
        timeout: float | None = None,
        **options: Unpack[RespondOptions],
    ) -> Decision:
        """Answers a `PermissionRequest` event; returns the decision taken.

        `message` is shown to the model with a denial; `remember` applies the same answer to
        the same call (tool and input) for the rest of the session. With an allow,
        `updated_input` runs the tool with that input instead, and `rule` (a suggestion's rule,
        or `(tool_name, rule_content)`) allows every matching call for the rest of the session
        instead of this one only. Allowing an ExitPlanMode request (a plan-mode session's
        plan) switches the session to `mode`: "user" (the default) or "power" (where the
        daemon allows it). The first answer wins: a later one raises
        FailedPreconditionError, one for a request that is not pending (never was, or its turn
        has ended) NotFoundError. Never retried.
        """
        req = _respond_request(session_id, request_id, allow, options)
        return self._call(self._sessions.RespondToPermission, req, timeout).decision

    def answer_question(
        self,
        session_id: str,
        request_id: str,
        answers: Mapping[str, str],
        *,
        timeout: float | None = None,
    ) -> QuestionOutcome:
        """Answers a `Question` event: question text -> the chosen option's label (or the
        person's own words; for a multi_select question the labels joined by ", "). Empty
        `answers` declines the questions. The first answer wins (a later one raises
        FailedPreconditionError; one for a question that is not pending NotFoundError; a key
        that is not one of its questions InvalidArgumentError). Never retried."""
        req = session_pb2.AnswerQuestionRequest(
            session_id=session_id, request_id=request_id, answers=dict(answers)
        )
        return self._call(self._sessions.AnswerQuestion, req, timeout).answer

    def list_audit_events(
        self, session_id: str, *, page_size: int = 0, timeout: float | None = None
    ) -> Iterator[AuditEvent]:
        """The session's audit trail (permission outcomes, mode switches), oldest first,
        fetching pages as the iteration goes."""
        req = session_pb2.ListAuditEventsRequest(session_id=session_id, page_size=page_size)
        return self._pages(self._sessions.ListAuditEvents, req, "events", timeout)

    def stop_task(self, session_id: str, task_id: str, *, timeout: float | None = None) -> None:
        """Stops a running task of the session (`Session.tasks`); its `TaskEnded` follows
        with status "stopped". NotFoundError when no such task runs. Never retried."""
        req = session_pb2.StopTaskRequest(session_id=session_id, task_id=task_id)
        self._call(self._sessions.StopTask, req, timeout)

    def get_task_output(
        self,
        session_id: str,
        task_id: str,
        *,
        offset: int = 0,
        limit: int = 0,
        timeout: float | None = None,
    ) -> TaskOutputPage:
        """A page of a task's output (running, or recently ended) from byte `offset`, at most
        `limit` bytes (0: the daemon's page size); read on from the page's `next_offset`."""
        req = _task_output_request(session_id, task_id, offset, limit)
        return self._call(self._sessions.GetTaskOutput, req, timeout)

    def get_status(self, *, timeout: float | None = None) -> Status:
        return self._call(self._daemon.GetStatus, daemon_pb2.GetStatusRequest(), timeout)

    def restart_daemon(self, *, timeout: float | None = None) -> Restart:
        """A planned restart (docs/restart.md): agents and running turns are handed to the
        next daemon. Streams end with UNAVAILABLE; re-attach with `watch` from the last seq."""
        return self._call(self._daemon.RestartDaemon, daemon_pb2.RestartDaemonRequest(), timeout)


__all__ = [
    "DEFAULT_TIMEOUT",
    "AsyncClient",
    "AsyncEventStream",
    "AttachmentLike",
    "AuditEvent",
    "Client",
    "Decision",
    "EventStream",
    "QuestionOutcome",
    "RetryPolicy",
    "Task",
    "TaskOutputPage",
    "_send_request",
    "_task_output_request",
    "attachment_from_path",
    "channel_options",
    "mode_value",
    "new_request_id",
    "service_config",
    "state_value",
]
