"""What GetStatus reports, gathered from the parts that know it."""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

from atomizerd import __version__
from atomizerd.api.status import StatusSnapshot
from atomizerd.atomizer import components, sandbox
from atomizerd.daemon.loopprobe import LoopProbe
from atomizerd.model import WebhookStatus

if TYPE_CHECKING:
    from atomizerd.agents.pool import AgentPool
    from atomizerd.config import Config
    from atomizerd.daemon.adoption import Adopted
    from atomizerd.notify.notifier import Webhooks
    from atomizerd.sessions.reaper import Reaper
    from atomizerd.sessions.registry import Registry
    from atomizerd.store.db import Store


class StatusReporter:
    """GetStatus's figures, asked of their owners (the `StatusSource` the servicer reads)."""

    def __init__(
        self, config: Config, store: Store, registry: Registry, pool: AgentPool, reaper: Reaper
    ) -> None:
        self.config = config
        self.store = store
        self.registry = registry
        self.pool = pool
        self.reaper = reaper
        self.started_at = time.time()
        self._started_mono = time.monotonic()
        self.agent_version = "unknown"
        # The webhooks (set by the daemon once built).
        self.notifier: Webhooks | None = None
        # What start-up adopted from the previous daemon (daemon/adoption.py).
        self.adopted: Adopted | None = None
        # Started by the daemon (`run()` as a task); here because GetStatus reports it.
        self.loop_probe = LoopProbe(
            config.daemon.loop_probe_interval, config.daemon.loop_stall_log_ms
        )

    def snapshot(self) -> StatusSnapshot:
        counts = self.registry.counts()
        return StatusSnapshot(
            version=__version__,
            started_at=self.started_at,
            uptime_seconds=time.monotonic() - self._started_mono,
            sessions_known=self.store.count_sessions(),
            live_processes=self.pool.live_count,
            spare_agents=self.pool.spare_count,
            spares_adopted=self.pool.spares_adopted,
            busy_sessions=counts["busy"],
            queued_turns=counts["queued"],
            pool_capacity=self.config.pool.max_live,
            agent_command=" ".join(self.config.agent.command),
            agent_version=self.agent_version,
            total_cost_usd=self.store.total_cost(),
            last_reaper_pass=self.reaper.last_pass,
            loop_lag_max_ms=self.loop_probe.max_ms,
            loop_lag_recent_max_ms=self.loop_probe.recent_max_ms(),
            sandbox=sandbox.check(self.config),
            agents_adopted=len(self.adopted.sessions) if self.adopted else 0,
            turns_resumed=len(self.adopted.turns) if self.adopted else 0,
            adoption_seconds=self.adopted.seconds if self.adopted else 0.0,
            warnings=tuple(components.warnings()),
            webhooks=self._webhooks(),
            failing_mcp_servers=self.pool.failing_mcp_servers,
        )

    def _webhooks(self) -> tuple[WebhookStatus, ...]:
        if self.notifier is None:
            return ()
        return tuple(self.notifier.status())
