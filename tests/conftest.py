"""Shared fixtures: a real daemon on a temporary socket, and stubs bound to it."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
from atomizer.v1 import daemon_pb2_grpc, session_pb2_grpc

from tests.support.daemon import RunningDaemon


@dataclass
class Stubs:
    sessions: session_pb2_grpc.SessionServiceStub
    daemon: daemon_pb2_grpc.DaemonServiceStub


def stubs_for(channel: grpc.Channel) -> Stubs:
    return Stubs(
        sessions=session_pb2_grpc.SessionServiceStub(channel),
        daemon=daemon_pb2_grpc.DaemonServiceStub(channel),
    )


@pytest.fixture
def short_tmp() -> Iterator[Path]:
    """A short temporary dir: Unix socket paths are limited to 107 bytes."""
    import tempfile

    with tempfile.TemporaryDirectory(prefix="azd-") as d:
        yield Path(d)


@pytest.fixture
def daemon(short_tmp: Path) -> Iterator[RunningDaemon]:
    with RunningDaemon(short_tmp) as d:
        yield d


@pytest.fixture
def stubs(daemon: RunningDaemon) -> Stubs:
    return stubs_for(daemon.channel())
