"""Validation and generation of the names clients hand us (session ids, study ids).

Everything a client names passes through here before it touches a path, a process argument
or a query: one pattern, checked once, at the edge.
"""

import re
import secrets
import uuid

from atomizerd.errors import InvalidArgument

_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]{0,63}")
_REQUEST_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.:-]{0,127}")


def _describe(value: str) -> str:
    shown = value if len(value) <= 40 else value[:37] + "..."
    return repr(shown)


def check_session_id(value: str) -> str:
    if not value:
        raise InvalidArgument("session_id is required")
    if not _NAME.fullmatch(value):
        raise InvalidArgument(
            f"session_id {_describe(value)} is not valid: use 1-64 letters, digits, '_' or '-', "
            "starting with a letter or digit"
        )
    return value


def check_study_id(value: str) -> str:
    """A study id is a plain folder name: no separators, no '..', nothing hidden."""
    if not _NAME.fullmatch(value):
        raise InvalidArgument(
            f"study_id {_describe(value)} is not a plain study name: use 1-64 letters, digits, "
            "'_' or '-' (no paths)"
        )
    return value


def check_request_id(value: str) -> str:
    if value and not _REQUEST_ID.fullmatch(value):
        raise InvalidArgument(
            f"request_id {_describe(value)} is not valid: use 1-128 letters, digits, '_', '-', "
            "'.' or ':'"
        )
    return value


_TASK_ID = re.compile(r"[A-Za-z0-9_-]{1,64}")


def check_task_id(value: str) -> str:
    """A task id as the CLI makes them (letters and digits); it names a file of the CLI."""
    if not _TASK_ID.fullmatch(value):
        raise InvalidArgument(
            f"task_id {_describe(value)} is not valid: use the task_id of a task_started event "
            "or of Session.tasks"
        )
    return value


def new_session_id() -> str:
    """128 random bits, url-safe: collision-safe where the original's 8 hex chars were not."""
    return "s" + secrets.token_hex(16)


def new_turn_id() -> str:
    return "t" + secrets.token_hex(12)


def new_agent_session_id() -> str:
    """The agent CLI wants a uuid for --session-id."""
    return str(uuid.uuid4())
