"""Thin client for atomizerd: `Client`, `AsyncClient`, typed events and one exception per status.

Depends on grpcio and protobuf only; the generated stubs are the `atomizer.v1` package.
"""

from atomizer_client.client import (
    DEFAULT_TIMEOUT,
    AsyncClient,
    AsyncEventStream,
    Client,
    EventStream,
    RetryPolicy,
    new_request_id,
)
from atomizer_client.discovery import find_socket
from atomizer_client.errors import (
    AtomizerError,
    DaemonNotFoundError,
    DeadlineExceededError,
    FailedPreconditionError,
    InternalError,
    InvalidArgumentError,
    NotFoundError,
    PermissionDeniedError,
    ResourceExhaustedError,
    UnavailableError,
)
from atomizer_client.events import (
    Event,
    Notice,
    PermissionDecided,
    PermissionRequest,
    TextDelta,
    ThinkingDelta,
    ToolResult,
    ToolUse,
    TurnCompleted,
    TurnFailed,
    TurnStarted,
    UnknownEvent,
    Usage,
    decider_name,
)

__all__ = [
    "DEFAULT_TIMEOUT",
    "AsyncClient",
    "AsyncEventStream",
    "AtomizerError",
    "Client",
    "DaemonNotFoundError",
    "DeadlineExceededError",
    "Event",
    "EventStream",
    "FailedPreconditionError",
    "InternalError",
    "InvalidArgumentError",
    "NotFoundError",
    "Notice",
    "PermissionDecided",
    "PermissionDeniedError",
    "PermissionRequest",
    "ResourceExhaustedError",
    "RetryPolicy",
    "TextDelta",
    "ThinkingDelta",
    "ToolResult",
    "ToolUse",
    "TurnCompleted",
    "TurnFailed",
    "TurnStarted",
    "UnavailableError",
    "UnknownEvent",
    "Usage",
    "decider_name",
    "find_socket",
    "new_request_id",
]
