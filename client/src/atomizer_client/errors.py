"""Exceptions raised by the client: one class per gRPC status code.

Every `grpc.RpcError` the client sees goes through `from_rpc_error`, so callers catch
`NotFoundError` and friends (or `AtomizerError` for all of them) and never import grpc.
"""

from __future__ import annotations

import grpc


class AtomizerError(Exception):
    """A call to atomizerd failed. `code` is the gRPC status, `details` the daemon's message."""

    code: grpc.StatusCode = grpc.StatusCode.UNKNOWN

    def __init__(self, details: str, code: grpc.StatusCode | None = None) -> None:
        super().__init__(details)
        self.details = details
        if code is not None:
            self.code = code

    def __str__(self) -> str:
        return f"{self.code.name}: {self.details}" if self.details else self.code.name


class CallCancelledError(AtomizerError):
    code = grpc.StatusCode.CANCELLED


class UnknownError(AtomizerError):
    code = grpc.StatusCode.UNKNOWN


class InvalidArgumentError(AtomizerError):
    code = grpc.StatusCode.INVALID_ARGUMENT


class DeadlineExceededError(AtomizerError):
    code = grpc.StatusCode.DEADLINE_EXCEEDED


class NotFoundError(AtomizerError):
    code = grpc.StatusCode.NOT_FOUND


class AlreadyExistsError(AtomizerError):
    code = grpc.StatusCode.ALREADY_EXISTS


class PermissionDeniedError(AtomizerError):
    code = grpc.StatusCode.PERMISSION_DENIED


class ResourceExhaustedError(AtomizerError):
    code = grpc.StatusCode.RESOURCE_EXHAUSTED


class FailedPreconditionError(AtomizerError):
    code = grpc.StatusCode.FAILED_PRECONDITION


class AbortedError(AtomizerError):
    code = grpc.StatusCode.ABORTED


class OutOfRangeError(AtomizerError):
    code = grpc.StatusCode.OUT_OF_RANGE


class UnimplementedError(AtomizerError):
    code = grpc.StatusCode.UNIMPLEMENTED


class InternalError(AtomizerError):
    code = grpc.StatusCode.INTERNAL


class UnavailableError(AtomizerError):
    """The daemon is not running, not reachable, or draining; retrying later may work."""

    code = grpc.StatusCode.UNAVAILABLE


class DataLossError(AtomizerError):
    code = grpc.StatusCode.DATA_LOSS


class UnauthenticatedError(AtomizerError):
    code = grpc.StatusCode.UNAUTHENTICATED


class DaemonNotFoundError(UnavailableError):
    """No daemon socket was found; the message lists every place that was searched."""


_BY_CODE: dict[grpc.StatusCode, type[AtomizerError]] = {
    cls.code: cls
    for cls in (
        CallCancelledError,
        UnknownError,
        InvalidArgumentError,
        DeadlineExceededError,
        NotFoundError,
        AlreadyExistsError,
        PermissionDeniedError,
        ResourceExhaustedError,
        FailedPreconditionError,
        AbortedError,
        OutOfRangeError,
        UnimplementedError,
        InternalError,
        UnavailableError,
        DataLossError,
        UnauthenticatedError,
    )
}


def from_rpc_error(err: grpc.RpcError) -> AtomizerError:
    """The client exception for a failed call (sync `grpc.Call` or `grpc.aio.AioRpcError`)."""
    if isinstance(err, grpc.Call | grpc.aio.AioRpcError):
        code, details = err.code(), err.details() or ""
    else:  # an RpcError that carries no status; grpc does not raise these, but be total
        code, details = grpc.StatusCode.UNKNOWN, str(err)
    cls = _BY_CODE.get(code, AtomizerError)
    return cls(details, code)


__all__ = [
    "AbortedError",
    "AlreadyExistsError",
    "AtomizerError",
    "CallCancelledError",
    "DaemonNotFoundError",
    "DataLossError",
    "DeadlineExceededError",
    "FailedPreconditionError",
    "InternalError",
    "InvalidArgumentError",
    "NotFoundError",
    "OutOfRangeError",
    "PermissionDeniedError",
    "ResourceExhaustedError",
    "UnauthenticatedError",
    "UnavailableError",
    "UnimplementedError",
    "UnknownError",
    "from_rpc_error",
]
