"""Thin client for atomizerd: `Client`, `AsyncClient`, typed events and one exception per status.

Depends on grpcio and protobuf only; the generated stubs are the `atomizer.v1` package.
"""

from atomizer_client import events
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
from atomizer_client.events import *  # noqa: F403 (the event types, as events.__all__ lists them)

__all__ = [
    "DEFAULT_TIMEOUT",
    "AsyncClient",
    "AsyncEventStream",
    "AtomizerError",
    "Client",
    "DaemonNotFoundError",
    "DeadlineExceededError",
    "EventStream",
    "FailedPreconditionError",
    "InternalError",
    "InvalidArgumentError",
    "NotFoundError",
    "PermissionDeniedError",
    "ResourceExhaustedError",
    "RetryPolicy",
    "UnavailableError",
    "find_socket",
    "new_request_id",
]
__all__ += events.__all__
