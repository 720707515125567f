"""The Python client (`atomizer_client.Client` and `AsyncClient`) against the real daemon."""

from __future__ import annotations

import asyncio
import json
import threading
from collections.abc import Iterator
from concurrent import futures
from pathlib import Path

import grpc
import pytest
from atomizer.v1 import daemon_pb2, daemon_pb2_grpc, session_pb2, session_pb2_grpc
from atomizer_client import (
    AsyncClient,
    AtomizerError,
    Client,
    DaemonNotFoundError,
    DeadlineExceededError,
    Event,
    FailedPreconditionError,
    InvalidArgumentError,
    NotFoundError,
    Notice,
    PermissionDecided,
    PermissionDeniedError,
    PermissionRequest,
    ResourceExhaustedError,
    RetryPolicy,
    TextDelta,
    ThinkingDelta,
    ToolResult,
    ToolUse,
    TurnCompleted,
    TurnFailed,
    TurnStarted,
    UnavailableError,
)
from atomizer_client.discovery import SYSTEM_SOCKET, find_socket

from tests.support.daemon import RunningDaemon

# The fake agent answers "echo: <text>" one delta per word; [[slow:MS]] waits before each delta.
SLOW = "[[slow:300]] one two three four five six seven eight nine ten eleven twelve"
# [[ask:Bash]] asks to use Bash before the reply, which then says "permission Bash: allow" (or
# "deny (<message>)"); the slow reply keeps the turn running a while after the answer.
ASK = "[[ask:Bash]] [[slow:150]] go on"


@pytest.fixture
def client(shared_daemon: RunningDaemon) -> Iterator[Client]:
    """A client of the module's shared daemon: for tests that stay within sessions of their own."""
    with Client(shared_daemon.socket) as c:
        yield c


@pytest.fixture
def own_client(daemon: RunningDaemon) -> Iterator[Client]:
    """A client of a daemon of the test's own: for tests that look at every session."""
    with Client(daemon.socket) as c:
        yield c


def assert_one_turn(events: list[Event]) -> None:
    """A turn's stream: TurnStarted first, one terminal event last, one turn, rising seqs."""
    assert isinstance(events[0], TurnStarted)
    assert [e.terminal for e in events].count(True) == 1
    assert events[-1].terminal
    assert len({e.turn_id for e in events}) == 1
    seqs = [e.seq for e in events]
    assert seqs == sorted(seqs) and len(set(seqs)) == len(seqs)


# --- discovery -----------------------------------------------------------------------------


def test_discovery_order_is_argument_then_env_then_user_then_system(tmp_path: Path) -> None:
    arg, env_sock = tmp_path / "arg.sock", tmp_path / "env.sock"
    user_sock = tmp_path / "xdg" / "atomizerd" / "atomizerd.sock"
    for p in (arg, env_sock, user_sock):
        p.parent.mkdir(parents=True, exist_ok=True)
        p.touch()
    env = {"ATOMIZERD_SOCKET": str(env_sock), "XDG_RUNTIME_DIR": str(tmp_path / "xdg")}
    assert find_socket(arg, env) == arg
    assert find_socket(f"unix://{arg}", env) == arg
    assert find_socket(None, env) == env_sock
    assert find_socket(None, {"XDG_RUNTIME_DIR": str(tmp_path / "xdg")}) == user_sock


def test_discovery_error_lists_every_place_it_looked(tmp_path: Path) -> None:
    if SYSTEM_SOCKET.exists():
        pytest.skip(f"a system daemon is running here ({SYSTEM_SOCKET})")
    with pytest.raises(DaemonNotFoundError) as err:
        find_socket(None, {"XDG_RUNTIME_DIR": str(tmp_path)})
    msg = str(err.value)
    assert str(tmp_path / "atomizerd" / "atomizerd.sock") in msg
    assert str(SYSTEM_SOCKET) in msg
    assert isinstance(err.value, UnavailableError)


def test_an_explicit_socket_that_does_not_exist_is_named(tmp_path: Path) -> None:
    with pytest.raises(DaemonNotFoundError, match=r"from .ATOMIZERD_SOCKET"):
        find_socket(None, {"ATOMIZERD_SOCKET": str(tmp_path / "nope.sock")})


# --- unary calls ---------------------------------------------------------------------------


def test_session_lifecycle(daemon: RunningDaemon, own_client: Client) -> None:
    (daemon.root / "studies" / "beam").mkdir()
    s = own_client.create_session(study_id="beam", session_id="life-1")
    assert (s.session_id, s.study_id, s.mode) == ("life-1", "beam", session_pb2.MODE_USER)
    assert own_client.get_session("life-1").agent_session_id == s.agent_session_id
    assert own_client.set_study_context("life-1", None).study_id == ""
    assert own_client.set_study_context("life-1", "beam").study_id == "beam"
    assert own_client.switch_mode("life-1", "user").mode == session_pb2.MODE_USER
    closed = own_client.terminate_session("life-1")
    assert closed is not None and closed.state == session_pb2.SESSION_STATE_CLOSED
    assert [s.session_id for s in own_client.list_sessions(state="closed")] == ["life-1"]
    reopened = own_client.create_session(session_id="life-1")
    assert reopened.state != session_pb2.SESSION_STATE_CLOSED
    assert own_client.terminate_session("life-1", purge=True) is None
    with pytest.raises(NotFoundError):
        own_client.get_session("life-1")


def test_list_sessions_iterates_every_page(own_client: Client) -> None:
    made = [own_client.create_session(session_id=f"page-{i}").session_id for i in range(7)]
    listed = [s.session_id for s in own_client.list_sessions(page_size=2)]
    assert listed == list(reversed(made))  # newest first, across 4 pages


def test_get_history_iterates_every_page_oldest_first(client: Client) -> None:
    sid = client.create_session().session_id
    for text in ("one", "two", "three"):
        list(client.send_message(sid, text))
    history = list(client.get_history(sid, page_size=4))
    assert [m.role for m in history] == [session_pb2.ROLE_USER, session_pb2.ROLE_ASSISTANT] * 3
    assert [m.content for m in history[::2]] == ["one", "two", "three"]
    assert history[1].content == "echo: one"


def test_get_status(client: Client) -> None:
    client.create_session()
    status = client.get_status()
    assert status.version and status.sessions_known >= 1 and status.pool_capacity > 0


# --- errors --------------------------------------------------------------------------------


def test_each_status_code_raises_its_own_exception(client: Client) -> None:
    sid = client.create_session().session_id
    with pytest.raises(NotFoundError) as nf:
        client.get_session("no-such-session")
    assert nf.value.code == grpc.StatusCode.NOT_FOUND and "no-such-session" in nf.value.details
    with pytest.raises(InvalidArgumentError):
        client.get_session("../etc")
    with pytest.raises(InvalidArgumentError):
        list(client.send_message(sid, ""))
    with pytest.raises(PermissionDeniedError):
        client.switch_mode(sid, "power")
    with pytest.raises(FailedPreconditionError):
        client.interrupt(sid)  # no turn is running
    client.terminate_session(sid)
    with pytest.raises(FailedPreconditionError):
        list(client.send_message(sid, "hello"))
    with pytest.raises(DeadlineExceededError):
        client.get_status(timeout=-1)  # a deadline already past
    assert all(
        isinstance(e, AtomizerError)
        for e in (nf.value, DeadlineExceededError("x"), UnavailableError("x"))
    )


def test_resource_exhausted_when_the_session_limit_is_reached(short_tmp: Path) -> None:
    with RunningDaemon(short_tmp, {"daemon": {"max_sessions": 1}}) as d, Client(d.socket) as c:
        c.create_session()
        with pytest.raises(ResourceExhaustedError):
            c.create_session()


def test_a_stopped_daemon_is_unavailable(daemon: RunningDaemon) -> None:
    c = Client(daemon.socket, timeout=3, retry=None)
    daemon.stop()
    with pytest.raises(UnavailableError):
        c.get_status()
    c.close()


# --- streams -------------------------------------------------------------------------------


def test_send_message_streams_one_turn_ending_in_one_terminal_event(client: Client) -> None:
    sid = client.create_session().session_id
    stream = client.send_message(sid, "hello")
    events = list(stream)
    assert_one_turn(events)
    started, done = events[0], events[-1]
    assert isinstance(started, TurnStarted)
    assert started.text == "hello" and started.request_id == stream.request_id
    assert "".join(e.text for e in events if isinstance(e, TextDelta)) == "echo: hello"
    assert isinstance(done, TurnCompleted) and not done.interrupted and not done.is_error
    assert done.text == "echo: hello" and done.usage.output_tokens > 0
    assert {e.session_id for e in events} == {sid}


def test_every_kind_of_event_arrives_typed(client: Client) -> None:
    sid = client.create_session().session_id
    events = list(client.send_message(sid, "[[api-retry:1]] [[tool:Read]] [[thinking]] hi"))
    assert_one_turn(events)
    by_type = {type(e): e for e in events}
    retry = by_type[Notice]
    assert isinstance(retry, Notice) and retry.kind == "API_RETRY" and retry.error_status == 529
    use, result = by_type[ToolUse], by_type[ToolResult]
    assert isinstance(use, ToolUse) and use.name == "Read" and json.loads(use.input_json)
    assert isinstance(result, ToolResult) and result.tool_use_id == use.id
    assert result.content == "ran Read" and not result.is_error
    thinking = by_type[ThinkingDelta]
    assert isinstance(thinking, ThinkingDelta) and thinking.text == "pondering"
    for e in events:  # what `atomizerctl --json` prints
        d = json.loads(json.dumps(e.to_dict()))
        assert d["type"] == e.type and d["seq"] == e.seq and d["time"]


def test_resending_with_the_same_request_id_attaches_to_the_same_turn(client: Client) -> None:
    sid = client.create_session().session_id
    first = client.send_message(sid, "hello")
    turn = [e.turn_id for e in first][0]  # noqa: RUF015 - reads the whole stream
    again = list(client.send_message(sid, "hello", request_id=first.request_id))
    assert {e.turn_id for e in again} == {turn}
    assert len(list(client.get_history(sid))) == 2  # one user message, one reply


def test_a_failed_turn_ends_with_turn_failed(client: Client) -> None:
    sid = client.create_session().session_id
    events = list(client.send_message(sid, "[[crash]] boom"))
    assert_one_turn(events)
    assert isinstance(events[-1], TurnFailed) and events[-1].code == "AGENT_EXITED"


def test_interrupt_ends_the_running_turn_interrupted(client: Client) -> None:
    sid = client.create_session().session_id
    stream = client.send_message(sid, SLOW)
    events: list[Event] = []
    for ev in stream:
        events.append(ev)
        if isinstance(ev, TextDelta) and len(events) == 2:
            assert client.interrupt(sid) == ev.turn_id
    assert_one_turn(events)
    done = events[-1]
    assert isinstance(done, TurnCompleted) and done.interrupted
    assert "twelve" not in done.text
    with pytest.raises(FailedPreconditionError):
        client.interrupt(sid)


def test_watch_replays_then_follows_live(client: Client) -> None:
    sid = client.create_session().session_id
    earlier = list(client.send_message(sid, "first"))
    watch = client.watch_session(sid, after_seq=0)
    replayed = [next(watch) for _ in earlier]
    assert [e.seq for e in replayed] == [e.seq for e in earlier]
    sender = threading.Thread(target=lambda: list(client.send_message(sid, "second")))
    sender.start()
    live: list[Event] = []
    for ev in watch:
        live.append(ev)
        if ev.terminal:
            break
    watch.cancel()
    sender.join(10)
    assert_one_turn(live)
    assert isinstance(live[0], TurnStarted) and live[0].text == "second"
    assert live[0].seq > earlier[-1].seq
    assert list(watch) == []  # cancelled: iteration ends quietly


def test_watch_after_a_seq_skips_what_the_caller_has(client: Client) -> None:
    sid = client.create_session().session_id
    events = list(client.send_message(sid, "hello"))
    with client.watch_session(sid, after_seq=events[1].seq) as watch:
        assert next(watch).seq == events[2].seq


# --- governance: tool approval, audit trail, budgets ---------------------------------------


def test_a_permission_request_is_answered_once_and_audited(client: Client) -> None:
    sid = client.create_session().session_id
    events: list[Event] = []
    for ev in client.send_message(sid, ASK):
        events.append(ev)
        if isinstance(ev, PermissionRequest):
            assert ev.tool_name == "Bash" and json.loads(ev.input_json) == {"command": "use Bash"}
            assert ev.deadline is not None and ev.tool_use_id and ev.request_id
            decision = client.respond_to_permission(sid, ev.request_id, True)
            assert decision.allow and decision.decider == session_pb2.DECIDER_CLIENT
            with pytest.raises(FailedPreconditionError, match="already decided"):
                client.respond_to_permission(sid, ev.request_id, False)
    assert_one_turn(events)
    done = events[-1]
    assert isinstance(done, TurnCompleted) and "permission Bash: allow" in done.text
    decided = [e for e in events if isinstance(e, PermissionDecided)]
    assert [(d.tool_name, d.allow, d.decider) for d in decided] == [("Bash", True, "client")]
    assert decided[0].to_dict()["decider"] == "client"
    trail = list(client.list_audit_events(sid))
    assert [(a.tool_name, a.allow, a.decider) for a in trail] == [
        ("Bash", True, session_pb2.DECIDER_CLIENT)
    ]
    assert trail[0].kind == session_pb2.AUDIT_KIND_PERMISSION and len(trail[0].input_digest) == 64
    with pytest.raises(NotFoundError):
        client.respond_to_permission(sid, "no-such-request", True)


def test_a_denial_carries_its_message_to_the_model(client: Client) -> None:
    sid = client.create_session().session_id
    events: list[Event] = []
    for ev in client.send_message(sid, ASK):
        events.append(ev)
        if isinstance(ev, PermissionRequest):
            client.respond_to_permission(sid, ev.request_id, False, message="not today")
    done = events[-1]
    assert isinstance(done, TurnCompleted) and "permission Bash: deny (not today)" in done.text
    assert [d.tool_name for d in done.permission_denials] == ["Bash"]
    (audited,) = client.list_audit_events(sid)
    assert (audited.allow, audited.detail) == (False, "not today")


def test_a_remembered_answer_is_not_asked_again(client: Client) -> None:
    sid = client.create_session().session_id
    for ev in client.send_message(sid, "[[ask:Bash]] first"):
        if isinstance(ev, PermissionRequest):
            client.respond_to_permission(sid, ev.request_id, True, remember=True)
    again = list(client.send_message(sid, "[[ask:Bash]] second"))
    assert not [e for e in again if isinstance(e, PermissionRequest)]
    decided = [e for e in again if isinstance(e, PermissionDecided)]
    assert [(d.allow, d.decider) for d in decided] == [(True, "rule")]
    deciders = [a.decider for a in client.list_audit_events(sid, page_size=1)]  # two pages
    assert deciders == [session_pb2.DECIDER_CLIENT, session_pb2.DECIDER_RULE]


def test_a_session_at_its_spending_cap_refuses_messages(client: Client) -> None:
    # The fake agent's turn costs $0.0001 per character of its reply and then some.
    s = client.create_session(budget_usd=0.0001, turn_budget_usd=0.00005)
    assert s.budget_usd == pytest.approx(0.0001) and s.turn_budget_usd == pytest.approx(0.00005)
    list(client.send_message(s.session_id, "spend"))
    with pytest.raises(ResourceExhaustedError, match="has spent"):
        list(client.send_message(s.session_id, "and more"))
    assert client.get_session(s.session_id).total_cost_usd >= 0.0001


def test_a_budget_may_not_be_negative(client: Client) -> None:
    with pytest.raises(InvalidArgumentError):
        client.create_session(budget_usd=-1.0)


# --- retries (a stub server: the daemon cannot be made to fail on cue) --------------------


class _Flaky(daemon_pb2_grpc.DaemonServiceServicer, session_pb2_grpc.SessionServiceServicer):
    """Answers UNAVAILABLE to the first `failures` calls of each method."""

    def __init__(self, failures: int) -> None:
        self.failures = failures
        self.calls: dict[str, int] = {}

    def _count(self, name: str, context: grpc.ServicerContext) -> None:
        self.calls[name] = self.calls.get(name, 0) + 1
        if self.calls[name] <= self.failures:
            context.abort(grpc.StatusCode.UNAVAILABLE, "draining")

    def GetStatus(self, request, context):  # type: ignore[no-untyped-def]
        self._count("GetStatus", context)
        return daemon_pb2.GetStatusResponse(version="stub")

    def CreateSession(self, request, context):  # type: ignore[no-untyped-def]
        self._count("CreateSession", context)
        return session_pb2.CreateSessionResponse()

    def ListAuditEvents(self, request, context):  # type: ignore[no-untyped-def]
        self._count("ListAuditEvents", context)
        return session_pb2.ListAuditEventsResponse(events=[session_pb2.AuditEvent(audit_id=1)])

    def RespondToPermission(self, request, context):  # type: ignore[no-untyped-def]
        self._count("RespondToPermission", context)
        return session_pb2.RespondToPermissionResponse()


@pytest.fixture
def flaky(short_tmp: Path) -> Iterator[tuple[Path, _Flaky]]:
    servicer = _Flaky(failures=2)
    server = grpc.server(futures.ThreadPoolExecutor(2))
    daemon_pb2_grpc.add_DaemonServiceServicer_to_server(servicer, server)
    session_pb2_grpc.add_SessionServiceServicer_to_server(servicer, server)
    sock = short_tmp / "flaky.sock"
    server.add_insecure_port(f"unix://{sock}")
    server.start()
    yield sock, servicer
    server.stop(None)


def test_read_only_calls_are_retried_on_unavailable(flaky: tuple[Path, _Flaky]) -> None:
    sock, servicer = flaky
    with Client(sock, retry=RetryPolicy(initial_backoff=0.01)) as c:
        assert c.get_status().version == "stub"
    assert servicer.calls["GetStatus"] == 3


def test_the_audit_trail_is_retried_on_unavailable(flaky: tuple[Path, _Flaky]) -> None:
    sock, servicer = flaky
    with Client(sock, retry=RetryPolicy(initial_backoff=0.01)) as c:
        assert [a.audit_id for a in c.list_audit_events("s")] == [1]
    assert servicer.calls["ListAuditEvents"] == 3


def test_writes_are_not_retried(flaky: tuple[Path, _Flaky]) -> None:
    sock, servicer = flaky
    with (
        Client(sock, retry=RetryPolicy(initial_backoff=0.01)) as c,
        pytest.raises(UnavailableError),
    ):
        c.create_session()
    assert servicer.calls["CreateSession"] == 1


def test_an_answer_to_a_permission_request_is_not_retried(flaky: tuple[Path, _Flaky]) -> None:
    sock, servicer = flaky
    with (
        Client(sock, retry=RetryPolicy(initial_backoff=0.01)) as c,
        pytest.raises(UnavailableError),
    ):
        c.respond_to_permission("s", "r", True)
    assert servicer.calls["RespondToPermission"] == 1


def test_without_a_retry_policy_unavailable_is_raised_at_once(flaky: tuple[Path, _Flaky]) -> None:
    sock, servicer = flaky
    with Client(sock, retry=None) as c, pytest.raises(UnavailableError, match="draining"):
        c.get_status()
    assert servicer.calls["GetStatus"] == 1


# --- asyncio -------------------------------------------------------------------------------


def test_async_client_crud_pages_and_errors(daemon: RunningDaemon) -> None:
    async def scenario() -> None:
        async with AsyncClient(daemon.socket) as c:
            made = [(await c.create_session(session_id=f"a{i}")).session_id for i in range(5)]
            listed = [s.session_id async for s in c.list_sessions(page_size=2)]
            assert listed == list(reversed(made))
            assert (await c.get_session("a0")).session_id == "a0"
            assert (await c.set_study_context("a0", "")).study_id == ""
            with pytest.raises(PermissionDeniedError):
                await c.switch_mode("a0", "power")
            with pytest.raises(NotFoundError):
                await c.get_session("missing")
            with pytest.raises(FailedPreconditionError):
                await c.interrupt("a0")
            assert (await c.get_status()).sessions_known == 5
            assert await c.terminate_session("a1", purge=True) is None

    asyncio.run(scenario())


def test_async_send_message_and_history(shared_daemon: RunningDaemon) -> None:
    async def scenario() -> None:
        async with AsyncClient(shared_daemon.socket) as c:
            sid = (await c.create_session()).session_id
            stream = c.send_message(sid, "hello")
            events = [e async for e in stream]
            assert_one_turn(events)
            assert isinstance(events[0], TurnStarted)
            assert events[0].request_id == stream.request_id
            assert isinstance(events[-1], TurnCompleted) and events[-1].text == "echo: hello"
            history = [m.content async for m in c.get_history(sid, page_size=1)]
            assert history == ["hello", "echo: hello"]
            with pytest.raises(InvalidArgumentError):
                [e async for e in c.send_message("../x", "hello")]

    asyncio.run(scenario())


def test_async_interrupt_and_watch(shared_daemon: RunningDaemon) -> None:
    async def scenario() -> None:
        async with AsyncClient(shared_daemon.socket) as c:
            sid = (await c.create_session()).session_id
            watch = c.watch_session(sid)
            events: list[Event] = []
            async for ev in c.send_message(sid, SLOW):
                events.append(ev)
                if len(events) == 2:
                    await c.interrupt(sid)
            assert_one_turn(events)
            assert isinstance(events[-1], TurnCompleted) and events[-1].interrupted
            watched = []
            async for ev in watch:
                watched.append(ev)
                if ev.terminal:
                    break
            watch.cancel()
            assert [e.seq for e in watched] == [e.seq for e in events]
            assert [e async for e in watch] == []

    asyncio.run(scenario())


def test_async_permission_audit_and_budget(shared_daemon: RunningDaemon) -> None:
    async def scenario() -> None:
        async with AsyncClient(shared_daemon.socket) as c:
            sid = (await c.create_session()).session_id
            events: list[Event] = []
            async for ev in c.send_message(sid, ASK):
                events.append(ev)
                if isinstance(ev, PermissionRequest):
                    decision = await c.respond_to_permission(sid, ev.request_id, True)
                    assert decision.allow and decision.decider == session_pb2.DECIDER_CLIENT
                    with pytest.raises(FailedPreconditionError):
                        await c.respond_to_permission(sid, ev.request_id, True)
            assert_one_turn(events)
            done = events[-1]
            assert isinstance(done, TurnCompleted) and "permission Bash: allow" in done.text
            trail = [a async for a in c.list_audit_events(sid)]
            assert [(a.tool_name, a.decider) for a in trail] == [
                ("Bash", session_pb2.DECIDER_CLIENT)
            ]
            with pytest.raises(NotFoundError):
                await c.respond_to_permission(sid, "no-such-request", False)

            capped = await c.create_session(budget_usd=0.0001)
            assert capped.budget_usd == pytest.approx(0.0001)
            [e async for e in c.send_message(capped.session_id, "spend")]
            with pytest.raises(ResourceExhaustedError, match="has spent"):
                [e async for e in c.send_message(capped.session_id, "and more")]

    asyncio.run(scenario())
