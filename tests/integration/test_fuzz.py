"""Property-based fuzzing of every RPC against one live daemon.

Whatever a well-formed request holds, the daemon answers with a deliberate status: never
INTERNAL or UNKNOWN (an unexpected daemon error), never a traceback in the details, and never
a hang (every unary call and every turn finishes within its deadline; only WatchSession, which
follows a session until the client leaves, may run into its short deadline).
"""

from __future__ import annotations

import base64
import json
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from atomizer.v1 import daemon_pb2
from atomizer.v1 import session_pb2 as pb
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from tests.conftest import Stubs, stubs_for
from tests.support.daemon import RunningDaemon

C = grpc.StatusCode
UNARY_TIMEOUT = 10.0
TURN_TIMEOUT = 30.0
WATCH_TIMEOUT = 0.2
KNOWN = ["fz-a", "fz-b", "fz-c"]

FUZZ = settings(
    max_examples=60,
    deadline=None,
    database=None,  # nothing written to the working tree
    suppress_health_check=[HealthCheck.too_slow],
)


@pytest.fixture(scope="module")
def stubs() -> Iterator[Stubs]:
    with tempfile.TemporaryDirectory(prefix="azd-") as tmp:
        config = {
            "agent": {"prewarm": False, "first_event_timeout": 20.0},
            "pool": {"max_live": 4},
        }
        with RunningDaemon(Path(tmp), config) as d:
            (d.root / "studies" / "beam").mkdir()
            s = stubs_for(d.channel())
            for sid in KNOWN:
                s.sessions.CreateSession(pb.CreateSessionRequest(session_id=sid))
            yield s
            assert d.proc is not None and d.proc.poll() is None, "the daemon died"


def deliberate(call: Callable[[], Any], *, may_time_out: bool = False) -> None:
    """Runs the call; a failure must be a deliberate, readable status."""
    try:
        call()
    except grpc.RpcError as e:
        code, details = e.code(), e.details() or ""
        if may_time_out and code == C.DEADLINE_EXCEEDED:
            return
        assert code not in (C.INTERNAL, C.UNKNOWN, C.DEADLINE_EXCEEDED), (code, details)
        assert details and "Traceback" not in details, (code, details)


def b64(data: str) -> str:
    return base64.urlsafe_b64encode(data.encode()).decode()


# Each field mixes values that pass validation with anything of its type, so that requests
# get past the first check and reach the deeper code.
int32 = st.integers(min_value=-(2**31), max_value=2**31 - 1)
int64 = st.integers(min_value=-(2**63), max_value=2**63 - 1)
known = st.sampled_from(KNOWN)
session_ids = st.one_of(
    known,
    known,
    st.from_regex(r"[A-Za-z0-9][A-Za-z0-9_-]{0,63}", fullmatch=True),
    st.text(max_size=80),
)
modes = st.one_of(st.sampled_from([0, 1, 2]), int32)
states = st.one_of(st.integers(0, 5), int32)
page_sizes = st.one_of(st.integers(0, 3), int32)
study_ids = st.one_of(st.sampled_from(["", "beam", "missing"]), st.text(max_size=80))
# Turn directives of the fake agent ([[hang]]...) are test hooks, not input to fuzz.
texts = st.text(max_size=300).map(lambda t: t.replace("[[", "[ ["))
row_ids = st.one_of(st.integers(-(2**70), 2**70), st.integers(2**63 - 2, 2**80))
id_tokens = st.one_of(st.text(max_size=40), row_ids.map(str).map(b64))
list_tokens = st.one_of(
    st.text(max_size=40),
    st.tuples(st.floats(), st.text(max_size=70)).map(lambda t: b64(json.dumps(list(t)))),
)
money = st.one_of(
    st.just(0.0), st.sampled_from([float("nan"), float("inf"), -0.0, 1e-300, 1e308]), st.floats()
)
NAN = float("nan")


@FUZZ
@given(mode=modes, study_id=study_ids, session_id=st.one_of(st.just(""), session_ids), money=money)
@example(mode=0, study_id="", session_id="", money=NAN)
@example(mode=1, study_id="", session_id="", money=float("inf"))
def test_create_session(
    stubs: Stubs, mode: int, study_id: str, session_id: str, money: float
) -> None:
    request = pb.CreateSessionRequest(
        mode=mode,
        study_id=study_id,
        session_id=session_id,
        budget_usd=money,
        turn_budget_usd=money / 2,
    )
    deliberate(lambda: stubs.sessions.CreateSession(request, timeout=UNARY_TIMEOUT))


@FUZZ
@given(session_id=session_ids)
def test_get_session(stubs: Stubs, session_id: str) -> None:
    request = pb.GetSessionRequest(session_id=session_id)
    deliberate(lambda: stubs.sessions.GetSession(request, timeout=UNARY_TIMEOUT))


@FUZZ
@given(page_size=page_sizes, page_token=list_tokens, study_id=study_ids, state=states)
def test_list_sessions(
    stubs: Stubs, page_size: int, page_token: str, study_id: str, state: int
) -> None:
    request = pb.ListSessionsRequest(
        page_size=page_size, page_token=page_token, study_id=study_id, state=state
    )
    deliberate(lambda: stubs.sessions.ListSessions(request, timeout=UNARY_TIMEOUT))


@FUZZ
@given(session_id=session_ids, purge=st.booleans())
def test_terminate_session(stubs: Stubs, session_id: str, purge: bool) -> None:
    request = pb.TerminateSessionRequest(session_id=session_id, purge=purge)
    deliberate(lambda: stubs.sessions.TerminateSession(request, timeout=UNARY_TIMEOUT))
    if session_id in KNOWN:  # keep the known sessions open for the other RPCs
        reopen = pb.CreateSessionRequest(session_id=session_id)
        stubs.sessions.CreateSession(reopen, timeout=UNARY_TIMEOUT)


@FUZZ
@given(session_id=session_ids, mode=modes)
def test_switch_mode(stubs: Stubs, session_id: str, mode: int) -> None:
    request = pb.SwitchModeRequest(session_id=session_id, mode=mode)
    deliberate(lambda: stubs.sessions.SwitchMode(request, timeout=UNARY_TIMEOUT))


@FUZZ
@given(session_id=session_ids, study_id=study_ids)
def test_set_study_context(stubs: Stubs, session_id: str, study_id: str) -> None:
    request = pb.SetStudyContextRequest(session_id=session_id, study_id=study_id)
    deliberate(lambda: stubs.sessions.SetStudyContext(request, timeout=UNARY_TIMEOUT))


@FUZZ
@given(session_id=session_ids, page_size=page_sizes, page_token=id_tokens)
@example(session_id=KNOWN[0], page_size=0, page_token=b64(str(2**64)))
def test_get_history(stubs: Stubs, session_id: str, page_size: int, page_token: str) -> None:
    request = pb.GetHistoryRequest(
        session_id=session_id, page_size=page_size, page_token=page_token
    )
    deliberate(lambda: stubs.sessions.GetHistory(request, timeout=UNARY_TIMEOUT))


@FUZZ
@given(
    session_id=session_ids,
    text=texts,
    request_id=st.one_of(st.just(""), st.text(max_size=140)),
)
def test_send_message(stubs: Stubs, session_id: str, text: str, request_id: str) -> None:
    request = pb.SendMessageRequest(session_id=session_id, text=text, request_id=request_id)
    events: list[pb.SessionEvent] = []

    def send() -> None:
        events.extend(r.event for r in stubs.sessions.SendMessage(request, timeout=TURN_TIMEOUT))

    deliberate(send)
    if events:  # a turn ran: it ended with exactly one terminal event, last
        kinds = [e.WhichOneof("kind") for e in events]
        assert kinds[-1] in ("turn_completed", "turn_failed"), kinds
        assert sum(k in ("turn_completed", "turn_failed") for k in kinds) == 1, kinds


@FUZZ
@given(session_id=session_ids, after_seq=int64)
def test_watch_session(stubs: Stubs, session_id: str, after_seq: int) -> None:
    request = pb.WatchSessionRequest(session_id=session_id, after_seq=after_seq)
    deliberate(
        lambda: list(stubs.sessions.WatchSession(request, timeout=WATCH_TIMEOUT)),
        may_time_out=True,
    )


@FUZZ
@given(session_id=session_ids)
def test_interrupt(stubs: Stubs, session_id: str) -> None:
    request = pb.InterruptRequest(session_id=session_id)
    deliberate(lambda: stubs.sessions.Interrupt(request, timeout=UNARY_TIMEOUT))


@FUZZ
@given(
    session_id=session_ids,
    request_id=st.text(max_size=140),
    allow=st.booleans(),
    message=st.text(max_size=300),
    remember=st.booleans(),
)
def test_respond_to_permission(
    stubs: Stubs, session_id: str, request_id: str, allow: bool, message: str, remember: bool
) -> None:
    request = pb.RespondToPermissionRequest(
        session_id=session_id,
        request_id=request_id,
        allow=allow,
        message=message,
        remember=remember,
    )
    deliberate(lambda: stubs.sessions.RespondToPermission(request, timeout=UNARY_TIMEOUT))


@FUZZ
@given(session_id=session_ids, page_size=page_sizes, page_token=id_tokens)
@example(session_id=KNOWN[0], page_size=0, page_token=b64(str(-(2**64))))
def test_list_audit_events(stubs: Stubs, session_id: str, page_size: int, page_token: str) -> None:
    request = pb.ListAuditEventsRequest(
        session_id=session_id, page_size=page_size, page_token=page_token
    )
    deliberate(lambda: stubs.sessions.ListAuditEvents(request, timeout=UNARY_TIMEOUT))


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        byte, n = n & 0x7F, n >> 7
        out.append(byte | (0x80 if n else 0))
        if not n:
            return bytes(out)


# Unknown fields: (field number, varint value or length-delimited bytes). A newer client may
# send fields this daemon does not know; they are skipped, as protobuf requires.
unknown_fields = st.lists(
    st.tuples(
        st.integers(1, 2**29 - 1).filter(lambda n: not 19000 <= n <= 19999),
        st.one_of(st.integers(0, 2**64 - 1), st.binary(max_size=64)),
    ),
    max_size=8,
)


@FUZZ
@given(fields=unknown_fields)
def test_get_status(stubs: Stubs, fields: list[tuple[int, int | bytes]]) -> None:
    raw = b"".join(
        _varint(num << 3) + _varint(value)
        if isinstance(value, int)
        else _varint(num << 3 | 2) + _varint(len(value)) + value
        for num, value in fields
    )
    channel_call = stubs.daemon.GetStatus
    status = daemon_pb2.GetStatusResponse()

    def call() -> None:
        status.CopyFrom(
            channel_call(daemon_pb2.GetStatusRequest.FromString(raw), timeout=UNARY_TIMEOUT)
        )

    deliberate(call)
    assert status.pool_capacity == 4


@settings(FUZZ, max_examples=40)
@given(mode=modes, study_id=study_ids, money=money, text=texts)
@example(mode=0, study_id="", money=float("inf"), text="hello")
def test_a_created_session_takes_a_message(
    stubs: Stubs, mode: int, study_id: str, money: float, text: str
) -> None:
    """Whatever a session was created with, its turns end deliberately too."""
    request = pb.CreateSessionRequest(
        mode=mode, study_id=study_id, budget_usd=money, turn_budget_usd=money
    )
    created: list[str] = []
    deliberate(
        lambda: created.append(
            stubs.sessions.CreateSession(request, timeout=UNARY_TIMEOUT).session.session_id
        )
    )
    for sid in created:
        send = pb.SendMessageRequest(session_id=sid, text=text)
        deliberate(lambda: list(stubs.sessions.SendMessage(send, timeout=TURN_TIMEOUT)))  # noqa: B023
        purge = pb.TerminateSessionRequest(session_id=sid, purge=True)
        stubs.sessions.TerminateSession(purge, timeout=UNARY_TIMEOUT)
