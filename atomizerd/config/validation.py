"""Checking a configuration: each key's own check (declared with the key, `fields.CHECKS`), then
the checks that need more than one value or more than a simple rule."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from atomizerd.config.derived import agent_umask, mcp_server_entry, metrics_address, socket_mode
from atomizerd.config.fields import ConfigError
from atomizerd.config.notify import parse_webhooks
from atomizerd.config.schema import Config, get, iter_keys
from atomizerd.model import Mode


def check_key(key: str, metadata: Any, value: Any) -> None:
    """Applies the simple check `metadata` declares for `key`, if any, to `value`."""
    check = metadata.get("check")
    if check == "positive":
        if value <= 0:
            raise ConfigError(f"{key}: must be greater than 0 (got {value})")
    elif check == "non_negative":
        if value < 0:
            raise ConfigError(f"{key}: must not be negative")
    elif check == "one_of":
        choices = metadata["choices"]
        if value not in choices:
            expected = ", ".join(choices[:-1]) + " or " + choices[-1]
            raise ConfigError(f"{key}: expected {expected} ({value!r})")
    elif check == "paths":
        for path in value:
            if not (path == "~" or path.startswith(("~/", "/"))):
                raise ConfigError(f"{key}: {path!r} must be an absolute path or start with ~/")


def validate(cfg: Config) -> None:
    try:
        mode = socket_mode(cfg)
    except ValueError:
        raise ConfigError(
            f"daemon.socket_mode: expected an octal mode like 0600 (got {cfg.daemon.socket_mode!r})"
        ) from None
    if mode & 0o007:
        raise ConfigError("daemon.socket_mode: must not grant access to others (e.g. 0600, 0660)")
    host_id = cfg.daemon.host_id
    if not host_id or len(host_id) > 255 or not host_id.isprintable() or host_id != host_id.strip():
        raise ConfigError(
            f"daemon.host_id: expected a name of 1 to 255 printable characters without leading "
            f"or trailing spaces (got {host_id!r})"
        )
    if not cfg.agent.command:
        raise ConfigError("agent.command: must name the agent program")
    plans = Path(cfg.modes.plan.plans_dir)
    if plans.is_absolute() or ".." in plans.parts or not plans.parts:
        raise ConfigError(
            f"modes.plan.plans_dir: a folder inside the Atomizer root, as a relative path "
            f"without '..' (got {cfg.modes.plan.plans_dir!r})"
        )
    for name in cfg.agent.models:
        if not name.strip() or len(name) > 128 or any(ch.isspace() for ch in name):
            raise ConfigError(f"agent.models: {name!r} is not a model name")
    for spare_mode in cfg.pool.spare_modes:
        if spare_mode not in (Mode.USER, Mode.POWER):
            raise ConfigError(f"pool.spare_modes: unknown mode {spare_mode!r} (use user or power)")
    try:
        umask = agent_umask(cfg)
    except ValueError:
        raise ConfigError(
            f"agent.umask: expected an octal mask like 0027 (got {cfg.agent.umask!r})"
        ) from None
    if not 0 <= umask <= 0o777:
        raise ConfigError(
            f"agent.umask: expected an octal mask like 0027 (got {cfg.agent.umask!r})"
        )
    for key, f in iter_keys():
        check_key(key, f.metadata, get(cfg, key))
    for name, spec in cfg.mcp.servers.items():
        mcp_server_entry(name, spec)
    if len(cfg.daemon.socket.encode()) > 107:
        raise ConfigError(
            f"daemon.socket: path longer than a Unix socket allows ({cfg.daemon.socket})"
        )
    metrics_address(cfg)
    parse_webhooks(cfg.notify.webhooks)
