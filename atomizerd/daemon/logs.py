"""structlog set-up: JSON lines when not on a TTY (journald), readable console otherwise.

Request handlers bind `session_id` with structlog's contextvars, so every line a request
causes carries it. Message text is never logged at info level.
"""

from __future__ import annotations

import logging
import sys

import structlog

from atomizerd.daemon.config import Config


def configure(config: Config) -> None:
    fmt = config.logging.format
    if fmt == "auto":
        fmt = "console" if sys.stderr.isatty() else "json"
    renderer: structlog.types.Processor
    if fmt == "json":
        renderer = structlog.processors.JSONRenderer()
    else:
        renderer = structlog.dev.ConsoleRenderer(colors=sys.stderr.isatty())
    processors: list[structlog.types.Processor] = [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
        structlog.processors.format_exc_info
        if fmt == "json"
        else structlog.processors.StackInfoRenderer(),
        renderer,
    ]
    structlog.configure(
        processors=processors,
        wrapper_class=structlog.make_filtering_bound_logger(
            logging.getLevelNamesMapping()[config.logging.level.upper()]
        ),
        logger_factory=structlog.PrintLoggerFactory(file=sys.stderr),
        cache_logger_on_first_use=True,
    )
