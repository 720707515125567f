"""A turn whose agent its shim stopped at `agent.orphan_timeout` (no daemon came back in time)
is stored by the next daemon from the record the shim left: the stored reply is what streamed,
not the last checkpoint."""

from __future__ import annotations

import time
from pathlib import Path

import grpc
from atomizer.v1 import session_pb2 as pb

from tests.conftest import stubs_for
from tests.support.daemon import RunningDaemon

WORDS = " ".join(f"w{i:02d}" for i in range(80))
CONFIG = {
    "agent": {"orphan_timeout": 1.0, "checkpoint_interval": 3600.0, "checkpoint_bytes": 1 << 30}
}


def test_an_orphaned_turn_is_stored_as_it_streamed(short_tmp: Path) -> None:
    d = RunningDaemon(short_tmp, CONFIG).start()
    stubs = stubs_for(d.channel())
    stubs.sessions.CreateSession(pb.CreateSessionRequest(session_id="o"))
    stream = stubs.sessions.SendMessage(
        pb.SendMessageRequest(session_id="o", text=f"[[slow:30]] {WORDS}"), timeout=60
    )
    seen = ""
    deltas = 0
    try:
        for response in stream:
            if response.event.HasField("text_delta"):
                seen += response.event.text_delta.text
                deltas += 1
                if deltas == 8:
                    d.kill()  # no checkpoint was stored: the record is all there is
    except grpc.RpcError as e:
        assert e.code() == grpc.StatusCode.UNAVAILABLE
    assert deltas >= 8
    sockets = d.runtime_dir / "agents"
    deadline = time.monotonic() + 30
    while any(sockets.glob("*.sock")):  # the shim stops its agent and exits
        assert time.monotonic() < deadline, "the orphaned shim did not exit"
        time.sleep(0.05)
    with RunningDaemon(short_tmp, CONFIG) as again:
        history = (
            stubs_for(again.channel())
            .sessions.GetHistory(pb.GetHistoryRequest(session_id="o"))
            .messages
        )
        reply = history[-1]
        assert reply.status == pb.MESSAGE_STATUS_INTERRUPTED
        # Everything a client saw, and what the daemon emitted after it (never more than the
        # agent said).
        assert reply.content.startswith(seen) and seen
        assert f"echo: {WORDS}".startswith(reply.content)
        assert not list((again.state_dir / "agent-spool").glob("*")), "the record was removed"
