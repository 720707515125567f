"""How full a session's context is, with the real CLI: Session.context_tokens and
context_window after every turn, and a notice when the CLI compacts the conversation."""

from __future__ import annotations

import pytest
from atomizer.v1 import session_pb2 as pb

from tests.conftest import Stubs
from tests.e2e.conftest import E2E
from tests.support.turns import kinds, send

pytestmark = pytest.mark.e2e


def session(stubs: Stubs, sid: str) -> pb.Session:
    return stubs.sessions.GetSession(pb.GetSessionRequest(session_id=sid)).session


def test_context_usage_follows_every_turn_and_a_compaction(e2e: E2E) -> None:
    stubs = e2e.start()
    fresh = stubs.sessions.CreateSession(pb.CreateSessionRequest(session_id="c")).session
    assert (fresh.context_tokens, fresh.context_window) == (0, 0)

    send(stubs, "c", "hello [[usage:5000:100]]")
    first = session(stubs, "c")
    # The last model call's input and output, as the fake reported them; the CLI's window.
    assert first.context_tokens == 5100
    assert first.context_window == 1_000_000

    assert e2e.daemon is not None
    notes = e2e.daemon.root / "notes.txt"
    notes.write_text("beam")
    send(stubs, "c", f'read [[usage:7000:40]] [[tool:Read {{"file_path": "{notes}"}}]]')
    second = session(stubs, "c")
    # Two model calls: the context is the last one's (its input holds the whole conversation).
    last = e2e.api.requests[-1]
    assert second.context_tokens > first.context_tokens
    assert second.context_tokens != 7040  # not the first call's
    assert last.tool_results  # the follow-up call, whose usage counts

    events = send(stubs, "c", "/compact")
    assert kinds(events)[-1] == "turn_completed"
    (notice,) = (
        e.notice
        for e in events
        if e.WhichOneof("kind") == "notice" and e.notice.kind == pb.NOTICE_KIND_CONTEXT_COMPACTED
    )
    assert notice.tokens_before == second.context_tokens
    assert 0 < notice.tokens_after < notice.tokens_before
    assert f"{notice.tokens_before} tokens before, {notice.tokens_after} after" in notice.message
    compacted = session(stubs, "c")
    assert compacted.context_tokens == notice.tokens_after
    assert compacted.context_window == 1_000_000

    e2e.stop()  # stored: a new daemon reports the same
    stubs = e2e.start()
    again = session(stubs, "c")
    assert (again.context_tokens, again.context_window) == (notice.tokens_after, 1_000_000)
