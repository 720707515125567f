"""What both clients share: the channel's retry policy, the names of values, and the requests
they build (atomizer_client.client, atomizer_client.client_async)."""

from __future__ import annotations

import json
import math
import os
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, TypedDict, TypeVar

from atomizer.v1 import daemon_pb2, session_pb2

from atomizer_client.discovery import find_socket, target_for
from atomizer_client.events import PermissionRule

DEFAULT_TIMEOUT = 10.0
SESSION_SERVICE = "atomizer.v1.SessionService"
DAEMON_SERVICE = "atomizer.v1.DaemonService"
# Calls that change nothing, so repeating one after UNAVAILABLE is always safe.
RETRIED_METHODS = (
    (SESSION_SERVICE, "GetSession"),
    (SESSION_SERVICE, "ListSessions"),
    (SESSION_SERVICE, "GetHistory"),
    (SESSION_SERVICE, "ListAuditEvents"),
    (DAEMON_SERVICE, "GetStatus"),
)

Req = TypeVar("Req")
Resp = TypeVar("Resp")
Session = session_pb2.Session
Message = session_pb2.Message
McpServerStatus = session_pb2.McpServerStatus
AsidePart = session_pb2.AskAsideResponse
AuditEvent = session_pb2.AuditEvent
Decision = session_pb2.PermissionDecided
QuestionOutcome = session_pb2.QuestionAnswered
Task = session_pb2.Task
TaskOutputPage = session_pb2.GetTaskOutputResponse
"""A page of a task's output: `data`, `next_offset`, `size` (so far), `running`."""
AttachmentLike = session_pb2.Attachment | tuple[str, str, bytes]
"""A file to send: a `session_pb2.Attachment`, or (name, media_type, data)."""
RuleLike = PermissionRule | tuple[str, str]
"""A permission rule: a suggestion's (`PermissionRequest.suggestions[i].rules[j]`) or
(tool_name, rule_content), e.g. ("Edit", "//srv/studies/beam/**"); "" content: the whole tool."""
Status = daemon_pb2.GetStatusResponse
Restart = daemon_pb2.RestartDaemonResponse
ModeLike = str | int
"""A mode: "user" / "power" (any case, with or without MODE_), or a `session_pb2.Mode` value."""
StateLike = str | int


# The keyword options of the calls that take many, typed once for both clients
# (`**options: Unpack[...]`); what each means is in `Client`'s docstrings. A blocking call adds
# its own `timeout` beside them.


class CreateOptions(TypedDict, total=False):
    mode: ModeLike | None
    study_id: str
    session_id: str
    budget_usd: float
    turn_budget_usd: float
    model: str
    labels: Mapping[str, str] | None


class ListOptions(TypedDict, total=False):
    study_id: str
    state: StateLike | None
    page_size: int
    host_id: str
    labels: Mapping[str, str] | None
    include_archived: bool
    archived_only: bool


class HistoryOptions(TypedDict, total=False):
    page_size: int
    hide_asides: bool  # leave out the questions asked aside and their answers
    hide_rolled_back: bool  # leave out what a rollback took out of the conversation


class SearchOptions(TypedDict, total=False):
    session_id: str
    labels: Mapping[str, str] | None
    page_size: int


class SendOptions(TypedDict, total=False):
    request_id: str | None
    timeout: float | None
    attachments: Sequence[AttachmentLike]
    steer: bool
    output_schema: str


class RespondOptions(TypedDict, total=False):
    message: str
    remember: bool
    updated_input: Mapping[str, Any] | None
    rule: RuleLike | None
    mode: ModeLike | None


@dataclass(frozen=True)
class RetryPolicy:
    """gRPC retry policy for the read-only calls. gRPC caps max_attempts at 5.

    Backoffs are in seconds; gRPC counts them in whole milliseconds, so less than 1 ms is 1 ms.
    What gRPC would refuse is refused here, with ValueError: fewer than 2 attempts (`retry=None`
    retries nothing), backoffs not in (0, MAX_BACKOFF], a multiplier not above 0.
    """

    max_attempts: int = 5
    initial_backoff: float = 0.1
    max_backoff: float = 2.0
    backoff_multiplier: float = 2.0

    MAX_BACKOFF: ClassVar[float] = 315_576_000_000.0
    """The longest google.protobuf.Duration (10,000 years), in seconds."""

    def __post_init__(self) -> None:
        if not self.max_attempts >= 2:
            raise ValueError(
                f"max_attempts must be at least 2, not {self.max_attempts!r} "
                "(retry=None retries nothing)"
            )
        for name in ("initial_backoff", "max_backoff"):
            value = getattr(self, name)
            if not 0 < value <= self.MAX_BACKOFF:
                raise ValueError(f"{name} must be above 0 and at most 10,000 years, not {value!r}")
        if not (self.backoff_multiplier > 0 and math.isfinite(self.backoff_multiplier)):
            raise ValueError(
                f"backoff_multiplier must be a number above 0, not {self.backoff_multiplier!r}"
            )


# The default retry policy (the read-only calls, on UNAVAILABLE).
DEFAULT_RETRY = RetryPolicy()


def _duration(seconds: float) -> str:
    """`seconds` as gRPC reads a JSON Duration, to the millisecond, at least 1 ms: "0.333s",
    never "1e-05s" or "0.3333333333333333s" (both refused, and the channel with them)."""
    millis = max(1, round(seconds * 1000))
    whole, frac = divmod(millis, 1000)
    return f"{whole}.{frac:03d}".rstrip("0").rstrip(".") + "s"


def service_config(retry: RetryPolicy | None) -> str:
    """The channel's JSON service config: a retryPolicy on RETRIED_METHODS."""
    if retry is None:
        return json.dumps({"methodConfig": []})
    policy = {
        "maxAttempts": retry.max_attempts,
        "initialBackoff": _duration(retry.initial_backoff),
        "maxBackoff": _duration(retry.max_backoff),
        "backoffMultiplier": retry.backoff_multiplier,
        "retryableStatusCodes": ["UNAVAILABLE"],
    }
    names = [{"service": s, "method": m} for s, m in RETRIED_METHODS]
    return json.dumps({"methodConfig": [{"name": names, "retryPolicy": policy}]})


def channel_options(retry: RetryPolicy | None) -> list[tuple[str, Any]]:
    return [
        ("grpc.service_config", service_config(retry)),
        ("grpc.enable_retries", 1),
        # Tool results can carry multi-MiB images; the daemon bounds sizes, not the client.
        ("grpc.max_receive_message_length", -1),
    ]


def _enum(enum: Any, prefix: str, value: str | int, what: str) -> Any:
    if isinstance(value, int):
        return value
    name = value.strip().upper().replace("-", "_")
    if not name.startswith(prefix):
        name = prefix + name
    try:
        return enum.Value(name)
    except ValueError:
        raise ValueError(f"unknown {what} {value!r}") from None


def mode_value(mode: ModeLike) -> session_pb2.Mode.ValueType:
    """`session_pb2.Mode` for "user" / "power" (or a Mode value, returned as is)."""
    result: session_pb2.Mode.ValueType = _enum(session_pb2.Mode, "MODE_", mode, "mode")
    return result


def state_value(state: StateLike | None) -> session_pb2.SessionState.ValueType:
    """`session_pb2.SessionState` for "idle", "ready", "busy", ...; None means any."""
    if state is None:
        return session_pb2.SESSION_STATE_UNSPECIFIED
    result: session_pb2.SessionState.ValueType = _enum(
        session_pb2.SessionState, "SESSION_STATE_", state, "session state"
    )
    return result


def new_request_id() -> str:
    """An idempotency key for SendMessage; a retry that reuses it attaches to the same turn."""
    return str(uuid.uuid4())


class _Base:
    socket: Path | None
    """The daemon's socket; None for a client made with `from_channel`."""
    target: str | None
    """The gRPC target of that socket; None for a client made with `from_channel`."""

    timeout: float

    def _locate(
        self,
        socket: str | os.PathLike[str] | None,
        timeout: float,
        retry: RetryPolicy | None,
        options: Sequence[tuple[str, Any]],
    ) -> str:
        """Finds the daemon's socket; returns the gRPC target to open a channel to."""
        path = find_socket(socket)
        target = target_for(path)
        self.socket, self.target, self.timeout = path, target, timeout
        self._options = [*channel_options(retry), *options]
        return target

    def _deadline(self, timeout: float | None) -> float:
        return self.timeout if timeout is None else timeout


# --- blocking client -----------------------------------------------------------------------


def _send_request(
    session_id: str,
    text: str,
    request_id: str,
    attachments: Sequence[AttachmentLike],
    steer: bool = False,
    output_schema: str = "",
) -> session_pb2.SendMessageRequest:
    files = [
        a
        if isinstance(a, session_pb2.Attachment)
        else session_pb2.Attachment(name=a[0], media_type=a[1], data=a[2])
        for a in attachments
    ]
    return session_pb2.SendMessageRequest(
        session_id=session_id,
        text=text,
        request_id=request_id,
        attachments=files,
        steer=steer,
        output_schema=output_schema,
    )


def _task_output_request(
    session_id: str, task_id: str, offset: int, limit: int
) -> session_pb2.GetTaskOutputRequest:
    if offset < 0 or limit < 0:
        raise ValueError(f"offset and limit must not be negative (offset {offset}, limit {limit})")
    return session_pb2.GetTaskOutputRequest(
        session_id=session_id, task_id=task_id, offset=offset, limit=limit
    )


# Media types by file extension for `attachment_from_path` (what the daemon takes).
MEDIA_TYPES = {
    ".png": "image/png",
    ".jpg": "image/jpeg",
    ".jpeg": "image/jpeg",
    ".gif": "image/gif",
    ".webp": "image/webp",
    ".pdf": "application/pdf",
    ".txt": "text/plain",
    ".log": "text/plain",
    ".md": "text/markdown",
    ".markdown": "text/markdown",
    ".csv": "text/csv",
    ".json": "application/json",
}


def attachment_from_path(
    path: str | os.PathLike[str], media_type: str | None = None
) -> session_pb2.Attachment:
    """A file as an attachment: its name, its media type (from its extension unless given;
    ValueError for one the daemon does not take) and its bytes."""
    p = Path(path)
    kind = media_type or MEDIA_TYPES.get(p.suffix.lower())
    if kind is None:
        known = ", ".join(sorted(MEDIA_TYPES))
        raise ValueError(f"{p.name}: no media type for {p.suffix or 'no extension'!r} ({known})")
    return session_pb2.Attachment(name=p.name, media_type=kind, data=p.read_bytes())


def _known(options: Mapping[str, object], kind: Any) -> None:
    """A keyword no option of `kind` names is refused, as Python refuses an unknown keyword
    argument (a misspelt option must not be dropped unnoticed)."""
    unknown = sorted(set(options) - set(kind.__optional_keys__))
    if unknown:
        raise TypeError(f"unexpected keyword argument(s): {', '.join(unknown)}")


def _create_request(options: CreateOptions) -> session_pb2.CreateSessionRequest:
    _known(options, CreateOptions)
    mode = options.get("mode")
    return session_pb2.CreateSessionRequest(
        mode=session_pb2.MODE_UNSPECIFIED if mode is None else mode_value(mode),
        study_id=options.get("study_id", ""),
        session_id=options.get("session_id", ""),
        budget_usd=options.get("budget_usd", 0.0),
        turn_budget_usd=options.get("turn_budget_usd", 0.0),
        model=options.get("model", ""),
        labels=dict(options.get("labels") or {}),
    )


def _history_request(session_id: str, options: HistoryOptions) -> session_pb2.GetHistoryRequest:
    _known(options, HistoryOptions)
    return session_pb2.GetHistoryRequest(session_id=session_id, **options)


def _list_request(options: ListOptions) -> session_pb2.ListSessionsRequest:
    _known(options, ListOptions)
    return session_pb2.ListSessionsRequest(
        page_size=options.get("page_size", 0),
        study_id=options.get("study_id", ""),
        state=state_value(options.get("state")),
        host_id=options.get("host_id", ""),
        labels=dict(options.get("labels") or {}),
        include_archived=options.get("include_archived", False),
        archived_only=options.get("archived_only", False),
    )


def _search_request(query: str, options: SearchOptions) -> session_pb2.SearchMessagesRequest:
    _known(options, SearchOptions)
    return session_pb2.SearchMessagesRequest(
        query=query,
        session_id=options.get("session_id", ""),
        labels=dict(options.get("labels") or {}),
        page_size=options.get("page_size", 0),
    )


def _send(
    session_id: str, text: str, options: SendOptions
) -> tuple[session_pb2.SendMessageRequest, str]:
    """The request of `send_message` and its request id (a fresh one unless given)."""
    _known(options, SendOptions)
    rid = options.get("request_id") or new_request_id()
    req = _send_request(
        session_id,
        text,
        rid,
        options.get("attachments", ()),
        options.get("steer", False),
        options.get("output_schema", ""),
    )
    return req, rid


def _respond_request(
    session_id: str, request_id: str, allow: bool, options: RespondOptions
) -> session_pb2.RespondToPermissionRequest:
    _known(options, RespondOptions)
    req = session_pb2.RespondToPermissionRequest(
        session_id=session_id,
        request_id=request_id,
        allow=allow,
        message=options.get("message", ""),
        remember=options.get("remember", False),
    )
    updated_input = options.get("updated_input")
    rule = options.get("rule")
    mode = options.get("mode")
    if updated_input is not None:
        req.updated_input_json = json.dumps(dict(updated_input), ensure_ascii=False)
    if rule is not None:
        tool_name, content = (
            (rule.tool_name, rule.rule_content) if isinstance(rule, PermissionRule) else rule
        )
        req.rule.CopyFrom(session_pb2.PermissionRule(tool_name=tool_name, rule_content=content))
    if mode is not None:
        req.mode = mode_value(mode)
    return req


# --- asyncio client ------------------------------------------------------------------------


_STREAM_RESPONSES = (session_pb2.SendMessageResponse, session_pb2.WatchSessionResponse)
