"""The retry policy the clients hand to gRPC: which calls it covers, and that gRPC takes it.

The client does not retry by itself (test_client_calls.py shows every call made once); the
read-only calls are retried by gRPC's channel, from the JSON service config built here. A
config gRPC refuses does not fail when the client is made: every call on that channel then
fails with INVALID_ARGUMENT, writes too, as if the daemon had refused them.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path
from typing import Any

import pytest
from atomizer.v1 import daemon_pb2, session_pb2
from atomizer_client import Client, InvalidArgumentError, RetryPolicy, UnavailableError
from atomizer_client.client import channel_options, service_config

SERVICES = (
    session_pb2.DESCRIPTOR.services_by_name["SessionService"],
    daemon_pb2.DESCRIPTOR.services_by_name["DaemonService"],
)
ALL_METHODS = {(s.full_name, m.name) for s in SERVICES for m in s.methods}
READ_ONLY = {
    ("atomizer.v1.SessionService", "GetSession"),
    ("atomizer.v1.SessionService", "ListSessions"),
    ("atomizer.v1.SessionService", "GetHistory"),
    ("atomizer.v1.SessionService", "ListAuditEvents"),
    ("atomizer.v1.DaemonService", "GetStatus"),
}
# gRPC's JSON form of google.protobuf.Duration: seconds, at most nine decimals, then "s".
DURATION = re.compile(r"\d+(\.\d{1,9})?s")


def method_config(retry: RetryPolicy | None) -> list[dict[str, Any]]:
    config: list[dict[str, Any]] = json.loads(service_config(retry))["methodConfig"]
    return config


def seconds(duration: str) -> float:
    assert DURATION.fullmatch(duration), f"{duration!r} is not a gRPC duration"
    return float(duration[:-1])


def test_the_read_only_calls_and_only_they_are_retried_on_unavailable() -> None:
    (config,) = method_config(RetryPolicy())
    named = {(n["service"], n["method"]) for n in config["name"]}
    assert named == READ_ONLY
    assert named <= ALL_METHODS  # a misspelt name would quietly never be retried
    assert config["retryPolicy"]["retryableStatusCodes"] == ["UNAVAILABLE"]


def test_without_a_policy_nothing_is_retried() -> None:
    assert method_config(None) == []


def test_the_channel_is_told_to_retry_and_to_take_any_message_size() -> None:
    options = dict(channel_options(RetryPolicy()))
    assert options["grpc.enable_retries"] == 1
    assert options["grpc.max_receive_message_length"] == -1
    assert json.loads(options["grpc.service_config"]) == json.loads(service_config(RetryPolicy()))


def test_the_policy_reaches_grpc_as_given() -> None:
    policy = RetryPolicy(
        max_attempts=3, initial_backoff=0.25, max_backoff=4, backoff_multiplier=1.5
    )
    (config,) = method_config(policy)
    got = config["retryPolicy"]
    assert got["maxAttempts"] == 3 and got["backoffMultiplier"] == 1.5
    assert (seconds(got["initialBackoff"]), seconds(got["maxBackoff"])) == (0.25, 4.0)


@pytest.mark.parametrize(
    ("backoff", "written"),
    [
        (0.1, 0.1),
        (2.0, 2.0),
        (86400.5, 86400.5),
        (1 / 3, 0.333),  # gRPC counts whole milliseconds
        (0.0996, 0.1),
        (1e-5, 0.001),  # and refuses 0 ms: less than 1 ms is 1 ms
        (1e-9, 0.001),
    ],
)
def test_backoffs_are_written_as_grpc_durations(backoff: float, written: float) -> None:
    (config,) = method_config(RetryPolicy(initial_backoff=backoff, max_backoff=backoff))
    for key in ("initialBackoff", "maxBackoff"):
        assert seconds(config["retryPolicy"][key]) == written


@pytest.mark.parametrize(
    "policy",
    [
        RetryPolicy(),
        RetryPolicy(initial_backoff=1 / 3),
        RetryPolicy(initial_backoff=1e-5, max_backoff=0.5),
        RetryPolicy(max_attempts=2, backoff_multiplier=1),
        RetryPolicy(initial_backoff=0.0009, max_backoff=RetryPolicy.MAX_BACKOFF),
        RetryPolicy(max_attempts=9),  # more than gRPC's 5: it caps them, and says so
    ],
    ids=repr,
)
def test_grpc_accepts_every_policy_that_can_be_made(tmp_path: Path, policy: RetryPolicy) -> None:
    # Nothing listens here: a channel gRPC accepted fails to connect, one it refused fails
    # before trying. CreateSession is not retried, so either way it fails at once.
    not_a_daemon = tmp_path / "not-a-daemon.sock"
    not_a_daemon.touch()
    with Client(not_a_daemon, retry=policy, timeout=5) as c, pytest.raises(Exception) as err:
        c.create_session()
    assert not isinstance(err.value, InvalidArgumentError), err.value
    assert isinstance(err.value, UnavailableError)


@pytest.mark.parametrize(
    ("fields", "named"),
    [
        ({"max_attempts": 1}, "max_attempts"),
        ({"max_attempts": 0}, "max_attempts"),
        ({"initial_backoff": 0}, "initial_backoff"),
        ({"initial_backoff": -1}, "initial_backoff"),
        ({"max_backoff": math.nan}, "max_backoff"),
        ({"max_backoff": math.inf}, "max_backoff"),
        ({"max_backoff": 1e12}, "max_backoff"),
        ({"backoff_multiplier": math.inf}, "backoff_multiplier"),
        ({"backoff_multiplier": 0}, "backoff_multiplier"),
    ],
)
def test_a_policy_grpc_would_refuse_cannot_be_made(fields: dict[str, Any], named: str) -> None:
    with pytest.raises(ValueError, match=named):
        RetryPolicy(**fields)
