"""The `claude` CLI's stream-json protocol: parse what it writes, build what we write.

Reading: `parse_line` turns one stdout line into agent messages (frozen dataclasses). It is
lenient about shape — a field of the wrong type becomes its default and an unrecognised line
becomes `Unknown` — because a newer CLI adding or changing fields must not fail a turn. Only a
line that is not a JSON object raises `ProtocolError`.

Writing: the `*_line`/`*_request`/`*_response` builders return one UTF-8 JSON line (with its
trailing newline) ready for the agent's stdin.

Shapes were taken from Claude Code 2.1.332 in `-p --input-format stream-json --output-format
stream-json --verbose --include-partial-messages` mode:

- a `system`/`init` line opens every turn (not process start-up), then `system`/`status` lines;
- text and thinking stream as `stream_event` lines wrapping `content_block_delta` events; each
  finished content block is then repeated whole as an `assistant` line (one block per line,
  same `message.id`), so tool calls are read from `assistant` lines, not from partial JSON;
- a `message_stop` event carrying `abandoned_blocks` withdraws deltas already streamed (after
  an interrupt, or a broken stream retried without streaming);
- tool outcomes are `user` lines holding `tool_result` blocks;
- API retries are `system`/`api_retry` lines (activity, not a stall);
- the turn ends with the `result` line; an interrupt answers with a `control_response` and then
  a `user` "[Request interrupted by user]" line and a `result` of subtype
  `error_during_execution`;
- the CLI asks us about tools with `control_request`/`can_use_tool` (with
  `--permission-prompt-tool=stdio`) and may withdraw a question with `control_cancel_request`.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

from atomizerd.agents.messages import (
    TASK_MESSAGES,
    AbandonedBlocks,
    AgentMessage,
    ApiRetry,
    AssistantMessage,
    CommandLifecycle,
    CompactBoundary,
    ControlCancelRequest,
    ControlRequest,
    ControlResponse,
    Init,
    MessageDelta,
    Result,
    TaskNotification,
    TaskProgress,
    TaskStarted,
    TextDelta,
    ThinkingDelta,
    ToolResult,
    ToolUse,
    Unknown,
    UserReplay,
)
from atomizerd.model import PermissionDenial

# The placeholder a flattened tool result shows instead of an image's base64 payload.
IMAGE_PLACEHOLDER = "[image]"


__all__ = [
    "IMAGE_PLACEHOLDER",
    "TASK_MESSAGES",
    "AbandonedBlocks",
    "AgentMessage",
    "ApiRetry",
    "AssistantMessage",
    "CommandLifecycle",
    "CompactBoundary",
    "ControlCancelRequest",
    "ControlRequest",
    "ControlResponse",
    "Init",
    "MessageDelta",
    "PermissionDenial",
    "ProtocolError",
    "Result",
    "TaskNotification",
    "TaskProgress",
    "TaskStarted",
    "TextDelta",
    "ThinkingDelta",
    "ToolResult",
    "ToolUse",
    "Unknown",
    "UserReplay",
    "context_window",
    "control_error_response",
    "control_request_line",
    "control_response",
    "encode_line",
    "flatten_content",
    "parse_line",
    "permission_allow",
    "permission_deny",
    "user_message_line",
]


class ProtocolError(ValueError):
    """A stdout line that is not a JSON object; the reader logs and skips it."""


# --- parsing -----------------------------------------------------------------------------------


def parse_line(line: str) -> tuple[AgentMessage, ...]:
    """Parse one stdout line into its messages (one, or one per tool result of a `user` line).

    Raises ProtocolError if the line is not a JSON object.
    """
    try:
        data = json.loads(line)
    except (ValueError, RecursionError) as exc:  # malformed, or nested too deep to parse
        raise ProtocolError(f"not JSON: {exc}") from None
    if not isinstance(data, dict):
        raise ProtocolError(f"not a JSON object: {type(data).__name__}")
    return _parse_object(data)


def _parse_object(data: dict[str, Any]) -> tuple[AgentMessage, ...]:
    kind = _str(data, "type")
    if kind == "stream_event":
        return (_parse_stream_event(data),)
    if kind == "assistant":
        return (_parse_assistant(data),)
    if kind == "user":
        return _parse_user(data)
    if kind == "system":
        return (_parse_system(data),)
    if kind == "result":
        return (_parse_result(data),)
    if kind == "control_request":
        return (_parse_control_request(data),)
    if kind == "control_response":
        return (_parse_control_response(data),)
    if kind == "command_lifecycle":
        return (
            CommandLifecycle(
                command_uuid=_str(data, "command_uuid"),
                state=_str(data, "state"),
                wakeup_source=_str(data, "wakeup_source"),
            ),
        )
    if kind == "control_cancel_request":
        return (ControlCancelRequest(request_id=_str(data, "request_id")),)
    return (_unknown(data),)


def _unknown(data: dict[str, Any]) -> Unknown:
    subtype = data.get("subtype")
    return Unknown(
        type=_str(data, "type"), subtype=subtype if isinstance(subtype, str) else None, raw=data
    )


def _parse_stream_event(data: dict[str, Any]) -> AgentMessage:
    event = _dict(data, "event")
    event_type = _str(event, "type")
    parent = _opt_str(data, "parent_tool_use_id")
    message_id = _str(data, "api_message_id")
    if event_type == "content_block_delta":
        delta = _dict(event, "delta")
        delta_type = _str(delta, "type")
        index = _int(event, "index")
        if delta_type == "text_delta":
            return TextDelta(_str(delta, "text"), parent, message_id, index)
        if delta_type == "thinking_delta":
            return ThinkingDelta(_str(delta, "thinking"), parent, message_id, index)
    if event_type == "message_delta":
        return MessageDelta(_int(_dict(event, "usage"), "output_tokens"), parent)
    abandoned = _dict(data, "abandoned_blocks") or _dict(event, "abandoned_blocks")
    if event_type == "message_stop" and abandoned:
        return AbandonedBlocks(
            message_id=_str(abandoned, "api_message_id") or message_id,
            from_block_index=_int(abandoned, "from_block_index"),
        )
    # message_start/stop, block start/stop, input_json_delta, signature_delta: the whole
    # `assistant` line that follows carries what we need from them.
    return Unknown(type="stream_event", subtype=_str(event, "type") or None, raw=data)


def _parse_assistant(data: dict[str, Any]) -> AssistantMessage:
    message = _dict(data, "message")
    texts: list[str] = []
    thinking: list[str] = []
    tool_uses: list[ToolUse] = []
    for block in _blocks(message.get("content")):
        block_type = _str(block, "type")
        if block_type == "text":
            texts.append(_str(block, "text"))
        elif block_type == "thinking":
            thinking.append(_str(block, "thinking"))
        elif block_type == "tool_use":
            tool_uses.append(_tool_use(block))
    error = data.get("error")
    return AssistantMessage(
        text="".join(texts),
        tool_uses=tuple(tool_uses),
        thinking="".join(thinking),
        message_id=_str(message, "id"),
        model=_str(message, "model"),
        parent_tool_use_id=_opt_str(data, "parent_tool_use_id"),
        error=error if isinstance(error, str) else None,
        aborted=data.get("aborted") is True,
        input_tokens=_input_tokens(_dict(message, "usage")),
        cache_creation_tokens=_int(_dict(message, "usage"), "cache_creation_input_tokens"),
        cache_read_tokens=_int(_dict(message, "usage"), "cache_read_input_tokens"),
        uuid=_str(data, "uuid"),
    )


def _input_tokens(usage: dict[str, Any]) -> int:
    keys = ("input_tokens", "cache_creation_input_tokens", "cache_read_input_tokens")
    return sum(_int(usage, k) for k in keys)


def context_window(result: Result) -> int:
    """The model's context window from a `result` line's `modelUsage` (0 if absent)."""
    usage = result.raw.get("modelUsage")
    models = usage.values() if isinstance(usage, dict) else ()
    return max((_int(m, "contextWindow") for m in models if isinstance(m, dict)), default=0)


def _tool_use(block: dict[str, Any]) -> ToolUse:
    return ToolUse(
        id=_str(block, "id"),
        name=_str(block, "name"),
        input_json=_to_json(block.get("input", {})),
    )


def _parse_user(data: dict[str, Any]) -> tuple[AgentMessage, ...]:
    parent = _opt_str(data, "parent_tool_use_id")
    results = tuple(
        ToolResult(
            tool_use_id=_str(block, "tool_use_id"),
            content=flatten_content(block.get("content")),
            is_error=block.get("is_error") is True,
            parent_tool_use_id=parent,
        )
        for block in _blocks(_dict(data, "message").get("content"))
        if block.get("type") == "tool_result"
    )
    if results:
        return results
    if data.get("isReplay") is True:
        content = _dict(data, "message").get("content")
        return (UserReplay(uuid=_str(data, "uuid"), text=flatten_content(content)),)
    return (_unknown(data),)  # e.g. the interrupt marker


def flatten_content(content: object) -> str:
    """A tool result's content as text: strings as-is, text blocks joined, images replaced."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        return _to_json(content)
    parts: list[str] = []
    for block in content:
        if isinstance(block, str):
            parts.append(block)
        elif not isinstance(block, dict):
            continue
        elif block.get("type") == "image":
            parts.append(IMAGE_PLACEHOLDER)
        elif isinstance(block.get("text"), str):
            parts.append(block["text"])
        else:
            parts.append(f"[{_str(block, 'type') or 'block'}]")
    return "\n".join(parts)


def _parse_system(data: dict[str, Any]) -> AgentMessage:
    subtype = _str(data, "subtype")
    if subtype == "init":
        return _parse_init(data)
    if subtype == "compact_boundary":
        meta = _dict(data, "compact_metadata")
        return CompactBoundary(
            trigger=_str(meta, "trigger"),
            pre_tokens=_int(meta, "pre_tokens"),
            post_tokens=_int(meta, "post_tokens"),
        )
    if subtype == "task_started":
        return TaskStarted(
            task_id=_str(data, "task_id"),
            tool_use_id=_str(data, "tool_use_id"),
            task_type=_str(data, "task_type"),
            description=_str(data, "description"),
            background=data.get("is_backgrounded") is True,
        )
    if subtype == "task_progress":
        return TaskProgress(
            task_id=_str(data, "task_id"),
            description=_str(data, "description"),
            last_tool_name=_str(data, "last_tool_name"),
            summary=_str(data, "summary"),
        )
    if subtype == "task_notification":
        return TaskNotification(
            task_id=_str(data, "task_id"),
            tool_use_id=_str(data, "tool_use_id"),
            status=_str(data, "status"),
            summary=_str(data, "summary"),
            output_file=_str(data, "output_file"),
        )
    if subtype == "api_retry":
        status = data.get("error_status")
        return ApiRetry(
            attempt=_int(data, "attempt"),
            max_retries=_int(data, "max_retries"),
            retry_delay_ms=_int(data, "retry_delay_ms"),
            error_status=status
            if isinstance(status, int) and not isinstance(status, bool)
            else None,
            error=_str(data, "error"),
        )
    return _unknown(data)


def _parse_init(data: dict[str, Any]) -> Init:
    servers = tuple(
        (_str(server, "name"), _str(server, "status"))
        for server in _blocks(data.get("mcp_servers"))
    )
    tools = data.get("tools")
    return Init(
        session_id=_str(data, "session_id"),
        model=_str(data, "model"),
        tools=tuple(t for t in tools if isinstance(t, str)) if isinstance(tools, list) else (),
        mcp_servers=servers,
        permission_mode=_str(data, "permissionMode"),
        raw=data,
    )


def _parse_result(data: dict[str, Any]) -> Result:
    usage = data.get("usage")
    errors = data.get("errors")
    result_text = data.get("result")
    return Result(
        subtype=_str(data, "subtype"),
        is_error=data.get("is_error") is True,
        result_text=result_text if isinstance(result_text, str) else "",
        total_cost_usd=_float(data, "total_cost_usd"),
        usage=usage if isinstance(usage, dict) else {},
        duration_ms=_int(data, "duration_ms"),
        num_turns=_int(data, "num_turns"),
        session_id=_str(data, "session_id"),
        stop_reason=_opt_str(data, "stop_reason"),
        permission_denials=tuple(_denial(d) for d in _blocks(data.get("permission_denials"))),
        errors=tuple(str(e) for e in errors) if isinstance(errors, list) else (),
        terminal_reason=_opt_str(data, "terminal_reason"),
        raw=data,
    )


def _denial(data: dict[str, Any]) -> PermissionDenial:
    return PermissionDenial(
        tool_name=_str(data, "tool_name"),
        tool_use_id=_str(data, "tool_use_id"),
        input_json=_to_json(data.get("tool_input", {})),
    )


def _parse_control_request(data: dict[str, Any]) -> ControlRequest:
    payload = _dict(data, "request")
    return ControlRequest(
        request_id=_str(data, "request_id"), subtype=_str(payload, "subtype"), payload=payload
    )


def _parse_control_response(data: dict[str, Any]) -> ControlResponse:
    body = _dict(data, "response")
    return ControlResponse(
        request_id=_str(body, "request_id"),
        subtype=_str(body, "subtype"),
        response=_dict(body, "response"),
        error=_opt_str(body, "error"),
    )


# --- lenient field access: a wrong type reads as the default ---------------------------------


def _str(data: Mapping[str, Any], key: str) -> str:
    value = data.get(key)
    return value if isinstance(value, str) else ""


def _opt_str(data: Mapping[str, Any], key: str) -> str | None:
    value = data.get(key)
    return value if isinstance(value, str) else None


def _int(data: Mapping[str, Any], key: str) -> int:
    value = data.get(key)
    if isinstance(value, bool) or not isinstance(value, int | float):
        return 0
    return int(value)


def _float(data: Mapping[str, Any], key: str) -> float:
    value = data.get(key)
    if isinstance(value, bool) or not isinstance(value, int | float):
        return 0.0
    return float(value)


def _dict(data: Mapping[str, Any], key: str) -> dict[str, Any]:
    value = data.get(key)
    return value if isinstance(value, dict) else {}


def _blocks(value: object) -> list[dict[str, Any]]:
    """The dict items of a JSON list (content blocks, servers, denials); anything else: none."""
    if not isinstance(value, list):
        return []
    return [item for item in value if isinstance(item, dict)]


def _to_json(value: object) -> str:
    return json.dumps(value, ensure_ascii=False, separators=(",", ":"))


# --- building what we write to stdin ----------------------------------------------------------


def encode_line(obj: Mapping[str, Any]) -> bytes:
    """One JSON line, UTF-8, newline-terminated. Compact: a prompt can be large."""
    return (json.dumps(obj, ensure_ascii=False, separators=(",", ":")) + "\n").encode("utf-8")


def user_message_line(content: str | list[dict[str, Any]], uuid: str = "") -> bytes:
    """A user turn: its text, or its content blocks (text, image, document). The CLI assigns
    the conversation id itself, so `session_id` stays empty; `uuid` comes back in the line's
    replay when the CLI takes it into a turn."""
    line: dict[str, Any] = {
        "type": "user",
        "message": {"role": "user", "content": content},
        "parent_tool_use_id": None,
        "session_id": "",
    }
    if uuid:
        line["uuid"] = uuid
    return encode_line(line)


def control_request_line(request_id: str, subtype: str, **fields: Any) -> bytes:
    """A control request of ours (`initialize`, `interrupt`, `set_model`, ...): AgentProcess
    sends every one of them with this."""
    return encode_line(
        {
            "type": "control_request",
            "request_id": request_id,
            "request": {"subtype": subtype, **fields},
        }
    )


def control_response(request_id: str, response: Mapping[str, Any]) -> bytes:
    """Our success answer to a control request from the CLI (e.g. `can_use_tool`)."""
    return encode_line(
        {
            "type": "control_response",
            "response": {
                "subtype": "success",
                "request_id": request_id,
                "response": dict(response),
            },
        }
    )


def control_error_response(request_id: str, error: str) -> bytes:
    return encode_line(
        {
            "type": "control_response",
            "response": {"subtype": "error", "request_id": request_id, "error": error},
        }
    )


def permission_allow(
    tool_input: Mapping[str, Any], updated_permissions: list[dict[str, Any]] | None = None
) -> dict[str, Any]:
    """The `can_use_tool` answer that runs the tool with this input (usually the asked one);
    `updated_permissions` (permission updates, e.g. rules for the session) go with it."""
    answer: dict[str, Any] = {"behavior": "allow", "updatedInput": dict(tool_input)}
    if updated_permissions:
        answer["updatedPermissions"] = updated_permissions
    return answer


def permission_deny(message: str, *, interrupt: bool = False) -> dict[str, Any]:
    """The `can_use_tool` answer that refuses; `message` becomes the tool's error result."""
    answer: dict[str, Any] = {"behavior": "deny", "message": message}
    if interrupt:
        answer["interrupt"] = True
    return answer
