"""Checks of what clients send, and the page tokens the API hands out.

Each check raises the domain error a client sees as its status (api/errormap.py) with a
message written for a person; nothing here touches a session's state.
"""

from __future__ import annotations

import base64
import binascii
import json
import math
import re
from collections.abc import Callable
from typing import TypeVar

from atomizerd import ids
from atomizerd.config import Config
from atomizerd.errors import InvalidArgument, PermissionDenied, ResourceExhausted
from atomizerd.model import Mode, SessionRecord

T = TypeVar("T")

# A model as the CLI takes it: an alias (sonnet, opus[1m]) or a model id.
_MODEL_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:@/\[\]-]{0,127}")
MAX_PAGE = 1000
DEFAULT_PAGE = 100
# SendMessageRequest.output_schema: at most this many bytes of JSON.
MAX_SCHEMA_BYTES = 64 * 1024
_SCHEMA_TYPES = frozenset({"object", "array", "string", "number", "integer", "boolean", "null"})
# Keywords whose value is a schema, a list of schemas, or a map of names to schemas.
_SUBSCHEMA = ("items", "not", "additionalProperties", "if", "then", "else", "contains")
_SUBSCHEMA_LISTS = ("allOf", "anyOf", "oneOf", "prefixItems")
_SUBSCHEMA_MAPS = ("properties", "patternProperties", "$defs", "definitions")


def check_model(config: Config, model: str) -> str:
    allowed = config.agent.models
    if allowed and model not in allowed:
        raise InvalidArgument(
            f"model {model[:130]!r} is not one this daemon offers (agent.models): "
            + ", ".join(allowed)
        )
    if not _MODEL_NAME.fullmatch(model):
        raise InvalidArgument(
            f"model {model[:130]!r} is not a model name (letters, digits and . _ - : @ / [ ])"
        )
    return model


def check_mode(config: Config, mode: str) -> Mode:
    if mode not in set(Mode):
        raise InvalidArgument(f"unknown mode {mode!r}: use MODE_USER, MODE_POWER or MODE_PLAN")
    if mode == Mode.POWER and not config.modes.power.enabled:
        raise PermissionDenied(
            "power mode is disabled on this daemon (modes.power.enabled = false)"
        )
    return Mode(mode)


def check_text(config: Config, text: str, *, empty_ok: bool = False) -> None:
    if not text.strip() and not empty_ok:
        raise InvalidArgument("the message text is empty")
    size = len(text.encode("utf-8", "surrogatepass"))
    limit = config.daemon.max_message_bytes
    if size > limit:
        raise InvalidArgument(
            f"the message is {size} bytes; the limit is {limit} (daemon.max_message_bytes)"
        )


def check_output_schema(text: str) -> dict[str, object] | None:
    """SendMessageRequest.output_schema: None when empty; else the JSON Schema as an object.
    INVALID_ARGUMENT for text that is too long, not JSON, or not a schema object (the
    keywords the agent relies on are checked for their shape, recursively)."""
    if not text:
        return None
    size = len(text.encode("utf-8", "surrogatepass"))
    if size > MAX_SCHEMA_BYTES:
        raise InvalidArgument(f"output_schema is {size} bytes; the limit is {MAX_SCHEMA_BYTES}")
    try:
        schema = json.loads(text)
    except ValueError as e:
        raise InvalidArgument(f"output_schema is not valid JSON: {e}") from None
    if not isinstance(schema, dict):
        raise InvalidArgument("output_schema must be a JSON Schema object ({...})")
    _check_schema(schema, "output_schema", 0)
    return schema


def _check_schema(schema: object, where: str, depth: int) -> None:
    if isinstance(schema, bool):  # true / false are schemas too (below the top)
        return
    if not isinstance(schema, dict):
        raise InvalidArgument(f"{where} is not a schema (an object or a boolean)")
    if depth > 32:
        raise InvalidArgument(f"{where}: the schema nests too deep")
    kind = schema.get("type")
    if kind is not None:
        kinds = kind if isinstance(kind, list) else [kind]
        if not kinds or not all(isinstance(k, str) and k in _SCHEMA_TYPES for k in kinds):
            raise InvalidArgument(
                f"{where}.type must be one of {', '.join(sorted(_SCHEMA_TYPES))} (or a list)"
            )
    required = schema.get("required")
    if required is not None and not (
        isinstance(required, list) and all(isinstance(r, str) for r in required)
    ):
        raise InvalidArgument(f"{where}.required must be a list of property names")
    enum = schema.get("enum")
    if enum is not None and not isinstance(enum, list):
        raise InvalidArgument(f"{where}.enum must be a list")
    for key in _SUBSCHEMA:
        if key in schema:
            _check_schema(schema[key], f"{where}.{key}", depth + 1)
    for key in _SUBSCHEMA_LISTS:
        if key in schema:
            value = schema[key]
            if not isinstance(value, list) or not value:
                raise InvalidArgument(f"{where}.{key} must be a non-empty list of schemas")
            for i, sub in enumerate(value):
                _check_schema(sub, f"{where}.{key}[{i}]", depth + 1)
    for key in _SUBSCHEMA_MAPS:
        if key in schema:
            value = schema[key]
            if not isinstance(value, dict):
                raise InvalidArgument(f"{where}.{key} must be an object of schemas")
            for name, sub in value.items():
                _check_schema(sub, f"{where}.{key}.{name}", depth + 1)


def check_budget(record: SessionRecord) -> None:
    cap = record.budget_usd
    if cap > 0 and record.total_cost_usd >= cap:
        raise ResourceExhausted(
            f"session {record.session_id!r} has spent ${record.total_cost_usd:.4f} of its "
            f"${cap:.4f} cap; it accepts no more messages"
        )


def cap(name: str, requested: float, daemon_cap: float) -> float:
    """A per-session cap may only lower the daemon's (0 means "the daemon's")."""
    if not math.isfinite(requested):  # NaN would slip past every comparison below
        raise InvalidArgument(f"{name} must be a finite number (got {requested})")
    if requested < 0:
        raise InvalidArgument(f"{name} must not be negative")
    if requested == 0:
        return daemon_cap
    if daemon_cap > 0 and requested > daemon_cap:
        raise InvalidArgument(
            f"{name} ${requested:g} is above the daemon's cap ${daemon_cap:g}; "
            "it may only be lowered"
        )
    return requested


def page_size(value: int) -> int:
    if value < 0:
        raise InvalidArgument("page_size must not be negative")
    return min(value or DEFAULT_PAGE, MAX_PAGE)


def encode_token(created_at: float, session_id: str) -> str:
    return base64.urlsafe_b64encode(json.dumps([created_at, session_id]).encode()).decode()


def decode_token(token: str) -> tuple[float, str] | None:
    if not token:
        return None
    try:
        created, sid = json.loads(base64.urlsafe_b64decode(token.encode()))
        return float(created), ids.check_session_id(str(sid))
    except (ValueError, TypeError, binascii.Error, InvalidArgument):
        raise InvalidArgument("page_token is not one this daemon issued") from None


def id_page(
    size: int,
    token: str,
    fetch: Callable[[int, int], list[T]],
    row_id: Callable[[T], int],
) -> tuple[list[T], str]:
    """One page of rows in id order: `fetch(after_id, limit)` asked for one row more than the
    page, which says whether a next page (its token) exists."""
    limit = page_size(size)
    rows = fetch(decode_id_token(token), limit + 1)
    page = rows[:limit]
    return page, encode_id_token(row_id(page[-1])) if len(rows) > limit else ""


def encode_id_token(last_id: int) -> str:
    return base64.urlsafe_b64encode(str(last_id).encode()).decode()


def decode_id_token(token: str) -> int:
    if not token:
        return 0
    try:
        value = int(base64.urlsafe_b64decode(token.encode()).decode())
        if not 0 <= value < 2**63:  # beyond SQLite's INTEGER: not a row id we handed out
            raise ValueError(value)
        return value
    except (ValueError, binascii.Error):
        raise InvalidArgument("page_token is not one this daemon issued") from None


# Labels: keys as Kubernetes label keys, values bounded.
MAX_LABELS = 64
MAX_LABEL_VALUE = 256
_LABEL_NAME = re.compile(r"[A-Za-z0-9]([A-Za-z0-9_.-]{0,61}[A-Za-z0-9])?")
_DNS_LABEL = re.compile(r"[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?")
LABEL_KEY_RULE = (
    "a label key (as in Kubernetes) is an optional prefix (a DNS subdomain of at most 253 "
    'characters: lowercase dot-separated parts of letters, digits and "-") and "/", then a '
    "name of 1-63 "
    'characters: letters, digits, "-", "_" and ".", beginning and ending with a letter or digit'
)


def check_label_key(key: str) -> str:
    prefix, slash, name = key.rpartition("/")
    ok = bool(_LABEL_NAME.fullmatch(name))
    if slash:
        ok = ok and 0 < len(prefix) <= 253
        ok = ok and all(_DNS_LABEL.fullmatch(part) for part in prefix.split("."))
    if not ok:
        raise InvalidArgument(f"label key {key[:330]!r} is not valid: {LABEL_KEY_RULE}")
    return key


def check_label_value(key: str, value: str) -> str:
    if not value or len(value) > MAX_LABEL_VALUE:
        raise InvalidArgument(
            f"label {key!r} has a value of {len(value)} characters; a label value has "
            f"1-{MAX_LABEL_VALUE}"
        )
    if any(ord(c) < 32 or ord(c) == 127 for c in value):
        raise InvalidArgument(f"label {key!r} has a control character in its value")
    return value


def check_labels(labels: dict[str, str]) -> dict[str, str]:
    """A session's whole label set (CreateSession, the result of SetLabels)."""
    if len(labels) > MAX_LABELS:
        raise InvalidArgument(
            f"a session has at most {MAX_LABELS} labels; this would give it {len(labels)}"
        )
    for key, value in labels.items():
        check_label_key(key)
        check_label_value(key, value)
    return labels


def check_label_filter(labels: dict[str, str]) -> dict[str, str]:
    """Labels to match (ListSessions, SearchMessages): the same rules, as a label set."""
    return check_labels(labels)


# Full-text search.
MAX_QUERY_CHARS = 1000
MAX_SEARCH_PAGE = 100
DEFAULT_SEARCH_PAGE = 20
MAX_SEARCH_OFFSET = 10_000  # deeper than any person pages: narrow the query instead


def check_query(query: str) -> str:
    if not query.strip():
        raise InvalidArgument("the search query is empty")
    if len(query) > MAX_QUERY_CHARS:
        raise InvalidArgument(
            f"the search query has {len(query)} characters; at most {MAX_QUERY_CHARS}"
        )
    if "\x00" in query:
        raise InvalidArgument("the search query has a NUL character")
    return query


def search_page_size(value: int) -> int:
    if value < 0:
        raise InvalidArgument("page_size must not be negative")
    return min(value or DEFAULT_SEARCH_PAGE, MAX_SEARCH_PAGE)


def decode_offset_token(token: str) -> int:
    offset = decode_id_token(token)
    if offset > MAX_SEARCH_OFFSET:
        raise InvalidArgument("page_token is not one this daemon issued")
    return offset
