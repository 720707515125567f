"""The daemon's configuration: every key, its default and why, in one place.

Sources, later ones winning: built-in defaults, the TOML file (``--config``),
``ATOMIZERD_<SECTION>_<KEY>`` environment variables, command-line flags (``--set key=value``
and a few shortcuts). Unknown keys and bad values are startup errors that name the key.
``docs/configuration.md`` is generated from the ``doc`` metadata of the keys (``atomizerd
--print-config-docs``); a test keeps it fresh. Durations are in seconds.

The package sits below everything else: it imports nothing of the daemon. `fields` (a key's
documentation and check), the sections by theme (`service`, `agents`, `policy`, `notify`), `schema`
(`Config`, the walk over the keys), `loading`, `derived` (values parsed from text keys),
`validation`, `render`. Here: the whole configuration and what works on it; a component given
one section imports that section's type from its theme's module.
"""

from atomizerd.config.derived import (
    MetricsAddress,
    agent_umask,
    mcp_server_entry,
    metrics_address,
    socket_mode,
)
from atomizerd.config.fields import ConfigError
from atomizerd.config.loading import ENV_PREFIX, load, resolve
from atomizerd.config.notify import parse_webhooks
from atomizerd.config.render import render_docs, render_toml
from atomizerd.config.schema import Config, iter_keys
from atomizerd.config.validation import validate

__all__ = [
    "ENV_PREFIX",
    "Config",
    "ConfigError",
    "MetricsAddress",
    "agent_umask",
    "iter_keys",
    "load",
    "mcp_server_entry",
    "metrics_address",
    "parse_webhooks",
    "render_docs",
    "render_toml",
    "resolve",
    "socket_mode",
    "validate",
]
