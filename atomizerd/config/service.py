"""The daemon's own sections: where it listens and keeps its state, its logs, its metrics."""

from __future__ import annotations

from dataclasses import dataclass

from atomizerd.config.fields import _doc


@dataclass
class DaemonConfig:
    socket: str = _doc(
        "Unix socket path. Empty: `<runtime_dir>/atomizerd.sock`. Clients look there first.",
        default="",
    )
    socket_mode: str = _doc(
        "Permissions of the socket file (octal). 0600 lets only the daemon's user connect; "
        "use 0660 with a shared group to let that group in.",
        default="0600",
    )
    runtime_dir: str = _doc(
        "Private directory (created 0700) for the socket, the lock and per-session files. "
        "Default: systemd's $RUNTIME_DIRECTORY, else $XDG_RUNTIME_DIR/atomizerd, else "
        "/tmp/atomizerd-<uid>. Empty means that default.",
        default="",
    )
    state_dir: str = _doc(
        "Directory for durable state (the SQLite database). Default: systemd's "
        "$STATE_DIRECTORY, else $XDG_STATE_HOME/atomizerd. Empty means that default.",
        default="",
    )
    database: str = _doc(
        "Database URL in peewee's form. Empty: `sqlite:///<state_dir>/atomizerd.db`. "
        "`postgresql://user@host/dbname` (or `postgresql://user@/dbname?host=/socket/dir`) "
        "needs the driver: `pip install 'atomizerd[postgresql]'` (psycopg 3). Several "
        "hosts' daemons may share one PostgreSQL database (docs/operations.md).",
        default="",
    )
    host_id: str = _doc(
        "This daemon's name among the daemons sharing one database: recorded on every "
        "session it creates; it serves only sessions of its own host_id (others are "
        "FAILED_PRECONDITION naming their host) and its start-up recovery touches only its "
        "host's turns and agents. Agents, the CLI's transcripts and credentials are local to "
        "a machine, hence one host_id per machine and daemon, stable across restarts. "
        "Empty: the machine's hostname.",
        default="",
    )
    grace_period: float = _doc(
        "On SIGTERM, how long running streams get to finish before they are cancelled.",
        default=5.0,
        check="positive",
    )
    max_message_bytes: int = _doc(
        "Largest user message accepted (UTF-8 bytes). Bigger is INVALID_ARGUMENT: a prompt "
        "that size is a mistake, and the gRPC receive limit is derived from it.",
        default=1024 * 1024,
        check="positive",
    )
    archived_send: str = _doc(
        "SendMessage to an archived session (ArchiveSession): `unarchive` takes it out of the "
        "archive and runs the turn; `refuse` is FAILED_PRECONDITION (UnarchiveSession first).",
        default="unarchive",
        check="one_of",
        choices=("unarchive", "refuse"),
    )
    max_sessions: int = _doc(
        "Open sessions at most; CreateSession beyond it is RESOURCE_EXHAUSTED. Closed "
        "sessions do not count.",
        default=10_000,
        check="positive",
    )
    event_buffer: int = _doc(
        "Most events kept per session for WatchSession replay, whatever their size. A long "
        "reply is many deltas; a re-attaching client replays from here.",
        default=4096,
        check="positive",
    )
    replay_bytes: int = _doc(
        "Bytes of events kept per session for clients that re-attach (WatchSession from a "
        "seq): the oldest go first, the newest event always stays. 4 MiB holds a long reply's "
        "deltas; a tool result of many MiB is dropped soon after it is delivered. A client "
        "further behind gets an EVENTS_MISSED notice and reads the rest with GetHistory.",
        default=4 * 1024 * 1024,
        check="positive",
    )
    follower_lag_bytes: int = _doc(
        "While a client is connected (SendMessage, WatchSession), events it has not read yet "
        "are kept up to this many bytes per session, so a slow reader of a long reply misses "
        "nothing; past it the client is told what it missed. 64 MiB: a multi-MiB reply "
        "streamed as tens of thousands of deltas.",
        default=64 * 1024 * 1024,
        check="positive",
    )
    replay_bytes_total: int = _doc(
        "Most bytes of events held for replay across all sessions, connected readers or not: "
        "the hard bound on the replay buffers' share of the daemon's memory, whatever the "
        "number of sessions and clients.",
        default=256 * 1024 * 1024,
        check="positive",
    )
    watchdog: bool = _doc(
        "Send WATCHDOG=1 to systemd when it asks (WATCHDOG_USEC is set).", default=True
    )
    loop_probe_interval: float = _doc(
        "How often the event-loop lag probe wakes up (seconds); 0 turns it off. Every stall "
        "of the loop longer than this is seen; GetStatus reports the worst lag.",
        default=0.05,
        check="non_negative",
    )
    loop_stall_log_ms: float = _doc(
        "An event-loop lag of at least this many milliseconds is logged as a warning "
        "(`event loop stalled`, with the lag): every stream and the watchdog wait meanwhile.",
        default=100.0,
        check="non_negative",
    )


@dataclass
class LoggingConfig:
    level: str = _doc(
        "Log level: debug, info, warning, error.",
        default="info",
        check="one_of",
        choices=("debug", "info", "warning", "error"),
    )
    format: str = _doc(
        "`auto` (console on a TTY, JSON lines otherwise, e.g. under journald), `json`, `console`.",
        default="auto",
        check="one_of",
        choices=("auto", "json", "console"),
    )


@dataclass
class MetricsConfig:
    listen: str = _doc(
        "Where Prometheus metrics are served, at `/metrics` over HTTP (docs/metrics.md lists "
        "them). Empty: no endpoint, the default, so that nothing listens that was not asked "
        "for. Either a loopback `host:port` (`127.0.0.1:9464`, `[::1]:9464`, "
        "`localhost:9464`; port 0 picks a free one, logged at start): the endpoint has no "
        "authentication and every local user can reach a port, so any other address is "
        "refused (put a proxy in front to scrape from elsewhere). Or a Unix socket path "
        "(anything with a `/`), created with `daemon.socket_mode`: only the daemon's user (or "
        "group) can read it.",
        default="",
    )
