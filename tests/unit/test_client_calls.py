"""What the blocking client does on the wire, against `grpc_testing`'s in-memory channel.

The test plays the daemon: it takes each call the client makes, reads its request and answers
with a response, a stream of events, or a status. That makes deadlines, error mapping and
"the client never repeats a call itself" observable one call at a time, with no daemon, no
socket and no sleeping. (The retries of the read-only calls happen inside gRPC's own channel,
which this channel does not have: they are specified in test_client_retry_policy.py and run
against a real stub server in tests/integration/test_client.py.)

grpc_testing does not hand a call's deadline to the server side, so the client gets the
channel through `Recorder`, which notes each invocation's method and timeout on the way in.
Two more of its ways: it passes request objects through unserialized (`Recorder` passes a copy,
as a real channel would have sent the bytes of the moment), and a status it is told to end a
stream with drops the messages the client has not read yet (so the tests read them first).
"""

from __future__ import annotations

import threading
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any, TypeVar

import grpc
import grpc_testing
import pytest
from atomizer.v1 import daemon_pb2, session_pb2
from atomizer_client import (
    DEFAULT_TIMEOUT,
    AtomizerError,
    Client,
    EventStream,
    TextDelta,
    TurnCompleted,
    TurnStarted,
    UnavailableError,
)
from atomizer_client import errors as e
from google.protobuf.descriptor import MethodDescriptor
from google.protobuf.message import Message
from google.protobuf.message_factory import GetMessageClass

T = TypeVar("T")

SERVICES = (
    session_pb2.DESCRIPTOR.services_by_name["SessionService"],
    daemon_pb2.DESCRIPTOR.services_by_name["DaemonService"],
)
METHODS: dict[str, MethodDescriptor] = {m.name: m for s in SERVICES for m in s.methods}
WAIT = 10.0
"""How long a test waits for the other side before it fails (a bound, never an expectation)."""


def in_background(fn: Callable[[], T]) -> Future[T]:
    """Runs `fn` in a daemon thread (a client call blocks until the test answers it)."""
    done: Future[T] = Future()

    def run() -> None:
        try:
            done.set_result(fn())
        except BaseException as exc:
            done.set_exception(exc)

    threading.Thread(target=run, daemon=True).start()
    return done


# --- the channel and the daemon's side of it ----------------------------------------------


@dataclass(frozen=True)
class Invocation:
    method: str
    timeout: float | None


class _Recorded:
    def __init__(self, recorder: Recorder, method: str, inner: Any) -> None:
        self._recorder, self._method, self._inner = recorder, method, inner

    def __call__(self, request: Any, timeout: float | None = None, **kwargs: Any) -> Any:
        self._recorder.invocations.append(Invocation(self._method.rsplit("/", 1)[-1], timeout))
        sent = type(request)()
        sent.CopyFrom(request)
        return self._inner(sent, timeout=timeout, **kwargs)


class Recorder(grpc.Channel):
    """A channel that notes every invocation (method, timeout), then passes it on."""

    def __init__(self, inner: Any) -> None:
        self._inner = inner
        self.invocations: list[Invocation] = []
        self.closed = False

    def calls(self) -> Counter[str]:
        return Counter(i.method for i in self.invocations)

    def timeouts(self, method: str) -> list[float | None]:
        return [i.timeout for i in self.invocations if i.method == method]

    def unary_unary(self, method, request_serializer=None, response_deserializer=None, **kw):
        inner = self._inner.unary_unary(method, request_serializer, response_deserializer, **kw)
        return _Recorded(self, method, inner)

    def unary_stream(self, method, request_serializer=None, response_deserializer=None, **kw):
        inner = self._inner.unary_stream(method, request_serializer, response_deserializer, **kw)
        return _Recorded(self, method, inner)

    def stream_unary(self, *args, **kwargs):
        raise AssertionError("the client has no client-streaming calls")

    def stream_stream(self, *args, **kwargs):
        raise AssertionError("the client has no bidirectional calls")

    def subscribe(self, callback, try_to_connect=False):
        raise AssertionError("the client does not watch connectivity")

    def unsubscribe(self, callback):
        raise AssertionError("the client does not watch connectivity")

    def close(self) -> None:
        self.closed = True
        self._inner.close()


class Daemon:
    """The server side of the test channel: take the client's calls and answer them."""

    def __init__(self, channel: Any) -> None:
        self._channel = channel

    def _take(self, what: str, take: Callable[[], T]) -> T:
        try:
            return in_background(take).result(timeout=WAIT)
        except TimeoutError:
            raise AssertionError(f"the client made no {what} call") from None

    def unary(self, method: str) -> tuple[Any, Any, Any]:
        """(invocation metadata, request, rpc) of the client's next call of `method`."""
        desc = METHODS[method]
        taken: tuple[Any, Any, Any] = self._take(
            method, lambda: self._channel.take_unary_unary(desc)
        )
        return taken

    def stream(self, method: str) -> tuple[Any, Any, Any]:
        desc = METHODS[method]
        taken: tuple[Any, Any, Any] = self._take(
            method, lambda: self._channel.take_unary_stream(desc)
        )
        return taken

    def answer(self, method: str, response: Message | None = None) -> Any:
        """Takes the next call of `method`, answers OK; returns its request."""
        _, request, rpc = self.unary(method)
        rpc.terminate(response or empty_response(method), (), grpc.StatusCode.OK, "")
        return request

    def fail(self, method: str, code: grpc.StatusCode, details: str) -> Any:
        _, request, rpc = self.unary(method)
        rpc.terminate(empty_response(method), (), code, details)
        return request


def empty_response(method: str) -> Message:
    cls: type[Message] = GetMessageClass(METHODS[method].output_type)
    return cls()


@pytest.fixture
def recorder() -> Recorder:
    return Recorder(grpc_testing.channel(SERVICES, grpc_testing.strict_real_time()))


@pytest.fixture
def daemon(recorder: Recorder) -> Daemon:
    return Daemon(recorder._inner)


@pytest.fixture
def client(recorder: Recorder) -> Iterator[Client]:
    with Client.from_channel(recorder, timeout=7.5) as c:
        yield c


def event(seq: int, **kind: Message) -> session_pb2.SessionEvent:
    return session_pb2.SessionEvent(seq=seq, session_id="s1", turn_id="t1", **kind)


def turn_events() -> list[session_pb2.SessionEvent]:
    return [
        event(1, turn_started=session_pb2.TurnStarted(text="hi")),
        event(2, text_delta=session_pb2.TextDelta(text="echo")),
        event(3, text_delta=session_pb2.TextDelta(text=": hi")),
        event(4, turn_completed=session_pb2.TurnCompleted(text="echo: hi")),
    ]


def reply(ev: session_pb2.SessionEvent) -> session_pb2.SendMessageResponse:
    return session_pb2.SendMessageResponse(event=ev)


# --- every unary call of the API -----------------------------------------------------------

# How the client makes each unary call; `kw` is passed through (the per-call timeout).
UNARY: dict[str, Callable[..., Any]] = {
    "CreateSession": lambda c, **kw: c.create_session(**kw),
    "GetSession": lambda c, **kw: c.get_session("s1", **kw),
    "ListSessions": lambda c, **kw: list(c.list_sessions(**kw)),
    "TerminateSession": lambda c, **kw: c.terminate_session("s1", **kw),
    "SwitchMode": lambda c, **kw: c.switch_mode("s1", "user", **kw),
    "SetStudyContext": lambda c, **kw: c.set_study_context("s1", "beam", **kw),
    "GetHistory": lambda c, **kw: list(c.get_history("s1", **kw)),
    "Interrupt": lambda c, **kw: c.interrupt("s1", **kw),
    "RespondToPermission": lambda c, **kw: c.respond_to_permission("s1", "r1", True, **kw),
    "ListAuditEvents": lambda c, **kw: list(c.list_audit_events("s1", **kw)),
    "GetAttachment": lambda c, **kw: c.get_attachment("s1", "0" * 64, **kw),
    "ForkSession": lambda c, **kw: c.fork_session("s1", **kw),
    "SetModel": lambda c, **kw: c.set_model("s1", "sonnet", **kw),
    "AnswerQuestion": lambda c, **kw: c.answer_question("s1", "q1", {"Which?": "A"}, **kw),
    "StopTask": lambda c, **kw: c.stop_task("s1", "b1", **kw),
    "GetTaskOutput": lambda c, **kw: c.get_task_output("s1", "b1", offset=10, limit=5, **kw),
    "SetLabels": lambda c, **kw: c.set_labels("s1", {"team": "cfd"}, **kw),
    "ArchiveSession": lambda c, **kw: c.archive_session("s1", **kw),
    "UnarchiveSession": lambda c, **kw: c.unarchive_session("s1", **kw),
    "SearchMessages": lambda c, **kw: list(c.search_messages("turbine", **kw)),
    "RenameSession": lambda c, **kw: c.rename_session("s1", "Truss", **kw),
    "GetMcpStatus": lambda c, **kw: c.get_mcp_status("s1", **kw),
    "ReconnectMcpServer": lambda c, **kw: c.reconnect_mcp_server("s1", "atomizer", **kw),
    "SetMcpServerEnabled": lambda c, **kw: c.set_mcp_server_enabled("s1", "x", False, **kw),
    "RewindFiles": lambda c, **kw: c.rewind_files("s1", 3, dry_run=True, **kw),
    "RollbackSession": lambda c, **kw: c.rollback_session("s1", 3, **kw),
    "UndoRollback": lambda c, **kw: c.undo_rollback("s1", **kw),
    "ImportSession": lambda c, **kw: c.import_session(agent_session_id="a" * 8, **kw),
    "GetStatus": lambda c, **kw: c.get_status(**kw),
    "RestartDaemon": lambda c, **kw: c.restart_daemon(**kw),
}


def test_the_client_makes_every_unary_call_of_the_api() -> None:
    # A unary method added to the contract must get a row above, and so these tests.
    unary = {name for name, m in METHODS.items() if not (m.client_streaming or m.server_streaming)}
    assert set(UNARY) == unary


@pytest.mark.parametrize("method", UNARY)
def test_every_unary_call_carries_the_clients_deadline_or_the_one_given(
    method: str, client: Client, daemon: Daemon, recorder: Recorder
) -> None:
    call = UNARY[method]
    done = in_background(lambda: call(client))
    daemon.answer(method)
    done.result(WAIT)
    done = in_background(lambda: call(client, timeout=0.25))
    daemon.answer(method)
    done.result(WAIT)
    assert recorder.timeouts(method) == [7.5, 0.25]


def test_the_default_deadline_is_ten_seconds(recorder: Recorder, daemon: Daemon) -> None:
    client = Client.from_channel(recorder)
    done = in_background(client.get_status)
    daemon.answer("GetStatus")
    done.result(WAIT)
    assert recorder.timeouts("GetStatus") == [DEFAULT_TIMEOUT] == [10.0]


@pytest.mark.parametrize("method", UNARY)
def test_an_unavailable_daemon_is_raised_after_one_attempt_by_the_client(
    method: str, client: Client, daemon: Daemon, recorder: Recorder
) -> None:
    """The client never repeats a call itself: retrying the read-only ones is the channel's
    job (its service config), so their attempts are not multiplied, and writes are sent once."""
    done = in_background(lambda: UNARY[method](client))
    daemon.fail(method, grpc.StatusCode.UNAVAILABLE, "atomizerd is shutting down")
    with pytest.raises(UnavailableError) as err:
        done.result(WAIT)
    assert err.value.details == "atomizerd is shutting down"
    assert recorder.calls() == {method: 1}


# --- error mapping -------------------------------------------------------------------------

C = grpc.StatusCode
ERRORS: dict[grpc.StatusCode, type[AtomizerError]] = {
    C.CANCELLED: e.CallCancelledError,
    C.UNKNOWN: e.UnknownError,
    C.INVALID_ARGUMENT: e.InvalidArgumentError,
    C.DEADLINE_EXCEEDED: e.DeadlineExceededError,
    C.NOT_FOUND: e.NotFoundError,
    C.ALREADY_EXISTS: e.AlreadyExistsError,
    C.PERMISSION_DENIED: e.PermissionDeniedError,
    C.RESOURCE_EXHAUSTED: e.ResourceExhaustedError,
    C.FAILED_PRECONDITION: e.FailedPreconditionError,
    C.ABORTED: e.AbortedError,
    C.OUT_OF_RANGE: e.OutOfRangeError,
    C.UNIMPLEMENTED: e.UnimplementedError,
    C.INTERNAL: e.InternalError,
    C.UNAVAILABLE: e.UnavailableError,
    C.DATA_LOSS: e.DataLossError,
    C.UNAUTHENTICATED: e.UnauthenticatedError,
}


def test_every_failure_status_has_its_own_exception() -> None:
    assert set(ERRORS) == set(grpc.StatusCode) - {grpc.StatusCode.OK}
    assert len(set(ERRORS.values())) == len(ERRORS)


@pytest.mark.parametrize("code", ERRORS, ids=lambda c: c.name)
def test_a_failed_call_raises_the_exception_of_its_status_with_the_daemons_message(
    code: grpc.StatusCode, client: Client, daemon: Daemon
) -> None:
    done = in_background(lambda: client.get_session("s1"))
    daemon.fail("GetSession", code, "session 's1' said no")
    with pytest.raises(AtomizerError) as err:
        done.result(WAIT)
    assert type(err.value) is ERRORS[code]
    assert (err.value.code, err.value.details) == (code, "session 's1' said no")
    assert str(err.value) == f"{code.name}: session 's1' said no"
    assert isinstance(err.value.__cause__, grpc.RpcError)  # kept for debugging, not needed


def test_a_status_without_a_message_reads_as_its_name(client: Client, daemon: Daemon) -> None:
    done = in_background(lambda: client.get_session("s1"))
    daemon.fail("GetSession", grpc.StatusCode.NOT_FOUND, "")
    with pytest.raises(e.NotFoundError) as err:
        done.result(WAIT)
    assert (err.value.details, str(err.value)) == ("", "NOT_FOUND")


def test_a_refused_message_fails_its_stream_with_the_same_exceptions(
    client: Client, daemon: Daemon
) -> None:
    stream = client.send_message("s1", "more")
    _, _, rpc = daemon.stream("SendMessage")
    rpc.terminate((), grpc.StatusCode.RESOURCE_EXHAUSTED, "session 's1' has spent $1.00")
    with pytest.raises(e.ResourceExhaustedError, match="has spent"):
        next(stream)
    watch = client.watch_session("s1", after_seq=99)
    _, _, rpc = daemon.stream("WatchSession")
    rpc.terminate((), grpc.StatusCode.INVALID_ARGUMENT, "after_seq 99 is in the future")
    with pytest.raises(e.InvalidArgumentError, match="in the future"):
        list(watch)


# --- paging --------------------------------------------------------------------------------


def test_pages_are_fetched_as_the_iteration_goes_each_with_a_deadline(
    client: Client, daemon: Daemon, recorder: Recorder
) -> None:
    sessions = client.list_sessions(study_id="beam", state="idle", page_size=2)
    assert recorder.calls() == {}  # nothing is asked before the first item is wanted
    first = in_background(lambda: [next(sessions).session_id for _ in range(2)])
    page = session_pb2.ListSessionsResponse(
        sessions=[session_pb2.Session(session_id="a"), session_pb2.Session(session_id="b")],
        next_page_token="after-b",
    )
    req1 = daemon.answer("ListSessions", page)
    assert first.result(WAIT) == ["a", "b"]
    assert recorder.calls() == {"ListSessions": 1}  # page 2 waits until it is needed

    rest = in_background(lambda: [s.session_id for s in sessions])
    last = session_pb2.ListSessionsResponse(sessions=[session_pb2.Session(session_id="c")])
    req2 = daemon.answer("ListSessions", last)
    assert rest.result(WAIT) == ["c"]
    assert (req1.page_token, req2.page_token) == ("", "after-b")
    for req in (req1, req2):  # the same query on every page
        assert (req.study_id, req.state, req.page_size) == (
            "beam",
            session_pb2.SESSION_STATE_IDLE,
            2,
        )
    assert recorder.timeouts("ListSessions") == [7.5, 7.5]


def test_a_failure_on_a_later_page_is_raised_after_the_earlier_items(
    client: Client, daemon: Daemon
) -> None:
    seen: list[int] = []

    def read() -> None:
        for a in client.list_audit_events("s1"):
            seen.append(a.audit_id)

    done = in_background(read)
    page = session_pb2.ListAuditEventsResponse(
        events=[session_pb2.AuditEvent(audit_id=1)], next_page_token="t"
    )
    daemon.answer("ListAuditEvents", page)
    daemon.fail("ListAuditEvents", grpc.StatusCode.NOT_FOUND, "session 's1' was purged")
    with pytest.raises(e.NotFoundError, match="purged"):
        done.result(WAIT)
    assert seen == [1]


# --- streams -------------------------------------------------------------------------------


def test_send_message_sends_its_idempotency_key_and_streams_typed_events_in_order(
    client: Client, daemon: Daemon, recorder: Recorder
) -> None:
    stream = client.send_message("s1", "hi")
    _, request, rpc = daemon.stream("SendMessage")
    assert (request.session_id, request.text, request.request_id) == ("s1", "hi", stream.request_id)
    assert uuid.UUID(stream.request_id)
    for ev in turn_events():
        rpc.send_response(reply(ev))
    rpc.terminate((), grpc.StatusCode.OK, "")
    events = list(stream)
    assert [type(ev) for ev in events] == [TurnStarted, TextDelta, TextDelta, TurnCompleted]
    assert [ev.seq for ev in events] == [1, 2, 3, 4]
    assert isinstance(events[-1], TurnCompleted) and events[-1].text == "echo: hi"


def test_a_turn_has_no_deadline_unless_one_is_given(
    client: Client, daemon: Daemon, recorder: Recorder
) -> None:
    """A turn may run far longer than a unary call (the daemon bounds it); so may a watch."""
    client.send_message("s1", "hi")
    client.send_message("s1", "hi", timeout=600)
    client.watch_session("s1")
    for method in ("SendMessage", "SendMessage", "WatchSession"):
        daemon.stream(method)[2].terminate((), grpc.StatusCode.OK, "")
    assert recorder.timeouts("SendMessage") == [None, 600]
    assert recorder.timeouts("WatchSession") == [None]


def test_each_message_gets_a_fresh_key_unless_the_caller_passes_one(
    client: Client, daemon: Daemon
) -> None:
    streams = [
        client.send_message("s1", "a"),
        client.send_message("s1", "b"),
        client.send_message("s1", "c", request_id="rid-7"),
    ]
    sent = [daemon.stream("SendMessage")[1].request_id for _ in streams]
    assert sent == [s.request_id for s in streams]
    assert sent[0] != sent[1] and sent[2] == "rid-7"


def test_a_stream_broken_mid_turn_raises_after_the_events_it_delivered(
    client: Client, daemon: Daemon, recorder: Recorder
) -> None:
    """The client does not resume by itself: it raises, and the caller re-attaches by sending
    again with `stream.request_id` (the daemon then streams that turn, not a new one)."""
    stream = client.send_message("s1", "hi")
    _, _, rpc = daemon.stream("SendMessage")
    for ev in turn_events()[:2]:
        rpc.send_response(reply(ev))
    got = [next(stream), next(stream)]
    rpc.terminate((), grpc.StatusCode.UNAVAILABLE, "Socket closed")
    with pytest.raises(UnavailableError, match="Socket closed"):
        next(stream)
    assert [ev.seq for ev in got] == [1, 2]
    assert list(stream) == []  # a broken stream stays ended
    assert recorder.calls() == {"SendMessage": 1}  # nothing was re-sent behind the caller's back

    again = client.send_message("s1", "hi", request_id=stream.request_id)
    _, request, _ = daemon.stream("SendMessage")
    assert (request.text, request.request_id) == ("hi", stream.request_id)
    assert again.request_id == stream.request_id


def test_watch_asks_for_the_events_after_the_seq_given(client: Client, daemon: Daemon) -> None:
    watch = client.watch_session("s1", after_seq=2)
    _, request, rpc = daemon.stream("WatchSession")
    assert (request.session_id, request.after_seq) == ("s1", 2)
    for ev in turn_events()[2:]:
        rpc.send_response(session_pb2.WatchSessionResponse(event=ev))
    rpc.terminate((), grpc.StatusCode.OK, "")
    assert [ev.seq for ev in watch] == [3, 4]


def test_cancel_ends_the_iteration_quietly_and_reaches_the_daemon(
    client: Client, daemon: Daemon
) -> None:
    watch = client.watch_session("s1")
    _, _, rpc = daemon.stream("WatchSession")
    rpc.send_response(session_pb2.WatchSessionResponse(event=turn_events()[0]))
    assert isinstance(next(watch), TurnStarted)
    watch.cancel()
    in_background(rpc.cancelled).result(WAIT)  # returns once the call is cancelled
    assert list(watch) == []


def test_leaving_a_with_block_cancels_the_stream(client: Client, daemon: Daemon) -> None:
    with client.send_message("s1", "hi") as stream:
        _, _, rpc = daemon.stream("SendMessage")
        assert isinstance(stream, EventStream)
    in_background(rpc.cancelled).result(WAIT)


def test_a_stream_the_daemon_cancels_is_an_error_not_a_quiet_end(
    client: Client, daemon: Daemon
) -> None:
    """Only the caller's own cancel() ends a stream silently."""
    stream = client.send_message("s1", "hi")
    _, _, rpc = daemon.stream("SendMessage")
    rpc.send_response(reply(turn_events()[0]))
    assert next(stream).seq == 1
    rpc.terminate((), grpc.StatusCode.CANCELLED, "the turn was abandoned")
    with pytest.raises(e.CallCancelledError, match="abandoned"):
        next(stream)


# --- the channel seam ----------------------------------------------------------------------


def test_a_client_made_from_a_channel_owns_it(recorder: Recorder) -> None:
    client = Client.from_channel(recorder)
    assert (client.socket, client.target, client.timeout) == (None, None, DEFAULT_TIMEOUT)
    with client:
        assert not recorder.closed
    assert recorder.closed
