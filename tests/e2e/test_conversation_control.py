"""Conversation control end to end (issue 25): questions aside, titles, live usage and MCP
health, with the real daemon and the real pinned CLI against the fake Messages API. Checked in
the RPCs' answers, in what the fake API received and in the CLI's transcript on disk.
"""

from __future__ import annotations

import json
import sys
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

FAKE_MCP = [sys.executable, str(Path(__file__).parents[1] / "support" / "fake_mcp_server.py")]


def history(stubs: Stubs, sid: str, **kw: object) -> list[pb.Message]:
    request = pb.GetHistoryRequest(session_id=sid, page_size=100, **kw)  # type: ignore[arg-type]
    return list(stubs.sessions.GetHistory(request).messages)


def session(stubs: Stubs, sid: str) -> pb.Session:
    return stubs.sessions.GetSession(pb.GetSessionRequest(session_id=sid)).session


def ask(stubs: Stubs, sid: str, text: str) -> list[pb.AskAsideResponse]:
    return list(stubs.sessions.AskAside(pb.AskAsideRequest(session_id=sid, text=text), timeout=60))


def transcript(workdir: Path, agent_session_id: str) -> list[dict[str, object]]:
    found = list((workdir / "home" / ".claude" / "projects").glob(f"*/{agent_session_id}.jsonl"))
    assert len(found) == 1, found
    return [json.loads(line) for line in found[0].read_text().splitlines() if line.strip()]


def code_of(call: object) -> grpc.StatusCode:
    with pytest.raises(grpc.RpcError) as caught:
        call()  # type: ignore[operator]
    return caught.value.code()


def test_a_question_aside_is_answered_while_a_turn_runs_and_stays_out_of_the_conversation(
    e2e: E2E,
) -> None:
    stubs = e2e.start()
    stubs.sessions.CreateSession(pb.CreateSessionRequest(session_id="as"))
    send(stubs, "as", "remember the word banana")

    # A turn that hangs until interrupted: the aside is answered while it runs.
    events: list[pb.SessionEvent] = []
    runner = threading.Thread(target=lambda: events.extend(send(stubs, "as", "work [[hang]]")))
    runner.start()
    try:
        wait_for("the hanging turn", lambda: session(stubs, "as").state == pb.SESSION_STATE_BUSY)
        wait_for(
            "the hanging call", lambda: any("[[hang]]" in r.prompt_text for r in e2e.api.requests)
        )
        steps = ask(stubs, "as", "which word? [[reply:it was banana]]")
        assert session(stubs, "as").state == pb.SESSION_STATE_BUSY  # the turn still runs
    finally:
        stubs.sessions.Interrupt(pb.InterruptRequest(session_id="as"))
        runner.join(60)
    assert events[-1].turn_completed.interrupted

    assert steps[0].question_message_id and not steps[0].done
    assert "".join(s.text for s in steps) == "it was banana"
    assert steps[-1].done and steps[-1].answer_message_id > steps[0].question_message_id

    # The model was asked with the conversation as context, the question last.
    aside_call = next(r for r in e2e.api.requests if r.prompt_text.startswith("which word?"))
    assert "remember the word banana" in json.dumps(aside_call.data["messages"])

    # The next turn's request carries neither the question nor the answer.
    after = send(stubs, "as", "and now?")
    assert after[-1].turn_completed.text == "echo: and now?"
    last_call = next(r for r in e2e.api.requests if r.prompt_text == "and now?")
    said = json.dumps(last_call.data["messages"])
    assert "banana" in said and "which word" not in said and "it was banana" not in said

    # History keeps the aside, marked, and can leave it out.
    rows = history(stubs, "as")
    asides = [(m.role, m.content, m.status) for m in rows if m.aside]
    assert asides == [
        (pb.ROLE_USER, "which word? [[reply:it was banana]]", pb.MESSAGE_STATUS_COMPLETE),
        (pb.ROLE_ASSISTANT, "it was banana", pb.MESSAGE_STATUS_COMPLETE),
    ]
    assert [m.message_id for m in rows if m.aside] == [
        steps[0].question_message_id,
        steps[-1].answer_message_id,
    ]
    hidden = history(stubs, "as", hide_asides=True)
    assert [m.content for m in hidden] == [m.content for m in rows if not m.aside]
    assert len(hidden) == 6
    # The CLI's transcript never had it either.
    lines = transcript(e2e.workdir, session(stubs, "as").agent_session_id)
    assert "which word?" not in json.dumps(lines)


def test_a_question_aside_resumes_an_agent_that_was_stopped(e2e: E2E) -> None:
    stubs = e2e.start({"agent": {"prewarm": False}})
    stubs.sessions.CreateSession(pb.CreateSessionRequest(session_id="cold"))
    assert code_of(lambda: ask(stubs, "cold", "anything?")) == grpc.StatusCode.FAILED_PRECONDITION
    send(stubs, "cold", "the beam is 3 m long")
    # Changing the model restarts nothing live, so stop the agent the plain way: a mode switch.
    stubs.sessions.SwitchMode(pb.SwitchModeRequest(session_id="cold", mode=pb.MODE_PLAN))
    wait_for("the agent gone", lambda: session(stubs, "cold").state == pb.SESSION_STATE_IDLE)
    steps = ask(stubs, "cold", "how long? [[reply:3 m]]")
    assert "".join(s.text for s in steps) == "3 m"
    aside_call = next(r for r in e2e.api.requests if r.prompt_text.startswith("how long?"))
    assert "the beam is 3 m long" in json.dumps(aside_call.data["messages"])


def test_bad_asides_get_the_right_codes_and_lose_nothing(e2e: E2E) -> None:
    stubs = e2e.start()
    stubs.sessions.CreateSession(pb.CreateSessionRequest(session_id="ba"))
    send(stubs, "ba", "hello")
    assert code_of(lambda: ask(stubs, "nobody", "q")) == grpc.StatusCode.NOT_FOUND
    assert code_of(lambda: ask(stubs, "ba", "   ")) == grpc.StatusCode.INVALID_ARGUMENT
    assert code_of(lambda: ask(stubs, "../x", "q")) == grpc.StatusCode.INVALID_ARGUMENT
    stubs.sessions.TerminateSession(pb.TerminateSessionRequest(session_id="ba"))
    assert code_of(lambda: ask(stubs, "ba", "q")) == grpc.StatusCode.FAILED_PRECONDITION
    assert [m.content for m in history(stubs, "ba")] == ["hello", "echo: hello"]


def test_the_first_turn_titles_the_session_and_rename_sets_it_everywhere(e2e: E2E) -> None:
    stubs = e2e.start({"agent": {"titles": True}})
    stubs.sessions.CreateSession(pb.CreateSessionRequest(session_id="ti"))
    send(stubs, "ti", 'size the truss [[reply:{"title": "Truss sizing"}]]')
    wait_for("the generated title", lambda: session(stubs, "ti").title == "Truss sizing")
    title_call = next(r for r in e2e.api.requests if r.prompt_text.startswith("<session>"))
    assert "size the truss" in title_call.prompt_text
    assert not title_call.data.get("tools")  # the title call runs no tools
    listed = stubs.sessions.ListSessions(pb.ListSessionsRequest()).sessions
    assert [(s.session_id, s.title) for s in listed] == [("ti", "Truss sizing")]
    agent_session_id = session(stubs, "ti").agent_session_id
    lines = transcript(e2e.workdir, agent_session_id)
    assert {"type": "ai-title", "aiTitle": "Truss sizing"}.items() <= lines[-1].items() or any(
        line.get("aiTitle") == "Truss sizing" for line in lines
    )

    renamed = stubs.sessions.RenameSession(
        pb.RenameSessionRequest(session_id="ti", title="Truss, second try")
    ).session
    assert renamed.title == "Truss, second try"
    lines = transcript(e2e.workdir, agent_session_id)
    assert any(line.get("customTitle") == "Truss, second try" for line in lines)
    # A later turn does not title it again.
    send(stubs, "ti", "more")
    assert sum(r.prompt_text.startswith("<session>") for r in e2e.api.requests) == 1

    # Stored with no live agent too, and kept over a restart of the daemon.
    stubs.sessions.TerminateSession(pb.TerminateSessionRequest(session_id="ti"))
    stubs.sessions.RenameSession(pb.RenameSessionRequest(session_id="ti", title="Closed one"))
    assert session(stubs, "ti").title == "Closed one"
    for bad in ("", "two\nlines", "x" * 257):
        assert (
            code_of(
                lambda bad=bad: stubs.sessions.RenameSession(
                    pb.RenameSessionRequest(session_id="ti", title=bad)
                )
            )
            == grpc.StatusCode.INVALID_ARGUMENT
        )
    assert (
        code_of(
            lambda: stubs.sessions.RenameSession(
                pb.RenameSessionRequest(session_id="no", title="t")
            )
        )
        == grpc.StatusCode.NOT_FOUND
    )
    assert session(stubs, "ti").title == "Closed one"


def test_usage_events_report_each_model_call_and_the_session_keeps_the_last(e2e: E2E) -> None:
    stubs = e2e.start({"modes.user": {"allowed_tools": ["Read"]}})
    stubs.sessions.CreateSession(pb.CreateSessionRequest(session_id="us"))
    events = send(stubs, "us", '[[tool:Read {"file_path": "/etc/hostname"}]] [[usage:700:30]]')
    usages = [e.usage for e in events if e.WhichOneof("kind") == "usage"]
    done = events[-1].turn_completed
    # Two model calls (the tool call, then the answer), each reported as it starts and ends,
    # then the turn's cost at its end, before turn_completed.
    assert events[-2].WhichOneof("kind") == "usage"
    assert len(usages) == 5, usages
    # The first call's usage is the fake's [[usage]]; the second's is its own estimate of the
    # bigger request (the tool's result added).
    assert [(u.input_tokens, u.output_tokens) for u in usages[:2]] == [(700, 0), (700, 30)]
    assert usages[1].context_tokens == 730
    assert usages[2].input_tokens > 700 and usages[2].output_tokens == 0
    assert usages[3].output_tokens > 0
    assert usages[3].context_tokens == usages[3].input_tokens + usages[3].output_tokens
    last = usages[-1]
    assert last.turn_cost_usd == pytest.approx(done.cost_usd) and last.turn_cost_usd > 0
    assert last.context_window == 1_000_000
    kept = session(stubs, "us").usage
    assert kept == last
    assert session(stubs, "us").context_tokens == last.context_tokens


def test_mcp_health_reconnect_and_toggle_governed_by_mode(e2e: E2E) -> None:
    extra = json.dumps({"command": FAKE_MCP[0], "args": FAKE_MCP[1:]})
    broken = json.dumps({"command": "/nonexistent/mcp-server"})
    stubs = e2e.start({"mcp": {"servers": {"extra": extra, "broken": broken}}})
    stubs.sessions.CreateSession(pb.CreateSessionRequest(session_id="mc"))
    assert (
        code_of(lambda: stubs.sessions.GetMcpStatus(pb.GetMcpStatusRequest(session_id="nobody")))
        == grpc.StatusCode.NOT_FOUND
    )
    send(stubs, "mc", "hello")

    def status() -> dict[str, pb.McpServerStatus]:
        got = stubs.sessions.GetMcpStatus(pb.GetMcpStatusRequest(session_id="mc")).servers
        return {s.name: s for s in got}

    wait_for("the servers up", lambda: status()["extra"].status == "connected")
    now = status()
    assert now["extra"].tools_count == 1 and now["extra"].configured
    assert now["broken"].status == "failed" and "ENOENT" in now["broken"].error

    off = stubs.sessions.SetMcpServerEnabled(
        pb.SetMcpServerEnabledRequest(session_id="mc", name="extra", enabled=False)
    ).server
    assert off.status == "disabled" and status()["extra"].status == "disabled"
    on = stubs.sessions.SetMcpServerEnabled(
        pb.SetMcpServerEnabledRequest(session_id="mc", name="extra", enabled=True)
    ).server
    assert on.status == "connected"
    again = stubs.sessions.ReconnectMcpServer(
        pb.ReconnectMcpServerRequest(session_id="mc", name="extra")
    ).server
    assert again.status == "connected"
    assert (
        code_of(
            lambda: stubs.sessions.ReconnectMcpServer(
                pb.ReconnectMcpServerRequest(session_id="mc", name="nosuch")
            )
        )
        == grpc.StatusCode.PERMISSION_DENIED  # user mode: not one the daemon configured
    )
    assert (
        code_of(
            lambda: stubs.sessions.SetMcpServerEnabled(
                pb.SetMcpServerEnabledRequest(session_id="mc", name="stray", enabled=True)
            )
        )
        == grpc.StatusCode.PERMISSION_DENIED
    )
    assert (
        code_of(
            lambda: stubs.sessions.SetMcpServerEnabled(
                pb.SetMcpServerEnabledRequest(session_id="mc", name="stray", enabled=False)
            )
        )
        == grpc.StatusCode.NOT_FOUND  # disabling is allowed; the agent has no such server
    )


def test_atomizerctl_aside_rename_and_mcp(e2e: E2E) -> None:
    extra = json.dumps({"command": FAKE_MCP[0], "args": FAKE_MCP[1:]})
    stubs = e2e.start({"mcp": {"servers": {"extra": extra}}})
    assert e2e.daemon is not None
    stubs.sessions.CreateSession(pb.CreateSessionRequest(session_id="cc"))
    send(stubs, "cc", "the load is 12 kN")
    done = ctl(e2e.daemon, "aside", "cc", "what load? [[reply:12 kN]]")
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "12 kN"
    done = ctl(e2e.daemon, "rename", "cc", "Load case")
    assert done.returncode == 0, done.stderr
    listing = ctl(e2e.daemon, "ls")
    assert "Load case" in listing.stdout, listing.stdout
    done = ctl(e2e.daemon, "mcp", "cc")
    assert done.returncode == 0, done.stderr
    assert "extra" in done.stdout and "connected" in done.stdout
    done = ctl(e2e.daemon, "mcp", "cc", "--disable", "extra")
    assert done.returncode == 0 and "disabled" in done.stdout, done.stdout + done.stderr
    bad = ctl(e2e.daemon, "aside", "nobody", "q")
    assert bad.returncode != 0
