"""DaemonService: the daemon's own status, and its planned restart."""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

import grpc
from atomizer.v1 import daemon_pb2 as pb
from atomizer.v1 import daemon_pb2_grpc

from atomizerd.api.convert import timestamp
from atomizerd.api.errormap import unary
from atomizerd.api.status import StatusSource


class DaemonServicer(daemon_pb2_grpc.DaemonServiceServicer):
    def __init__(self, status: StatusSource, restart: Callable[[], bool]) -> None:
        self.status = status
        # Begins a planned restart (after this answer is sent); whether agents are handed over.
        self.restart = restart

    @unary
    async def RestartDaemon(
        self, request: pb.RestartDaemonRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> pb.RestartDaemonResponse:
        s = self.status.snapshot()
        hand_over = self.restart()
        return pb.RestartDaemonResponse(
            pid=os.getpid(),
            hand_over=hand_over,
            live_processes=s.live_processes,
            busy_sessions=s.busy_sessions,
        )

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
            agents_adopted=s.agents_adopted,
            turns_resumed=s.turns_resumed,
            adoption_seconds=s.adoption_seconds,
            failing_mcp_servers=s.failing_mcp_servers,
        )
        if s.sandbox is not None:
            resp.sandbox_enabled = s.sandbox.enabled
            resp.sandbox_available = s.sandbox.available
            resp.sandbox_detail = s.sandbox.detail
        resp.warnings.extend(s.warnings)
        for w in s.webhooks:
            hook = resp.webhooks.add(
                name=w.name,
                url=w.url,
                queued=w.queued,
                delivered=w.delivered,
                failed=w.failed,
                dropped=w.dropped,
                failing=w.failing,
                last_error=w.last_error,
            )
            if w.failing_since:
                hook.failing_since.CopyFrom(timestamp(w.failing_since))
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
