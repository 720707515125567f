"""The daemon runs its event-loop lag probe: GetStatus reports the worst lag, a stall past
`daemon.loop_stall_log_ms` is logged, and the worst is logged again at shutdown."""

from __future__ import annotations

from pathlib import Path

from atomizer.v1 import daemon_pb2

from tests.conftest import stubs_for
from tests.support.daemon import RunningDaemon
from tests.support.waiting import wait_for


def test_get_status_reports_the_loop_lag_and_shutdown_logs_it(short_tmp: Path) -> None:
    # A threshold of 0: every wake-up of the probe is logged, so there is something to see.
    config = {"daemon": {"loop_probe_interval": 0.01, "loop_stall_log_ms": 0.0}}
    with RunningDaemon(short_tmp, config) as d:
        stubs = stubs_for(d.channel())
        wait_for(
            "the probe's first wake-ups",
            lambda: any(r.get("event") == "event loop stalled" for r in d.log_records()),
        )
        status = stubs.daemon.GetStatus(daemon_pb2.GetStatusRequest(), timeout=5)
        assert status.loop_lag_max_ms >= status.loop_lag_recent_max_ms >= 0.0
    [summary] = [r for r in d.log_records() if r.get("event") == "event loop lag"]
    # The log gives it to 0.01 ms: no worst lag reported before can be above it at that precision.
    assert summary["max_ms"] >= round(status.loop_lag_max_ms, 2)
    assert summary["ticks"] > 0 and summary["interval_ms"] == 10.0
