"""DaemonService: the daemon's own status."""

from __future__ import annotations

from typing import Any

import grpc
from atomizer.v1 import daemon_pb2 as pb
from atomizer.v1 import daemon_pb2_grpc

from atomizerd.api.convert import timestamp
from atomizerd.api.errormap import unary
from atomizerd.daemon.report import StatusReporter


class DaemonServicer(daemon_pb2_grpc.DaemonServiceServicer):
    def __init__(self, status: StatusReporter) -> None:
        self.status = status

    @unary
    async def GetStatus(
        self, request: pb.GetStatusRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> pb.GetStatusResponse:
        s = self.status.snapshot()
        resp = pb.GetStatusResponse(
            version=s.version,
            started_at=timestamp(s.started_at),
            uptime_seconds=s.uptime_seconds,
            sessions_known=s.sessions_known,
            live_processes=s.live_processes,
            spare_agents=s.spare_agents,
            spares_adopted=s.spares_adopted,
            busy_sessions=s.busy_sessions,
            queued_turns=s.queued_turns,
            pool_capacity=s.pool_capacity,
            agent_command=s.agent_command,
            agent_version=s.agent_version,
            total_cost_usd=s.total_cost_usd,
            loop_lag_max_ms=s.loop_lag_max_ms,
            loop_lag_recent_max_ms=s.loop_lag_recent_max_ms,
        )
        if s.sandbox is not None:
            resp.sandbox_enabled = s.sandbox.enabled
            resp.sandbox_available = s.sandbox.available
            resp.sandbox_detail = s.sandbox.detail
        if s.last_reaper_pass is not None:
            p = s.last_reaper_pass
            resp.last_reaper_pass.CopyFrom(
                pb.ReaperPass(
                    finished_at=timestamp(p.finished_at),
                    processes_stopped=p.processes_stopped,
                    sessions_purged=p.sessions_purged,
                    errors=p.errors,
                    duration_ms=p.duration_ms,
                )
            )
        return resp
