"""Turns through the daemon when the agent misbehaves (scripted fake agent): each fault ends
the turn with one clear terminal event, the outcome is stored, and the daemon and the session
carry on."""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import pytest
from atomizer.v1 import daemon_pb2
from atomizer.v1 import session_pb2 as pb

from tests.conftest import Stubs, stubs_for
from tests.support.daemon import RunningDaemon
from tests.support.turns import kinds, send
from tests.support.turns import reply_text as text_of


def start(tmp: Path, **sections: dict[str, Any]) -> tuple[RunningDaemon, Stubs]:
    transcripts = tmp / "transcripts"
    transcripts.mkdir(exist_ok=True)
    config: dict[str, dict[str, Any]] = {
        "agent": {"env": {"HOME": str(tmp / "home"), "FAKE_AGENT_TRANSCRIPT_DIR": str(transcripts)}}
    }
    for name, values in sections.items():
        config.setdefault(name.replace("__", "."), {}).update(values)
    d = RunningDaemon(tmp, config).start()
    stubs = stubs_for(d.channel())
    stubs.sessions.CreateSession(pb.CreateSessionRequest(session_id="f"))
    return d, stubs


@pytest.fixture
def faulty(short_tmp: Path):
    daemons: list[RunningDaemon] = []

    def make(**sections: dict[str, Any]) -> Stubs:
        d, stubs = start(short_tmp, **sections)
        daemons.append(d)
        return stubs

    yield make
    for d in daemons:
        d.stop()


def assert_failed(events: list[pb.SessionEvent], code: int) -> pb.TurnFailed:
    assert kinds(events)[-1] == "turn_failed", kinds(events)
    assert sum(1 for k in kinds(events) if k in ("turn_failed", "turn_completed")) == 1
    failed = events[-1].turn_failed
    assert failed.code == code, failed
    return failed


def assert_recovers(stubs: Stubs) -> None:
    after = send(stubs, "f", "are you back?")
    assert text_of(after) == "echo: are you back?"


def test_a_crash_mid_turn_fails_the_turn_with_the_stderr_tail_and_the_session_recovers(
    faulty,
) -> None:
    stubs = faulty()
    events = send(stubs, "f", "[[crash]] boom")
    failed = assert_failed(events, pb.FAILURE_CODE_AGENT_EXITED)
    assert "exit status 3" in failed.message
    assert failed.stderr_tail.strip()
    history = stubs.sessions.GetHistory(pb.GetHistoryRequest(session_id="f")).messages
    assert history[1].status == pb.MESSAGE_STATUS_FAILED
    assert history[1].content == text_of(events)  # the partial text is kept
    assert_recovers(stubs)


def test_a_silent_agent_trips_the_stall_watchdog(faulty) -> None:
    stubs = faulty(agent={"stall_timeout": 1.0, "stop_grace": 0.5})
    failed = assert_failed(send(stubs, "f", "[[hang]]"), pb.FAILURE_CODE_STALL_TIMEOUT)
    assert "agent.stall_timeout" in failed.message
    assert_recovers(stubs)


def test_a_turn_past_its_time_limit_is_stopped(faulty) -> None:
    stubs = faulty(agent={"turn_timeout": 1.0, "stop_grace": 0.5})
    events = send(stubs, "f", "[[slow:200]] [[deltas:100]]")
    failed = assert_failed(events, pb.FAILURE_CODE_TURN_TIMEOUT)
    assert "agent.turn_timeout" in failed.message
    assert_recovers(stubs)


def test_a_line_past_the_limit_fails_the_turn_not_the_daemon(faulty) -> None:
    stubs = faulty(agent={"max_line_bytes": 100_000})
    failed = assert_failed(send(stubs, "f", "[[huge:300000]]"), pb.FAILURE_CODE_LINE_TOO_LONG)
    assert "agent.max_line_bytes" in failed.message
    assert_recovers(stubs)


@pytest.mark.parametrize(
    ("directive", "check"),
    [
        ("[[garbage]]", lambda t: t == "echo: hi"),
        ("[[stderr-flood:10485760]]", lambda t: t == "echo: hi"),
        ("[[bad-utf8]]", lambda t: "\ufffd" in t and t.endswith("echo: hi")),
        ("[[huge:2000000]]", lambda t: t == "echo: hi"),
    ],
)
def test_noise_from_the_agent_does_not_break_the_turn(faulty, directive: str, check) -> None:
    stubs = faulty()
    events = send(stubs, "f", f"{directive} hi")
    assert kinds(events)[-1] == "turn_completed"
    assert check(text_of(events)), text_of(events)


def test_a_missing_agent_command_fails_turns_clearly_and_status_says_why(short_tmp: Path) -> None:
    with RunningDaemon(short_tmp, {"agent": {"command": ["/nonexistent/claude"]}}) as d:
        stubs = stubs_for(d.channel())
        stubs.sessions.CreateSession(pb.CreateSessionRequest(session_id="f"))
        failed = assert_failed(send(stubs, "f", "hi"), pb.FAILURE_CODE_SPAWN_FAILED)
        assert "/nonexistent/claude" in failed.message
        status = stubs.daemon.GetStatus(daemon_pb2.GetStatusRequest())
        assert status.agent_version.startswith("unavailable")


def test_an_agent_that_exits_at_start_reports_its_stderr(faulty) -> None:
    stubs = faulty()
    events = send(stubs, "f", "[[exit-at-start]]")
    failed = assert_failed(events, pb.FAILURE_CODE_AGENT_EXITED)
    assert failed.stderr_tail.strip()


def test_an_api_error_reported_in_the_result_is_an_error_flagged_completion(faulty) -> None:
    stubs = faulty()
    events = send(stubs, "f", "[[error-result]] hi")
    assert kinds(events)[-1] == "turn_completed"
    assert events[-1].turn_completed.is_error


def test_api_retries_are_relayed_as_notices(faulty) -> None:
    stubs = faulty()
    events = send(stubs, "f", "[[api-retry:2]] hi")
    notices = [e.notice for e in events if e.WhichOneof("kind") == "notice"]
    assert [n.kind for n in notices] == [pb.NOTICE_KIND_API_RETRY] * 2
    assert notices[1].attempt == 2 and notices[0].error_status == 529
    assert "retry" in notices[0].message
    assert kinds(events)[-1] == "turn_completed"


def test_messages_to_one_session_run_one_at_a_time_in_order(faulty) -> None:
    stubs = faulty()
    results: dict[str, list[pb.SessionEvent]] = {}

    def run(label: str) -> None:
        results[label] = send(stubs, "f", f"{label} [[slow:30]]")

    first = threading.Thread(target=run, args=("first",))
    first.start()
    stubs.sessions.GetSession(pb.GetSessionRequest(session_id="f"))
    second = threading.Thread(target=run, args=("second",))
    second.start()
    first.join(60)
    second.join(60)
    a, b = results["first"], results["second"]
    assert a[-1].seq < b[0].seq or b[-1].seq < a[0].seq  # never interleaved
    history = stubs.sessions.GetHistory(pb.GetHistoryRequest(session_id="f")).messages
    assert [m.role for m in history] == [pb.ROLE_USER, pb.ROLE_ASSISTANT] * 2


def test_a_retried_request_id_attaches_instead_of_sending_twice(faulty) -> None:
    stubs = faulty()
    first = send(stubs, "f", "once", request_id="req-1")
    again = send(stubs, "f", "once", request_id="req-1")
    assert {e.turn_id for e in again} == {first[0].turn_id}
    assert kinds(again)[-1] == "turn_completed"
    history = stubs.sessions.GetHistory(pb.GetHistoryRequest(session_id="f")).messages
    assert [m.content for m in history if m.role == pb.ROLE_USER] == ["once"]


def test_watch_replays_from_a_seq_then_follows_later_turns(faulty) -> None:
    stubs = faulty()
    first = send(stubs, "f", "one")
    watch = stubs.sessions.WatchSession(
        pb.WatchSessionRequest(session_id="f", after_seq=first[1].seq), timeout=30
    )
    replayed = [next(watch).event for _ in range(len(first) - 2)]
    assert [e.seq for e in replayed] == [e.seq for e in first[2:]]
    second = send(stubs, "f", "two")
    followed = [next(watch).event for _ in range(len(second))]
    assert [e.seq for e in followed] == [e.seq for e in second]
    watch.cancel()


def test_watchers_of_a_terminated_session_are_let_go(faulty) -> None:
    stubs = faulty()
    send(stubs, "f", "one")
    watch = stubs.sessions.WatchSession(pb.WatchSessionRequest(session_id="f"), timeout=30)
    replayed = [next(watch).event for _ in range(3)]
    assert replayed[0].WhichOneof("kind") == "turn_started"
    stubs.sessions.TerminateSession(pb.TerminateSessionRequest(session_id="f"))
    rest = list(watch)  # ends (status OK) instead of waiting for its deadline
    assert all(e.event.turn_id == replayed[0].turn_id for e in rest)
    stubs.sessions.CreateSession(pb.CreateSessionRequest(session_id="f"))  # reopen
    assert text_of(send(stubs, "f", "two")) == "echo: two"


def test_watching_a_closed_session_ends_after_what_is_buffered(faulty) -> None:
    stubs = faulty()
    stubs.sessions.TerminateSession(pb.TerminateSessionRequest(session_id="f"))
    watch = stubs.sessions.WatchSession(pb.WatchSessionRequest(session_id="f"), timeout=30)
    assert list(watch) == []
