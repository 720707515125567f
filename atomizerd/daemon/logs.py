"""structlog set-up: JSON lines when not on a TTY (journald), readable console otherwise.

Request handlers bind `session_id` and `rpc` (api/errormap.py: `merge_request`), so every
line a request causes carries them. Message text is never logged at info level.

Everything else that writes to stderr goes the same way, so the log stays one JSON object a
line: the standard library's `logging` (asyncio, grpc, warnings), errors the event loop
reports (`loop_exception`: a task exception nobody retrieved), exceptions Python can only
report (unraisable ones, those of threads).
"""

from __future__ import annotations

import logging
import sys
import threading
import traceback
from typing import Any

import structlog

from atomizerd.api.errormap import merge_request
from atomizerd.config import Config

log = structlog.get_logger("atomizerd.daemon.logs")


def configure(config: Config) -> None:
    fmt = config.logging.format
    if fmt == "auto":
        fmt = "console" if sys.stderr.isatty() else "json"
    renderer: structlog.types.Processor
    if fmt == "json":
        renderer = structlog.processors.JSONRenderer()
    else:
        renderer = structlog.dev.ConsoleRenderer(colors=sys.stderr.isatty())
    shared: list[structlog.types.Processor] = [
        structlog.contextvars.merge_contextvars,
        merge_request,
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
    ]
    exc: structlog.types.Processor = (
        structlog.processors.format_exc_info
        if fmt == "json"
        else structlog.processors.StackInfoRenderer()
    )
    level = logging.getLevelNamesMapping()[config.logging.level.upper()]
    structlog.configure(
        processors=[*shared, exc, renderer],
        wrapper_class=structlog.make_filtering_bound_logger(level),
        logger_factory=structlog.PrintLoggerFactory(file=sys.stderr),
        cache_logger_on_first_use=True,
    )
    _route_stdlib(shared, exc, renderer, max(level, logging.WARNING))
    sys.unraisablehook = _unraisable
    threading.excepthook = _thread_exception


def _route_stdlib(
    shared: list[structlog.types.Processor],
    exc: structlog.types.Processor,
    renderer: structlog.types.Processor,
    level: int,
) -> None:
    """The standard library's loggers render like ours (warnings and up: their debug and
    info lines are other libraries' chatter)."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(
        structlog.stdlib.ProcessorFormatter(
            foreign_pre_chain=[*shared, structlog.stdlib.add_logger_name],
            processors=[structlog.stdlib.ProcessorFormatter.remove_processors_meta, exc, renderer],
        )
    )
    root = logging.getLogger()
    root.handlers = [handler]
    root.setLevel(level)
    logging.captureWarnings(True)


def loop_exception(loop: Any, context: dict[str, Any]) -> None:
    """The event loop's exception handler: one log line, never a bare traceback."""
    error = context.get("exception")
    fields: dict[str, Any] = {"message": context.get("message", "")}
    for key in ("task", "future", "handle"):
        if key in context:
            fields[key] = repr(context[key])[:300]
    if isinstance(error, BaseException):
        fields["error"] = repr(error)
        fields["traceback"] = "".join(traceback.format_exception(error))[-4000:]
    log.error("unhandled error in the event loop", **fields)


def _unraisable(unraisable: Any) -> None:
    error = unraisable.exc_value
    log.error(
        "unraisable exception",
        message=str(unraisable.err_msg or ""),
        object=repr(unraisable.object)[:300],
        error=repr(error),
        traceback="".join(traceback.format_exception(error))[-4000:] if error else "",
    )


def _thread_exception(args: threading.ExceptHookArgs) -> None:
    error = args.exc_value
    log.error(
        "exception in a thread",
        thread=args.thread.name if args.thread else "",
        error=repr(error),
        traceback="".join(traceback.format_exception(error))[-4000:] if error else "",
    )
