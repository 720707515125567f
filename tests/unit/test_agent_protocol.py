"""The stream-json protocol (parsing and building lines) and the line framing under it.

The sample lines are trimmed copies of what Claude Code 2.1.332 wrote against a local fake
Messages API.
"""

from __future__ import annotations

import json

import pytest

from atomizerd.agents import protocol as p
from atomizerd.agents.lines import LineSplitter, Overflow

SID = "02c6efc1-ad15-498a-bd6b-4fb01de1bcf8"


def one(line: dict[str, object] | str) -> p.AgentMessage:
    text = line if isinstance(line, str) else json.dumps(line)
    messages = p.parse_line(text)
    assert len(messages) == 1
    return messages[0]


def stream_event(event: dict[str, object], parent: str | None = None) -> dict[str, object]:
    return {
        "type": "stream_event",
        "event": event,
        "session_id": SID,
        "parent_tool_use_id": parent,
        "uuid": "u",
    }


# --- parsing ---------------------------------------------------------------------------------


def test_init_line() -> None:
    msg = one(
        {
            "type": "system",
            "subtype": "init",
            "cwd": "/tmp/x",
            "session_id": SID,
            "tools": ["Bash", "Read"],
            "mcp_servers": [{"name": "srv", "status": "failed", "source": "dynamic"}],
            "model": "claude-opus-5-5",
            "permissionMode": "acceptEdits",
            "claude_code_version": "2.1.332",
        }
    )
    assert isinstance(msg, p.Init)
    assert msg.session_id == SID
    assert msg.model == "claude-opus-5-5"
    assert msg.tools == ("Bash", "Read")
    assert msg.mcp_servers == (("srv", "failed"),)
    assert msg.permission_mode == "acceptEdits"
    assert msg.raw["claude_code_version"] == "2.1.332"


def test_text_and_thinking_deltas() -> None:
    text = {
        "type": "content_block_delta",
        "index": 1,
        "delta": {"type": "text_delta", "text": "wörld"},
    }
    thinking = {
        "type": "content_block_delta",
        "index": 0,
        "delta": {"type": "thinking_delta", "thinking": "hmm"},
    }
    assert one(stream_event(text)) == p.TextDelta("wörld", index=1)
    assert one(stream_event(thinking)) == p.ThinkingDelta("hmm")
    assert one(stream_event(text, parent="toolu_9")) == p.TextDelta("wörld", "toolu_9", index=1)


def test_deltas_name_their_message_and_block() -> None:
    line = stream_event(
        {"type": "content_block_delta", "index": 3, "delta": {"type": "text_delta", "text": "a"}}
    )
    line["api_message_id"] = "msg_7"
    assert one(line) == p.TextDelta("a", None, "msg_7", 3)


def test_abandoned_blocks() -> None:
    line = stream_event({"type": "message_stop"})
    line["api_message_id"] = "msg_15"
    line["abandoned_blocks"] = {"api_message_id": "msg_15", "from_block_index": 1}
    assert one(line) == p.AbandonedBlocks("msg_15", 1)


@pytest.mark.parametrize(
    "event",
    [
        {"type": "message_start", "message": {"id": "msg_1"}},
        {"type": "content_block_start", "index": 2, "content_block": {"type": "tool_use"}},
        {
            "type": "content_block_delta",
            "index": 2,
            "delta": {"type": "input_json_delta", "partial_json": "{"},
        },
        {
            "type": "content_block_delta",
            "index": 0,
            "delta": {"type": "signature_delta", "signature": "s"},
        },
        {"type": "message_stop"},
    ],
)
def test_other_stream_events_are_unknown(event: dict[str, object]) -> None:
    msg = one(stream_event(event))
    assert isinstance(msg, p.Unknown)
    assert msg.type == "stream_event"
    assert msg.subtype == event["type"]


def test_assistant_message_with_text_thinking_and_tool_use() -> None:
    msg = one(
        {
            "type": "assistant",
            "message": {
                "id": "msg_1",
                "model": "claude-x",
                "content": [
                    {"type": "thinking", "thinking": "let me see", "signature": "sig"},
                    {"type": "text", "text": "Hello "},
                    {"type": "text", "text": "there"},
                    {
                        "type": "tool_use",
                        "id": "toolu_1",
                        "name": "Bash",
                        "input": {"command": "echo é", "n": 1},
                    },
                ],
            },
            "parent_tool_use_id": None,
            "session_id": SID,
        }
    )
    assert isinstance(msg, p.AssistantMessage)
    assert msg.text == "Hello there"
    assert msg.thinking == "let me see"
    assert msg.message_id == "msg_1"
    assert msg.model == "claude-x"
    assert msg.error is None
    (tool,) = msg.tool_uses
    assert (tool.id, tool.name) == ("toolu_1", "Bash")
    assert json.loads(tool.input_json) == {"command": "echo é", "n": 1}
    assert "é" in tool.input_json  # not \u-escaped


def test_aborted_assistant_message() -> None:
    msg = one(
        {
            "type": "assistant",
            "message": {"id": "msg_28", "content": [{"type": "text", "text": "e"}]},
            "aborted": True,
        }
    )
    assert isinstance(msg, p.AssistantMessage)
    assert msg.aborted and msg.text == "e"


def test_synthetic_api_error_assistant_message() -> None:
    msg = one(
        {
            "type": "assistant",
            "message": {"model": "<synthetic>", "content": [{"type": "text", "text": "API Error"}]},
            "error": "server_error",
        }
    )
    assert isinstance(msg, p.AssistantMessage)
    assert msg.error == "server_error"


def test_user_line_with_tool_results() -> None:
    messages = p.parse_line(
        json.dumps(
            {
                "type": "user",
                "message": {
                    "role": "user",
                    "content": [
                        {
                            "tool_use_id": "toolu_1",
                            "type": "tool_result",
                            "content": "hi",
                            "is_error": False,
                        },
                        {
                            "tool_use_id": "toolu_2",
                            "type": "tool_result",
                            "content": [
                                {"type": "text", "text": "see:"},
                                {"type": "image", "source": {"type": "base64", "data": "QUJD"}},
                                {"type": "tool_reference", "tool_name": "X"},
                            ],
                            "is_error": True,
                        },
                    ],
                },
                "parent_tool_use_id": None,
            }
        )
    )
    assert messages == (
        p.ToolResult("toolu_1", "hi", False),
        p.ToolResult("toolu_2", "see:\n[image]\n[tool_reference]", True),
    )


def test_user_line_without_tool_results_is_unknown() -> None:
    msg = one(
        {
            "type": "user",
            "message": {
                "role": "user",
                "content": [{"type": "text", "text": "[Request interrupted by user]"}],
            },
        }
    )
    assert isinstance(msg, p.Unknown)
    assert msg.type == "user"


@pytest.mark.parametrize(
    ("content", "expected"),
    [
        (None, ""),
        ("plain", "plain"),
        ({"a": 1}, '{"a":1}'),
        (["a", {"type": "text", "text": "b"}], "a\nb"),
    ],
)
def test_flatten_content(content: object, expected: str) -> None:
    assert p.flatten_content(content) == expected


def test_api_retry() -> None:
    line = {
        "type": "system",
        "subtype": "api_retry",
        "attempt": 2,
        "max_retries": 10,
        "retry_delay_ms": 1203,
        "error_status": 529,
        "error": "overloaded",
    }
    assert one(line) == p.ApiRetry(2, 10, 1203, 529, "overloaded")
    line.update(error_status=None, error="unknown")
    assert one(line) == p.ApiRetry(2, 10, 1203, None, "unknown")


def test_other_system_lines_are_unknown() -> None:
    msg = one({"type": "system", "subtype": "status", "status": "requesting"})
    assert isinstance(msg, p.Unknown)
    assert (msg.type, msg.subtype) == ("system", "status")


def test_result_success() -> None:
    msg = one(
        {
            "type": "result",
            "subtype": "success",
            "is_error": False,
            "duration_ms": 706,
            "num_turns": 2,
            "result": "Hello wörld",
            "session_id": SID,
            "stop_reason": "end_turn",
            "total_cost_usd": 0.00028,
            "usage": {"input_tokens": 20, "output_tokens": 10},
            "permission_denials": [
                {
                    "tool_name": "Bash",
                    "tool_use_id": "toolu_1",
                    "tool_input": {"command": "touch z"},
                }
            ],
            "terminal_reason": "completed",
        }
    )
    assert isinstance(msg, p.Result)
    assert (msg.subtype, msg.is_error, msg.result_text) == ("success", False, "Hello wörld")
    assert (msg.duration_ms, msg.num_turns, msg.session_id) == (706, 2, SID)
    assert msg.total_cost_usd == pytest.approx(0.00028)
    assert msg.usage == {"input_tokens": 20, "output_tokens": 10}
    assert msg.stop_reason == "end_turn"
    (denial,) = msg.permission_denials
    assert (denial.tool_name, denial.tool_use_id) == ("Bash", "toolu_1")
    assert json.loads(denial.input_json) == {"command": "touch z"}


def test_result_error_shapes() -> None:
    # An API failure: subtype success, is_error true.
    api = one(
        {"type": "result", "subtype": "success", "is_error": True, "result": "API Error: 401"}
    )
    assert isinstance(api, p.Result)
    assert api.is_error and api.subtype == "success"
    # An interrupt: no `result` field, a null stop_reason, an errors list.
    interrupted = one(
        {
            "type": "result",
            "subtype": "error_during_execution",
            "is_error": True,
            "stop_reason": None,
            "errors": ["[ede_diagnostic] result_type=user"],
            "terminal_reason": "aborted_streaming",
        }
    )
    assert isinstance(interrupted, p.Result)
    assert interrupted.result_text == ""
    assert interrupted.stop_reason is None
    assert interrupted.errors == ("[ede_diagnostic] result_type=user",)
    assert interrupted.terminal_reason == "aborted_streaming"
    assert interrupted.total_cost_usd == 0.0


def test_result_with_wrong_field_types_is_lenient() -> None:
    msg = one(
        {
            "type": "result",
            "subtype": 5,
            "is_error": "yes",
            "total_cost_usd": "free",
            "usage": [],
            "duration_ms": True,
            "num_turns": 2.0,
            "permission_denials": "none",
        }
    )
    assert isinstance(msg, p.Result)
    assert msg.subtype == "" and msg.is_error is False
    assert (msg.total_cost_usd, msg.usage, msg.duration_ms, msg.num_turns) == (0.0, {}, 0, 2)
    assert msg.permission_denials == ()


def test_control_messages() -> None:
    request = one(
        {
            "type": "control_request",
            "request_id": "a23d",
            "request": {
                "subtype": "can_use_tool",
                "tool_name": "Bash",
                "input": {"command": "touch z"},
                "tool_use_id": "toolu_1",
            },
        }
    )
    assert isinstance(request, p.ControlRequest)
    assert (request.request_id, request.subtype) == ("a23d", "can_use_tool")
    assert request.payload["tool_name"] == "Bash"

    ok = one(
        {
            "type": "control_response",
            "response": {
                "subtype": "success",
                "request_id": "r1",
                "response": {"still_queued": []},
            },
        }
    )
    assert ok == p.ControlResponse("r1", "success", {"still_queued": []}, None)
    err = one(
        {
            "type": "control_response",
            "response": {
                "subtype": "error",
                "request_id": "r2",
                "error": "Unsupported",
                "response": {},
            },
        }
    )
    assert err == p.ControlResponse("r2", "error", {}, "Unsupported")
    assert one({"type": "control_cancel_request", "request_id": "a23d"}) == p.ControlCancelRequest(
        "a23d"
    )


def test_unknown_type_keeps_the_line() -> None:
    msg = one({"type": "rate_limit_event", "rate_limit_info": {"status": "allowed"}})
    assert isinstance(msg, p.Unknown)
    assert msg.type == "rate_limit_event"
    assert msg.raw["rate_limit_info"] == {"status": "allowed"}
    assert isinstance(one({"no_type": 1}), p.Unknown)


@pytest.mark.parametrize("line", ["not json", "{", "", "[1, 2]", '"text"', "null", "[" * 100_000])
def test_lines_that_are_not_json_objects_raise(line: str) -> None:
    with pytest.raises(p.ProtocolError):
        p.parse_line(line)


# --- building ---------------------------------------------------------------------------------


def decode(line: bytes) -> dict[str, object]:
    assert line.endswith(b"\n")
    assert line.count(b"\n") == 1
    obj = json.loads(line.decode("utf-8"))
    assert isinstance(obj, dict)
    return obj


def test_user_message_line() -> None:
    text = 'héllo 世界 🎉\nsecond line "quoted" [[tool:x]]'
    line = p.user_message_line(text)
    assert "世界".encode() in line  # UTF-8, not \u escapes
    assert decode(line) == {
        "type": "user",
        "message": {"role": "user", "content": text},
        "parent_tool_use_id": None,
        "session_id": "",
    }


def test_control_request_builders() -> None:
    assert decode(p.control_request_line("r1", "interrupt")) == {
        "type": "control_request",
        "request_id": "r1",
        "request": {"subtype": "interrupt"},
    }
    assert decode(p.control_request_line("r2", "initialize", hooks=None)) == {
        "type": "control_request",
        "request_id": "r2",
        "request": {"subtype": "initialize", "hooks": None},
    }
    init = decode(
        p.control_request_line("r3", "initialize", hooks=None, excludeDynamicSections=True)
    )
    assert init["request"] == {
        "subtype": "initialize",
        "hooks": None,
        "excludeDynamicSections": True,
    }


def test_control_response_builders() -> None:
    allow = p.permission_allow({"command": "ls"})
    assert decode(p.control_response("q1", allow)) == {
        "type": "control_response",
        "response": {
            "subtype": "success",
            "request_id": "q1",
            "response": {"behavior": "allow", "updatedInput": {"command": "ls"}},
        },
    }
    assert p.permission_deny("no", interrupt=True) == {
        "behavior": "deny",
        "message": "no",
        "interrupt": True,
    }
    assert decode(p.control_error_response("q2", "boom")) == {
        "type": "control_response",
        "response": {"subtype": "error", "request_id": "q2", "error": "boom"},
    }


def test_built_lines_parse_back() -> None:
    (msg,) = p.parse_line(p.control_response("q1", {"ok": 1}).decode())
    assert msg == p.ControlResponse("q1", "success", {"ok": 1}, None)


# --- line framing ---------------------------------------------------------------------------


def feed_all(splitter: LineSplitter, chunks: list[bytes]) -> list[bytes | Overflow]:
    out: list[bytes | Overflow] = []
    for chunk in chunks:
        out += splitter.feed(chunk)
    return out + splitter.finish()


def test_multibyte_characters_split_across_chunks_arrive_whole() -> None:
    line = json.dumps({"text": "é 世界 🎉"}, ensure_ascii=False).encode() + b"\n"
    data = line * 3
    for size in (1, 2, 3, 5, 7):
        chunks = [data[i : i + size] for i in range(0, len(data), size)]
        out = feed_all(LineSplitter(1024), chunks)
        assert out == [line[:-1]] * 3
        assert all(isinstance(x, bytes) and x.decode("utf-8") for x in out)


def test_many_lines_in_one_chunk_and_empty_lines() -> None:
    out = feed_all(LineSplitter(100), [b"a\n\nbb\nccc\n", b"\n", b"d"])
    assert out == [b"a", b"bb", b"ccc", b"d"]


def test_line_at_the_limit_passes_one_more_byte_overflows() -> None:
    splitter = LineSplitter(4)
    assert splitter.feed(b"abcd\nabcde\nok\n") == [b"abcd", Overflow(5, 4), b"ok"]


def test_overflow_across_chunks_then_next_line_is_read() -> None:
    splitter = LineSplitter(10)
    out = splitter.feed(b"short\n0123")
    out += splitter.feed(b"456789ABCDEF")  # over the limit here: buffer released
    out += splitter.feed(b"GHIJ" * 1000)
    out += splitter.feed(b"end\nnext line\n")
    assert out == [b"short", Overflow(16 + 4000 + 3, 10), b"next line"]
    assert splitter.finish() == []


def test_unterminated_last_line_and_overflow_at_eof() -> None:
    splitter = LineSplitter(3)
    assert splitter.feed(b"ab") == []
    assert splitter.finish() == [b"ab"]
    splitter = LineSplitter(3)
    assert splitter.feed(b"abcdef") == []
    assert splitter.finish() == [Overflow(6, 3)]


def test_splitter_rejects_a_useless_limit() -> None:
    with pytest.raises(ValueError):
        LineSplitter(0)
