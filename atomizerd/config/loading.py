"""Building the effective configuration from its sources, later ones winning: built-in
defaults, the TOML file (``--config``), ``ATOMIZERD_<SECTION>_<KEY>`` environment variables,
command-line flags (``--set key=value`` and a few shortcuts). Unknown keys and bad values are
startup errors that name the key."""

from __future__ import annotations

import dataclasses
import os
import socket
import tomllib
import typing
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from atomizerd.config.fields import ConfigError
from atomizerd.config.schema import Config, iter_keys, leaf_type
from atomizerd.config.validation import validate

ENV_PREFIX = "ATOMIZERD_"
# ATOMIZERD_* variables that are not configuration keys.
_ENV_NOT_KEYS = frozenset({ENV_PREFIX + "CONFIG", ENV_PREFIX + "SOCKET"})


def _default_runtime_dir() -> str:
    # systemd sets RUNTIME_DIRECTORY for RuntimeDirectory=; a user session has XDG_RUNTIME_DIR.
    if os.environ.get("RUNTIME_DIRECTORY"):
        return os.environ["RUNTIME_DIRECTORY"].split(":")[0]
    if os.environ.get("XDG_RUNTIME_DIR"):
        return str(Path(os.environ["XDG_RUNTIME_DIR"]) / "atomizerd")
    return f"/tmp/atomizerd-{os.getuid()}"


def _default_state_dir() -> str:
    if os.environ.get("STATE_DIRECTORY"):
        return os.environ["STATE_DIRECTORY"].split(":")[0]
    base = os.environ.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
    return str(Path(base) / "atomizerd")


def _coerce(key: str, value: Any, *, from_text: bool) -> Any:
    """Checks (and, for env/flag text, parses) a value against the key's declared type."""
    tp = leaf_type(key)
    origin = typing.get_origin(tp)
    try:
        if tp is bool:
            if from_text and isinstance(value, str):
                low = value.strip().lower()
                if low in ("1", "true", "yes", "on"):
                    return True
                if low in ("0", "false", "no", "off"):
                    return False
                raise ValueError("expected true or false")
            if not isinstance(value, bool):
                raise ValueError("expected true or false")
            return value
        if tp is int:
            if isinstance(value, bool):
                raise ValueError("expected an integer")
            if isinstance(value, str) and from_text:
                return int(value)
            if not isinstance(value, int):
                raise ValueError("expected an integer")
            return value
        if tp is float:
            if isinstance(value, bool):
                raise ValueError("expected a number")
            if isinstance(value, str) and from_text:
                return float(value)
            if not isinstance(value, int | float):
                raise ValueError("expected a number")
            return float(value)
        if tp is str:
            if not isinstance(value, str):
                raise ValueError("expected a string")
            return value
        if origin is list and typing.get_args(tp)[0] is not str:
            # A list of tables (notify.webhooks): checked by its own parser in validate().
            if isinstance(value, str) and from_text:
                import json

                value = json.loads(value)
            if not isinstance(value, list) or not all(isinstance(v, dict) for v in value):
                raise ValueError("expected a list of tables")
            return [dict(v) for v in value]
        if origin is list:
            if isinstance(value, str) and from_text:
                import shlex

                value = shlex.split(value)
            if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
                raise ValueError("expected a list of strings")
            return list(value)
        if origin is dict:
            if isinstance(value, str) and from_text:
                import json

                value = json.loads(value)
            if not isinstance(value, dict) or not all(
                isinstance(k, str) and isinstance(v, str) for k, v in value.items()
            ):
                raise ValueError("expected a table of strings")
            return dict(value)
    except ValueError as e:
        raise ConfigError(f"{key}: {e} (got {value!r})") from None
    raise ConfigError(f"{key}: unsupported type {tp}")  # pragma: no cover


def _set(cfg: Config, key: str, value: Any) -> None:
    *sections, leaf = key.split(".")
    target: Any = cfg
    for s in sections:
        target = getattr(target, s)
    setattr(target, leaf, value)


def _flatten(table: Mapping[str, Any], prefix: str = "") -> Iterator[tuple[str, Any]]:
    for k, v in table.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and not _is_table_key(key):
            yield from _flatten(v, key + ".")
        else:
            yield key, v


def _is_table_key(key: str) -> bool:
    try:
        return typing.get_origin(leaf_type(key)) is dict
    except (KeyError, TypeError):
        return False


def _known_keys() -> dict[str, dataclasses.Field[Any]]:
    return dict(iter_keys())


def _apply(cfg: Config, key: str, value: Any, *, source: str, from_text: bool) -> None:
    if key not in _known_keys():
        raise ConfigError(f"unknown configuration key {key!r} (from {source})")
    _set(cfg, key, _coerce(key, value, from_text=from_text))


def _env_key_map() -> dict[str, str]:
    return {ENV_PREFIX + k.replace(".", "_").upper(): k for k in _known_keys()}


def load(
    path: str | Path | None = None,
    *,
    environ: Mapping[str, str] | None = None,
    overrides: Mapping[str, str] | None = None,
) -> Config:
    """Builds the effective configuration and validates it."""
    cfg = Config()
    if path is not None:
        try:
            with open(path, "rb") as fh:
                table = tomllib.load(fh)
        except FileNotFoundError:
            raise ConfigError(f"config file {path} does not exist") from None
        except tomllib.TOMLDecodeError as e:
            raise ConfigError(f"config file {path} is not valid TOML: {e}") from None
        for key, value in _flatten(table):
            _apply(cfg, key, value, source=str(path), from_text=False)
    env = os.environ if environ is None else environ
    env_map = _env_key_map()
    # ATOMIZERD_SOCKET is where clients look for the daemon: the daemon listens there too.
    if env.get(ENV_PREFIX + "SOCKET") and not env.get(ENV_PREFIX + "DAEMON_SOCKET"):
        _apply(
            cfg,
            "daemon.socket",
            env[ENV_PREFIX + "SOCKET"],
            source="ATOMIZERD_SOCKET",
            from_text=True,
        )
    for name, value in env.items():
        if not name.startswith(ENV_PREFIX) or name in _ENV_NOT_KEYS:
            continue
        if name not in env_map:
            raise ConfigError(f"unknown configuration variable {name}")
        _apply(cfg, env_map[name], value, source=name, from_text=True)
    for key, value in (overrides or {}).items():
        _apply(cfg, key, value, source="command line", from_text=True)
    resolve(cfg)
    validate(cfg)
    return cfg


def resolve(cfg: Config) -> None:
    """Fills the defaults that depend on the environment, and makes paths absolute."""
    d = cfg.daemon
    d.runtime_dir = str(Path(d.runtime_dir or _default_runtime_dir()).expanduser().absolute())
    d.state_dir = str(Path(d.state_dir or _default_state_dir()).expanduser().absolute())
    d.socket = str(Path(d.socket or Path(d.runtime_dir) / "atomizerd.sock").expanduser().absolute())
    if not d.database:
        d.database = f"sqlite:///{Path(d.state_dir) / 'atomizerd.db'}"
    d.host_id = d.host_id or socket.gethostname()
    if "/" in cfg.metrics.listen:
        cfg.metrics.listen = str(Path(cfg.metrics.listen).expanduser().absolute())
    a = cfg.atomizer
    a.root = str(Path(a.root or os.getcwd()).expanduser().absolute())
    a.studies_root = str(Path(a.studies_root or Path(a.root) / "studies").expanduser().absolute())
    sb = cfg.sandbox
    sb.tmp_dir = str(Path(sb.tmp_dir or Path(d.state_dir) / "agent-tmp").expanduser().absolute())
