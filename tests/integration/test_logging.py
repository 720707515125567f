"""Logs: JSON lines off a TTY, the session id on every line a request causes, and never the
text of a message at info level."""

from __future__ import annotations

from pathlib import Path

from atomizer.v1 import session_pb2 as pb

from tests.conftest import stubs_for
from tests.support.daemon import RunningDaemon
from tests.support.turns import send


def test_request_lines_name_their_session_and_never_the_message_text(short_tmp: Path) -> None:
    secret = "my-confidential-design-notes-4711"
    with RunningDaemon(short_tmp, {"logging": {"level": "info"}}) as d:
        stubs = stubs_for(d.channel())
        made = stubs.sessions.CreateSession(pb.CreateSessionRequest()).session
        send(stubs, made.session_id, f"{secret} [[crash]]")  # a failure logs the most
        send(stubs, made.session_id, secret)
        records = d.log_records()
    assert records, d.log()
    assert all("event" in r and "level" in r and "timestamp" in r for r in records)
    assert not [r for r in records if secret in str(r)]
    per_request = [r for r in records if r.get("rpc") in ("CreateSession", "SendMessage")]
    assert per_request
    assert {r.get("session_id") for r in per_request} == {made.session_id}
