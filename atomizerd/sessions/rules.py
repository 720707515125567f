"""Permission rules a client asks the session to remember (RespondToPermission's `rule`), and
the suggestions the CLI makes with each permission request.

A rule is Claude Code's own syntax, `Tool` or `Tool(content)`, so the CLI itself matches it:
it is given to the running agent in the allow answer (`updatedPermissions`, destination
`session`, docs/agent-protocol.md) and to every later agent of the session on `--allowedTools`.
The daemon never matches rules itself.
"""

from __future__ import annotations

import re
from typing import Any

from atomizerd.errors import InvalidArgument
from atomizerd.sessions import events as ev

# A tool's name as the CLI spells it: built-in (Edit, Bash) or an MCP tool (mcp__server__tool).
_TOOL_NAME = re.compile(r"[A-Za-z][A-Za-z0-9_.:-]{0,127}")
# The whole rule fits the permission_rules row and stays one argv token.
MAX_RULE_CHARS = 256


def format_rule(tool_name: str, rule_content: str) -> str:
    return f"{tool_name}({rule_content})" if rule_content else tool_name


def check_rule(tool_name: str, rule_content: str) -> str:
    """The rule as one string, or InvalidArgument saying what is wrong with it."""
    if not _TOOL_NAME.fullmatch(tool_name):
        raise InvalidArgument(
            f"rule.tool_name {tool_name[:80]!r} is not a tool name (letters, digits, _ . : -)"
        )
    if any(ch in rule_content for ch in "()\n\r\x00"):
        raise InvalidArgument("rule.rule_content must not hold parentheses or line breaks")
    rule = format_rule(tool_name, rule_content.strip())
    if len(rule) > MAX_RULE_CHARS:
        raise InvalidArgument(f"the rule is {len(rule)} characters; the limit is {MAX_RULE_CHARS}")
    return rule


def parse_suggestions(raw: object) -> tuple[ev.PermissionSuggestion, ...]:
    """The CLI's `permission_suggestions`, leniently (wrong types read as empty)."""
    out = []
    for s in raw if isinstance(raw, list) else []:
        if not isinstance(s, dict):
            continue
        rules = s.get("rules")
        dirs = s.get("directories")
        out.append(
            ev.PermissionSuggestion(
                type=_text(s.get("type")),
                rules=tuple(
                    ev.PermissionRule(_text(r.get("toolName")), _text(r.get("ruleContent")))
                    for r in (rules if isinstance(rules, list) else [])
                    if isinstance(r, dict)
                ),
                behavior=_text(s.get("behavior")),
                mode=_text(s.get("mode")),
                directories=tuple(d for d in (dirs if isinstance(dirs, list) else []) if _is(d)),
                destination=_text(s.get("destination")),
            )
        )
    return tuple(out)


def session_rule_update(tool_name: str, rule_content: str) -> dict[str, Any]:
    """The `updatedPermissions` entry that makes the running agent allow the rule."""
    rule: dict[str, Any] = {"toolName": tool_name}
    if rule_content:
        rule["ruleContent"] = rule_content
    return {"type": "addRules", "rules": [rule], "behavior": "allow", "destination": "session"}


def _text(value: object) -> str:
    return value if isinstance(value, str) else ""


def _is(value: object) -> bool:
    return isinstance(value, str)
