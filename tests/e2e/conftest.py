"""End-to-end fixtures: the daemon driving the real pinned claude CLI against the fake
Messages API on loopback."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import Stubs, stubs_for
from tests.support.daemon import RunningDaemon, merge, real_claude
from tests.support.fake_messages_api import FakeMessagesAPI


@pytest.fixture
def api() -> Iterator[FakeMessagesAPI]:
    with FakeMessagesAPI() as fake:
        yield fake


def real_cli_config(
    workdir: Path, api: FakeMessagesAPI, extra: dict[str, Any] | None = None
) -> dict[str, Any]:
    home = workdir / "home"
    cfg: dict[str, Any] = {
        "agent": {
            "command": [real_claude()],
            "env": {**api.env(), "HOME": str(home), "CLAUDE_CONFIG_DIR": str(home / ".claude")},
            "first_event_timeout": 60.0,
            "stop_grace": 3.0,
            # A generated title is one more model call, which the tests that look at what the
            # fake received do not expect; tests/e2e/test_conversation_control.py turns it on.
            "titles": False,
        },
    }
    extra = {k: dict(v) for k, v in (extra or {}).items()}
    cfg["agent"]["env"].update(extra.get("agent", {}).pop("env", {}))
    merge(cfg, extra)
    return cfg


class E2E:
    def __init__(self, workdir: Path, api: FakeMessagesAPI) -> None:
        self.workdir = workdir
        self.api = api
        self.daemon: RunningDaemon | None = None

    def start(self, extra: dict[str, Any] | None = None) -> Stubs:
        self.daemon = RunningDaemon(self.workdir, real_cli_config(self.workdir, self.api, extra))
        self.daemon.start()
        return stubs_for(self.daemon.channel())

    def stop(self) -> None:
        if self.daemon is not None:
            self.daemon.stop()
            self.daemon = None


@pytest.fixture
def e2e(short_tmp: Path, api: FakeMessagesAPI) -> Iterator[E2E]:
    env = E2E(short_tmp, api)
    try:
        yield env
    finally:
        env.stop()
        log = short_tmp / "daemon.log"
        if log.exists():  # shown by pytest when the test failed
            print(log.read_text(errors="replace")[-6000:])
