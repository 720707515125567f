"""The asyncio client (grpc.aio): `AsyncClient`, the same calls as `Client` (client.py)."""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from types import TracebackType
from typing import Any, Self, Unpack

import grpc
import grpc.aio
from atomizer.v1 import daemon_pb2, daemon_pb2_grpc, session_pb2, session_pb2_grpc

from atomizer_client import client_base as base
from atomizer_client.errors import from_rpc_error
from atomizer_client.events import Event, from_proto


class AsyncEventStream(AsyncIterator[Event]):
    """`EventStream` for asyncio: `async for ev in stream`."""

    def __init__(self, call: grpc.aio.UnaryStreamCall[Any, Any], request_id: str = "") -> None:
        self._call = call
        self.request_id = request_id
        self._cancelled = False

    async def __anext__(self) -> Event:
        try:
            resp = await self._call.read()
        except grpc.RpcError as e:
            if self._cancelled:
                raise StopAsyncIteration from None
            raise from_rpc_error(e) from e
        except asyncio.CancelledError:
            # grpc.aio raises asyncio's CancelledError from read() after call.cancel()
            if self._cancelled:
                raise StopAsyncIteration from None
            raise
        if not isinstance(resp, base._STREAM_RESPONSES):  # grpc.aio.EOF: the stream ended
            raise StopAsyncIteration
        return from_proto(resp.event)

    def cancel(self) -> None:
        self._cancelled = True
        self._call.cancel()

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.cancel()


class AsyncClient(base._Base):
    """The same API as `Client`, for asyncio; create and use it inside one event loop.

    Unary calls use the client's `timeout` as their gRPC deadline; for a tighter bound on one
    call, wrap it in `asyncio.timeout()`.
    """

    def __init__(
        self,
        socket: str | os.PathLike[str] | None = None,
        *,
        timeout: float = base.DEFAULT_TIMEOUT,
        retry: base.RetryPolicy | None = base.DEFAULT_RETRY,
        options: Sequence[tuple[str, Any]] = (),
    ) -> None:
        target = self._locate(socket, timeout, retry, options)
        self._channel = grpc.aio.insecure_channel(target, options=self._options)
        self._sessions = session_pb2_grpc.SessionServiceStub(self._channel)
        self._daemon = daemon_pb2_grpc.DaemonServiceStub(self._channel)

    async def close(self) -> None:
        await self._channel.close(None)

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self, t: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()

    async def _call(self, method: Callable[..., Awaitable[base.Resp]], req: Any) -> base.Resp:
        try:
            return await method(req, timeout=self.timeout)
        except grpc.RpcError as e:
            raise from_rpc_error(e) from e

    async def create_session(self, **options: Unpack[base.CreateOptions]) -> base.Session:
        """As `Client.create_session`."""
        req = base._create_request(options)
        return (await self._call(self._sessions.CreateSession, req)).session

    async def get_session(self, session_id: str) -> base.Session:
        req = session_pb2.GetSessionRequest(session_id=session_id)
        return (await self._call(self._sessions.GetSession, req)).session

    def list_sessions(self, **options: Unpack[base.ListOptions]) -> AsyncIterator[base.Session]:
        """`async for s in client.list_sessions()`: as `Client.list_sessions`."""
        req = base._list_request(options)
        return self._pages(self._sessions.ListSessions, req, "sessions")

    async def terminate_session(
        self, session_id: str, *, purge: bool = False
    ) -> base.Session | None:
        req = session_pb2.TerminateSessionRequest(session_id=session_id, purge=purge)
        resp = await self._call(self._sessions.TerminateSession, req)
        return resp.session if resp.HasField("session") else None

    async def switch_mode(self, session_id: str, mode: base.ModeLike) -> base.Session:
        req = session_pb2.SwitchModeRequest(session_id=session_id, mode=base.mode_value(mode))
        return (await self._call(self._sessions.SwitchMode, req)).session

    async def set_study_context(self, session_id: str, study_id: str | None) -> base.Session:
        req = session_pb2.SetStudyContextRequest(session_id=session_id, study_id=study_id or "")
        return (await self._call(self._sessions.SetStudyContext, req)).session

    async def fork_session(
        self, session_id: str, *, new_session_id: str = "", at_message_id: int = 0
    ) -> base.Session:
        req = session_pb2.ForkSessionRequest(
            session_id=session_id, new_session_id=new_session_id, at_message_id=at_message_id
        )
        return (await self._call(self._sessions.ForkSession, req)).session

    async def set_model(self, session_id: str, model: str) -> base.Session:
        req = session_pb2.SetModelRequest(session_id=session_id, model=model)
        return (await self._call(self._sessions.SetModel, req)).session

    async def get_attachment(self, session_id: str, sha256: str) -> session_pb2.Attachment:
        req = session_pb2.GetAttachmentRequest(session_id=session_id, sha256=sha256)
        return (await self._call(self._sessions.GetAttachment, req)).attachment

    def get_history(
        self, session_id: str, **options: Unpack[base.HistoryOptions]
    ) -> AsyncIterator[base.Message]:
        """`async for m in client.get_history(sid)`: every stored message, oldest first."""
        return self._pages(
            self._sessions.GetHistory, base._history_request(session_id, options), "messages"
        )

    async def ask_aside(
        self, session_id: str, text: str, *, timeout: float | None = None
    ) -> AsyncIterator[base.AsidePart]:
        """As `Client.ask_aside`: `async for part in client.ask_aside(sid, "...")`."""
        req = session_pb2.AskAsideRequest(session_id=session_id, text=text)
        try:
            async for part in self._sessions.AskAside(req, timeout=timeout):
                yield part
        except grpc.RpcError as e:
            raise from_rpc_error(e) from e

    async def rewind_files(
        self, session_id: str, message_id: int, *, dry_run: bool = False, force: bool = False
    ) -> session_pb2.RewindFilesResponse:
        """As `Client.rewind_files`."""
        req = session_pb2.RewindFilesRequest(
            session_id=session_id, message_id=message_id, dry_run=dry_run, force=force
        )
        return await self._call(self._sessions.RewindFiles, req)

    async def rollback_session(
        self, session_id: str, message_id: int, *, rewind_files: bool = False
    ) -> session_pb2.RollbackSessionResponse:
        """As `Client.rollback_session`."""
        req = session_pb2.RollbackSessionRequest(
            session_id=session_id, message_id=message_id, rewind_files=rewind_files
        )
        return await self._call(self._sessions.RollbackSession, req)

    async def undo_rollback(self, session_id: str) -> session_pb2.UndoRollbackResponse:
        req = session_pb2.UndoRollbackRequest(session_id=session_id)
        return await self._call(self._sessions.UndoRollback, req)

    async def import_session(
        self,
        *,
        agent_session_id: str = "",
        transcript_path: str = "",
        mode: base.ModeLike | None = None,
        study_id: str = "",
        session_id: str = "",
    ) -> session_pb2.ImportSessionResponse:
        """As `Client.import_session`."""
        req = session_pb2.ImportSessionRequest(
            agent_session_id=agent_session_id,
            transcript_path=transcript_path,
            mode=session_pb2.MODE_UNSPECIFIED if mode is None else base.mode_value(mode),
            study_id=study_id,
            session_id=session_id,
        )
        return await self._call(self._sessions.ImportSession, req)

    async def rename_session(self, session_id: str, title: str) -> base.Session:
        req = session_pb2.RenameSessionRequest(session_id=session_id, title=title)
        return (await self._call(self._sessions.RenameSession, req)).session

    async def get_mcp_status(self, session_id: str) -> list[base.McpServerStatus]:
        req = session_pb2.GetMcpStatusRequest(session_id=session_id)
        return list((await self._call(self._sessions.GetMcpStatus, req)).servers)

    async def reconnect_mcp_server(self, session_id: str, name: str) -> base.McpServerStatus:
        req = session_pb2.ReconnectMcpServerRequest(session_id=session_id, name=name)
        return (await self._call(self._sessions.ReconnectMcpServer, req)).server

    async def set_mcp_server_enabled(
        self, session_id: str, name: str, enabled: bool
    ) -> base.McpServerStatus:
        req = session_pb2.SetMcpServerEnabledRequest(
            session_id=session_id, name=name, enabled=enabled
        )
        return (await self._call(self._sessions.SetMcpServerEnabled, req)).server

    async def set_labels(
        self, session_id: str, labels: Mapping[str, str], *, replace: bool = False
    ) -> base.Session:
        """As `Client.set_labels`."""
        req = session_pb2.SetLabelsRequest(
            session_id=session_id, labels=dict(labels), replace=replace
        )
        return (await self._call(self._sessions.SetLabels, req)).session

    async def archive_session(self, session_id: str) -> base.Session:
        req = session_pb2.ArchiveSessionRequest(session_id=session_id)
        return (await self._call(self._sessions.ArchiveSession, req)).session

    async def unarchive_session(self, session_id: str) -> base.Session:
        req = session_pb2.UnarchiveSessionRequest(session_id=session_id)
        return (await self._call(self._sessions.UnarchiveSession, req)).session

    def search_messages(
        self, query: str, **options: Unpack[base.SearchOptions]
    ) -> AsyncIterator[session_pb2.SearchHit]:
        """`async for hit in client.search_messages(q)`: as `Client.search_messages`."""
        req = base._search_request(query, options)
        return self._pages(self._sessions.SearchMessages, req, "hits")

    async def _pages(
        self, method: Callable[..., Awaitable[Any]], req: Any, field: str
    ) -> AsyncIterator[Any]:
        while True:
            resp = await self._call(method, req)
            for item in getattr(resp, field):
                yield item
            if not resp.next_page_token:
                return
            req.page_token = resp.next_page_token

    def send_message(
        self, session_id: str, text: str, **options: Unpack[base.SendOptions]
    ) -> AsyncEventStream:
        """As `Client.send_message`; the call starts when the event loop next runs."""
        req, rid = base._send(session_id, text, options)
        call = self._sessions.SendMessage(req, timeout=options.get("timeout"))
        return AsyncEventStream(call, rid)

    def watch_session(self, session_id: str, *, after_seq: int = 0) -> AsyncEventStream:
        req = session_pb2.WatchSessionRequest(session_id=session_id, after_seq=after_seq)
        return AsyncEventStream(self._sessions.WatchSession(req))

    async def interrupt(self, session_id: str) -> str:
        req = session_pb2.InterruptRequest(session_id=session_id)
        return (await self._call(self._sessions.Interrupt, req)).turn_id

    async def respond_to_permission(
        self,
        session_id: str,
        request_id: str,
        allow: bool,
        **options: Unpack[base.RespondOptions],
    ) -> base.Decision:
        """As `Client.respond_to_permission`; never retried."""
        req = base._respond_request(session_id, request_id, allow, options)
        return (await self._call(self._sessions.RespondToPermission, req)).decision

    async def answer_question(
        self, session_id: str, request_id: str, answers: Mapping[str, str]
    ) -> base.QuestionOutcome:
        """As `Client.answer_question`; never retried."""
        req = session_pb2.AnswerQuestionRequest(
            session_id=session_id, request_id=request_id, answers=dict(answers)
        )
        return (await self._call(self._sessions.AnswerQuestion, req)).answer

    def list_audit_events(
        self, session_id: str, *, page_size: int = 0
    ) -> AsyncIterator[base.AuditEvent]:
        """`async for a in client.list_audit_events(sid)`: the audit trail, oldest first."""
        req = session_pb2.ListAuditEventsRequest(session_id=session_id, page_size=page_size)
        return self._pages(self._sessions.ListAuditEvents, req, "events")

    async def stop_task(self, session_id: str, task_id: str) -> None:
        """As `Client.stop_task`; never retried."""
        req = session_pb2.StopTaskRequest(session_id=session_id, task_id=task_id)
        await self._call(self._sessions.StopTask, req)

    async def get_task_output(
        self, session_id: str, task_id: str, *, offset: int = 0, limit: int = 0
    ) -> base.TaskOutputPage:
        """As `Client.get_task_output`."""
        req = base._task_output_request(session_id, task_id, offset, limit)
        return await self._call(self._sessions.GetTaskOutput, req)

    async def get_status(self) -> base.Status:
        return await self._call(self._daemon.GetStatus, daemon_pb2.GetStatusRequest())

    async def restart_daemon(self) -> base.Restart:
        """A planned restart; see `Client.restart_daemon`."""
        return await self._call(self._daemon.RestartDaemon, daemon_pb2.RestartDaemonRequest())
