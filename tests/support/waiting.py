"""Bounded waiting for tests: poll a condition, fail with what was awaited."""

from __future__ import annotations

import time
from collections.abc import Callable

from atomizerd.agents.procgroup import read_stat


def wait_for(what: str, predicate: Callable[[], bool], timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:g} s waiting for {what}")
        time.sleep(0.02)


def alive(pid: int) -> bool:
    """The process exists and is not a zombie."""
    stat = read_stat(pid)
    return stat is not None and stat.state not in ("Z", "X")
