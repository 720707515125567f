"""SessionService: atomizer.v1 requests in, domain calls, atomizer.v1 responses out."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import grpc
from atomizer.v1 import session_pb2 as pb
from atomizer.v1 import session_pb2_grpc

from atomizerd.api import convert
from atomizerd.api.errormap import streaming, unary
from atomizerd.model import SessionFilter
from atomizerd.sessions.registry import Registry

Ctx = grpc.aio.ServicerContext[Any, Any]


class SessionServicer(session_pb2_grpc.SessionServiceServicer):
    def __init__(self, registry: Registry) -> None:
        self.registry = registry

    @unary
    async def CreateSession(
        self, request: pb.CreateSessionRequest, context: Ctx
    ) -> pb.CreateSessionResponse:
        view = await self.registry.create_session(
            mode=convert.mode_from_pb(request.mode, required=False),
            study_id=request.study_id or None,
            session_id=request.session_id or None,
            budget_usd=request.budget_usd,
            turn_budget_usd=request.turn_budget_usd,
            model=request.model,
            labels=dict(request.labels),
        )
        return pb.CreateSessionResponse(session=convert.session_to_pb(view))

    @unary
    async def GetSession(
        self, request: pb.GetSessionRequest, context: Ctx
    ) -> pb.GetSessionResponse:
        view = self.registry.get_session(request.session_id)
        return pb.GetSessionResponse(session=convert.session_to_pb(view))

    @unary
    async def ListSessions(
        self, request: pb.ListSessionsRequest, context: Ctx
    ) -> pb.ListSessionsResponse:
        views, token = self.registry.catalog.list_sessions(
            page_size=request.page_size,
            page_token=request.page_token,
            study_id=request.study_id or None,
            state=convert.state_from_pb(request.state),
            host_id=request.host_id or None,
            filters=SessionFilter(
                labels=dict(request.labels),
                mode=convert.mode_from_pb(request.mode, required=False),
                archived=True
                if request.archived_only
                else (None if request.include_archived else False),
                created_after=convert.seconds(
                    request.created_after, request.HasField("created_after")
                ),
                created_before=convert.seconds(
                    request.created_before, request.HasField("created_before")
                ),
                active_after=convert.seconds(
                    request.active_after, request.HasField("active_after")
                ),
                active_before=convert.seconds(
                    request.active_before, request.HasField("active_before")
                ),
            ),
        )
        return pb.ListSessionsResponse(
            sessions=[convert.session_to_pb(v) for v in views], next_page_token=token
        )

    @unary
    async def TerminateSession(
        self, request: pb.TerminateSessionRequest, context: Ctx
    ) -> pb.TerminateSessionResponse:
        view = await self.registry.terminate_session(request.session_id, purge=request.purge)
        if view is None:
            return pb.TerminateSessionResponse()
        return pb.TerminateSessionResponse(session=convert.session_to_pb(view))

    @unary
    async def SwitchMode(
        self, request: pb.SwitchModeRequest, context: Ctx
    ) -> pb.SwitchModeResponse:
        mode = convert.mode_from_pb(request.mode, required=True)
        assert mode is not None
        view = await self.registry.switch_mode(request.session_id, mode)
        return pb.SwitchModeResponse(session=convert.session_to_pb(view))

    @unary
    async def SetStudyContext(
        self, request: pb.SetStudyContextRequest, context: Ctx
    ) -> pb.SetStudyContextResponse:
        view = await self.registry.set_study(request.session_id, request.study_id)
        return pb.SetStudyContextResponse(session=convert.session_to_pb(view))

    @unary
    async def ForkSession(
        self, request: pb.ForkSessionRequest, context: Ctx
    ) -> pb.ForkSessionResponse:
        view = await self.registry.fork_session(
            request.session_id, request.new_session_id, request.at_message_id
        )
        return pb.ForkSessionResponse(session=convert.session_to_pb(view))

    @unary
    async def SetModel(self, request: pb.SetModelRequest, context: Ctx) -> pb.SetModelResponse:
        view = await self.registry.set_model(request.session_id, request.model)
        return pb.SetModelResponse(session=convert.session_to_pb(view))

    @unary
    async def GetHistory(
        self, request: pb.GetHistoryRequest, context: Ctx
    ) -> pb.GetHistoryResponse:
        messages, token = self.registry.streams.history(
            request.session_id,
            request.page_size,
            request.page_token,
            asides=not request.hide_asides,
            rolled_back=not request.hide_rolled_back,
        )
        return pb.GetHistoryResponse(
            messages=[convert.message_to_pb(m) for m in messages], next_page_token=token
        )

    @unary
    async def GetAttachment(
        self, request: pb.GetAttachmentRequest, context: Ctx
    ) -> pb.GetAttachmentResponse:
        record, data = self.registry.get_attachment(request.session_id, request.sha256)
        return pb.GetAttachmentResponse(
            attachment=pb.Attachment(name=record.name, media_type=record.media_type, data=data)
        )

    @streaming
    async def SendMessage(
        self, request: pb.SendMessageRequest, context: Ctx
    ) -> AsyncIterator[pb.SendMessageResponse]:
        # A client that goes away cancels only this stream; the turn runs on and is stored.
        files = [(a.name, a.media_type, a.data) for a in request.attachments]
        async for event in self.registry.send_message(
            request.session_id,
            request.text,
            request.request_id,
            files,
            steer=request.steer,
            output_schema=request.output_schema,
        ):
            yield pb.SendMessageResponse(event=convert.event_to_pb(event))

    @streaming
    async def WatchSession(
        self, request: pb.WatchSessionRequest, context: Ctx
    ) -> AsyncIterator[pb.WatchSessionResponse]:
        async for event in self.registry.watch(request.session_id, request.after_seq):
            yield pb.WatchSessionResponse(event=convert.event_to_pb(event))

    @unary
    async def Interrupt(self, request: pb.InterruptRequest, context: Ctx) -> pb.InterruptResponse:
        turn_id = await self.registry.answers.interrupt(request.session_id)
        return pb.InterruptResponse(turn_id=turn_id)

    @unary
    async def RespondToPermission(
        self, request: pb.RespondToPermissionRequest, context: Ctx
    ) -> pb.RespondToPermissionResponse:
        decision = self.registry.answers.respond_to_permission(
            request.session_id,
            request.request_id,
            request.allow,
            request.message,
            request.remember,
            request.updated_input_json,
            (request.rule.tool_name, request.rule.rule_content)
            if request.HasField("rule")
            else None,
            convert.mode_from_pb(request.mode, required=False),
        )
        return pb.RespondToPermissionResponse(
            decision=pb.PermissionDecided(
                request_id=request.request_id,
                tool_name=decision.tool_name,
                allow=decision.allow,
                decider=convert.decider_to_pb(decision.decider),
                message=decision.message,
            )
        )

    @unary
    async def AnswerQuestion(
        self, request: pb.AnswerQuestionRequest, context: Ctx
    ) -> pb.AnswerQuestionResponse:
        outcome = self.registry.answers.answer_question(
            request.session_id, request.request_id, dict(request.answers)
        )
        return pb.AnswerQuestionResponse(answer=convert.question_answered_to_pb(outcome))

    @unary
    async def ListAuditEvents(
        self, request: pb.ListAuditEventsRequest, context: Ctx
    ) -> pb.ListAuditEventsResponse:
        events, token = self.registry.answers.audit_events(
            request.session_id, request.page_size, request.page_token
        )
        return pb.ListAuditEventsResponse(
            events=[convert.audit_to_pb(e) for e in events], next_page_token=token
        )

    @unary
    async def StopTask(self, request: pb.StopTaskRequest, context: Ctx) -> pb.StopTaskResponse:
        await self.registry.stop_task(request.session_id, request.task_id)
        return pb.StopTaskResponse()

    @unary
    async def GetTaskOutput(
        self, request: pb.GetTaskOutputRequest, context: Ctx
    ) -> pb.GetTaskOutputResponse:
        page = self.registry.task_output(
            request.session_id, request.task_id, request.offset, request.limit
        )
        return pb.GetTaskOutputResponse(
            data=page.data, next_offset=page.next_offset, size=page.size, running=page.running
        )

    @unary
    async def SetLabels(self, request: pb.SetLabelsRequest, context: Ctx) -> pb.SetLabelsResponse:
        view = self.registry.catalog.set_labels(
            request.session_id, dict(request.labels), request.replace
        )
        return pb.SetLabelsResponse(session=convert.session_to_pb(view))

    @unary
    async def ArchiveSession(
        self, request: pb.ArchiveSessionRequest, context: Ctx
    ) -> pb.ArchiveSessionResponse:
        view = await self.registry.catalog.archive_session(request.session_id)
        return pb.ArchiveSessionResponse(session=convert.session_to_pb(view))

    @unary
    async def UnarchiveSession(
        self, request: pb.UnarchiveSessionRequest, context: Ctx
    ) -> pb.UnarchiveSessionResponse:
        view = self.registry.catalog.unarchive_session(request.session_id)
        return pb.UnarchiveSessionResponse(session=convert.session_to_pb(view))

    @unary
    async def SearchMessages(
        self, request: pb.SearchMessagesRequest, context: Ctx
    ) -> pb.SearchMessagesResponse:
        hits, token = self.registry.catalog.search_messages(
            request.query,
            request.session_id or None,
            dict(request.labels),
            request.page_size,
            request.page_token,
        )
        return pb.SearchMessagesResponse(
            hits=[convert.search_hit_to_pb(h) for h in hits], next_page_token=token
        )

    @streaming
    async def AskAside(
        self, request: pb.AskAsideRequest, context: Ctx
    ) -> AsyncIterator[pb.AskAsideResponse]:
        async for step in self.registry.asides.ask(request.session_id, request.text):
            yield convert.aside_step_to_pb(step)

    @unary
    async def RenameSession(
        self, request: pb.RenameSessionRequest, context: Ctx
    ) -> pb.RenameSessionResponse:
        view = await self.registry.titles.rename(request.session_id, request.title)
        return pb.RenameSessionResponse(session=convert.session_to_pb(view))

    @unary
    async def GetMcpStatus(
        self, request: pb.GetMcpStatusRequest, context: Ctx
    ) -> pb.GetMcpStatusResponse:
        servers = await self.registry.mcp.status(request.session_id)
        return pb.GetMcpStatusResponse(servers=[convert.mcp_server_to_pb(m) for m in servers])

    @unary
    async def ReconnectMcpServer(
        self, request: pb.ReconnectMcpServerRequest, context: Ctx
    ) -> pb.ReconnectMcpServerResponse:
        server = await self.registry.mcp.reconnect(request.session_id, request.name)
        return pb.ReconnectMcpServerResponse(server=convert.mcp_server_to_pb(server))

    @unary
    async def SetMcpServerEnabled(
        self, request: pb.SetMcpServerEnabledRequest, context: Ctx
    ) -> pb.SetMcpServerEnabledResponse:
        server = await self.registry.mcp.set_enabled(
            request.session_id, request.name, request.enabled
        )
        return pb.SetMcpServerEnabledResponse(server=convert.mcp_server_to_pb(server))

    @unary
    async def RewindFiles(
        self, request: pb.RewindFilesRequest, context: Ctx
    ) -> pb.RewindFilesResponse:
        r = await self.registry.undo.rewind_files(
            request.session_id, request.message_id, dry_run=request.dry_run, force=request.force
        )
        return pb.RewindFilesResponse(
            files=r.files,
            conflicts=r.conflicts,
            insertions=r.insertions,
            deletions=r.deletions,
            rewound=r.rewound,
        )

    @unary
    async def RollbackSession(
        self, request: pb.RollbackSessionRequest, context: Ctx
    ) -> pb.RollbackSessionResponse:
        r = await self.registry.undo.rollback(
            request.session_id, request.message_id, rewind_files=request.rewind_files
        )
        return pb.RollbackSessionResponse(
            session=convert.session_to_pb(r.view), rolled_back=r.count, files=r.files
        )

    @unary
    async def UndoRollback(
        self, request: pb.UndoRollbackRequest, context: Ctx
    ) -> pb.UndoRollbackResponse:
        view, count = await self.registry.undo.undo_rollback(request.session_id)
        return pb.UndoRollbackResponse(session=convert.session_to_pb(view), restored=count)

    @unary
    async def ImportSession(
        self, request: pb.ImportSessionRequest, context: Ctx
    ) -> pb.ImportSessionResponse:
        view, count = self.registry.importer.import_session(
            request.agent_session_id,
            request.transcript_path,
            mode=convert.mode_from_pb(request.mode, required=False),
            study_id=request.study_id,
            session_id=request.session_id,
        )
        return pb.ImportSessionResponse(
            session=convert.session_to_pb(view), imported_messages=count
        )
