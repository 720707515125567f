"""The daemon's lifecycle, top to bottom: startup, main loop, shutdown.

Startup: private dirs → single-instance lock (runtime dir: the socket) → the database locked
for this daemon alone, then opened → agents a previous daemon left under their shims adopted
(daemon/adoption.py), with their running turns → the rest reconciled → socket bound (on a
private name, renamed over the socket's: daemon/listener.py) → metrics endpoint (when
`metrics.listen` is set) → health SERVING → sd_notify READY=1.

SIGTERM/SIGINT (a stop): STOPPING=1, health NOT_SERVING, running turns interrupted and stored,
streams ended, `stop(grace)`, agents stopped, webhook deliveries stopped (what is pending stays
stored for the next start), metrics endpoint closed, store closed, socket
removed. A second signal skips the grace periods. Each step has a bound (`_step`): one that
fails or overruns it is logged and the shutdown goes on, so the daemon always exits or execs.

SIGUSR2 (a planned restart, docs/restart.md): the same, except that a holding socket takes
the socket's name first (clients wait in it, kept across the exec), and running turns and idle
agents are handed over instead of stopped (agents under shims outlive the daemon); then the
daemon starts again in place (exec; under systemd it exits with RESTART_EXIT_STATUS and the
unit restarts it), and the new one adopts them.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import functools
import gc
import os
import signal
import socket
import stat
from collections.abc import Awaitable
from pathlib import Path

import grpc
import structlog
from atomizer.v1 import daemon_pb2, daemon_pb2_grpc, session_pb2, session_pb2_grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from atomizerd.agents.argv import build_env
from atomizerd.agents.pool import AgentPool
from atomizerd.agents.process import probe_version
from atomizerd.agents.procgroup import kill_group_if_same
from atomizerd.agents.shim_client import reap_if_ours
from atomizerd.agents.transport import process_spawner, shim_spawner
from atomizerd.agents.vocabulary import AgentError
from atomizerd.api.daemon import DaemonServicer
from atomizerd.api.session import SessionServicer
from atomizerd.atomizer import components
from atomizerd.atomizer.launcher import Launcher
from atomizerd.atomizer.prompt import ContextBuilder
from atomizerd.atomizer.studies import Studies
from atomizerd.config import Config, socket_mode
from atomizerd.daemon import listener, logs, unitjob
from atomizerd.daemon.adoption import Adopted, adopt_agents, shim_settings
from atomizerd.daemon.backlog import relay_backlog
from atomizerd.daemon.dbwatch import DatabaseWatch
from atomizerd.daemon.metrics import MetricsEndpoint, MetricsError, start_endpoint
from atomizerd.daemon.report import StatusReporter
from atomizerd.daemon.sdnotify import Notifier
from atomizerd.daemon.sockets import Claim, claim_socket_path
from atomizerd.errors import DatabaseUnavailable, StorageFull
from atomizerd.notify.notifier import Webhooks
from atomizerd.sessions.reaper import Reaper
from atomizerd.sessions.registry import HAND_OVER_SETTLE, KILL_SETTLE, Registry, spare_record
from atomizerd.store.db import Store
from atomizerd.store.lock import DatabaseInUse
from atomizerd.telemetry import Relay

log = structlog.get_logger("atomizerd.daemon.server")

# The exit status of a planned restart under systemd (the unit's RestartForceExitStatus=).
RESTART_EXIT_STATUS = 75
# Added to each shutdown step's own bound (its grace periods), for what it does around them.
STEP_SLACK = 5.0
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING

SERVICE_NAMES = (
    session_pb2.DESCRIPTOR.services_by_name["SessionService"].full_name,
    daemon_pb2.DESCRIPTOR.services_by_name["DaemonService"].full_name,
)


async def _step(what: str, step: Awaitable[object], bound: float) -> None:
    """One step of the shutdown, at most `bound` seconds: one that fails or takes longer is
    logged and left behind (cancelled), and the shutdown goes on."""
    task = asyncio.ensure_future(step)
    done, _ = await asyncio.wait({task}, timeout=bound)
    if not done:
        task.cancel()
        log.error("a shutdown step did not finish in time; going on", step=what, seconds=bound)
    elif not task.cancelled() and (error := task.exception()) is not None:
        log.error("a shutdown step failed; going on", step=what, error=repr(error))


def under_systemd() -> bool:
    return bool(os.environ.get("INVOCATION_ID"))


class StartupError(RuntimeError):
    """A reason the daemon cannot start, worded for the operator."""


class Daemon:
    def __init__(self, config: Config, waiting: socket.socket | None = None) -> None:
        self.config = config
        self.notifier = Notifier()
        self.should_exit = asyncio.Event()
        self.force_exit = False
        self.restart = False  # a planned restart: agents handed over, not stopped
        self._asking_systemd = False
        self.adopted = Adopted()
        self._lock_fd: int | None = None
        # The socket clients wait in while this daemon restarts in place (daemon/listener.py):
        # the one a previous daemon passed on, and the one this daemon passes on.
        self._inherited = waiting
        self.held: socket.socket | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self._pinger: asyncio.Task[None] | None = None  # WATCHDOG=1 pings
        self.server: grpc.aio.Server | None = None
        self.store: Store | None = None
        self.pool: AgentPool | None = None
        self.registry: Registry | None = None
        self.webhooks: Webhooks | None = None
        self.metrics: MetricsEndpoint | None = None
        # What the parts report (telemetry hooks), relayed to the metrics once they are served.
        self.telemetry = Relay()
        self.db_watch: DatabaseWatch | None = None
        self.health = health.aio.HealthServicer()  # type: ignore[attr-defined]

    async def serve(self) -> None:
        asyncio.get_running_loop().set_exception_handler(logs.loop_exception)
        self._install_signal_handlers()
        try:
            await self.startup()
            await self.should_exit.wait()
        finally:
            await self.shutdown()

    # --- startup ---------------------------------------------------------------------------

    async def startup(self) -> None:
        cfg = self.config
        os.umask(0o077)
        self._prepare_runtime_dir()
        self._take_lock()
        self._clear_stale_socket()
        try:
            # Exclusive (among this host's daemons): the crash recovery below takes every row
            # of this host for this daemon's own.
            self.store = Store(cfg.daemon.database, exclusive=True, host_id=cfg.daemon.host_id)
        except (DatabaseInUse, StorageFull, DatabaseUnavailable) as e:
            raise StartupError(str(e)) from None
        studies = Studies(cfg)
        try:
            own = components.resolve(cfg, create=True)
        except components.ComponentError as e:
            raise StartupError(str(e)) from None
        for warning in components.warnings():
            log.warning("atomizerd: warning", detail=warning)
        launcher = Launcher(
            cfg, studies, ContextBuilder(), remembered_rules=self.store.patterns, components=own
        )
        if cfg.agent.survive_restart:
            spawner = shim_spawner(shim_settings(cfg))
        else:
            spawner = process_spawner(
                max_line_bytes=cfg.agent.max_line_bytes,
                stderr_tail_bytes=cfg.agent.stderr_tail_bytes,
                write_timeout=cfg.agent.write_timeout,
            )
        self.pool = AgentPool(
            cfg,
            self.store,
            launcher,
            spawner,
            spare_record=functools.partial(spare_record, cfg),
            telemetry=self.telemetry,
        )
        self.registry = Registry(
            cfg, self.store, self.pool, studies, launcher.context_text, self.telemetry
        )
        # Before adoption: the events of turns taken over from the previous daemon are told
        # too, and what it left to deliver is queued first.
        self.webhooks = Webhooks(cfg, self.store, self.telemetry)
        self.registry.notices.point_at(self.webhooks)
        self.webhooks.start()
        self.adopted = await adopt_agents(cfg, self.store, self.pool, self.registry)
        try:
            self._reconcile(studies)
        except (StorageFull, DatabaseUnavailable) as e:
            raise StartupError(f"cannot recover the previous run's state: {e}") from None
        reaper = Reaper(cfg, self.store, self.registry, self.pool, self.telemetry)
        status = StatusReporter(cfg, self.store, self.registry, self.pool, reaper)
        status.adopted = self.adopted
        status.notifier = self.webhooks
        self.server = self._build_server(
            SessionServicer(self.registry), DaemonServicer(status, self._restart_soon)
        )
        await self._serve_socket()
        try:
            self.metrics = await start_endpoint(cfg, self.telemetry, status)
        except MetricsError as e:
            raise StartupError(str(e)) from None
        await self._set_health(health_pb2.HealthCheckResponse.SERVING)
        self.notifier.notify("READY=1")
        log.info(
            "atomizerd ready",
            socket=str(cfg.socket_path),
            pid=os.getpid(),
            host_id=cfg.daemon.host_id,
        )
        self.pool.replenish_spares()
        # What start-up built lives as long as the daemon: out of the collector's way, so a
        # full collection later does not walk it (a pause on the loop otherwise).
        gc.freeze()
        if self.store.outages is not None:
            self.db_watch = DatabaseWatch(self.store.outages, self._serving)
            self._tasks.append(asyncio.create_task(self.db_watch.run()))
        self._tasks.append(asyncio.create_task(status.loop_probe.run()))
        self._tasks.append(asyncio.create_task(reaper.run_forever()))
        self._tasks.append(asyncio.create_task(self._probe_agent(status)))
        if cfg.daemon.watchdog and self.notifier.watchdog_interval:
            self._pinger = asyncio.create_task(self._watchdog(self.notifier.watchdog_interval))
            self._tasks.append(self._pinger)

    async def _serve_socket(self) -> None:
        """The server bound on a private name, then renamed over the socket's (never a moment
        without a listener under it); what waited for this daemon in its predecessor's holding
        socket is relayed to it."""
        assert self.server is not None
        path = self.config.socket_path
        private = listener.private_name(path, "grpc")
        with contextlib.suppress(FileNotFoundError):
            private.unlink()
        self.server.add_insecure_port(f"unix:{private}")
        await self.server.start()
        os.chmod(private, socket_mode(self.config))
        listener.publish(private, path)
        if self._inherited is not None:
            self._tasks.append(asyncio.create_task(relay_backlog(self._inherited, path)))
            self._inherited = None

    def _prepare_runtime_dir(self) -> None:
        for path in (self.config.runtime_dir, self.config.state_dir):
            path.mkdir(mode=0o700, parents=True, exist_ok=True)
        st = self.config.runtime_dir.stat()
        if st.st_mode & stat.S_IWOTH:
            raise StartupError(
                f"runtime dir {self.config.runtime_dir} is writable by other users; "
                "fix its permissions (e.g. chmod 0700) or choose another daemon.runtime_dir"
            )
        if st.st_uid != os.geteuid():
            raise StartupError(f"runtime dir {self.config.runtime_dir} belongs to another user")

    def _take_lock(self) -> None:
        path = self.config.runtime_dir / "atomizerd.lock"
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise StartupError(
                f"another atomizerd is already running with runtime dir "
                f"{self.config.runtime_dir} (socket {self.config.socket_path}); stop it first"
            ) from None
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        self._lock_fd = fd

    def _clear_stale_socket(self) -> None:
        """Replaces a dead daemon's socket; refuses to steal a live one."""
        path = self.config.socket_path
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        if self._inherited is not None and path.exists():
            return  # the holding socket under it is this process's own
        claim = claim_socket_path(path)
        if claim is Claim.NOT_A_SOCKET:
            raise StartupError(
                f"{path} exists and is not a socket; remove it or choose another daemon.socket"
            )
        if claim is Claim.IN_USE:
            raise StartupError(f"another process is serving on {path}; stop it first")
        if claim is Claim.REPLACED:
            log.info("removed stale socket", socket=str(path))

    def _reconcile(self, studies: Studies) -> None:
        """Crash recovery: agents a previous daemon of this host left running are killed, its
        unfinished turns settled. Everything here is this daemon's own to touch: the store
        reads only this host's agents and sessions (`daemon.host_id`; other hosts sharing the
        database keep theirs, running turns included), and this daemon holds the database
        exclusively among its host's daemons (`Store(exclusive=True)`), so each recorded agent
        and pending turn was left by an earlier daemon of this host that is gone, never by
        one still running (whatever its runtime dir)."""
        assert self.store is not None and self.registry is not None
        for rec in self.store.agent_processes():
            if rec.pgid in self.adopted.pgids:
                continue  # adopted: it goes on under this daemon
            if rec.pgid in self.adopted.ended:
                # Stopped by adoption, which also removed its shim's files: a SIGKILL now
                # would only cut short the shim's own exit.
                self.store.forget_agent_process(rec.pgid)
                continue
            if kill_group_if_same(rec.pgid, rec.start_time, signal.SIGKILL):
                log.warning(
                    "killed agent left by a previous daemon",
                    session_id=rec.session_id,
                    pgid=rec.pgid,
                )
            reap_if_ours(rec.pgid)  # a shim started by this process before it exec'd
            self.store.forget_agent_process(rec.pgid)
        self.registry.reconcile(
            keep=self.adopted.turns, replies=self.adopted.replies, sessions=self.adopted.sessions
        )
        # Per-session files are rewritten at every agent spawn: only adopted agents' are live.
        removed = studies.remove_stale_files(keep=self.adopted.sessions)
        if removed:
            log.info("removed stale runtime files", count=removed)

    def _build_server(self, sessions: SessionServicer, daemon: DaemonServicer) -> grpc.aio.Server:
        # Well above daemon.max_message_bytes, so an oversized text reaches the registry and
        # gets its INVALID_ARGUMENT with the limit spelled out; far beyond it gRPC refuses.
        # The same for attachments (attachments.max_message_bytes).
        most = self.config.daemon.max_message_bytes + self.config.attachments.max_message_bytes
        max_receive = max(32 * 1024 * 1024, 2 * most)
        server = grpc.aio.server(
            options=[
                ("grpc.max_receive_message_length", max_receive),
                ("grpc.max_concurrent_streams", 1000),
                ("grpc.keepalive_time_ms", 60_000),
                ("grpc.keepalive_timeout_ms", 20_000),
                ("grpc.http2.min_ping_interval_without_data_ms", 10_000),
                ("grpc.so_reuseport", 0),
            ]
        )
        session_pb2_grpc.add_SessionServiceServicer_to_server(sessions, server)
        daemon_pb2_grpc.add_DaemonServiceServicer_to_server(daemon, server)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, server)
        reflection.enable_server_reflection(
            (*SERVICE_NAMES, health.SERVICE_NAME, reflection.SERVICE_NAME), server
        )
        return server

    async def _set_health(
        self, status: health_pb2.HealthCheckResponse.ServingStatus.ValueType
    ) -> None:
        await self.health.set("", status)
        for name in SERVICE_NAMES:
            await self.health.set(name, status)

    async def _serving(self, serving: bool) -> None:
        """The database's availability (DatabaseWatch): NOT_SERVING while it cannot be
        written; SERVING again when it can, unless the daemon is stopping meanwhile."""
        if serving and self.should_exit.is_set():
            return
        await self._set_health(health_pb2.HealthCheckResponse.SERVING if serving else NOT_SERVING)

    async def _probe_agent(self, status: StatusReporter) -> None:
        try:
            status.agent_version = await probe_version(
                self.config.agent.command,
                env=build_env(os.environ, self.config.agent.env),
                timeout=self.config.agent.version_timeout,
            )
        except AgentError as e:
            status.agent_version = f"unavailable: {e}"
            log.error(
                "agent command does not work", command=self.config.agent.command, error=str(e)
            )
            return
        log.info("agent command", command=self.config.agent.command, version=status.agent_version)

    async def _watchdog(self, interval: float) -> None:
        while True:
            self.notifier.notify("WATCHDOG=1")
            await asyncio.sleep(interval)

    # --- signals ---------------------------------------------------------------------------

    def _install_signal_handlers(self) -> None:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self._on_signal, sig)
        loop.add_signal_handler(signal.SIGUSR2, self.request_restart)

    def request_restart(self) -> None:
        """A planned restart (SIGUSR2, `atomizerctl daemon restart`, `systemctl reload`)."""
        if self.should_exit.is_set():
            return
        log.info("planned restart requested")
        self.restart = True
        self.should_exit.set()

    def _restart_soon(self) -> bool:
        """RestartDaemon: the restart begins once the answer is on its way."""
        asyncio.get_running_loop().call_soon(self.request_restart)
        return self.config.agent.survive_restart

    def _on_signal(self, sig: int) -> None:
        if self.should_exit.is_set() or self._asking_systemd:
            # A second signal: no more grace. Killing the agents ends their turns at once
            # (still stored); the server then stops without waiting for streams.
            log.warning("second signal: stopping now", signal=signal.Signals(sig).name)
            self.force_exit = True
            self.restart = False  # a second signal always means: stop, now
            if self.pool is not None:
                self.pool.kill_all()
            self.should_exit.set()
            return
        if sig == signal.SIGTERM and self.config.agent.survive_restart and under_systemd():
            # `systemctl restart` and `systemctl stop` send the same SIGTERM: ask which it is.
            self._asking_systemd = True
            self._tasks.append(asyncio.ensure_future(self._stop_or_restart()))
            return
        self.should_exit.set()

    async def _stop_or_restart(self) -> None:
        try:
            restart = await unitjob.restart_pending()
            self.restart = restart and not self.force_exit
        finally:
            self.should_exit.set()

    # --- shutdown --------------------------------------------------------------------------

    async def shutdown(self) -> None:
        """Every step is bounded and runs whatever the one before it did (finished, failed or
        gave up): the daemon always gets to its end, and to the exec of a restart."""
        if self._pinger is not None:
            # systemd's stop timeout governs from here; a ping after STOPPING=1 would say
            # the service is running again.
            self._pinger.cancel()
        self.notifier.notify("STOPPING=1")
        log.info("atomizerd stopping", restart=self.restart)
        if self.restart and self.server is not None and not under_systemd():
            # Before the server stops: from here on new connections wait for the next daemon.
            try:
                self.held = listener.hold(self.config.socket_path, socket_mode(self.config))
            except OSError as e:
                log.error("cannot hold the socket across the restart", error=str(e))
        grace = 0.0 if self.force_exit else self.config.daemon.grace_period
        if self.server is not None:
            await _step("health", self._set_health(NOT_SERVING), STEP_SLACK)
        if self.registry is not None:
            if self.restart and self.config.agent.survive_restart:
                await _step("hand over", self.registry.hand_over(), HAND_OVER_SETTLE + STEP_SLACK)
                grace = min(grace, 1.0)  # streams have ended; clients re-attach to the next one
            else:
                await _step("drain", self.registry.drain(grace), grace + KILL_SETTLE + STEP_SLACK)
        if self.server is not None:
            grace = 0 if self.force_exit else grace
            await _step("server", self.server.stop(grace), grace + STEP_SLACK)
        for task in self._tasks:
            task.cancel()
        await _step("tasks", asyncio.gather(*self._tasks, return_exceptions=True), STEP_SLACK)
        if self.pool is not None:
            bound = self.pool.close_bound() + STEP_SLACK
            await _step("agents", self.pool.close(), bound)
        if self.webhooks is not None:
            # After the turns' ends: their notifications are stored for the next daemon.
            await _step("webhooks", self.webhooks.close(), STEP_SLACK)
        if self.metrics is not None:
            await _step("metrics", self.metrics.close(), STEP_SLACK)
        if self.store is not None:
            try:
                self.store.close()
            except Exception:
                log.exception("closing the store failed")
        self._remove_socket()
        if self._lock_fd is not None:
            os.close(self._lock_fd)
        log.info("atomizerd stopped")

    def _remove_socket(self) -> None:
        if self.held is not None and self.restart:
            return  # the next daemon serves under the name
        # A holding socket never served (a failed start) or held for a restart that a second
        # signal turned into a stop: what waited in it is refused, as at any stop.
        ours = self.server is not None or self._inherited is not None or self.held is not None
        for sock in (self._inherited, self.held):
            if sock is not None:
                sock.close()
        self._inherited = self.held = None
        if not ours:
            return  # never bound: whatever is there is not ours
        with contextlib.suppress(FileNotFoundError):
            Path(self.config.socket_path).unlink()
