"""The fake Messages API's latency model: time to first token, then tokens per second."""

from __future__ import annotations

import http.client
import json
import time

import pytest

from tests.support.fake_messages_api import FakeMessagesAPI

REPLY = "x" * 40  # two deltas of 32 and 8 characters: 8 and 2 tokens


def post(api: FakeMessagesAPI, *, stream: bool) -> tuple[list[tuple[float, str]], float]:
    """(arrival of each SSE event or of the JSON body, seconds since the request), total."""
    body = {
        "model": "claude-fake",
        "max_tokens": 100,
        "stream": stream,
        "messages": [{"role": "user", "content": f"[[reply:{REPLY}]]"}],
    }
    conn = http.client.HTTPConnection("127.0.0.1", api.port, timeout=10)
    try:
        t0 = time.monotonic()
        conn.request("POST", "/v1/messages", json.dumps(body), {"content-type": "application/json"})
        resp = conn.getresponse()
        events: list[tuple[float, str]] = []
        if not stream:
            data = json.loads(resp.read())
            events.append((time.monotonic() - t0, data["content"][0]["text"]))
            return events, time.monotonic() - t0
        while True:
            line = resp.readline()
            if not line:
                break
            if line.startswith(b"event: "):
                events.append((time.monotonic() - t0, line[7:].strip().decode()))
        return events, time.monotonic() - t0
    finally:
        conn.close()


def first(events: list[tuple[float, str]], name: str) -> float:
    return next(t for t, e in events if e == name)


def test_default_answers_at_once() -> None:
    with FakeMessagesAPI() as api:
        events, total = post(api, stream=True)
    assert first(events, "content_block_delta") < 0.15
    assert total < 0.3


def test_streamed_reply_waits_for_first_token_then_streams_at_the_rate() -> None:
    with FakeMessagesAPI(ttft_ms=300, tokens_per_s=50) as api:
        events, total = post(api, stream=True)
    start = first(events, "message_start")
    deltas = [t for t, e in events if e == "content_block_delta"]
    assert len(deltas) == 2
    # Lower bounds only, each counted from the request's start: nothing can be received
    # before it was sent, however late a loaded machine delivers it.
    assert start >= 0.29
    assert deltas[0] >= 0.29
    assert deltas[1] >= 0.3 + 8 / 50 - 0.01  # after the first delta's 8 tokens at 50/s
    assert first(events, "message_stop") >= 0.3 + 10 / 50 - 0.01
    assert total >= first(events, "message_stop")


def test_whole_reply_comes_after_first_token_and_every_token() -> None:
    with FakeMessagesAPI(ttft_ms=200, tokens_per_s=100) as api:
        events, _ = post(api, stream=False)
    assert events[0][1] == REPLY
    assert events[0][0] >= 0.2 + 10 / 100 - 0.01


def test_negative_latency_is_refused() -> None:
    with pytest.raises(ValueError):
        FakeMessagesAPI(ttft_ms=-1)
