"""Turns through the daemon with the real claude CLI (offline, against the fake Messages API)."""

from __future__ import annotations

import threading

import pytest
from atomizer.v1 import session_pb2 as pb

from tests.e2e.conftest import E2E
from tests.support.turns import kinds, reply_text, send

pytestmark = pytest.mark.e2e


def test_text_streams_in_order_with_increasing_seq(e2e: E2E) -> None:
    stubs = e2e.start()
    stubs.sessions.CreateSession(pb.CreateSessionRequest(session_id="a"))
    events = send(stubs, "a", "count [[chunks:8]]")
    k = kinds(events)
    assert k[0] == "turn_started" and k[-1] == "turn_completed"
    assert k.count("text_delta") >= 3  # the CLI may merge deltas; order is what counts
    assert [e.seq for e in events] == sorted({e.seq for e in events})
    assert reply_text(events) == "echo: count"
    done = events[-1].turn_completed
    assert done.text == "echo: count"
    assert done.cost_usd > 0 and done.usage.output_tokens > 0
    assert not done.interrupted and not done.is_error
    assert len({e.turn_id for e in events}) == 1


def test_a_second_message_continues_the_conversation(e2e: E2E) -> None:
    stubs = e2e.start()
    stubs.sessions.CreateSession(pb.CreateSessionRequest(session_id="c"))
    first = send(stubs, "c", "my name is Ada")
    events = send(stubs, "c", "what is my name")
    costs = [first[-1].turn_completed.cost_usd, events[-1].turn_completed.cost_usd]
    session = stubs.sessions.GetSession(pb.GetSessionRequest(session_id="c")).session
    # The CLI reports cost cumulatively; the daemon reports each turn's own.
    assert all(c > 0 for c in costs)
    assert session.total_cost_usd == pytest.approx(sum(costs))
    assert reply_text(events) == "echo: what is my name"
    last = e2e.api.requests[-1]
    assert "my name is Ada" in " ".join(last.texts("user"))
    assert any("echo: my name is Ada" in t for t in last.texts("assistant"))


def test_multibyte_text_arrives_byte_exact(e2e: E2E) -> None:
    stubs = e2e.start()
    stubs.sessions.CreateSession(pb.CreateSessionRequest(session_id="u"))
    text = "héllo 世界 🎉🚀 ñ"
    events = send(stubs, "u", f"{text} [[chunks:13]]")
    assert reply_text(events) == f"echo: {text}"
    assert events[0].turn_started.text == f"{text} [[chunks:13]]"
    history = stubs.sessions.GetHistory(pb.GetHistoryRequest(session_id="u")).messages
    assert history[1].content == f"echo: {text}"


def test_a_multi_mib_reply_arrives_whole(e2e: E2E) -> None:
    stubs = e2e.start()
    stubs.sessions.CreateSession(pb.CreateSessionRequest(session_id="big"))
    size = 3 * 1024 * 1024
    events = send(stubs, "big", f"[[big:{size}]]")
    assert kinds(events)[-1] == "turn_completed"
    assert len(reply_text(events).encode()) == size
    history = stubs.sessions.GetHistory(pb.GetHistoryRequest(session_id="big")).messages
    assert len(history[1].content.encode()) == size


def test_interrupt_ends_the_turn_and_keeps_the_session_usable(e2e: E2E) -> None:
    stubs = e2e.start()
    stubs.sessions.CreateSession(pb.CreateSessionRequest(session_id="i"))
    stream = stubs.sessions.SendMessage(
        pb.SendMessageRequest(session_id="i", text="long [[chunks:200]] [[slow:50]]"), timeout=120
    )
    events = []
    for r in stream:
        events.append(r.event)
        if r.event.WhichOneof("kind") == "text_delta" and len(events) == 3:
            stubs.sessions.Interrupt(pb.InterruptRequest(session_id="i"), timeout=10)
    done = events[-1]
    assert done.WhichOneof("kind") == "turn_completed"
    assert done.turn_completed.interrupted
    history = stubs.sessions.GetHistory(pb.GetHistoryRequest(session_id="i")).messages
    assert history[1].status == pb.MESSAGE_STATUS_INTERRUPTED
    assert history[1].content == reply_text(events)
    assert reply_text(send(stubs, "i", "still there?")) == "echo: still there?"


def test_eviction_and_transparent_resume_with_one_live_process(e2e: E2E) -> None:
    stubs = e2e.start({"pool": {"max_live": 1}})
    for sid in ("x", "y"):
        stubs.sessions.CreateSession(pb.CreateSessionRequest(session_id=sid))
    send(stubs, "x", "x remembers apples")
    send(stubs, "y", "y remembers pears")  # evicts x's process
    events = send(stubs, "x", "and now?")  # x resumes with --resume
    assert reply_text(events) == "echo: and now?"
    last = e2e.api.requests[-1]
    assert "x remembers apples" in " ".join(last.texts("user"))
    assert "pears" not in " ".join(last.texts("user"))


def test_daemon_restart_then_resume(e2e: E2E) -> None:
    stubs = e2e.start()
    stubs.sessions.CreateSession(pb.CreateSessionRequest(session_id="r"))
    send(stubs, "r", "before the restart")
    e2e.stop()
    stubs = e2e.start()
    events = send(stubs, "r", "after the restart")
    assert reply_text(events) == "echo: after the restart"
    assert "before the restart" in " ".join(e2e.api.requests[-1].texts("user"))


def test_a_watcher_sees_both_sides_and_a_disconnected_sender_loses_nothing(e2e: E2E) -> None:
    stubs = e2e.start()
    stubs.sessions.CreateSession(pb.CreateSessionRequest(session_id="w"))
    watched: list[pb.SessionEvent] = []

    def watch() -> None:
        for r in stubs.sessions.WatchSession(pb.WatchSessionRequest(session_id="w"), timeout=60):
            watched.append(r.event)
            if r.event.WhichOneof("kind") == "turn_completed":
                return

    watcher = threading.Thread(target=watch)
    watcher.start()
    stream = stubs.sessions.SendMessage(
        pb.SendMessageRequest(session_id="w", text="bye [[chunks:20]] [[slow:20]]"), timeout=60
    )
    next(stream)
    stream.cancel()  # the sender goes away mid-turn
    watcher.join(60)
    assert watched[0].turn_started.text.startswith("bye")
    assert watched[-1].turn_completed.text == "echo: bye"
    history = stubs.sessions.GetHistory(pb.GetHistoryRequest(session_id="w")).messages
    assert history[1].content == "echo: bye"
    assert history[1].status == pb.MESSAGE_STATUS_COMPLETE


def test_a_hung_model_stream_trips_the_stall_watchdog_and_the_session_resumes(e2e: E2E) -> None:
    stubs = e2e.start({"agent": {"stall_timeout": 2.0, "stop_grace": 1.0}})
    stubs.sessions.CreateSession(pb.CreateSessionRequest(session_id="h"))
    send(stubs, "h", "remember the number 42")
    events = send(stubs, "h", "[[hang]]")
    assert kinds(events)[-1] == "turn_failed"
    assert events[-1].turn_failed.code == pb.FAILURE_CODE_STALL_TIMEOUT
    after = send(stubs, "h", "back?")
    assert reply_text(after) == "echo: back?"
    assert "remember the number 42" in " ".join(e2e.api.requests[-1].texts("user"))
