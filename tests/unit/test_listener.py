"""The API socket's name across a restart in place (daemon/listener.py), and the request a log
line belongs to (api/errormap.py)."""

from __future__ import annotations

import os
import socket
from pathlib import Path

import pytest

from atomizerd.api import errormap
from atomizerd.daemon import listener


def test_a_held_socket_takes_the_name_and_is_passed_on(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "d.sock"
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    private = listener.private_name(path, "grpc")
    server.bind(str(private))
    server.listen()
    listener.publish(private, path)
    assert not private.exists()
    held = listener.hold(path, 0o600)
    try:
        # A client now reaches the holding socket, not the server's.
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as client:
            client.connect(str(path))
            conn, _ = held.accept()
            conn.close()
        assert oct(path.stat().st_mode & 0o777) == oct(0o600)
        monkeypatch.delenv(listener.ENV, raising=False)
        listener.pass_on(held)
        assert os.get_inheritable(held.fileno())
        got = listener.inherited()
        assert got is not None and got.fileno() == held.fileno()
        assert not os.get_inheritable(held.fileno())
        assert listener.ENV not in os.environ
    finally:
        held.close()
        server.close()


def test_an_inherited_descriptor_that_is_no_listening_socket_is_ignored(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    a, b = socket.socketpair()
    try:
        monkeypatch.setenv(listener.ENV, str(a.detach()))
        assert listener.inherited() is None
        monkeypatch.setenv(listener.ENV, "not a number")
        assert listener.inherited() is None
    finally:
        b.close()


def test_log_lines_name_the_request_unless_they_say_otherwise() -> None:
    assert errormap.merge_request(None, "info", {"event": "x"}) == {"event": "x"}
    token = errormap._REQUEST.set(("s1", "GetSession"))
    try:
        line = errormap.merge_request(None, "info", {"event": "x"})
        assert line == {"event": "x", "session_id": "s1", "rpc": "GetSession"}
        own = errormap.merge_request(None, "info", {"event": "x", "rpc": "Other"})
        assert own["rpc"] == "Other" and own["session_id"] == "s1"
    finally:
        errormap._REQUEST.reset(token)
