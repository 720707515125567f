"""The gRPC server's own limits (atomizerd/daemon/server.py `_build_server`).

The receive limit is twice `daemon.max_message_bytes` and at least 32 MiB: a message over
`daemon.max_message_bytes` but under the receive limit reaches the daemon, which explains its
own limit; beyond the receive limit gRPC refuses the message itself (RESOURCE_EXHAUSTED)
before any daemon code runs, and the daemon keeps serving.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import grpc
import pytest
from atomizer.v1 import daemon_pb2
from atomizer.v1 import session_pb2 as pb

from tests.conftest import Stubs, stubs_for
from tests.support.daemon import RunningDaemon

MIB = 1024 * 1024


def send(stubs: Stubs, text: str) -> list[pb.SessionEvent]:
    request = pb.SendMessageRequest(session_id="big", text=text)
    return [r.event for r in stubs.sessions.SendMessage(request, timeout=60)]


def refusal(stubs: Stubs, size: int) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as err:
        send(stubs, "x" * size)
    return err.value


def assert_serving(stubs: Stubs) -> None:
    stubs.daemon.GetStatus(daemon_pb2.GetStatusRequest(), timeout=5)
    assert send(stubs, "still here")[-1].turn_completed.text == "echo: still here"


def refused_by_the_daemon(d: RunningDaemon) -> list[str]:
    return [
        r["reason"]
        for r in d.log_records()
        if r.get("event") == "request refused" and r.get("rpc") == "SendMessage"
    ]


@pytest.mark.parametrize(
    ("max_message_mib", "receive_limit_mib"),
    [(None, 32), (20, 42)],
    ids=["default limit", "derived from daemon.max_message_bytes"],
)
def test_a_message_beyond_the_receive_limit_is_refused_by_grpc_itself(
    short_tmp: Path, max_message_mib: int | None, receive_limit_mib: int
) -> None:
    # Twice the text and the attachments a message may carry (here 1 MiB of attachments).
    config: dict[str, dict[str, Any]] = {
        "agent": {"prewarm": False},
        "attachments": {"max_message_bytes": MIB},
    }
    if max_message_mib is not None:
        config["daemon"] = {"max_message_bytes": max_message_mib * MIB}
    with RunningDaemon(short_tmp, config) as d:
        stubs = stubs_for(d.channel())
        stubs.sessions.CreateSession(pb.CreateSessionRequest(session_id="big"))

        # Just under the receive limit: the daemon's own check, which names its setting.
        under = refusal(stubs, receive_limit_mib * MIB - 1024)
        assert under.code() == grpc.StatusCode.INVALID_ARGUMENT, under.details()
        assert "(daemon.max_message_bytes)" in (under.details() or "")
        assert len(refused_by_the_daemon(d)) == 1

        over = refusal(stubs, receive_limit_mib * MIB + 1024)
        assert over.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, over.details()
        assert f"vs. {receive_limit_mib * MIB}" in (over.details() or "")
        assert "larger than max" in (over.details() or "")
        assert len(refused_by_the_daemon(d)) == 1  # the daemon never saw it
        assert_serving(stubs)


def test_more_concurrent_streams_than_the_http2_default_are_served(short_tmp: Path) -> None:
    """max_concurrent_streams is 1000: 150 watchers on one connection all get their replay
    (many HTTP/2 peers default to 100 streams per connection)."""
    with RunningDaemon(short_tmp, {"agent": {"prewarm": False}}) as d:
        stubs = stubs_for(d.channel())
        stubs.sessions.CreateSession(pb.CreateSessionRequest(session_id="big"))
        send(stubs, "hello")
        watches = [
            stubs.sessions.WatchSession(pb.WatchSessionRequest(session_id="big"), timeout=30)
            for _ in range(150)
        ]
        try:
            firsts = [next(w).event for w in watches]
            assert {e.WhichOneof("kind") for e in firsts} == {"turn_started"}
        finally:
            for w in watches:
                w.cancel()
        assert_serving(stubs)
