"""The `notify` section: webhooks told about what needs a person (docs/clients.md,
"Notifications"), and the bounds of their delivery."""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

from atomizerd.config.fields import ConfigError, _doc

# What an endpoint may subscribe to (docs/clients.md lists what each one means).
EVENTS = (
    "permission_request",
    "question",
    "turn_completed",
    "turn_failed",
    "task_ended",
    "session_failed",
    "budget_exhausted",
)
# Bounds of one endpoint's declaration: a config is written by a person, these only catch
# mistakes that would make deliveries huge or unbounded.
MAX_WEBHOOKS = 16
MAX_URL_CHARS = 2048
MAX_SECRET_CHARS = 1024
_ENDPOINT_KEYS = frozenset({"url", "events", "secret", "labels", "include_text", "name"})
_NAME = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")


@dataclass(frozen=True)
class Webhook:
    """One checked endpoint of `notify.webhooks`."""

    name: str
    url: str
    events: frozenset[str]
    secret: str
    labels: tuple[tuple[str, str], ...] = ()
    include_text: bool = False

    @property
    def key(self) -> str:
        """What its stored deliveries are filed under: the URL's digest, so renaming or
        reordering endpoints keeps their pending deliveries."""
        return hashlib.sha256(self.url.encode()).hexdigest()[:32]

    @property
    def unix_path(self) -> str | None:
        """The socket's path when the endpoint is a Unix socket (`/path` or `unix:/path`)."""
        if self.url.startswith("unix:"):
            return self.url[len("unix:") :].removeprefix("//")
        return self.url if self.url.startswith("/") else None

    @property
    def shown(self) -> str:
        """The URL as status and logs show it: no user info, query or fragment (they may
        carry credentials)."""
        if self.unix_path is not None:
            return f"unix:{self.unix_path}"
        parts = urlsplit(self.url)
        port = f":{parts.port}" if parts.port else ""
        return f"{parts.scheme}://{parts.hostname}{port}{parts.path}"

    def matches(self, labels: dict[str, str]) -> bool:
        """Whether a session with `labels` is one this endpoint is told about."""
        return all(labels.get(k) == v for k, v in self.labels)


@dataclass
class NotifyConfig:
    webhooks: list[dict[str, Any]] = _doc(
        "Endpoints told about session events, as `[[notify.webhooks]]` tables: `url` (an "
        "`http://` or `https://` URL, or a Unix socket path, `/path` or `unix:/path`), "
        "`secret` (the HMAC-SHA256 key of the signature; required), `events` (a list among "
        "permission_request, question, turn_completed, turn_failed, task_ended, "
        "session_failed, budget_exhausted; empty: all), `labels` (a table: only sessions "
        "carrying all of them), `include_text` (put the reply, question or tool input in "
        "the body; off: a short summary only, so bodies never leave with the webhook), "
        "`name` (how status and metrics name it; default `webhook<N>`). At most 16. "
        'docs/clients.md, "Notifications", says what is sent and how to verify it.',
        default_factory=list,
    )
    queue_size: int = _doc(
        "Deliveries waiting per endpoint, stored (a planned restart keeps them). When full "
        "the oldest is dropped and counted (atomizerd_notify_dropped_total): a receiver "
        "that is down must not grow the database without bound.",
        default=1000,
        check="positive",
    )
    timeout: float = _doc(
        "Bound of one delivery attempt: connecting, sending, and reading the status line. "
        "A timeout is retried like a 5xx.",
        default=10.0,
        check="positive",
    )
    retry_initial: float = _doc(
        "First wait before retrying a delivery that failed for a 5xx, a timeout or a "
        "connection error; doubled after each failure up to `notify.retry_max`, each wait "
        "drawn at random between half of it and all of it (so endpoints do not retry in "
        "step). A 4xx is never retried: the receiver refused that body.",
        default=1.0,
        check="positive",
    )
    retry_max: float = _doc(
        "Longest wait between retries of a delivery: a receiver back after an outage is "
        "caught up within about this long.",
        default=60.0,
        check="positive",
    )
    give_up_after: float = _doc(
        "How long a delivery is retried before it is dropped (counted as failed). An "
        "hour: a notification older than that rarely helps anybody.",
        default=3600.0,
        check="positive",
    )
    failing_after: int = _doc(
        "Failed attempts in a row after which an endpoint is reported as failing (GetStatus "
        "`webhooks`, atomizerd_notify_endpoint_failing), until a delivery succeeds.",
        default=3,
        check="positive",
    )
    max_body_bytes: int = _doc(
        "Largest body of one delivery; texts (with `include_text`) are cut to fit.",
        default=65536,
        check="positive",
    )
    delivery_wait: float = _doc(
        "A permission request (or question) with nobody attached, in a session an endpoint "
        "is told about (`permission_request`, `question`), waits this long for its "
        "notification to be delivered; once delivered it waits `approvals.timeout` from "
        "then, so the person told can act. Not delivered within this (the receiver down): "
        "denied as when nobody is attached.",
        default=120.0,
        check="positive",
    )


def parse_webhooks(tables: list[dict[str, Any]]) -> list[Webhook]:
    """`notify.webhooks` checked: a ConfigError names the endpoint and what is wrong."""
    if len(tables) > MAX_WEBHOOKS:
        raise ConfigError(f"notify.webhooks: at most {MAX_WEBHOOKS} endpoints ({len(tables)})")
    hooks = [_parse_one(i, t) for i, t in enumerate(tables)]
    names = [h.name for h in hooks]
    if len(set(names)) != len(names):
        raise ConfigError(f"notify.webhooks: endpoint names must differ ({names})")
    if len({h.url for h in hooks}) != len(hooks):
        raise ConfigError("notify.webhooks: two endpoints have the same url")
    return hooks


def _parse_one(i: int, table: Any) -> Webhook:
    where = f"notify.webhooks[{i}]"
    if not isinstance(table, dict):
        raise ConfigError(f"{where}: expected a table with url and secret")
    unknown = set(table) - _ENDPOINT_KEYS
    if unknown:
        raise ConfigError(f"{where}: unknown keys {sorted(unknown)}")
    url = _text(where, table, "url", MAX_URL_CHARS)
    _check_url(where, url)
    secret = _text(where, table, "secret", MAX_SECRET_CHARS)
    name = table.get("name", f"webhook{i}")
    if not isinstance(name, str) or not _NAME.match(name):
        raise ConfigError(f"{where}.name: 1 to 64 letters, digits, '_', '.', '-' ({name!r})")
    events = table.get("events", [])
    if not isinstance(events, list) or not all(isinstance(e, str) for e in events):
        raise ConfigError(f"{where}.events: expected a list of event names")
    for e in events:
        if e not in EVENTS:
            raise ConfigError(f"{where}.events: unknown event {e!r} (known: {', '.join(EVENTS)})")
    labels = table.get("labels", {})
    if not isinstance(labels, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in labels.items()
    ):
        raise ConfigError(f"{where}.labels: expected a table of strings")
    include_text = table.get("include_text", False)
    if not isinstance(include_text, bool):
        raise ConfigError(f"{where}.include_text: expected true or false")
    return Webhook(
        name=name,
        url=url,
        events=frozenset(events or EVENTS),
        secret=secret,
        labels=tuple(sorted(labels.items())),
        include_text=include_text,
    )


def _text(where: str, table: dict[str, Any], key: str, most: int) -> str:
    value = table.get(key)
    if not isinstance(value, str) or not value or len(value) > most:
        raise ConfigError(f"{where}.{key}: expected a string of 1 to {most} characters")
    return value


def _check_url(where: str, url: str) -> None:
    if url.startswith(("/", "unix:")):
        path = url.removeprefix("unix:").removeprefix("//")
        if not path.startswith("/") or len(path.encode()) > 107:
            raise ConfigError(f"{where}.url: a Unix socket needs an absolute path ({url!r})")
        return
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018 - raises on a bad port
    except ValueError as e:
        raise ConfigError(f"{where}.url: {e} ({url!r})") from None
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ConfigError(
            f"{where}.url: expected an http:// or https:// URL or a Unix socket path ({url!r})"
        )
