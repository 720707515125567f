"""What every configuration key is made of: its documentation and the check its value passes.

A key is a dataclass field declared with `_doc(text, default=..., check=...)`. The text is what
`docs/configuration.md` says of the key; `check` names one of the simple checks `validate`
applies to every key that declares it (`CHECKS`). Checks that need more than the key's own
value stay as code in `validation.py`.
"""

from __future__ import annotations

from dataclasses import field
from typing import Any

# The simple checks a key may declare:
#   positive      a number greater than 0
#   non_negative  a number of 0 or more
#   one_of        a string among the key's `choices`
#   paths         a list of absolute paths or paths under ~ (the agent's HOME)
CHECKS = frozenset({"positive", "non_negative", "one_of", "paths"})


class ConfigError(ValueError):
    """A configuration problem, worded for the person who wrote the config."""


def _doc(text: str, *, check: str | None = None, choices: tuple[str, ...] = (), **kw: Any) -> Any:
    """A configuration key: `text` documents it, `check` (one of `CHECKS`) checks its value."""
    if check is not None and check not in CHECKS:
        raise ValueError(f"unknown check {check!r}")
    if (check == "one_of") != bool(choices):
        raise ValueError("choices go with check='one_of', and only with it")
    metadata: dict[str, Any] = {"doc": text}
    if check is not None:
        metadata["check"] = check
    if choices:
        metadata["choices"] = choices
    return field(metadata=metadata, **kw)
