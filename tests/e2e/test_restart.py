"""Turns survive a daemon restart: the agents outlive the daemon under their shims, and the
next daemon adopts them with their running turns (docs/restart.md). Real CLI, real kills."""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import grpc
import pytest
from atomizer.v1 import session_pb2 as pb

from tests.conftest import Stubs
from tests.e2e.conftest import E2E
from tests.support.turns import kinds, reply_text

pytestmark = pytest.mark.e2e

# 30 deltas, 150 ms apart: a turn of about 4.5 s, long enough to span a restart.
TEXT = "".join(f"part{i:02d}; " for i in range(30))
SLOW = f"[[reply:{TEXT}]] [[chunks:30]] [[slow:150]]"


def agent_pids(e2e: E2E, event: str) -> list[int]:
    """Agent pids the daemon's log names for `event` (agent.spawned / agent adopted)."""
    assert e2e.daemon is not None
    out = []
    for record in e2e.daemon.log_records():
        if record.get("event") == event:
            out.append(int(record.get("agent_pid") or record.get("pid")))
    return out


def alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def parent(pid: int) -> int:
    with open(f"/proc/{pid}/stat") as f:
        return int(f.read().rsplit(")", 1)[1].split()[1])


def wait_for(condition: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


def stream_until(
    stubs: Stubs, session_id: str, text: str, stop: Callable[[list[pb.SessionEvent]], bool]
) -> tuple[list[pb.SessionEvent], Callable[[], None]]:
    """Sends `text`; reads its events until `stop(events)` is true, then returns them and a
    function that waits for the stream to end (it ends when the daemon goes away)."""
    events: list[pb.SessionEvent] = []
    reached = threading.Event()
    ended = threading.Event()

    def read() -> None:
        stream = stubs.sessions.SendMessage(
            pb.SendMessageRequest(session_id=session_id, text=text), timeout=120
        )
        try:
            for response in stream:
                events.append(response.event)
                if stop(events):
                    reached.set()
        except grpc.RpcError as e:
            assert e.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED), e
        finally:
            reached.set()
            ended.set()

    threading.Thread(target=read, daemon=True).start()
    assert reached.wait(60), "the turn did not get far enough"

    def wait_ended() -> None:
        assert ended.wait(30), "the stream did not end with the daemon"

    return events, wait_ended


def watch(stubs: Stubs, session_id: str, after_seq: int) -> Iterator[pb.SessionEvent]:
    for response in stubs.sessions.WatchSession(
        pb.WatchSessionRequest(session_id=session_id, after_seq=after_seq), timeout=60
    ):
        yield response.event


def rest_of_turn(stubs: Stubs, session_id: str, after_seq: int) -> list[pb.SessionEvent]:
    out = []
    for event in watch(stubs, session_id, after_seq):
        out.append(event)
        if event.WhichOneof("kind") in ("turn_completed", "turn_failed"):
            return out
    raise AssertionError("the watch ended before the turn")


def deltas(events: list[pb.SessionEvent]) -> int:
    return kinds(events).count("text_delta")


def assert_whole_and_once(stubs: Stubs, session_id: str, events: list[pb.SessionEvent]) -> None:
    seqs = [e.seq for e in events]
    assert seqs == list(range(seqs[0], seqs[0] + len(seqs))), "a gap or a repeat in the seqs"
    assert reply_text(events) == TEXT  # every delta once, in order
    done = events[-1]
    assert done.WhichOneof("kind") == "turn_completed", done
    assert done.turn_completed.text == TEXT and not done.turn_completed.interrupted
    history = stubs.sessions.GetHistory(pb.GetHistoryRequest(session_id=session_id)).messages
    assert [m.content for m in history] == [SLOW, TEXT]


def test_a_turn_streams_on_across_a_planned_restart(e2e: E2E) -> None:
    stubs = e2e.start()
    stubs.sessions.CreateSession(pb.CreateSessionRequest(session_id="planned"))
    before, ended = stream_until(stubs, "planned", SLOW, lambda ev: deltas(ev) >= 5)
    (pid,) = agent_pids(e2e, "agent.spawned")
    assert e2e.daemon is not None
    e2e.daemon.restart_in_place()
    ended()
    after = rest_of_turn(stubs, "planned", before[-1].seq)
    assert_whole_and_once(stubs, "planned", before + after)
    assert agent_pids(e2e, "agent adopted") == [pid] and alive(pid)
    assert agent_pids(e2e, "agent.spawned") == [pid]  # nothing was started again
    # The adopted agent serves the next turn too.
    follow_up = list(
        stubs.sessions.SendMessage(pb.SendMessageRequest(session_id="planned", text="next"))
    )
    assert reply_text([r.event for r in follow_up]) == "echo: next"
    assert agent_pids(e2e, "agent.spawned") == [pid]
    # The shim is the restarted daemon's child (it exec'd itself): once the session ends, it
    # is reaped, not left a zombie.
    shim = parent(pid)
    stubs.sessions.TerminateSession(pb.TerminateSessionRequest(session_id="planned"))
    wait_for(lambda: not Path(f"/proc/{shim}").exists(), 15, "the shim to exit and be reaped")


def test_a_turn_survives_a_sigkill_of_the_daemon(e2e: E2E) -> None:
    stubs = e2e.start()
    stubs.sessions.CreateSession(pb.CreateSessionRequest(session_id="crash"))
    before, ended = stream_until(stubs, "crash", SLOW, lambda ev: deltas(ev) >= 5)
    (pid,) = agent_pids(e2e, "agent.spawned")
    assert e2e.daemon is not None
    e2e.daemon.kill()
    ended()
    assert alive(pid)
    stubs = e2e.start()
    # A client that re-attaches from the last seq it saw gets the rest, once.
    after = rest_of_turn(stubs, "crash", before[-1].seq)
    assert_whole_and_once(stubs, "crash", before + after)
    assert agent_pids(e2e, "agent adopted") == [pid]
    # One that re-attaches from the turn's start gets all of it again, with the same seqs.
    again = rest_of_turn(stubs, "crash", before[0].seq - 1)
    assert [(e.seq, e.WhichOneof("kind")) for e in again] == [
        (e.seq, e.WhichOneof("kind")) for e in before + after
    ]


def test_a_permission_request_pending_across_a_restart_is_answered_after_it(
    e2e: E2E,
) -> None:
    stubs = e2e.start()
    stubs.sessions.CreateSession(pb.CreateSessionRequest(session_id="ask"))
    target = e2e.workdir / "after-restart.txt"
    prompt = f"[[tool:Write {json.dumps({'file_path': str(target), 'content': 'ran'})}]]"
    before, ended = stream_until(stubs, "ask", prompt, lambda ev: "permission_request" in kinds(ev))
    asked = next(e for e in before if e.WhichOneof("kind") == "permission_request")
    assert e2e.daemon is not None
    e2e.daemon.kill()
    ended()
    stubs = e2e.start()
    seen = []
    for event in watch(stubs, "ask", before[0].seq - 1):
        seen.append(event)
        if event.WhichOneof("kind") == "permission_request":
            # Offered again, as it was: same request, same seq.
            assert event.seq == asked.seq
            assert event.permission_request.request_id == asked.permission_request.request_id
            stubs.sessions.RespondToPermission(
                pb.RespondToPermissionRequest(
                    session_id="ask", request_id=asked.permission_request.request_id, allow=True
                ),
                timeout=10,
            )
        if event.WhichOneof("kind") in ("turn_completed", "turn_failed"):
            break
    assert seen[-1].WhichOneof("kind") == "turn_completed", seen[-1]
    assert target.read_text() == "ran"
    decided = [e.permission_decided for e in seen if e.WhichOneof("kind") == "permission_decided"]
    assert [d.allow for d in decided] == [True]
    # The first answer won: a second one is refused.
    with pytest.raises(grpc.RpcError) as err:
        stubs.sessions.RespondToPermission(
            pb.RespondToPermissionRequest(
                session_id="ask", request_id=asked.permission_request.request_id, allow=False
            ),
            timeout=10,
        )
    assert err.value.code() in (grpc.StatusCode.FAILED_PRECONDITION, grpc.StatusCode.NOT_FOUND)


def test_an_agent_whose_daemon_does_not_return_stops_at_its_orphan_timeout(e2e: E2E) -> None:
    stubs = e2e.start({"agent": {"orphan_timeout": 2.0}})
    stubs.sessions.CreateSession(pb.CreateSessionRequest(session_id="orphan"))
    _, ended = stream_until(stubs, "orphan", SLOW, lambda ev: deltas(ev) >= 2)
    (pid,) = agent_pids(e2e, "agent.spawned")
    assert e2e.daemon is not None
    e2e.daemon.kill()
    ended()
    wait_for(lambda: not alive(pid), 30, "the orphaned agent to stop")
    sockets = Path(e2e.daemon.runtime_dir) / "agents"
    wait_for(lambda: not any(sockets.glob("*.sock")), 10, "the shim to remove its socket")
    stubs = e2e.start({"agent": {"orphan_timeout": 2.0}})
    history = stubs.sessions.GetHistory(pb.GetHistoryRequest(session_id="orphan")).messages
    assert history[-1].status == pb.MESSAGE_STATUS_INTERRUPTED


def test_a_stop_still_stops_the_agents(e2e: E2E) -> None:
    stubs = e2e.start()
    stubs.sessions.CreateSession(pb.CreateSessionRequest(session_id="stop"))
    list(stubs.sessions.SendMessage(pb.SendMessageRequest(session_id="stop", text="hi")))
    (pid,) = agent_pids(e2e, "agent.spawned")
    assert e2e.daemon is not None
    runtime = Path(e2e.daemon.runtime_dir)
    assert e2e.daemon.stop() == 0
    wait_for(lambda: not alive(pid), 10, "the agent to stop with the daemon")
    wait_for(lambda: not any((runtime / "agents").glob("*.sock")), 10, "the shims to exit")


def test_recovery_does_not_touch_an_adopted_agent_and_kills_the_rest(e2e: E2E) -> None:
    stubs = e2e.start()
    for sid in ("kept", "gone"):
        stubs.sessions.CreateSession(pb.CreateSessionRequest(session_id=sid))
        list(stubs.sessions.SendMessage(pb.SendMessageRequest(session_id=sid, text="hi")))
    pids = agent_pids(e2e, "agent.spawned")
    assert len(pids) == 2
    assert e2e.daemon is not None
    e2e.daemon.kill()
    # While no daemon runs, one of the sessions is closed in the store behind its back: its
    # agent must not be adopted.
    import sqlite3

    with sqlite3.connect(Path(e2e.daemon.state_dir) / "atomizerd.db") as db:
        db.execute("UPDATE sessions SET closed = 1 WHERE session_id = 'gone'")
    stubs = e2e.start()
    adopted = agent_pids(e2e, "agent adopted")
    assert len(adopted) == 1 and alive(adopted[0])
    (other,) = set(pids) - set(adopted)
    wait_for(lambda: not alive(other), 15, "the agent of the closed session to stop")
    events = [
        r.event
        for r in stubs.sessions.SendMessage(pb.SendMessageRequest(session_id="kept", text="x"))
    ]
    assert reply_text(events) == "echo: x"


def test_a_question_open_across_a_planned_restart_is_answered_after_it(e2e: E2E) -> None:
    from tests.e2e.test_questions import MATERIAL, ask

    stubs = e2e.start()
    stubs.sessions.CreateSession(pb.CreateSessionRequest(session_id="q"))
    before, ended = stream_until(
        stubs, "q", f"pick {ask(MATERIAL)}", lambda ev: "question" in kinds(ev)
    )
    asked = next(e for e in before if e.WhichOneof("kind") == "question")
    assert e2e.daemon is not None
    e2e.daemon.restart_in_place()
    ended()
    answered = stubs.sessions.AnswerQuestion(
        pb.AnswerQuestionRequest(
            session_id="q",
            request_id=asked.question.request_id,
            answers={"Which material?": "Steel"},
        ),
        timeout=10,
    ).answer
    assert answered.answered
    rest = rest_of_turn(stubs, "q", before[-1].seq)
    assert rest[-1].WhichOneof("kind") == "turn_completed", rest[-1]
    # What the model was told is the answer given after the restart.
    assert "Steel" in json.dumps(e2e.api.requests[-1].tool_results)


def test_what_a_killed_shim_left_is_removed_and_its_turn_settled(e2e: E2E) -> None:
    stubs = e2e.start()
    stubs.sessions.CreateSession(pb.CreateSessionRequest(session_id="dead"))
    _, ended = stream_until(stubs, "dead", SLOW, lambda ev: deltas(ev) >= 2)
    (pid,) = agent_pids(e2e, "agent.spawned")
    shim = parent(pid)
    assert e2e.daemon is not None
    runtime = Path(e2e.daemon.runtime_dir)
    e2e.daemon.kill()
    ended()
    os.kill(shim, signal.SIGKILL)  # its agent dies with it (parent-death signal)
    wait_for(lambda: not alive(pid), 10, "the agent to die with its shim")
    assert list((runtime / "agents").glob("*.sock"))  # left behind
    stubs = e2e.start()
    assert not list((runtime / "agents").glob("*.sock"))
    assert not list((Path(e2e.daemon.state_dir) / "agent-spool").glob("*"))
    history = stubs.sessions.GetHistory(pb.GetHistoryRequest(session_id="dead")).messages
    assert history[-1].status == pb.MESSAGE_STATUS_INTERRUPTED


def slow_start_cli(workdir: Path, seconds: float) -> str:
    """The real CLI behind a wrapper that waits before it starts: an agent spawned through it
    stays SPAWNING (its handshake not answered) for `seconds`."""
    from tests.support.daemon import real_claude

    wrapper = workdir / "slow-claude"
    wrapper.write_text(f'#!/bin/sh\nsleep {seconds:g}\nexec "{real_claude()}" "$@"\n')
    wrapper.chmod(0o755)
    return str(wrapper)


def json_log(e2e: E2E) -> list[str]:
    """The lines of the daemon's log that are not one JSON object."""
    assert e2e.daemon is not None
    bad = []
    for line in e2e.daemon.log_path.read_text(errors="replace").splitlines():
        try:
            if not isinstance(json.loads(line), dict):
                bad.append(line)
        except ValueError:
            bad.append(line)
    return bad


def test_a_planned_restart_while_an_agent_is_starting_completes(e2e: E2E) -> None:
    """Issue 22: a restart that landed while a turn's agent was being spawned (--resume after
    a stop) hung for ever after the hand-over; the daemon now stops the spawn, refuses the
    message (never sent) and execs."""
    stubs = e2e.start()
    stubs.sessions.CreateSession(pb.CreateSessionRequest(session_id="spawning"))
    list(stubs.sessions.SendMessage(pb.SendMessageRequest(session_id="spawning", text="hi")))
    e2e.stop()
    slow = {"agent": {"command": [slow_start_cli(e2e.workdir, 5)]}}
    stubs = e2e.start(slow)
    assert e2e.daemon is not None
    pid = e2e.daemon.proc.pid if e2e.daemon.proc else 0
    errors: list[grpc.StatusCode] = []

    def send() -> None:
        try:
            list(
                stubs.sessions.SendMessage(
                    pb.SendMessageRequest(session_id="spawning", text="again"), timeout=60
                )
            )
        except grpc.RpcError as e:
            errors.append(e.code())

    sender = threading.Thread(target=send, daemon=True)
    sender.start()
    wait_for(
        lambda: any(
            r.get("event") == "agent process started" and r.get("resume")
            for r in e2e.daemon.log_records()  # type: ignore[union-attr]
        ),
        30,
        "the resumed agent to be spawned",
    )
    e2e.daemon.signal(signal.SIGUSR2)
    sender.join(30)
    assert errors == [grpc.StatusCode.UNAVAILABLE]
    e2e.daemon.wait_serving(timeout=60)  # the same process, exec'd
    assert e2e.daemon.proc is not None and e2e.daemon.proc.pid == pid
    assert e2e.daemon.proc.poll() is None
    # The session works on the next daemon; the message that was refused can be sent again.
    events = [
        r.event
        for r in stubs.sessions.SendMessage(
            pb.SendMessageRequest(session_id="spawning", text="again"), timeout=120
        )
    ]
    assert reply_text(events) == "echo: again"
    assert e2e.daemon.stop() == 0
    assert json_log(e2e) == []
