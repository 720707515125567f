"""What DaemonService reports, as the servicer needs it: the figures (`StatusSnapshot`) and
where it gets them (`StatusSource`, implemented by the daemon's reporter, which gathers them
from the parts that know them)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

from atomizerd.model import WebhookStatus

if TYPE_CHECKING:
    from atomizerd.atomizer.sandbox import SandboxStatus
    from atomizerd.sessions.reaper import ReaperPass


@dataclass
class StatusSnapshot:
    version: str
    started_at: float
    uptime_seconds: float
    sessions_known: int
    live_processes: int
    busy_sessions: int
    queued_turns: int
    pool_capacity: int
    agent_command: str
    agent_version: str
    total_cost_usd: float
    last_reaper_pass: ReaperPass | None
    loop_lag_max_ms: float = 0.0
    spare_agents: int = 0
    spares_adopted: int = 0
    loop_lag_recent_max_ms: float = 0.0
    sandbox: SandboxStatus | None = None
    agents_adopted: int = 0
    turns_resumed: int = 0
    adoption_seconds: float = 0.0
    warnings: tuple[str, ...] = ()
    webhooks: tuple[WebhookStatus, ...] = ()
    failing_mcp_servers: int = 0


class StatusSource(Protocol):
    def snapshot(self) -> StatusSnapshot:
        """The figures as they are now."""
        ...
