"""Undoing end to end (issue 25): the agent's file changes (RewindFiles) and the conversation
in place (RollbackSession, UndoRollback), with the real daemon and the real pinned CLI against
the fake Messages API. Checked from the files on disk, the history, the audit trail, what
watchers see and what the fake model received.
"""

from __future__ import annotations

import json
import threading
from pathlib import Path

import grpc
import pytest
from atomizer.v1 import session_pb2 as pb

from tests.conftest import Stubs
from tests.e2e.conftest import E2E
from tests.integration.test_ctl import ctl
from tests.support.turns import send
from tests.support.waiting import wait_for

pytestmark = pytest.mark.e2e

POWER = {"modes.power": {"enabled": True}, "agent": {"env": {"IS_SANDBOX": "1"}}}


def write(path: Path, content: str) -> str:
    return f"[[tool:Write {json.dumps({'file_path': str(path), 'content': content})}]]"


def history(stubs: Stubs, sid: str, **kw: object) -> list[pb.Message]:
    request = pb.GetHistoryRequest(session_id=sid, page_size=100, **kw)  # type: ignore[arg-type]
    return list(stubs.sessions.GetHistory(request).messages)


def user_ids(stubs: Stubs, sid: str) -> list[int]:
    return [m.message_id for m in history(stubs, sid) if m.role == pb.ROLE_USER]


def code_of(call: object) -> grpc.StatusCode:
    with pytest.raises(grpc.RpcError) as caught:
        call()  # type: ignore[operator]
    return caught.value.code()


def rewind(stubs: Stubs, sid: str, message_id: int, **kw: bool) -> pb.RewindFilesResponse:
    return stubs.sessions.RewindFiles(
        pb.RewindFilesRequest(session_id=sid, message_id=message_id, **kw), timeout=120
    )


def next_event(stubs: Stubs, sid: str, after_seq: int) -> pb.SessionEvent:
    stream = stubs.sessions.WatchSession(
        pb.WatchSessionRequest(session_id=sid, after_seq=after_seq), timeout=30
    )
    try:
        return next(iter(stream)).event
    finally:
        stream.cancel()


def last_seq(stubs: Stubs, sid: str) -> int:
    return stubs.sessions.GetSession(pb.GetSessionRequest(session_id=sid)).session.last_seq


def prompt_of(e2e: E2E, text: str) -> str:
    call = next(r for r in reversed(e2e.api.requests) if text in r.prompt_text)
    return json.dumps(call.data["messages"])


def test_rewind_restores_the_agents_files_and_stops_at_a_file_changed_by_hand(e2e: E2E) -> None:
    stubs = e2e.start(POWER)
    work = e2e.workdir / "work"
    work.mkdir()
    a, b, other = work / "a.txt", work / "b.txt", work / "untouched.txt"
    other.write_text("mine\n")
    stubs.sessions.CreateSession(pb.CreateSessionRequest(session_id="rw", mode=pb.MODE_POWER))
    send(stubs, "rw", "first " + write(a, "v1\n"))
    send(stubs, "rw", "second " + write(a, "v2\n") + " " + write(b, "new b\n"))
    first, second = user_ids(stubs, "rw")
    assert a.read_text() == "v2\n" and b.read_text() == "new b\n"

    plan = rewind(stubs, "rw", second, dry_run=True)
    assert sorted(plan.files) == [str(a), str(b)] and not plan.conflicts and not plan.rewound
    assert a.read_text() == "v2\n"  # a dry run touches nothing

    b.write_text("edited by hand\n")
    stopped = rewind(stubs, "rw", second)
    assert list(stopped.conflicts) == [str(b)] and not stopped.rewound
    assert a.read_text() == "v2\n" and b.read_text() == "edited by hand\n"

    before = last_seq(stubs, "rw")
    forced = rewind(stubs, "rw", second, force=True)
    assert forced.rewound and sorted(forced.files) == [str(a), str(b)]
    assert a.read_text() == "v1\n" and not b.exists()  # b was the agent's: it goes
    assert other.read_text() == "mine\n"  # never the agent's: never touched
    notice = next_event(stubs, "rw", before)
    assert notice.notice.kind == pb.NOTICE_KIND_FILES_REWOUND and str(a) in notice.notice.message
    audit = stubs.sessions.ListAuditEvents(pb.ListAuditEventsRequest(session_id="rw")).events
    assert [e.kind for e in audit].count(pb.AUDIT_KIND_FILE_REWIND) == 1
    # The conversation is untouched, and the files as they are now are the agent's again.
    assert len(history(stubs, "rw")) == 4
    again = rewind(stubs, "rw", first, dry_run=True)
    assert list(again.files) == [str(a)] and not again.conflicts


def test_bad_rewinds_get_the_right_codes_and_change_nothing(e2e: E2E) -> None:
    stubs = e2e.start(POWER)
    work = e2e.workdir / "work"
    work.mkdir()
    a = work / "a.txt"
    for sid in ("one", "two"):
        stubs.sessions.CreateSession(pb.CreateSessionRequest(session_id=sid, mode=pb.MODE_POWER))
    send(stubs, "one", "edit " + write(a, "v1\n"))
    send(stubs, "two", "hello")
    (mine, reply), theirs = (
        [m.message_id for m in history(stubs, "one")],
        user_ids(stubs, "two")[0],
    )
    assert code_of(lambda: rewind(stubs, "one", theirs)) == grpc.StatusCode.NOT_FOUND
    assert code_of(lambda: rewind(stubs, "one", 999_999)) == grpc.StatusCode.NOT_FOUND
    assert code_of(lambda: rewind(stubs, "one", reply)) == grpc.StatusCode.INVALID_ARGUMENT
    assert code_of(lambda: rewind(stubs, "nobody", mine)) == grpc.StatusCode.NOT_FOUND

    events: list[pb.SessionEvent] = []
    runner = threading.Thread(target=lambda: events.extend(send(stubs, "one", "wait [[hang]]")))
    runner.start()
    try:
        wait_for(
            "the hanging call", lambda: any("[[hang]]" in r.prompt_text for r in e2e.api.requests)
        )
        assert code_of(lambda: rewind(stubs, "one", mine)) == grpc.StatusCode.FAILED_PRECONDITION
        rollback = pb.RollbackSessionRequest(session_id="one", message_id=mine)
        assert (
            code_of(lambda: stubs.sessions.RollbackSession(rollback))
            == grpc.StatusCode.FAILED_PRECONDITION
        )
    finally:
        stubs.sessions.Interrupt(pb.InterruptRequest(session_id="one"))
        runner.join(60)
    assert a.read_text() == "v1\n"
    assert not any(m.rolled_back for m in history(stubs, "one"))


def test_a_rollback_goes_on_without_the_later_turns_and_can_be_undone_until_a_turn_runs(
    e2e: E2E,
) -> None:
    stubs = e2e.start(POWER)
    stubs.sessions.CreateSession(pb.CreateSessionRequest(session_id="rb"))
    for word in ("apple", "banana", "cherry"):
        send(stubs, "rb", f"remember {word}")
    _, second, _ = user_ids(stubs, "rb")

    before = last_seq(stubs, "rb")
    done = stubs.sessions.RollbackSession(
        pb.RollbackSessionRequest(session_id="rb", message_id=second)
    )
    assert done.rolled_back == 4
    notice = next_event(stubs, "rb", before)
    assert notice.notice.kind == pb.NOTICE_KIND_ROLLED_BACK
    rows = history(stubs, "rb")
    assert [m.rolled_back for m in rows] == [False, False, True, True, True, True]
    assert [m.content for m in history(stubs, "rb", hide_rolled_back=True)] == [
        "remember apple",
        "echo: remember apple",
    ]

    undone = stubs.sessions.UndoRollback(pb.UndoRollbackRequest(session_id="rb"))
    assert undone.restored == 4 and not any(m.rolled_back for m in history(stubs, "rb"))
    send(stubs, "rb", "all three?")
    said = prompt_of(e2e, "all three?")
    assert all(w in said for w in ("apple", "banana", "cherry"))

    third = user_ids(stubs, "rb")[2]
    stubs.sessions.RollbackSession(pb.RollbackSessionRequest(session_id="rb", message_id=third))
    send(stubs, "rb", "what now?")
    said = prompt_of(e2e, "what now?")
    assert "apple" in said and "banana" in said
    assert "cherry" not in said and "all three?" not in said
    # A turn ran: the rollback stays.
    assert (
        code_of(lambda: stubs.sessions.UndoRollback(pb.UndoRollbackRequest(session_id="rb")))
        == grpc.StatusCode.FAILED_PRECONDITION
    )
    # The agent started again (a mode switch restarts it) goes on from the same place.
    stubs.sessions.SwitchMode(pb.SwitchModeRequest(session_id="rb", mode=pb.MODE_POWER))
    send(stubs, "rb", "and after a restart?")
    said = prompt_of(e2e, "and after a restart?")
    assert "what now?" in said and "banana" in said and "cherry" not in said
    audit = stubs.sessions.ListAuditEvents(pb.ListAuditEventsRequest(session_id="rb")).events
    assert [e.kind for e in audit].count(pb.AUDIT_KIND_ROLLBACK) == 3


def test_a_rollback_with_files_rewinds_them_too(e2e: E2E) -> None:
    stubs = e2e.start(POWER)
    work = e2e.workdir / "work"
    work.mkdir()
    a = work / "a.txt"
    stubs.sessions.CreateSession(pb.CreateSessionRequest(session_id="rf", mode=pb.MODE_POWER))
    send(stubs, "rf", "first " + write(a, "v1\n"))
    send(stubs, "rf", "second " + write(a, "v2\n"))
    second = user_ids(stubs, "rf")[1]
    done = stubs.sessions.RollbackSession(
        pb.RollbackSessionRequest(session_id="rf", message_id=second, rewind_files=True),
        timeout=120,
    )
    assert list(done.files) == [str(a)] and done.rolled_back == 2
    assert a.read_text() == "v1\n"
    send(stubs, "rf", "next")
    assert "second" not in prompt_of(e2e, "next")


def test_atomizerctl_rewind_rollback_and_undo(e2e: E2E) -> None:
    stubs = e2e.start(POWER)
    assert e2e.daemon is not None
    work = e2e.workdir / "work"
    work.mkdir()
    a = work / "a.txt"
    stubs.sessions.CreateSession(pb.CreateSessionRequest(session_id="cr", mode=pb.MODE_POWER))
    send(stubs, "cr", "first " + write(a, "v1\n"))
    send(stubs, "cr", "second " + write(a, "v2\n"))
    second = str(user_ids(stubs, "cr")[1])
    assert f"#{second}" in ctl(e2e.daemon, "history", "cr").stdout
    dry = ctl(e2e.daemon, "rewind", "cr", second, "--dry-run")
    assert dry.returncode == 0 and dry.stdout.strip() == str(a), dry.stderr
    a.write_text("by hand\n")
    refused = ctl(e2e.daemon, "rewind", "cr", second)
    assert refused.returncode == 4 and "changed by someone else" in refused.stdout
    assert a.read_text() == "by hand\n"
    forced = ctl(e2e.daemon, "rewind", "cr", second, "--force")
    assert forced.returncode == 0 and a.read_text() == "v1\n", forced.stderr
    rolled = ctl(e2e.daemon, "rollback", "cr", second)
    assert rolled.returncode == 0 and "2 message(s) rolled back" in rolled.stdout
    assert "[rolled back]" in ctl(e2e.daemon, "history", "cr").stdout
    undone = ctl(e2e.daemon, "undo-rollback", "cr")
    assert undone.returncode == 0 and "2 message(s) back" in undone.stdout
