"""Conversions between atomizer.v1 protobuf messages and domain values."""

from __future__ import annotations

from atomizer.v1 import session_pb2 as pb
from google.protobuf.timestamp_pb2 import Timestamp

from atomizerd.errors import InvalidArgument
from atomizerd.model import ASIDE, AuditRecord, MessageRecord, Mode, SearchHit
from atomizerd.sessions import events as ev
from atomizerd.sessions.registry import AsideStep, McpServer, SessionView
from atomizerd.sessions.tasks import TaskInfo

_MODE_TO_DOMAIN = {pb.MODE_USER: Mode.USER, pb.MODE_POWER: Mode.POWER, pb.MODE_PLAN: Mode.PLAN}
_MODE_TO_PB = {v: k for k, v in _MODE_TO_DOMAIN.items()}
_STATE_TO_PB = {
    "idle": pb.SESSION_STATE_IDLE,
    "starting": pb.SESSION_STATE_STARTING,
    "ready": pb.SESSION_STATE_READY,
    "busy": pb.SESSION_STATE_BUSY,
    "closed": pb.SESSION_STATE_CLOSED,
}
_STATE_TO_DOMAIN = {v: k for k, v in _STATE_TO_PB.items()}
_ROLE_TO_PB = {"user": pb.ROLE_USER, "assistant": pb.ROLE_ASSISTANT}
_STATUS_TO_PB = {
    "pending": pb.MESSAGE_STATUS_PENDING,
    "complete": pb.MESSAGE_STATUS_COMPLETE,
    "interrupted": pb.MESSAGE_STATUS_INTERRUPTED,
    "failed": pb.MESSAGE_STATUS_FAILED,
}
_ORIGIN_TO_PB = {
    ev.TurnOrigin.CLIENT: pb.TURN_ORIGIN_CLIENT,
    ev.TurnOrigin.TASK: pb.TURN_ORIGIN_TASK,
    ev.TurnOrigin.SCHEDULED: pb.TURN_ORIGIN_SCHEDULED,
    ev.TurnOrigin.AGENT: pb.TURN_ORIGIN_AGENT,
}
_TASK_KIND_TO_PB = {
    ev.TaskKind.BASH: pb.TASK_KIND_BASH,
    ev.TaskKind.SUBAGENT: pb.TASK_KIND_SUBAGENT,
    ev.TaskKind.OTHER: pb.TASK_KIND_OTHER,
}
_TASK_STATUS_TO_PB = {
    ev.TaskStatus.COMPLETED: pb.TASK_STATUS_COMPLETED,
    ev.TaskStatus.FAILED: pb.TASK_STATUS_FAILED,
    ev.TaskStatus.STOPPED: pb.TASK_STATUS_STOPPED,
    ev.TaskStatus.KILLED: pb.TASK_STATUS_KILLED,
}


def timestamp(seconds: float) -> Timestamp:
    ts = Timestamp()
    ts.FromNanoseconds(int(seconds * 1e9))
    return ts


def mode_from_pb(value: int, *, required: bool) -> str | None:
    """None for MODE_UNSPECIFIED (when allowed); INVALID_ARGUMENT for unknown numbers."""
    if value == pb.MODE_UNSPECIFIED and not required:
        return None
    mode = _MODE_TO_DOMAIN.get(value)  # type: ignore[call-overload]
    if mode is None:
        raise InvalidArgument(
            f"unknown mode {value}: use MODE_USER (1), MODE_POWER (2) or MODE_PLAN (3)"
        )
    return str(mode)


def state_from_pb(value: int) -> str | None:
    if value == pb.SESSION_STATE_UNSPECIFIED:
        return None
    state = _STATE_TO_DOMAIN.get(value)  # type: ignore[call-overload]
    if state is None:
        raise InvalidArgument(f"unknown session state {value}")
    return str(state)


def session_to_pb(view: SessionView) -> pb.Session:
    r = view.record
    return pb.Session(
        session_id=r.session_id,
        mode=_MODE_TO_PB[r.mode],
        study_id=r.study_id or "",
        state=_STATE_TO_PB[view.state],
        agent_session_id=r.agent_session_id,
        created_at=timestamp(r.created_at),
        last_active_at=timestamp(r.last_active_at),
        message_count=r.message_count,
        total_cost_usd=r.total_cost_usd,
        last_seq=view.last_seq,
        mcp_servers=[pb.McpServerStatus(name=n, status=s) for n, s in view.mcp_servers],
        queued_turns=view.queued_turns,
        budget_usd=r.budget_usd,
        turn_budget_usd=r.turn_budget_usd,
        host_id=r.host_id,
        model=r.model,
        context_tokens=r.context_tokens,
        context_window=r.context_window,
        plan=r.plan,
        forked_from=r.forked_from,
        tasks=[task_to_pb(t) for t in view.tasks],
        labels=r.label_map(),
        archived=r.archived,
        title=r.title,
        usage=live_usage_to_pb(view.usage) if view.usage is not None else None,
    )


def seconds(ts: Timestamp, present: bool) -> float | None:
    """A request's optional time bound (None: unset)."""
    return ts.seconds + ts.nanos / 1e9 if present else None


def search_hit_to_pb(h: SearchHit) -> pb.SearchHit:
    return pb.SearchHit(
        session_id=h.session_id,
        message_id=h.message_id,
        turn_id=h.turn_id,
        role=_ROLE_TO_PB.get(h.role, pb.ROLE_UNSPECIFIED),
        created_at=timestamp(h.created_at),
        snippet=h.snippet,
        score=h.score,
    )


def task_to_pb(t: TaskInfo) -> pb.Task:
    return pb.Task(
        task_id=t.task_id,
        tool_use_id=t.tool_use_id,
        kind=_TASK_KIND_TO_PB.get(t.kind, pb.TASK_KIND_OTHER),
        description=t.description,
        background=t.background,
        started_at=timestamp(t.started_at),
        output_bytes=t.output_bytes,
    )


def origin_to_pb(origin: ev.TurnOrigin | str) -> pb.TurnOrigin.ValueType:
    """A turn's origin, as the domain's enum or as stored ("client", "task", ...)."""
    try:
        return _ORIGIN_TO_PB[ev.TurnOrigin(origin)]
    except ValueError:  # a value from a newer store
        return pb.TURN_ORIGIN_UNSPECIFIED


def usage_to_pb(usage: dict[str, int]) -> pb.Usage:
    return pb.Usage(
        input_tokens=int(usage.get("input_tokens", 0)),
        output_tokens=int(usage.get("output_tokens", 0)),
        cache_creation_input_tokens=int(usage.get("cache_creation_input_tokens", 0)),
        cache_read_input_tokens=int(usage.get("cache_read_input_tokens", 0)),
    )


def message_to_pb(m: MessageRecord) -> pb.Message:
    return pb.Message(
        message_id=m.message_id,
        turn_id=m.turn_id,
        role=_ROLE_TO_PB[m.role],
        content=m.content,
        status=_STATUS_TO_PB[m.status],
        tool_calls=[
            pb.ToolCall(
                id=tc.id,
                name=tc.name,
                input_json=tc.input_json,
                result=tc.result,
                is_error=tc.is_error,
            )
            for tc in m.tool_calls
        ],
        cost_usd=m.cost_usd,
        usage=usage_to_pb(m.usage),
        created_at=timestamp(m.created_at),
        detail=m.detail,
        attachments=[
            attachment_info_to_pb(a.name, a.media_type, a.size, a.sha256) for a in m.attachments
        ],
        # An aside's turn was the client's (its origin "aside" says it is not the conversation's).
        origin=pb.TURN_ORIGIN_CLIENT if m.origin == ASIDE else origin_to_pb(m.origin),
        aside=m.origin == ASIDE,
        structured_output=m.structured_output,
        rolled_back=m.rolled_back_at != 0,
    )


def live_usage_to_pb(u: ev.LiveUsage) -> pb.LiveUsage:
    return pb.LiveUsage(
        input_tokens=u.input_tokens,
        output_tokens=u.output_tokens,
        cache_creation_input_tokens=u.cache_creation_input_tokens,
        cache_read_input_tokens=u.cache_read_input_tokens,
        context_tokens=u.context_tokens,
        context_window=u.context_window,
        turn_cost_usd=u.turn_cost_usd,
        estimated_turn_cost_usd=u.estimated_turn_cost_usd,
    )


def mcp_server_to_pb(m: McpServer) -> pb.McpServerStatus:
    return pb.McpServerStatus(
        name=m.name,
        status=m.status,
        tools_count=m.tools_count,
        error=m.error,
        configured=m.configured,
    )


def aside_step_to_pb(step: AsideStep) -> pb.AskAsideResponse:
    return pb.AskAsideResponse(
        question_message_id=step.question_id,
        text=step.text,
        done=step.done,
        answer_message_id=step.answer_id,
    )


def attachment_info_to_pb(name: str, media_type: str, size: int, sha256: str) -> pb.AttachmentInfo:
    return pb.AttachmentInfo(name=name, media_type=media_type, size_bytes=size, sha256=sha256)


def event_to_pb(e: ev.SessionEvent) -> pb.SessionEvent:
    out = pb.SessionEvent(
        seq=e.seq, turn_id=e.turn_id, session_id=e.session_id, time=timestamp(e.time)
    )
    k = e.kind
    match k:
        case ev.TextDelta():
            out.text_delta.text = k.text
        case ev.ThinkingDelta():
            out.thinking_delta.text = k.text
        case ev.TurnStarted():
            out.turn_started.CopyFrom(
                pb.TurnStarted(
                    text=k.text,
                    request_id=k.request_id,
                    attachments=[
                        attachment_info_to_pb(a.name, a.media_type, a.size, a.sha256)
                        for a in k.attachments
                    ],
                    origin=origin_to_pb(k.origin),
                )
            )
        case ev.UserMessage():
            out.user_message.CopyFrom(pb.UserMessage(text=k.text, request_id=k.request_id))
        case ev.ToolUse():
            out.tool_use.CopyFrom(
                pb.ToolUse(
                    id=k.id,
                    name=k.name,
                    input_json=k.input_json,
                    parent_tool_use_id=k.parent_tool_use_id,
                )
            )
        case ev.ToolResult():
            out.tool_result.CopyFrom(
                pb.ToolResult(
                    tool_use_id=k.tool_use_id,
                    content=k.content,
                    is_error=k.is_error,
                    parent_tool_use_id=k.parent_tool_use_id,
                )
            )
        case ev.TaskStarted():
            out.task_started.CopyFrom(
                pb.TaskStarted(
                    task_id=k.task_id,
                    tool_use_id=k.tool_use_id,
                    kind=_TASK_KIND_TO_PB.get(k.kind, pb.TASK_KIND_OTHER),
                    description=k.description,
                    background=k.background,
                )
            )
        case ev.TaskOutput():
            out.task_output.CopyFrom(pb.TaskOutput(task_id=k.task_id, text=k.text))
        case ev.TaskEnded():
            out.task_ended.CopyFrom(
                pb.TaskEnded(
                    task_id=k.task_id,
                    status=_TASK_STATUS_TO_PB.get(k.status, pb.TASK_STATUS_UNSPECIFIED),
                    summary=k.summary,
                )
            )
        case ev.TurnCompleted():
            out.turn_completed.CopyFrom(_completed_to_pb(k))
        case ev.TurnFailed():
            out.turn_failed.CopyFrom(
                pb.TurnFailed(
                    code=pb.FailureCode.Value("FAILURE_CODE_" + k.code),
                    message=k.message,
                    stderr_tail=k.stderr_tail,
                )
            )
        case ev.Notice():
            out.notice.CopyFrom(
                pb.Notice(
                    kind=pb.NoticeKind.Value("NOTICE_KIND_" + k.kind),
                    message=k.message,
                    attempt=k.attempt,
                    max_retries=k.max_retries,
                    retry_delay_ms=k.retry_delay_ms,
                    error_status=k.error_status,
                    missed_from_seq=k.missed_from_seq,
                    missed_to_seq=k.missed_to_seq,
                    tokens_before=k.tokens_before,
                    tokens_after=k.tokens_after,
                )
            )
        case ev.PermissionRequest():
            out.permission_request.CopyFrom(
                pb.PermissionRequest(
                    request_id=k.request_id,
                    tool_name=k.tool_name,
                    input_json=k.input_json,
                    description=k.description,
                    tool_use_id=k.tool_use_id,
                    deadline=timestamp(k.deadline),
                    suggestions=[suggestion_to_pb(s) for s in k.suggestions],
                    plan=k.plan,
                )
            )
        case ev.PermissionDecided():
            out.permission_decided.CopyFrom(
                pb.PermissionDecided(
                    request_id=k.request_id,
                    tool_name=k.tool_name,
                    allow=k.allow,
                    decider=decider_to_pb(k.decider),
                    message=k.message,
                )
            )
        case ev.Question():
            out.question.CopyFrom(question_to_pb(k))
        case ev.QuestionAnswered():
            out.question_answered.CopyFrom(question_answered_to_pb(k))
        case ev.LiveUsage():
            out.usage.CopyFrom(live_usage_to_pb(k))
        case ev.PlanUpdated():
            out.plan_updated.plan = k.plan
    return out


def question_to_pb(k: ev.Question) -> pb.Question:
    return pb.Question(
        request_id=k.request_id,
        questions=[
            pb.QuestionItem(
                question=q.question,
                header=q.header,
                options=[
                    pb.QuestionOption(label=o.label, description=o.description) for o in q.options
                ],
                multi_select=q.multi_select,
            )
            for q in k.questions
        ],
        tool_use_id=k.tool_use_id,
        deadline=timestamp(k.deadline),
    )


def question_answered_to_pb(k: ev.QuestionAnswered) -> pb.QuestionAnswered:
    return pb.QuestionAnswered(
        request_id=k.request_id,
        answers=dict(k.answers),
        answered=k.answered,
        decider=decider_to_pb(k.decider),
        message=k.message,
    )


def suggestion_to_pb(s: ev.PermissionSuggestion) -> pb.PermissionSuggestion:
    return pb.PermissionSuggestion(
        type=s.type,
        rules=[
            pb.PermissionRule(tool_name=r.tool_name, rule_content=r.rule_content) for r in s.rules
        ],
        behavior=s.behavior,
        mode=s.mode,
        directories=s.directories,
        destination=s.destination,
    )


def decider_to_pb(decider: str) -> pb.Decider.ValueType:
    return pb.Decider.Value("DECIDER_" + decider.upper())


def audit_to_pb(a: AuditRecord) -> pb.AuditEvent:
    return pb.AuditEvent(
        audit_id=a.audit_id,
        session_id=a.session_id,
        time=timestamp(a.time),
        kind=pb.AuditKind.Value("AUDIT_KIND_" + a.kind.upper()),
        tool_name=a.tool_name,
        input_digest=a.input_digest,
        allow=a.allow,
        decider=decider_to_pb(a.decider),
        detail=a.detail,
        turn_id=a.turn_id,
    )


def _completed_to_pb(k: ev.TurnCompleted) -> pb.TurnCompleted:
    return pb.TurnCompleted(
        stop_reason=k.stop_reason,
        is_error=k.is_error,
        cost_usd=k.cost_usd,
        usage=usage_to_pb(k.usage),
        duration_ms=k.duration_ms,
        num_turns=k.num_turns,
        interrupted=k.interrupted,
        permission_denials=[
            pb.PermissionDenial(
                tool_name=d.tool_name, tool_use_id=d.tool_use_id, input_json=d.input_json
            )
            for d in k.permission_denials
        ],
        result_subtype=k.result_subtype,
        text=k.text,
        structured_output=k.structured_output,
    )
