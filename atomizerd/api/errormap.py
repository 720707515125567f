"""The one place where domain errors become gRPC status codes.

Servicer methods are wrapped with `unary` or `streaming`: they bind the request's
session_id to every log line, map `AtomizerError`s to their status code with the error's own
(person-readable) message, and turn anything unexpected into INTERNAL without leaking a
traceback to the client (it goes to the log).
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import AsyncIterator, Awaitable, Callable, MutableMapping
from contextvars import ContextVar
from typing import Any, NoReturn, TypeVar

import grpc
import structlog

from atomizerd import errors

log = structlog.get_logger("atomizerd.api")

STATUS_OF: dict[type[errors.AtomizerError], grpc.StatusCode] = {
    errors.InvalidArgument: grpc.StatusCode.INVALID_ARGUMENT,
    errors.NotFound: grpc.StatusCode.NOT_FOUND,
    errors.PermissionDenied: grpc.StatusCode.PERMISSION_DENIED,
    errors.ResourceExhausted: grpc.StatusCode.RESOURCE_EXHAUSTED,
    errors.FailedPrecondition: grpc.StatusCode.FAILED_PRECONDITION,
    errors.Unavailable: grpc.StatusCode.UNAVAILABLE,
    errors.Internal: grpc.StatusCode.INTERNAL,
}

# The request a handler serves (its session id, its rpc), for every log line it causes
# (`merge_request`, a log processor). One context variable set per call: structlog's own
# binding copies the whole context on every call, a sizeable part of a short call's time.
_REQUEST: ContextVar[tuple[str, str] | None] = ContextVar("atomizerd_request", default=None)

Req = TypeVar("Req")
Resp = TypeVar("Resp")
Self = TypeVar("Self")


def status_code(exc: errors.AtomizerError) -> grpc.StatusCode:
    for cls in type(exc).__mro__:
        if cls in STATUS_OF:
            return STATUS_OF[cls]
    return grpc.StatusCode.UNKNOWN


async def _abort(
    context: grpc.aio.ServicerContext[Any, Any], exc: BaseException, rpc: str
) -> NoReturn:
    if isinstance(exc, errors.AtomizerError):
        code = status_code(exc)
        log.info("request refused", rpc=rpc, code=code.name, reason=str(exc))
        await context.abort(code, str(exc))
    log.exception("request failed", rpc=rpc)
    await context.abort(grpc.StatusCode.INTERNAL, "internal error in atomizerd; see its log")


def _session_of(request: object) -> str:
    value = getattr(request, "session_id", "")
    # Only bind plausible ids: a hostile 10 KB id must not flood the log.
    return value[:64] if isinstance(value, str) else ""


def merge_request(
    _logger: object, _method: str, event_dict: MutableMapping[str, Any]
) -> MutableMapping[str, Any]:
    """A log processor: the session id and rpc of the request being served, unless the line
    (or a binding of its own) says otherwise."""
    request = _REQUEST.get()
    if request is not None:
        event_dict.setdefault("session_id", request[0])
        event_dict.setdefault("rpc", request[1])
    return event_dict


@contextlib.asynccontextmanager
async def _serving(
    request: Any, context: grpc.aio.ServicerContext[Any, Any], rpc: str
) -> AsyncIterator[None]:
    """One request served: its session and rpc in every log line, a domain error (or a bug)
    turned into the call's status."""
    token = _REQUEST.set((_session_of(request), rpc))
    try:
        yield
    except (errors.AtomizerError, Exception) as exc:
        if isinstance(exc, grpc.aio.AbortError):
            raise
        await _abort(context, exc, rpc)  # raises: the call ends with the status
    finally:
        _REQUEST.reset(token)


def unary(
    method: Callable[[Self, Req, grpc.aio.ServicerContext[Any, Any]], Awaitable[Resp]],
) -> Callable[[Self, Req, grpc.aio.ServicerContext[Any, Any]], Awaitable[Resp]]:
    rpc = method.__name__

    @functools.wraps(method)
    async def wrapper(
        self: Self, request: Req, context: grpc.aio.ServicerContext[Any, Any]
    ) -> Resp:
        async with _serving(request, context, rpc):
            return await method(self, request, context)
        raise AssertionError("unreachable: a failed call is aborted")

    return wrapper


def streaming(
    method: Callable[[Self, Req, grpc.aio.ServicerContext[Any, Any]], AsyncIterator[Resp]],
) -> Callable[[Self, Req, grpc.aio.ServicerContext[Any, Any]], AsyncIterator[Resp]]:
    rpc = method.__name__

    @functools.wraps(method)
    async def wrapper(
        self: Self, request: Req, context: grpc.aio.ServicerContext[Any, Any]
    ) -> AsyncIterator[Resp]:
        async with _serving(request, context, rpc):
            async for item in method(self, request, context):
                yield item

    return wrapper
