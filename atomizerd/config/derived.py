"""Values parsed out of the configuration's text keys, each checked where it is parsed."""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass
from typing import Any

from atomizerd.config.fields import ConfigError
from atomizerd.config.schema import Config


def mcp_server_entry(name: str, spec: str) -> dict[str, Any]:
    """An `mcp.servers` value parsed and checked (a JSON object with a command or a url)."""
    import json

    key = f"mcp.servers.{name}"
    if name == "atomizer":
        raise ConfigError(f"{key}: the name 'atomizer' is reserved for Atomizer's own server")
    try:
        entry = json.loads(spec)
    except ValueError as e:
        raise ConfigError(f"{key}: not valid JSON ({e})") from None
    if not isinstance(entry, dict) or not ({"command", "url"} & entry.keys()):
        raise ConfigError(f'{key}: expected a JSON object with a "command" or a "url"')
    return entry


@dataclass(frozen=True)
class MetricsAddress:
    """Where the metrics endpoint listens: a loopback `host` and `port`, or a Unix `path`."""

    host: str = ""
    port: int = 0
    path: str = ""


def metrics_address(cfg: Config) -> MetricsAddress | None:
    """`metrics.listen` parsed and checked; None when the endpoint is off."""
    listen = cfg.metrics.listen.strip()
    if not listen:
        return None
    if "/" in listen:
        if len(listen.encode()) > 107:
            raise ConfigError(f"metrics.listen: path longer than a Unix socket allows ({listen})")
        return MetricsAddress(path=listen)
    expected = "expected a loopback host:port (e.g. 127.0.0.1:9464) or a Unix socket path"
    if listen.startswith("["):
        host, sep, port = listen[1:].partition("]:")
    else:
        host, sep, port = listen.rpartition(":")
        if ":" in host:
            raise ConfigError(
                f"metrics.listen: write an IPv6 address in brackets, as [::1]:9464 (got {listen!r})"
            )
    if not sep or not host:
        raise ConfigError(f"metrics.listen: {expected} (got {listen!r})")
    try:
        number = int(port)
    except ValueError:
        number = -1
    if not 0 <= number <= 65535:
        raise ConfigError(f"metrics.listen: port must be 0 to 65535 (got {listen!r})")
    if host == "localhost":
        host = "127.0.0.1"
    try:
        loopback = ipaddress.ip_address(host).is_loopback
    except ValueError:
        loopback = False
    if not loopback:
        raise ConfigError(
            f"metrics.listen: {host} is not a loopback address. The metrics endpoint has no "
            "authentication, so it listens only on loopback (127.0.0.1, ::1, localhost) or on a "
            "Unix socket path; put a proxy in front of it to scrape from another machine"
        )
    return MetricsAddress(host=host, port=number)


def socket_mode(cfg: Config) -> int:
    return int(cfg.daemon.socket_mode, 8)


def agent_umask(cfg: Config) -> int:
    return int(cfg.agent.umask, 8)
