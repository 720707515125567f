"""`atomizerd`: the command line, configuration, and the run of the daemon."""

from __future__ import annotations

import argparse
import asyncio
import os
import socket
import sys
from collections.abc import Coroutine
from typing import Any

import structlog

import atomizerd.config as config_mod
from atomizerd import __version__
from atomizerd.agents import procgroup
from atomizerd.daemon import listener, logs

EXIT_CONFIG = 2
EXIT_STARTUP = 1
# At shutdown: how long what is left on the loop (tasks, threads) gets to end.
LOOP_SETTLE = 5.0

log = structlog.get_logger("atomizerd.daemon.main")

# Flag shortcuts for the keys people set most often (everything else: --set key=value).
_SHORTCUTS = {
    "socket": "daemon.socket",
    "runtime_dir": "daemon.runtime_dir",
    "state_dir": "daemon.state_dir",
    "database": "daemon.database",
    "log_level": "logging.level",
}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="atomizerd",
        description="Runs persistent Claude Code sessions for Atomizer tools behind a gRPC API "
        "on a Unix socket.",
        epilog="Configuration keys: docs/configuration.md (or --print-config-docs).",
    )
    p.add_argument(
        "--config",
        metavar="FILE",
        default=os.environ.get("ATOMIZERD_CONFIG"),
        help="TOML configuration file (default: $ATOMIZERD_CONFIG)",
    )
    p.add_argument(
        "--set",
        metavar="KEY=VALUE",
        action="append",
        default=[],
        help="override one configuration key, e.g. --set pool.max_live=4",
    )
    p.add_argument("--socket", help="Unix socket path (daemon.socket)")
    p.add_argument("--runtime-dir", help="runtime directory (daemon.runtime_dir)")
    p.add_argument("--state-dir", help="state directory (daemon.state_dir)")
    p.add_argument("--database", help="database URL (daemon.database)")
    p.add_argument("--log-level", help="debug, info, warning or error (logging.level)")
    p.add_argument(
        "--check-config",
        action="store_true",
        help="validate the configuration, print the effective one, and exit",
    )
    p.add_argument(
        "--print-config-docs",
        action="store_true",
        help="print the configuration reference (Markdown) and exit",
    )
    p.add_argument(
        "--allow-root",
        action="store_true",
        help="run as root (refused otherwise: run the daemon as an ordinary user)",
    )
    p.add_argument("--version", action="version", version=f"atomizerd {__version__}")
    return p.parse_args(argv)


def overrides_from(args: argparse.Namespace) -> dict[str, str]:
    out: dict[str, str] = {}
    for item in args.set:
        key, sep, value = item.partition("=")
        if not sep:
            raise config_mod.ConfigError(f"--set {item!r}: expected KEY=VALUE")
        out[key.strip()] = value
    for attr, key in _SHORTCUTS.items():
        value = getattr(args, attr)
        if value is not None:
            out[key] = value
    return out


def main(argv: list[str] | None = None) -> int:
    # Before the configuration is read: its variable is no configuration variable.
    waiting = listener.inherited()
    args = parse_args(argv)
    if args.print_config_docs:
        sys.stdout.write(config_mod.render_docs())
        return 0
    try:
        cfg = config_mod.load(args.config, overrides=overrides_from(args))
    except config_mod.ConfigError as e:
        print(f"atomizerd: configuration error: {e}", file=sys.stderr)
        return EXIT_CONFIG
    # Agents are started through `setpriv --pdeathsig KILL` (they die with the daemon, or with
    # their shim):
    # resolved and tried once here, before any thread exists, so that a machine without it
    # fails now, clearly, and not at the first spawn.
    try:
        procgroup.check_setpriv()
    except procgroup.SetprivMissing as e:
        print(f"atomizerd: cannot start agents: {e}", file=sys.stderr)
        return EXIT_STARTUP
    if args.check_config:
        sys.stdout.write(config_mod.render_toml(cfg))
        from atomizerd.atomizer import sandbox

        status = sandbox.check(cfg)
        sys.stdout.write(f"\n# sandbox (user mode): {status.summary()}\n")
        if status.enabled and not status.available:
            print(f"atomizerd: warning: sandbox {status.summary()}", file=sys.stderr)
        return check_components(cfg)
    if os.geteuid() == 0 and not args.allow_root:
        print(
            "atomizerd: refusing to run as root; run it as an ordinary user (or pass --allow-root)",
            file=sys.stderr,
        )
        return EXIT_CONFIG
    logs.configure(cfg)
    return run(cfg, waiting)


def check_components(cfg: config_mod.Config) -> int:
    """--check-config: the daemon's own components as start-up would resolve them, and how
    the daemon runs."""
    from atomizerd.atomizer import components

    for warning in components.warnings():
        sys.stdout.write(f"# warning: {warning}\n")
        print(f"atomizerd: warning: {warning}", file=sys.stderr)
    try:
        found = components.resolve(cfg, create=False)
    except components.ComponentError as e:
        sys.stdout.write(f"# components: REFUSED: {e}\n")
        print(f"atomizerd: the daemon would not start: {e}", file=sys.stderr)
        return EXIT_CONFIG
    sys.stdout.write(f"# components: {components.describe(found)}\n")
    return 0


def run(cfg: config_mod.Config, waiting: socket.socket | None = None) -> int:
    if cfg.daemon.database.startswith("sqlite:"):
        _import_peewee_without_drivers()
    from atomizerd.daemon.server import RESTART_EXIT_STATUS, Daemon, StartupError, under_systemd

    daemon = Daemon(cfg, waiting)
    try:
        finished = run_loop(daemon.serve())
    except StartupError as e:
        print(f"atomizerd: cannot start: {e}", file=sys.stderr)
        return EXIT_STARTUP
    if daemon.restart:
        if under_systemd():
            # Under systemd: the unit starts the next daemon (RestartForceExitStatus=).
            return exit_now(RESTART_EXIT_STATUS, finished)
        restart_in_place(daemon.held)
    return exit_now(0, finished)


# The client libraries of other databases, which peewee imports at its own import when they are
# installed (the PostgreSQL one is most of the daemon's start-up then); a daemon on SQLite
# never uses them.
_OTHER_DRIVERS = ("psycopg", "psycopg2", "psycopg2cffi", "pymysql", "MySQLdb")


def _import_peewee_without_drivers() -> None:
    hidden = [name for name in _OTHER_DRIVERS if name not in sys.modules]
    for name in hidden:
        sys.modules[name] = None  # type: ignore[assignment]  # its import raises ImportError
    try:
        import peewee  # noqa: F401
    finally:
        for name in hidden:
            del sys.modules[name]


def run_loop(main: Coroutine[Any, Any, None]) -> bool:
    """Runs the daemon's loop; then what is still running on it is cancelled and given
    LOOP_SETTLE seconds, and the loop's threads as long. Returns False if something did not
    end in time: the daemon goes anyway (a stuck task must not keep it from exiting or
    restarting)."""
    loop = asyncio.new_event_loop()
    asyncio.set_event_loop(loop)
    loop.set_exception_handler(logs.loop_exception)
    try:
        loop.run_until_complete(main)
    finally:
        finished = _finish_loop(loop)
    return finished


def _finish_loop(loop: asyncio.AbstractEventLoop) -> bool:
    left = asyncio.all_tasks(loop)
    for task in left:
        task.cancel()
    pending: set[asyncio.Task[Any]] = set()
    if left:
        _, pending = loop.run_until_complete(asyncio.wait(left, timeout=LOOP_SETTLE))
        if pending:
            log.error("tasks did not end at shutdown", tasks=sorted(_name(t) for t in pending))
    try:
        loop.run_until_complete(asyncio.wait_for(loop.shutdown_asyncgens(), LOOP_SETTLE))
        loop.run_until_complete(asyncio.wait_for(loop.shutdown_default_executor(), LOOP_SETTLE))
    except TimeoutError:
        log.error("the loop's threads did not end at shutdown")
        return False
    if not pending:
        loop.close()
    return not pending


def _name(task: asyncio.Task[Any]) -> str:
    coro = task.get_coro()
    return getattr(coro, "__qualname__", None) or task.get_name()


def exit_now(status: int, finished: bool) -> int:
    """The exit status; when something of the daemon's was left running (logged), the
    process exits at once instead of waiting for it at interpreter shutdown."""
    if not finished:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(status)
    return status


def restart_in_place(held: socket.socket | None) -> None:
    """The next daemon replaces this one in the same process (same pid, same arguments):
    whoever started it keeps supervising it. Every descriptor of ours is close-on-exec but
    the socket clients wait in meanwhile (`held`)."""
    if held is not None:
        listener.pass_on(held)
    sys.stdout.flush()
    sys.stderr.flush()
    os.execv(sys.executable, [sys.executable, *sys.orig_argv[1:]])
