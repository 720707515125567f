"""Hostile and abusive requests through the real socket (beyond the error table in
test_errors.py): each gets its status code and a message a person understands, the daemon
keeps serving, and no file appears outside the daemon's runtime and state dirs.

"No file appears" compares listings before and after each request: in the system temp dir,
the entries whose name holds part of a hostile input (`_OURS`: what other processes on the
machine create there meanwhile is theirs), and the whole of the daemon's working directory,
which holds its runtime and state dirs, the agent's working directory (the Atomizer root) and
the agent's HOME.
"""

from __future__ import annotations

import base64
import json
import re
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import grpc
import pytest
from atomizer.v1 import daemon_pb2
from atomizer.v1 import session_pb2 as pb

from tests.conftest import Stubs, stubs_for
from tests.support.daemon import RunningDaemon

C = grpc.StatusCode
TEMP_ROOT = Path(tempfile.gettempdir())
# What a hostile input could make there: a name holding part of one (other processes on a
# shared machine create and remove files of their own in the temp dir while a case runs).
_OURS = re.compile(r"zz|hostile|ession|\uff53\uff45\uff53\uff53", re.IGNORECASE)


@dataclass
class Listing:
    temp_root: set[str]
    workdir: set[str]


def listing(d: RunningDaemon) -> Listing:
    private = (d.runtime_dir, d.state_dir)
    return Listing(
        temp_root={p.name for p in TEMP_ROOT.iterdir() if _OURS.search(p.name)},
        workdir={
            str(p.relative_to(d.workdir))
            for p in d.workdir.rglob("*")
            if not any(p == q or q in p.parents for q in private)
        },
    )


@dataclass
class Hostile:
    daemon: RunningDaemon
    stubs: Stubs


@pytest.fixture(scope="module")
def hostile() -> Iterator[Hostile]:
    with tempfile.TemporaryDirectory(prefix="azd-") as tmp:
        workdir = Path(tmp)
        with RunningDaemon(workdir, {"agent": {"prewarm": False}}) as d:
            studies = d.root / "studies"
            (studies / "zz-hostile-escape").symlink_to("/etc")
            (studies / "zz-hostile-file").write_text("not a folder")
            stubs = stubs_for(d.channel())
            for sid in ("known", "shut"):
                stubs.sessions.CreateSession(pb.CreateSessionRequest(session_id=sid))
            stubs.sessions.TerminateSession(pb.TerminateSessionRequest(session_id="shut"))
            yield Hostile(d, stubs)


def assert_serving(stubs: Stubs) -> None:
    got = stubs.sessions.GetSession(pb.GetSessionRequest(session_id="known"), timeout=5)
    assert got.session.session_id == "known"
    stubs.daemon.GetStatus(daemon_pb2.GetStatusRequest(), timeout=5)


def assert_refused(
    d: RunningDaemon, stubs: Stubs, call: Callable[[], Any], code: grpc.StatusCode, words: str
) -> str:
    """The call fails with `code` and a readable message holding `words`; nothing else
    changes. Returns the message."""
    before = listing(d)
    with pytest.raises(grpc.RpcError) as err:
        call()
    details = err.value.details() or ""
    assert err.value.code() == code, details
    assert words in details, details
    assert "Traceback" not in details
    assert len(details) < 400, "the message echoes the hostile input back"
    assert "\0" not in details
    assert_serving(stubs)
    assert listing(d) == before
    return details


# --- ids on every RPC that takes one -----------------------------------------------------------

RPCS_WITH_AN_ID: dict[str, Callable[[Stubs, str], Any]] = {
    "CreateSession": lambda s, i: s.sessions.CreateSession(
        pb.CreateSessionRequest(session_id=i), timeout=5
    ),
    "GetSession": lambda s, i: s.sessions.GetSession(pb.GetSessionRequest(session_id=i), timeout=5),
    "TerminateSession": lambda s, i: s.sessions.TerminateSession(
        pb.TerminateSessionRequest(session_id=i, purge=True), timeout=5
    ),
    "SwitchMode": lambda s, i: s.sessions.SwitchMode(
        pb.SwitchModeRequest(session_id=i, mode=pb.MODE_USER), timeout=5
    ),
    "SetStudyContext": lambda s, i: s.sessions.SetStudyContext(
        pb.SetStudyContextRequest(session_id=i), timeout=5
    ),
    "GetHistory": lambda s, i: s.sessions.GetHistory(pb.GetHistoryRequest(session_id=i), timeout=5),
    "SendMessage": lambda s, i: list(
        s.sessions.SendMessage(pb.SendMessageRequest(session_id=i, text="hi"), timeout=5)
    ),
    "WatchSession": lambda s, i: list(
        s.sessions.WatchSession(pb.WatchSessionRequest(session_id=i), timeout=5)
    ),
    "Interrupt": lambda s, i: s.sessions.Interrupt(pb.InterruptRequest(session_id=i), timeout=5),
    "RespondToPermission": lambda s, i: s.sessions.RespondToPermission(
        pb.RespondToPermissionRequest(session_id=i, request_id="r1", allow=True), timeout=5
    ),
    "ListAuditEvents": lambda s, i: s.sessions.ListAuditEvents(
        pb.ListAuditEventsRequest(session_id=i), timeout=5
    ),
}

HOSTILE_IDS = {
    "traversal": "../../../../tmp/zz-hostile",
    "absolute path": "/tmp/zz-hostile",
    "NUL": "zz\0hostile",
    "Cyrillic lookalike": "\u0455ession",  # "ѕession"
    "fullwidth letters": "\uff53\uff45\uff53\uff53",  # "ｓｅｓｓ"
    "option injection": "--resume=zz-hostile",
    "trailing newline": "zzhostile\n",
    "right-to-left override": "zz\u202ehostile",
    "percent-encoded traversal": "%2e%2e%2fzz-hostile",
    "space": "zz hostile",
    "65 characters": "z" * 65,
    "10 KB": "z" * 10_240,
}
# test_errors.py already has these two.
_COVERED = {("GetSession", "NUL"), ("GetSession", "10 KB")}
ID_CASES = [
    (rpc, name) for rpc in RPCS_WITH_AN_ID for name in HOSTILE_IDS if (rpc, name) not in _COVERED
]


@pytest.mark.parametrize(("rpc", "kind"), ID_CASES, ids=[f"{r}-{k}" for r, k in ID_CASES])
def test_a_hostile_session_id_is_refused_before_it_is_used(
    hostile: Hostile, rpc: str, kind: str
) -> None:
    call = RPCS_WITH_AN_ID[rpc]
    assert_refused(
        hostile.daemon,
        hostile.stubs,
        lambda: call(hostile.stubs, HOSTILE_IDS[kind]),
        C.INVALID_ARGUMENT,
        "session_id",
    )


UNKNOWN_ID_RPCS = [r for r in RPCS_WITH_AN_ID if r not in ("CreateSession", "GetSession")]


@pytest.mark.parametrize("rpc", UNKNOWN_ID_RPCS)
def test_a_well_formed_unknown_id_is_not_found(hostile: Hostile, rpc: str) -> None:
    call = RPCS_WITH_AN_ID[rpc]
    assert_refused(
        hostile.daemon,
        hostile.stubs,
        lambda: call(hostile.stubs, "zz-hostile-nobody"),
        C.NOT_FOUND,
        "'zz-hostile-nobody' does not exist",
    )


# --- every other field ----------------------------------------------------------------------


def _token(payload: bytes) -> str:
    return base64.urlsafe_b64encode(payload).decode()


CASES: list[tuple[str, Callable[[Stubs], Any], grpc.StatusCode, str]] = [
    # Unknown values of each enum field (open enums: any int32 arrives).
    (
        "CreateSession mode 99",
        lambda s: s.sessions.CreateSession(pb.CreateSessionRequest(mode=99)),
        C.INVALID_ARGUMENT,
        "unknown mode 99",
    ),
    (
        "CreateSession negative mode",
        lambda s: s.sessions.CreateSession(pb.CreateSessionRequest(mode=-1)),
        C.INVALID_ARGUMENT,
        "unknown mode -1",
    ),
    (
        "SwitchMode mode 9",
        lambda s: s.sessions.SwitchMode(pb.SwitchModeRequest(session_id="known", mode=9)),
        C.INVALID_ARGUMENT,
        "unknown mode 9",
    ),
    (
        "SwitchMode negative mode",
        lambda s: s.sessions.SwitchMode(pb.SwitchModeRequest(session_id="known", mode=-(2**31))),
        C.INVALID_ARGUMENT,
        "unknown mode",
    ),
    (
        "ListSessions state 6",
        lambda s: s.sessions.ListSessions(pb.ListSessionsRequest(state=6)),
        C.INVALID_ARGUMENT,
        "unknown session state 6",
    ),
    (
        "ListSessions negative state",
        lambda s: s.sessions.ListSessions(pb.ListSessionsRequest(state=-1)),
        C.INVALID_ARGUMENT,
        "unknown session state -1",
    ),
    # Spending caps: NaN compares false with everything, infinity is no amount of money.
    (
        "NaN budget",
        lambda s: s.sessions.CreateSession(pb.CreateSessionRequest(budget_usd=float("nan"))),
        C.INVALID_ARGUMENT,
        "budget_usd must be a finite number",
    ),
    (
        "infinite turn budget",
        lambda s: s.sessions.CreateSession(pb.CreateSessionRequest(turn_budget_usd=float("inf"))),
        C.INVALID_ARGUMENT,
        "turn_budget_usd must be a finite number",
    ),
    (
        "negative budget",
        lambda s: s.sessions.CreateSession(pb.CreateSessionRequest(budget_usd=-0.01)),
        C.INVALID_ARGUMENT,
        "budget_usd must not be negative",
    ),
    # Study ids.
    (
        "study symlinked out of the root",
        lambda s: s.sessions.SetStudyContext(
            pb.SetStudyContextRequest(session_id="known", study_id="zz-hostile-escape")
        ),
        C.INVALID_ARGUMENT,
        "resolves outside the studies root",
    ),
    (
        "study that is a file",
        lambda s: s.sessions.CreateSession(pb.CreateSessionRequest(study_id="zz-hostile-file")),
        C.INVALID_ARGUMENT,
        "does not exist",
    ),
    (
        "study id lookalike",
        lambda s: s.sessions.CreateSession(pb.CreateSessionRequest(study_id="\u0455tudy")),
        C.INVALID_ARGUMENT,
        "plain study name",
    ),
    (
        "10 KB study id",
        lambda s: s.sessions.SetStudyContext(
            pb.SetStudyContextRequest(session_id="known", study_id="z" * 10_240)
        ),
        C.INVALID_ARGUMENT,
        "plain study name",
    ),
    (
        "study id with NUL",
        lambda s: s.sessions.SetStudyContext(
            pb.SetStudyContextRequest(session_id="known", study_id="zz\0hostile")
        ),
        C.INVALID_ARGUMENT,
        "plain study name",
    ),
    (
        "study filter that is a path",
        lambda s: s.sessions.ListSessions(pb.ListSessionsRequest(study_id="../zz-hostile")),
        C.INVALID_ARGUMENT,
        "plain study name",
    ),
    # Message text and request ids.
    (
        "10 MiB text",
        lambda s: list(
            s.sessions.SendMessage(
                pb.SendMessageRequest(session_id="known", text="x" * (10 * 1024 * 1024)),
                timeout=30,
            )
        ),
        C.INVALID_ARGUMENT,
        "the limit is 1048576 (daemon.max_message_bytes)",
    ),
    (
        "text of unicode whitespace only",
        lambda s: list(
            s.sessions.SendMessage(
                pb.SendMessageRequest(session_id="known", text="\t\n\r\u00a0\u2003\u3000\u2028")
            )
        ),
        C.INVALID_ARGUMENT,
        "empty",
    ),
    (
        "10 KB request id",
        lambda s: list(
            s.sessions.SendMessage(
                pb.SendMessageRequest(session_id="known", text="hi", request_id="r" * 10_240)
            )
        ),
        C.INVALID_ARGUMENT,
        "request_id",
    ),
    (
        "request id that is a path",
        lambda s: list(
            s.sessions.SendMessage(
                pb.SendMessageRequest(session_id="known", text="hi", request_id="../zz-hostile")
            )
        ),
        C.INVALID_ARGUMENT,
        "request_id",
    ),
    (
        "request id with NUL",
        lambda s: list(
            s.sessions.SendMessage(
                pb.SendMessageRequest(session_id="known", text="hi", request_id="r\0r")
            )
        ),
        C.INVALID_ARGUMENT,
        "request_id",
    ),
    # Paging.
    (
        "negative page size when listing",
        lambda s: s.sessions.ListSessions(pb.ListSessionsRequest(page_size=-5)),
        C.INVALID_ARGUMENT,
        "page_size must not be negative",
    ),
    (
        "garbage history page token",
        lambda s: s.sessions.GetHistory(
            pb.GetHistoryRequest(session_id="known", page_token="garbage!")
        ),
        C.INVALID_ARGUMENT,
        "page_token",
    ),
    (
        "history page token past any row id",
        lambda s: s.sessions.GetHistory(
            pb.GetHistoryRequest(session_id="known", page_token=_token(b"9" * 30))
        ),
        C.INVALID_ARGUMENT,
        "page_token",
    ),
    (
        "audit page token past any row id",
        lambda s: s.sessions.ListAuditEvents(
            pb.ListAuditEventsRequest(session_id="known", page_token=_token(b"9" * 30))
        ),
        C.INVALID_ARGUMENT,
        "page_token",
    ),
    (
        "negative audit page size",
        lambda s: s.sessions.ListAuditEvents(
            pb.ListAuditEventsRequest(session_id="known", page_size=-1)
        ),
        C.INVALID_ARGUMENT,
        "page_size must not be negative",
    ),
    (
        "answer a permission request nobody asked",
        lambda s: s.sessions.RespondToPermission(
            pb.RespondToPermissionRequest(session_id="known", request_id="zz-hostile", allow=True)
        ),
        C.NOT_FOUND,
        "has no permission request",
    ),
    (
        "answer a permission request without its id",
        lambda s: s.sessions.RespondToPermission(
            pb.RespondToPermissionRequest(session_id="known", allow=True)
        ),
        C.INVALID_ARGUMENT,
        "request_id is required",
    ),
    (
        "list page token naming a path",
        lambda s: s.sessions.ListSessions(
            pb.ListSessionsRequest(page_token=_token(json.dumps([1.0, "../zz-hostile"]).encode()))
        ),
        C.INVALID_ARGUMENT,
        "page_token",
    ),
    (
        "list page token of the wrong shape",
        lambda s: s.sessions.ListSessions(
            pb.ListSessionsRequest(page_token=_token(json.dumps({"zz": "hostile"}).encode()))
        ),
        C.INVALID_ARGUMENT,
        "page_token",
    ),
    # Watching.
    (
        "negative after_seq",
        lambda s: list(
            s.sessions.WatchSession(pb.WatchSessionRequest(session_id="known", after_seq=-1))
        ),
        C.INVALID_ARGUMENT,
        "after_seq must not be negative",
    ),
    (
        "after_seq one past the newest",
        lambda s: list(
            s.sessions.WatchSession(pb.WatchSessionRequest(session_id="known", after_seq=1))
        ),
        C.INVALID_ARGUMENT,
        "is in the future",
    ),
    (
        "largest after_seq",
        lambda s: list(
            s.sessions.WatchSession(pb.WatchSessionRequest(session_id="known", after_seq=2**63 - 1))
        ),
        C.INVALID_ARGUMENT,
        "is in the future",
    ),
    # A closed session.
    (
        "switch the mode of a closed session",
        lambda s: s.sessions.SwitchMode(pb.SwitchModeRequest(session_id="shut", mode=pb.MODE_USER)),
        C.FAILED_PRECONDITION,
        "reopens it",
    ),
    (
        "attach a study to a closed session",
        lambda s: s.sessions.SetStudyContext(pb.SetStudyContextRequest(session_id="shut")),
        C.FAILED_PRECONDITION,
        "reopens it",
    ),
    (
        "interrupt a closed session",
        lambda s: s.sessions.Interrupt(pb.InterruptRequest(session_id="shut")),
        C.FAILED_PRECONDITION,
        "no turn running",
    ),
]


@pytest.mark.parametrize(("case", "call", "code", "words"), CASES, ids=[c[0] for c in CASES])
def test_a_hostile_field_is_refused(
    hostile: Hostile, case: str, call: Callable[[Stubs], Any], code: grpc.StatusCode, words: str
) -> None:
    assert_refused(hostile.daemon, hostile.stubs, lambda: call(hostile.stubs), code, words)


@pytest.mark.parametrize(
    ("method", "raw", "words"),
    [
        ("GetSession", b"\x0a\x02\xff\xfe", "bad UTF-8"),  # session_id = FF FE
        ("SendMessage", b"\x0a\x05known\x12\x02\xc3\x28", "bad UTF-8"),  # text = C3 28
        ("CreateSession", b"\xff\xff\xff", "corrupt"),  # not protobuf at all
    ],
)
def test_bytes_that_are_not_a_valid_request_get_a_clean_error(
    hostile: Hostile, method: str, raw: bytes, words: str
) -> None:
    """Proto3 strings must be UTF-8; no client library sends anything else, but a raw client
    can. gRPC refuses such a request before any daemon code runs; Python's grpc.aio reports
    parse failures as UNKNOWN with the parser's message (no traceback)."""
    channel = hostile.daemon.channel()
    path = f"/atomizer.v1.SessionService/{method}"
    if method == "SendMessage":
        stream = channel.unary_stream(path, request_serializer=None, response_deserializer=None)
        call: Callable[[], Any] = lambda: list(stream(raw, timeout=5))  # noqa: E731
    else:
        unary = channel.unary_unary(path, request_serializer=None, response_deserializer=None)
        call = lambda: unary(raw, timeout=5)  # noqa: E731
    details = assert_refused(hostile.daemon, hostile.stubs, call, C.UNKNOWN, words)
    assert "Error parsing message" in details
    history = hostile.stubs.sessions.GetHistory(pb.GetHistoryRequest(session_id="known"))
    assert list(history.messages) == []  # nothing ran


# --- requests against running turns -------------------------------------------------------------


def test_terminate_during_a_running_turn_ends_and_stores_it(hostile: Hostile) -> None:
    d, stubs = hostile.daemon, hostile.stubs
    stubs.sessions.CreateSession(pb.CreateSessionRequest(session_id="doomed"))
    before = listing(d)
    stream = stubs.sessions.SendMessage(
        pb.SendMessageRequest(session_id="doomed", text="[[slow:200]] " + "w " * 100), timeout=60
    )
    first = next(stream).event
    assert first.HasField("turn_started")
    next(e for e in (r.event for r in stream) if e.HasField("text_delta"))  # mid-reply
    closed = stubs.sessions.TerminateSession(
        pb.TerminateSessionRequest(session_id="doomed"), timeout=30
    )
    assert closed.session.state == pb.SESSION_STATE_CLOSED
    rest = [r.event for r in stream]
    assert rest, "the stream ended without its terminal event"
    terminal = rest[-1]
    # The agent acknowledges the interrupt (the turn completes, interrupted) or is stopped.
    if terminal.HasField("turn_completed"):
        assert terminal.turn_completed.interrupted
        stored = pb.MESSAGE_STATUS_INTERRUPTED
    else:
        assert terminal.turn_failed.code == pb.FAILURE_CODE_SESSION_TERMINATED, terminal
        stored = pb.MESSAGE_STATUS_FAILED
    history = stubs.sessions.GetHistory(pb.GetHistoryRequest(session_id="doomed")).messages
    assert [(m.role, m.status) for m in history] == [
        (pb.ROLE_USER, stored),
        (pb.ROLE_ASSISTANT, stored),
    ]
    assert history[1].content.startswith("echo: ")  # what was said before the end is kept
    assert history[1].turn_id == first.turn_id
    assert not list((d.runtime_dir / "sessions").glob("doomed.*"))
    assert_serving(stubs)
    assert listing(d) == before


def test_a_page_size_beyond_the_maximum_is_clamped(short_tmp: Path) -> None:
    with RunningDaemon(short_tmp, {"agent": {"prewarm": False}}) as d:
        stubs = stubs_for(d.channel())
        for i in range(1001):
            stubs.sessions.CreateSession(pb.CreateSessionRequest(session_id=f"p{i:04d}"))
        before = listing(d)
        first = stubs.sessions.ListSessions(pb.ListSessionsRequest(page_size=2**31 - 1))
        assert len(first.sessions) == 1000 and first.next_page_token
        rest = stubs.sessions.ListSessions(
            pb.ListSessionsRequest(page_size=2**31 - 1, page_token=first.next_page_token)
        )
        assert [s.session_id for s in rest.sessions] == ["p0000"] and not rest.next_page_token
        history = stubs.sessions.GetHistory(
            pb.GetHistoryRequest(session_id="p0000", page_size=2**31 - 1)
        )
        assert list(history.messages) == [] and not history.next_page_token
        assert listing(d) == before


# --- floods past the limits -------------------------------------------------------------------


def _slow_turn(stubs: Stubs, sid: str) -> Iterable[pb.SendMessageResponse]:
    """A turn that holds its process for ~2 s; returns once the agent is replying."""
    stream = stubs.sessions.SendMessage(
        pb.SendMessageRequest(session_id=sid, text="[[slow:200]] a b c d e f g h i j"),
        timeout=60,
    )
    assert next(stream).event.HasField("turn_started")
    return stream


def _wait_for(what: str, predicate: Callable[[], bool], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:g} s waiting for {what}")
        time.sleep(0.02)


def _completes(stream: Iterable[pb.SendMessageResponse]) -> bool:
    return [r.event for r in stream][-1].HasField("turn_completed")


def test_turns_beyond_the_pool_queue_are_resource_exhausted(short_tmp: Path) -> None:
    config = {"pool": {"max_live": 1, "max_queued": 1}, "agent": {"prewarm": False}}
    with RunningDaemon(short_tmp, config) as d:
        stubs = stubs_for(d.channel())
        for sid in ("f1", "f2", "f3", "known"):
            stubs.sessions.CreateSession(pb.CreateSessionRequest(session_id=sid))
        running = _slow_turn(stubs, "f1")  # holds the only process
        queued = stubs.sessions.SendMessage(
            pb.SendMessageRequest(session_id="f2", text="hi"), timeout=60
        )

        def status() -> daemon_pb2.GetStatusResponse:
            return stubs.daemon.GetStatus(daemon_pb2.GetStatusRequest(), timeout=5)

        _wait_for("the second turn to wait for a process", lambda: status().queued_turns == 1)
        details = assert_refused(
            d,
            stubs,
            lambda: list(
                stubs.sessions.SendMessage(
                    pb.SendMessageRequest(session_id="f3", text="hi"), timeout=30
                )
            ),
            C.RESOURCE_EXHAUSTED,
            "(pool.max_queued)",
        )
        assert "agent processes are busy" in details
        assert _completes(running) and _completes(queued)
        refused = stubs.sessions.GetHistory(pb.GetHistoryRequest(session_id="f3")).messages
        assert list(refused) == []  # a refused message was never committed
        assert _completes(
            stubs.sessions.SendMessage(pb.SendMessageRequest(session_id="f3", text="again"))
        )


def test_messages_beyond_a_sessions_queue_are_resource_exhausted(short_tmp: Path) -> None:
    config = {"pool": {"max_queued_per_session": 1}, "agent": {"prewarm": False}}
    with RunningDaemon(short_tmp, config) as d:
        stubs = stubs_for(d.channel())
        stubs.sessions.CreateSession(pb.CreateSessionRequest(session_id="known"))
        running = _slow_turn(stubs, "known")
        waiting = stubs.sessions.SendMessage(
            pb.SendMessageRequest(session_id="known", text="second"), timeout=60
        )

        def queued() -> int:
            return stubs.sessions.GetSession(
                pb.GetSessionRequest(session_id="known")
            ).session.queued_turns

        _wait_for("the second message to wait behind the first", lambda: queued() == 1)
        assert_refused(
            d,
            stubs,
            lambda: list(
                stubs.sessions.SendMessage(
                    pb.SendMessageRequest(session_id="known", text="third"), timeout=30
                )
            ),
            C.RESOURCE_EXHAUSTED,
            "(pool.max_queued_per_session = 1)",
        )
        assert _completes(running) and _completes(waiting)
        history = stubs.sessions.GetHistory(pb.GetHistoryRequest(session_id="known")).messages
        assert [m.content for m in history if m.role == pb.ROLE_USER][-1] == "second"
        assert len(history) == 4


def test_reopening_a_closed_session_counts_against_the_session_limit(short_tmp: Path) -> None:
    config = {"daemon": {"max_sessions": 2}, "agent": {"prewarm": False}}
    with RunningDaemon(short_tmp, config) as d:
        stubs = stubs_for(d.channel())
        for sid in ("known", "other"):
            stubs.sessions.CreateSession(pb.CreateSessionRequest(session_id=sid))
        stubs.sessions.TerminateSession(pb.TerminateSessionRequest(session_id="other"))
        stubs.sessions.CreateSession(pb.CreateSessionRequest(session_id="third"))  # 2 open
        for sid in ("other", "fourth"):
            assert_refused(
                d,
                stubs,
                partial(
                    stubs.sessions.CreateSession, pb.CreateSessionRequest(session_id=sid), timeout=5
                ),
                C.RESOURCE_EXHAUSTED,
                "(daemon.max_sessions)",
            )
        open_now = stubs.sessions.ListSessions(pb.ListSessionsRequest()).sessions
        assert sum(s.state != pb.SESSION_STATE_CLOSED for s in open_now) == 2
        # Below the limit again, it reopens.
        stubs.sessions.TerminateSession(pb.TerminateSessionRequest(session_id="third"))
        again = stubs.sessions.CreateSession(pb.CreateSessionRequest(session_id="other"))
        assert again.session.state != pb.SESSION_STATE_CLOSED
