"""The daemon's configuration: every key, its default and why, in one place.

Sources, later ones winning: built-in defaults, the TOML file (``--config``),
``ATOMIZERD_<SECTION>_<KEY>`` environment variables, command-line flags (``--set key=value``
and a few shortcuts). Unknown keys and bad values are startup errors that name the key.
``docs/configuration.md`` is generated from the ``doc`` metadata below (``atomizerd
--print-config-docs``); a test keeps it fresh. Durations are in seconds.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import os
import socket
import tomllib
import typing
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ENV_PREFIX = "ATOMIZERD_"
# ATOMIZERD_* variables that are not configuration keys.
_ENV_NOT_KEYS = frozenset({ENV_PREFIX + "CONFIG", ENV_PREFIX + "SOCKET"})


class ConfigError(ValueError):
    """A configuration problem, worded for the person who wrote the config."""


def _doc(text: str, **kw: Any) -> Any:
    return field(metadata={"doc": text}, **kw)


def _default_runtime_dir() -> str:
    # systemd sets RUNTIME_DIRECTORY for RuntimeDirectory=; a user session has XDG_RUNTIME_DIR.
    if os.environ.get("RUNTIME_DIRECTORY"):
        return os.environ["RUNTIME_DIRECTORY"].split(":")[0]
    if os.environ.get("XDG_RUNTIME_DIR"):
        return str(Path(os.environ["XDG_RUNTIME_DIR"]) / "atomizerd")
    return f"/tmp/atomizerd-{os.getuid()}"


def _default_state_dir() -> str:
    if os.environ.get("STATE_DIRECTORY"):
        return os.environ["STATE_DIRECTORY"].split(":")[0]
    base = os.environ.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
    return str(Path(base) / "atomizerd")


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
    )
    max_message_bytes: int = _doc(
        "Largest user message accepted (UTF-8 bytes). Bigger is INVALID_ARGUMENT: a prompt "
        "that size is a mistake, and the gRPC receive limit is derived from it.",
        default=1024 * 1024,
    )
    max_sessions: int = _doc(
        "Open sessions at most; CreateSession beyond it is RESOURCE_EXHAUSTED. Closed "
        "sessions do not count.",
        default=10_000,
    )
    event_buffer: int = _doc(
        "Most events kept per session for WatchSession replay, whatever their size. A long "
        "reply is many deltas; a re-attaching client replays from here.",
        default=4096,
    )
    replay_bytes: int = _doc(
        "Bytes of events kept per session for clients that re-attach (WatchSession from a "
        "seq): the oldest go first, the newest event always stays. 4 MiB holds a long reply's "
        "deltas; a tool result of many MiB is dropped soon after it is delivered. A client "
        "further behind gets an EVENTS_MISSED notice and reads the rest with GetHistory.",
        default=4 * 1024 * 1024,
    )
    follower_lag_bytes: int = _doc(
        "While a client is connected (SendMessage, WatchSession), events it has not read yet "
        "are kept up to this many bytes per session, so a slow reader of a long reply misses "
        "nothing; past it the client is told what it missed. 64 MiB: a multi-MiB reply "
        "streamed as tens of thousands of deltas.",
        default=64 * 1024 * 1024,
    )
    replay_bytes_total: int = _doc(
        "Most bytes of events held for replay across all sessions, connected readers or not: "
        "the hard bound on the replay buffers' share of the daemon's memory, whatever the "
        "number of sessions and clients.",
        default=256 * 1024 * 1024,
    )
    watchdog: bool = _doc(
        "Send WATCHDOG=1 to systemd when it asks (WATCHDOG_USEC is set).", default=True
    )
    loop_probe_interval: float = _doc(
        "How often the event-loop lag probe wakes up (seconds); 0 turns it off. Every stall "
        "of the loop longer than this is seen; GetStatus reports the worst lag.",
        default=0.05,
    )
    loop_stall_log_ms: float = _doc(
        "An event-loop lag of at least this many milliseconds is logged as a warning "
        "(`event loop stalled`, with the lag): every stream and the watchdog wait meanwhile.",
        default=100.0,
    )


@dataclass
class AgentConfig:
    command: list[str] = _doc(
        "The agent command (argv prefix). `claude` found on PATH by default; tests point it at "
        "the pinned CLI or at a scripted fake agent.",
        default_factory=lambda: ["claude"],
    )
    args: list[str] = _doc(
        "Extra arguments appended to every agent command line.", default_factory=list
    )
    env: dict[str, str] = _doc(
        "Variables added to the agent's environment (which is otherwise an explicit "
        "allowlist, never the daemon's whole environment).",
        default_factory=dict,
    )
    model: str = _doc("Model name passed as --model; empty lets the CLI choose.", default="")
    models: list[str] = _doc(
        "The models clients may choose for a session (CreateSession / SetModel `model`), as "
        "the CLI names them (aliases such as `sonnet`, or full model ids). Empty: any name "
        "the CLI takes; a name outside a non-empty list is INVALID_ARGUMENT, so whoever runs "
        "the daemon decides what sessions may cost.",
        default_factory=list,
    )
    prewarm: bool = _doc(
        "Start the agent process when a session is created, so the first turn skips the "
        "~0.4 s CLI start-up.",
        default=True,
    )
    first_event_timeout: float = _doc(
        "A turn with no event from the agent for this long fails (FIRST_EVENT_TIMEOUT). "
        "Generous: the first turn after a spawn includes CLI start-up and the model's latency.",
        default=120.0,
    )
    stall_timeout: float = _doc(
        "A turn whose agent writes nothing for this long fails (STALL_TIMEOUT). API retries "
        "are output, so a slow-but-retrying API does not trip it.",
        default=600.0,
    )
    turn_timeout: float = _doc(
        "A turn running longer than this is stopped (TURN_TIMEOUT): long tool runs are normal "
        "in optimization studies, so this is a backstop, not a latency target.",
        default=3600.0,
    )
    task_timeout: float = _doc(
        "A task the agent runs on its own (a background or long Bash command, a subagent) "
        "that runs longer than this is stopped (the CLI's stop_task), with a notice to the "
        "session. A day: solver runs take hours, and an agent with a running task keeps its "
        "pool slot, so a forgotten task must not hold it forever.",
        default=86400.0,
    )
    task_output_bytes: int = _doc(
        "Bytes of a background command's output file streamed to clients as task_output per "
        "task and per second (the rest stays in the file, paged with GetTaskOutput). A solver "
        "can write megabytes a second; the stream is for following it, not a copy.",
        default=16384,
    )
    stop_grace: float = _doc(
        "When stopping an agent: seconds to wait after closing stdin, and again after "
        "SIGTERM, before SIGKILL.",
        default=3.0,
    )
    write_timeout: float = _doc(
        "How long a write to the agent's stdin (a user message, a control request or answer) "
        "may wait for the agent to take it; then the write fails (the agent is stuck and not "
        "reading). 10 s: the CLI reads its input continuously, so even a message of "
        "`daemon.max_message_bytes` is taken in milliseconds; without a bound a hung agent "
        "would hold the turn forever.",
        default=10.0,
    )
    max_line_bytes: int = _doc(
        "Longest stdout line read from the agent. Tool results can carry base64 images of "
        "many MiB; a longer line fails that turn, not the daemon.",
        default=64 * 1024 * 1024,
    )
    stderr_tail_bytes: int = _doc(
        "How much of the agent's stderr is kept (the newest bytes) for failure reports.",
        default=64 * 1024,
    )
    spawn_retries: int = _doc(
        "How many times an agent that dies before it received the turn's message (a crash at "
        "start-up, an exit during its handshake, a closed stdin at the first write) is started "
        "again before the turn fails. Safe because nothing was sent; each retry is a "
        "NOTICE_KIND_AGENT_RESTARTED notice. 2: a transient crash is absorbed, a CLI that "
        "always crashes fails the turn within seconds.",
        default=2,
    )
    spawn_retry_backoff: float = _doc(
        "Seconds before the first such restart; doubled for each later one, so a crashing CLI "
        "is not restarted in a tight loop.",
        default=0.5,
    )
    checkpoint_interval: float = _doc(
        "While a reply streams, what it has said so far is stored at most this often (and "
        "after every `checkpoint_bytes`), so a turn cut off by a crash or kill keeps its "
        "partial reply. Never a write per delta: 0.5 s bounds both the writes and what a kill "
        "can lose.",
        default=0.5,
    )
    checkpoint_bytes: int = _doc(
        "Reply text streamed since the last checkpoint that triggers the next one sooner.",
        default=64 * 1024,
    )
    history_seed_messages: int = _doc(
        "When a session's agent transcript is gone, a new conversation is seeded with this "
        "many of its last stored messages.",
        default=10,
    )
    version_timeout: float = _doc(
        "How long `<command> --version` may take at start-up (reported by GetStatus).",
        default=10.0,
    )
    umask: str = _doc(
        "File-mode mask (octal) of agent processes and the tools they run. 0027, as the "
        "system unit: what a study's scripts write is readable by the daemon's group and "
        "never by others. Not inherited from the daemon's own private 0077, which would make "
        "study results unreadable to the group that shares them.",
        default="0027",
    )
    survive_restart: bool = _doc(
        "Start every agent under a small shim of its own (docs/restart.md) that holds its "
        "pipes, so agents and their running turns outlive a restart or a crash of the daemon "
        "and the next daemon adopts them. Costs ~10 MiB and a few tens of ms at spawn per "
        "agent; off: agents are the daemon's children and die with it.",
        default=True,
    )
    orphan_timeout: float = _doc(
        "How long an agent's shim waits for a daemon to come back before it stops the agent "
        "(its turn is then recorded as interrupted by the next daemon). 10 minutes: long "
        "enough for an upgrade or a crash loop to settle, short enough that a daemon that is "
        "gone for good does not leave agents (~200 MiB each) behind for long.",
        default=600.0,
    )
    spool_bytes: int = _doc(
        "Most a shim keeps, on disk under `<state_dir>/agent-spool`, of a running turn's "
        "output and events for the next daemon. A turn that writes more before a restart "
        "cannot be adopted (it ends as interrupted, as without a shim); the agent is never "
        "slowed for it. 256 MiB: far above any realistic turn, a bound on the disk it takes.",
        default=256 * 1024 * 1024,
    )


@dataclass
class AtomizerConfig:
    root: str = _doc(
        "The Atomizer checkout. Every agent runs with it as working directory, which is how "
        "the CLI keys its transcripts, so a session can always be resumed. Empty: the "
        "daemon's working directory at start.",
        default="",
    )
    studies_root: str = _doc(
        "Where study folders live. Empty: `<root>/studies`. A study id is a plain folder name "
        "resolved inside it.",
        default="",
    )


@dataclass
class UserModeConfig:
    allowed_tools: list[str] = _doc(
        "Tools the agent may use in user mode without asking (Claude Code permission-rule "
        "syntax); anything else asks the session's clients (or is denied, see `approvals`). "
        "`{root}` and `{study}` stand for the Atomizer root and the session's study folder as "
        "absolute rule paths (`//...`); a rule naming `{study}` is left out when the session "
        "has no study. Default: read the root and the study, write the study's report and "
        "its Markdown results (`Edit` rules cover the Write tool too; `Write(...)` rules "
        "match nothing), run Python.",
        default_factory=lambda: [
            "Read({root}/**)",
            "Read({study}/**)",
            "Edit({study}/STUDY_REPORT.md)",
            "Edit({study}/3_results/*.md)",
            "Bash(python:*)",
        ],
    )
    scheduled_prompts: bool = _doc(
        "Give user- and plan-mode agents the CLI's scheduling tools (ScheduleWakeup, "
        "CronCreate, CronDelete, CronList, RemoteTrigger). Off by default: a scheduled prompt "
        "later runs a turn nobody asked for, with nobody there to watch or approve it.",
        default=False,
    )


@dataclass
class PowerModeConfig:
    enabled: bool = _doc(
        "Allow MODE_POWER (full tool access, --dangerously-skip-permissions). Off by default: "
        "it is a policy decision for whoever runs the daemon.",
        default=False,
    )
    study_instructions: bool = _doc(
        "Let power-mode agents load the project's instruction and settings files (CLAUDE.md, "
        "CLAUDE.local.md, AGENTS.md, `.claude/`: settings, commands, skills, agents, rules) "
        "from the Atomizer root and the study. Off by default: a study is written by "
        "user-mode agents, and a file planted there would steer a power-mode agent (full "
        "access) later; off, power-mode agents (and plan-mode agents that may go on in power "
        "mode) read only the daemon user's own settings (`--setting-sources=user`).",
        default=False,
    )


@dataclass
class PlanModeConfig:
    plans_dir: str = _doc(
        "Where plan-mode agents write their plans, relative to the Atomizer root (each "
        "session its own folder in it, removed when the session is purged). Inside the root "
        "because the CLI takes a plans folder only there (`plansDirectory`), and not the CLI's "
        "own `~/.claude/plans`, which the sandbox closes to user-mode tools with the rest of "
        "the CLI's config dir (every session's transcripts). The daemon makes it at start-up "
        "(0700) and refuses to start when a part of it is a symlink, another user's, or "
        "writable by group or others; no user-mode agent may write in it, and Bash reads only "
        "its own session's folder.",
        default=".atomizerd/plans",
    )


@dataclass
class ModesConfig:
    user: UserModeConfig = field(default_factory=UserModeConfig)
    power: PowerModeConfig = field(default_factory=PowerModeConfig)
    plan: PlanModeConfig = field(default_factory=PlanModeConfig)


@dataclass
class SandboxConfig:
    enabled: bool = _doc(
        "Run user-mode agents' Bash commands inside Claude Code's sandbox (bubblewrap and "
        "seccomp on Linux: install the Debian packages `bubblewrap` and `socat`). It fails "
        "closed: when the sandbox cannot run, a user-mode session does not start its agent "
        "and the client gets FAILED_PRECONDITION; `--check-config` and GetStatus say whether "
        "it is available. Off: user mode is then advisory only (the allowlist and approvals "
        "steer the agent, but `python -c` in Bash is arbitrary code as the daemon's user). "
        "Power mode is never sandboxed.",
        default=True,
    )
    auto_allow_bash: bool = _doc(
        "Sandboxed Bash commands run without asking (the CLI's autoAllowBashIfSandboxed): the "
        "sandbox bounds what they can touch, and the allowlist's `Bash(python:*)` already "
        "runs arbitrary code. Off: a command outside the allowlist still asks the session's "
        "clients first, and then runs sandboxed.",
        default=True,
    )
    allowed_domains: list[str] = _doc(
        "Hosts Bash commands may reach (through the sandbox's proxy; `*.example.com` "
        "wildcards), e.g. a package index. Empty: no network from tools at all, and nobody "
        "is asked for more: a study's scripts compute on local files. The CLI's own calls to "
        "the model API are not affected.",
        default_factory=list,
    )
    allow_write: list[str] = _doc(
        "Paths Bash may write besides the session's study folder and its private "
        "temporary dir (e.g. a shared scratch volume); `~` is the agent's HOME. Everything "
        "else, the rest of the Atomizer root included, is read-only to Bash.",
        default_factory=list,
    )
    deny_read: list[str] = _doc(
        "Paths user-mode tools may not read; `~` is the agent's HOME, where credentials "
        "and the CLI's transcripts live. The Atomizer root and the session's study stay "
        "readable inside them. Always denied on top: the daemon's state and runtime dirs, "
        "the CLI's config dir (every session's transcripts) and other sessions' temporary "
        "dirs.",
        default_factory=lambda: ["~"],
    )
    allow_read: list[str] = _doc(
        "Paths readable again inside `deny_read` (e.g. a Python installed under HOME); "
        "never the always-denied ones.",
        default_factory=list,
    )
    tmp_dir: str = _doc(
        "Where each agent gets its private temporary dir (TMPDIR, created 0700, removed "
        "when the agent stops): the only place besides its study where a user-mode agent's "
        "Bash may write. Empty: `<state_dir>/agent-tmp` (on disk, private to this daemon; "
        "not /run, whose small tmpfs a big temporary file would fill).",
        default="",
    )


@dataclass
class McpConfig:
    atomizer_command: list[str] = _doc(
        "Command of the `atomizer` MCP server given to every session (with ATOMIZER_MODE, "
        "ATOMIZER_ROOT, ATOMIZER_STUDY in its env). Empty: `node <root>/mcp-server/"
        "atomizer-tools/dist/index.js` when that file exists at start-up, otherwise no "
        "atomizer server until the next start. Resolved once, at start-up: the daemon refuses "
        "to start when the server's file (or, for the default, any folder from the root down "
        "to it) is a symlink, another user's, or writable by group or others. It runs "
        "unsandboxed as the daemon's user in every session.",
        default_factory=list,
    )
    servers: dict[str, str] = _doc(
        "Extra MCP servers for every session: name = JSON of the server's entry as in a "
        'Claude Code MCP config, e.g. `docs = \'{"command": "node", "args": ["docs.js"]}\'`. '
        "The name `atomizer` is reserved.",
        default_factory=dict,
    )
    strict: bool = _doc(
        "Pass --strict-mcp-config so a user's own MCP servers never leak into sessions.",
        default=True,
    )


@dataclass
class PoolConfig:
    max_live: int = _doc(
        "Live agent processes at most. Each costs ~200 MiB, so this is the memory bound; the "
        "least-recently-used idle process is evicted (and resumed later) when full.",
        default=8,
    )
    max_queued: int = _doc(
        "Turns that may wait for a process when all are busy; beyond it RESOURCE_EXHAUSTED.",
        default=64,
    )
    queue_timeout: float = _doc(
        "How long a turn waits for a free process before failing with RESOURCE_EXHAUSTED.",
        default=300.0,
    )
    max_queued_per_session: int = _doc(
        "Messages that may wait behind a session's running turn; beyond it RESOURCE_EXHAUSTED.",
        default=8,
    )
    spares: int = _doc(
        "Agents kept started and initialized ahead of need, per mode in `pool.spare_modes`, "
        "counted inside `max_live`: a new session adopts one at CreateSession, so its first "
        "message skips the CLI's start-up (~0.4 s). Only a session a spare fits adopts one "
        "(no client-chosen id, no study, default model and budgets: what is fixed at spawn); "
        "others spawn as before. Spares are the first agents evicted "
        "when the pool is full and are never started while a turn waits. 0 turns them off.",
        default=1,
    )
    spare_modes: list[str] = _doc(
        "The modes spares are kept for (`user`, `power`; power only when enabled).",
        default_factory=lambda: ["user"],
    )


@dataclass
class ReaperConfig:
    interval: float = _doc("Seconds between reaper passes.", default=300.0)
    idle_timeout: float = _doc(
        "An idle agent process older than this is stopped; its session stays and resumes "
        "on its next message.",
        default=3600.0,
    )
    retention: float = _doc(
        "Sessions inactive longer than this are purged with their history. 30 days: a study "
        "runs for days or weeks and people come back to its discussion; 0 keeps forever.",
        default=30 * 24 * 3600.0,
    )
    cull_busy: bool = _doc(
        "Also stop processes of sessions with a running turn (as Jupyter's cull_busy). Off: "
        "a long tool run is work, not staleness.",
        default=False,
    )
    cull_connected: bool = _doc(
        "Also stop processes of sessions someone is watching (Jupyter's cull_connected). Off: "
        "a watched session is in use.",
        default=False,
    )


@dataclass
class ApprovalsConfig:
    enabled: bool = _doc(
        "In user mode, ask the session's clients before a tool outside the allowlist runs "
        "(a permission_request event, answered by RespondToPermission), and, in both modes, "
        "let the agent ask the user questions (its AskUserQuestion tool: a question event, "
        "answered by AnswerQuestion). Off: such tools are denied at once, as the CLI does by "
        "itself, and the CLI disables AskUserQuestion.",
        default=True,
    )
    timeout: float = _doc(
        "How long a permission request waits for an answer before it is denied, and a "
        "question before it ends unanswered. Long enough for a person to read the request; "
        "the turn counts as busy, not stalled, meanwhile.",
        default=60.0,
    )


@dataclass
class BudgetConfig:
    session_usd: float = _doc(
        "Spending cap of a session in USD, 0 for none. A session at its cap refuses new "
        "messages (RESOURCE_EXHAUSTED); CreateSession may lower it per session.",
        default=0.0,
    )
    turn_usd: float = _doc(
        "Spending cap of one turn in USD, 0 for none (--max-budget-usd). Costs a fresh agent "
        "process per turn, since the CLI takes the cap at start-up.",
        default=0.0,
    )


@dataclass
class AttachmentsConfig:
    max_bytes: int = _doc(
        "Largest file sent with a message (SendMessage `attachments`), in bytes; bigger is "
        "INVALID_ARGUMENT. 5 MiB: the model API's limit for one image; a PDF or a data file "
        "of a study's size fits too.",
        default=5 * 1024 * 1024,
    )
    max_message_bytes: int = _doc(
        "The most bytes of attachments one message may carry, all together. 20 MiB stays "
        "under the model API's request limit once base64 has grown it by a third.",
        default=20 * 1024 * 1024,
    )
    max_count: int = _doc(
        "The most attachments one message may carry.",
        default=20,
    )


@dataclass
class LoggingConfig:
    level: str = _doc("Log level: debug, info, warning, error.", default="info")
    format: str = _doc(
        "`auto` (console on a TTY, JSON lines otherwise, e.g. under journald), `json`, `console`.",
        default="auto",
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


@dataclass
class Config:
    daemon: DaemonConfig = field(default_factory=DaemonConfig)
    agent: AgentConfig = field(default_factory=AgentConfig)
    atomizer: AtomizerConfig = field(default_factory=AtomizerConfig)
    modes: ModesConfig = field(default_factory=ModesConfig)
    sandbox: SandboxConfig = field(default_factory=SandboxConfig)
    mcp: McpConfig = field(default_factory=McpConfig)
    pool: PoolConfig = field(default_factory=PoolConfig)
    reaper: ReaperConfig = field(default_factory=ReaperConfig)
    approvals: ApprovalsConfig = field(default_factory=ApprovalsConfig)
    budget: BudgetConfig = field(default_factory=BudgetConfig)
    attachments: AttachmentsConfig = field(default_factory=AttachmentsConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    metrics: MetricsConfig = field(default_factory=MetricsConfig)

    # Derived paths, resolved once by `resolve()`.
    @property
    def runtime_dir(self) -> Path:
        return Path(self.daemon.runtime_dir)

    @property
    def state_dir(self) -> Path:
        return Path(self.daemon.state_dir)

    @property
    def socket_path(self) -> Path:
        return Path(self.daemon.socket)

    @property
    def atomizer_root(self) -> Path:
        return Path(self.atomizer.root)

    @property
    def studies_root(self) -> Path:
        return Path(self.atomizer.studies_root)


# --- loading -------------------------------------------------------------------------------


def iter_keys(obj: Any = None, prefix: str = "") -> Iterator[tuple[str, dataclasses.Field[Any]]]:
    """Yields (dotted key, field) for every leaf key, in declaration order."""
    cls = obj if isinstance(obj, type) else type(obj) if obj is not None else Config
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        name = f"{prefix}{f.name}"
        tp = hints[f.name]
        if dataclasses.is_dataclass(tp):
            yield from iter_keys(tp, name + ".")
        else:
            yield name, f


def _leaf_type(key: str) -> Any:
    cls: Any = Config
    *sections, leaf = key.split(".")
    for s in sections:
        cls = typing.get_type_hints(cls)[s]
    return typing.get_type_hints(cls)[leaf]


def _coerce(key: str, value: Any, *, from_text: bool) -> Any:
    """Checks (and, for env/flag text, parses) a value against the key's declared type."""
    tp = _leaf_type(key)
    origin = typing.get_origin(tp)
    try:
        if tp is bool:
            if from_text and isinstance(value, str):
                low = value.strip().lower()
                if low in ("1", "true", "yes", "on"):
                    return True
                if low in ("0", "false", "no", "off"):
                    return False
                raise ValueError("expected true or false")
            if not isinstance(value, bool):
                raise ValueError("expected true or false")
            return value
        if tp is int:
            if isinstance(value, bool):
                raise ValueError("expected an integer")
            if isinstance(value, str) and from_text:
                return int(value)
            if not isinstance(value, int):
                raise ValueError("expected an integer")
            return value
        if tp is float:
            if isinstance(value, bool):
                raise ValueError("expected a number")
            if isinstance(value, str) and from_text:
                return float(value)
            if not isinstance(value, int | float):
                raise ValueError("expected a number")
            return float(value)
        if tp is str:
            if not isinstance(value, str):
                raise ValueError("expected a string")
            return value
        if origin is list:
            if isinstance(value, str) and from_text:
                import shlex

                value = shlex.split(value)
            if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
                raise ValueError("expected a list of strings")
            return list(value)
        if origin is dict:
            if isinstance(value, str) and from_text:
                import json

                value = json.loads(value)
            if not isinstance(value, dict) or not all(
                isinstance(k, str) and isinstance(v, str) for k, v in value.items()
            ):
                raise ValueError("expected a table of strings")
            return dict(value)
    except ValueError as e:
        raise ConfigError(f"{key}: {e} (got {value!r})") from None
    raise ConfigError(f"{key}: unsupported type {tp}")  # pragma: no cover


def _set(cfg: Config, key: str, value: Any) -> None:
    *sections, leaf = key.split(".")
    target: Any = cfg
    for s in sections:
        target = getattr(target, s)
    setattr(target, leaf, value)


def _flatten(table: Mapping[str, Any], prefix: str = "") -> Iterator[tuple[str, Any]]:
    for k, v in table.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and not _is_table_key(key):
            yield from _flatten(v, key + ".")
        else:
            yield key, v


def _is_table_key(key: str) -> bool:
    try:
        return typing.get_origin(_leaf_type(key)) is dict
    except (KeyError, TypeError):
        return False


def _known_keys() -> dict[str, dataclasses.Field[Any]]:
    return dict(iter_keys())


def _apply(cfg: Config, key: str, value: Any, *, source: str, from_text: bool) -> None:
    if key not in _known_keys():
        raise ConfigError(f"unknown configuration key {key!r} (from {source})")
    _set(cfg, key, _coerce(key, value, from_text=from_text))


def _env_key_map() -> dict[str, str]:
    return {ENV_PREFIX + k.replace(".", "_").upper(): k for k in _known_keys()}


def load(
    path: str | Path | None = None,
    *,
    environ: Mapping[str, str] | None = None,
    overrides: Mapping[str, str] | None = None,
) -> Config:
    """Builds the effective configuration and validates it."""
    cfg = Config()
    if path is not None:
        try:
            with open(path, "rb") as fh:
                table = tomllib.load(fh)
        except FileNotFoundError:
            raise ConfigError(f"config file {path} does not exist") from None
        except tomllib.TOMLDecodeError as e:
            raise ConfigError(f"config file {path} is not valid TOML: {e}") from None
        for key, value in _flatten(table):
            _apply(cfg, key, value, source=str(path), from_text=False)
    env = os.environ if environ is None else environ
    env_map = _env_key_map()
    # ATOMIZERD_SOCKET is where clients look for the daemon: the daemon listens there too.
    if env.get(ENV_PREFIX + "SOCKET") and not env.get(ENV_PREFIX + "DAEMON_SOCKET"):
        _apply(
            cfg,
            "daemon.socket",
            env[ENV_PREFIX + "SOCKET"],
            source="ATOMIZERD_SOCKET",
            from_text=True,
        )
    for name, value in env.items():
        if not name.startswith(ENV_PREFIX) or name in _ENV_NOT_KEYS:
            continue
        if name not in env_map:
            raise ConfigError(f"unknown configuration variable {name}")
        _apply(cfg, env_map[name], value, source=name, from_text=True)
    for key, value in (overrides or {}).items():
        _apply(cfg, key, value, source="command line", from_text=True)
    resolve(cfg)
    validate(cfg)
    return cfg


def resolve(cfg: Config) -> None:
    """Fills the defaults that depend on the environment, and makes paths absolute."""
    d = cfg.daemon
    d.runtime_dir = str(Path(d.runtime_dir or _default_runtime_dir()).expanduser().absolute())
    d.state_dir = str(Path(d.state_dir or _default_state_dir()).expanduser().absolute())
    d.socket = str(Path(d.socket or Path(d.runtime_dir) / "atomizerd.sock").expanduser().absolute())
    if not d.database:
        d.database = f"sqlite:///{Path(d.state_dir) / 'atomizerd.db'}"
    d.host_id = d.host_id or socket.gethostname()
    if "/" in cfg.metrics.listen:
        cfg.metrics.listen = str(Path(cfg.metrics.listen).expanduser().absolute())
    a = cfg.atomizer
    a.root = str(Path(a.root or os.getcwd()).expanduser().absolute())
    a.studies_root = str(Path(a.studies_root or Path(a.root) / "studies").expanduser().absolute())
    sb = cfg.sandbox
    sb.tmp_dir = str(Path(sb.tmp_dir or Path(d.state_dir) / "agent-tmp").expanduser().absolute())


def mcp_server_entry(name: str, spec: str) -> dict[str, Any]:
    """An `mcp.servers` value parsed and checked (a JSON object with a command or a url)."""
    import json

    key = f"mcp.servers.{name}"
    if name == "atomizer":
        raise ConfigError(f"{key}: the name 'atomizer' is reserved for Atomizer's own server")
    try:
        entry = json.loads(spec)
    except ValueError as e:
        raise ConfigError(f"{key}: not valid JSON ({e})") from None
    if not isinstance(entry, dict) or not ({"command", "url"} & entry.keys()):
        raise ConfigError(f'{key}: expected a JSON object with a "command" or a "url"')
    return entry


@dataclass(frozen=True)
class MetricsAddress:
    """Where the metrics endpoint listens: a loopback `host` and `port`, or a Unix `path`."""

    host: str = ""
    port: int = 0
    path: str = ""


def metrics_address(cfg: Config) -> MetricsAddress | None:
    """`metrics.listen` parsed and checked; None when the endpoint is off."""
    listen = cfg.metrics.listen.strip()
    if not listen:
        return None
    if "/" in listen:
        if len(listen.encode()) > 107:
            raise ConfigError(f"metrics.listen: path longer than a Unix socket allows ({listen})")
        return MetricsAddress(path=listen)
    expected = "expected a loopback host:port (e.g. 127.0.0.1:9464) or a Unix socket path"
    if listen.startswith("["):
        host, sep, port = listen[1:].partition("]:")
    else:
        host, sep, port = listen.rpartition(":")
        if ":" in host:
            raise ConfigError(
                f"metrics.listen: write an IPv6 address in brackets, as [::1]:9464 (got {listen!r})"
            )
    if not sep or not host:
        raise ConfigError(f"metrics.listen: {expected} (got {listen!r})")
    try:
        number = int(port)
    except ValueError:
        number = -1
    if not 0 <= number <= 65535:
        raise ConfigError(f"metrics.listen: port must be 0 to 65535 (got {listen!r})")
    if host == "localhost":
        host = "127.0.0.1"
    try:
        loopback = ipaddress.ip_address(host).is_loopback
    except ValueError:
        loopback = False
    if not loopback:
        raise ConfigError(
            f"metrics.listen: {host} is not a loopback address. The metrics endpoint has no "
            "authentication, so it listens only on loopback (127.0.0.1, ::1, localhost) or on a "
            "Unix socket path; put a proxy in front of it to scrape from another machine"
        )
    return MetricsAddress(host=host, port=number)


def socket_mode(cfg: Config) -> int:
    return int(cfg.daemon.socket_mode, 8)


def agent_umask(cfg: Config) -> int:
    return int(cfg.agent.umask, 8)


def validate(cfg: Config) -> None:
    def positive(key: str, value: float) -> None:
        if value <= 0:
            raise ConfigError(f"{key}: must be greater than 0 (got {value})")

    try:
        mode = socket_mode(cfg)
    except ValueError:
        raise ConfigError(
            f"daemon.socket_mode: expected an octal mode like 0600 (got {cfg.daemon.socket_mode!r})"
        ) from None
    if mode & 0o007:
        raise ConfigError("daemon.socket_mode: must not grant access to others (e.g. 0600, 0660)")
    host_id = cfg.daemon.host_id
    if not host_id or len(host_id) > 255 or not host_id.isprintable() or host_id != host_id.strip():
        raise ConfigError(
            f"daemon.host_id: expected a name of 1 to 255 printable characters without leading "
            f"or trailing spaces (got {host_id!r})"
        )
    if not cfg.agent.command:
        raise ConfigError("agent.command: must name the agent program")
    plans = Path(cfg.modes.plan.plans_dir)
    if plans.is_absolute() or ".." in plans.parts or not plans.parts:
        raise ConfigError(
            f"modes.plan.plans_dir: a folder inside the Atomizer root, as a relative path "
            f"without '..' (got {cfg.modes.plan.plans_dir!r})"
        )
    for name in cfg.agent.models:
        if not name.strip() or len(name) > 128 or any(ch.isspace() for ch in name):
            raise ConfigError(f"agent.models: {name!r} is not a model name")
    for spare_mode in cfg.pool.spare_modes:
        if spare_mode not in ("user", "power"):
            raise ConfigError(f"pool.spare_modes: unknown mode {spare_mode!r} (use user or power)")
    try:
        umask = agent_umask(cfg)
    except ValueError:
        raise ConfigError(
            f"agent.umask: expected an octal mask like 0027 (got {cfg.agent.umask!r})"
        ) from None
    if not 0 <= umask <= 0o777:
        raise ConfigError(
            f"agent.umask: expected an octal mask like 0027 (got {cfg.agent.umask!r})"
        )
    for key in (
        "daemon.grace_period",
        "daemon.max_message_bytes",
        "daemon.max_sessions",
        "daemon.event_buffer",
        "daemon.replay_bytes",
        "daemon.replay_bytes_total",
        "daemon.follower_lag_bytes",
        "agent.checkpoint_interval",
        "agent.checkpoint_bytes",
        "agent.first_event_timeout",
        "agent.stall_timeout",
        "agent.turn_timeout",
        "agent.task_timeout",
        "agent.task_output_bytes",
        "agent.stop_grace",
        "agent.write_timeout",
        "agent.max_line_bytes",
        "agent.stderr_tail_bytes",
        "agent.version_timeout",
        "agent.orphan_timeout",
        "agent.spool_bytes",
        "pool.max_live",
        "pool.queue_timeout",
        "reaper.interval",
        "reaper.idle_timeout",
        "approvals.timeout",
        "attachments.max_bytes",
        "attachments.max_message_bytes",
        "attachments.max_count",
    ):
        section, name = key.split(".")
        positive(key, getattr(getattr(cfg, section), name))
    for key in (
        "daemon.loop_probe_interval",
        "daemon.loop_stall_log_ms",
        "pool.max_queued",
        "pool.max_queued_per_session",
        "pool.spares",
        "agent.spawn_retries",
        "agent.spawn_retry_backoff",
        "reaper.retention",
        "budget.session_usd",
        "budget.turn_usd",
    ):
        section, name = key.split(".")
        if getattr(getattr(cfg, section), name) < 0:
            raise ConfigError(f"{key}: must not be negative")
    if cfg.logging.level not in ("debug", "info", "warning", "error"):
        raise ConfigError(
            f"logging.level: expected debug, info, warning or error ({cfg.logging.level!r})"
        )
    if cfg.logging.format not in ("auto", "json", "console"):
        raise ConfigError(
            f"logging.format: expected auto, json or console ({cfg.logging.format!r})"
        )
    for name, spec in cfg.mcp.servers.items():
        mcp_server_entry(name, spec)
    for key in ("sandbox.allow_write", "sandbox.deny_read", "sandbox.allow_read"):
        for path in _get(cfg, key):
            if not (path == "~" or path.startswith(("~/", "/"))):
                raise ConfigError(f"{key}: {path!r} must be an absolute path or start with ~/")
    if len(cfg.daemon.socket.encode()) > 107:
        raise ConfigError(
            f"daemon.socket: path longer than a Unix socket allows ({cfg.daemon.socket})"
        )
    metrics_address(cfg)


# --- presentation --------------------------------------------------------------------------


def _toml_value(value: Any) -> str:
    import json

    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value)
    if isinstance(value, list):
        return "[" + ", ".join(json.dumps(v) for v in value) + "]"
    if isinstance(value, dict):
        return (
            "{ " + ", ".join(f"{json.dumps(k)} = {json.dumps(v)}" for k, v in value.items()) + " }"
        )
    raise TypeError(type(value))


def _get(cfg: Config, key: str) -> Any:
    target: Any = cfg
    for part in key.split("."):
        target = getattr(target, part)
    return target


def render_toml(cfg: Config) -> str:
    """The effective configuration as TOML (what --check-config prints)."""
    lines: list[str] = []
    section = None
    for key, _f in iter_keys():
        sec, leaf = key.rsplit(".", 1)
        if sec != section:
            lines.append(f"\n[{sec}]")
            section = sec
        lines.append(f"{leaf} = {_toml_value(_get(cfg, key))}")
    return "\n".join(lines).lstrip() + "\n"


def render_docs() -> str:
    """docs/configuration.md, generated from the field docs above."""
    defaults = Config()
    out = [
        "# Configuration",
        "",
        "<!-- generated by `atomizerd --print-config-docs`; edit atomizerd/daemon/config.py -->",
        "",
        "atomizerd reads a TOML file (`atomizerd --config FILE`), then `ATOMIZERD_<SECTION>_<KEY>`",
        "environment variables (e.g. `ATOMIZERD_POOL_MAX_LIVE=4`; lists are shell-split, tables",
        "are JSON), then `--set key=value` flags. Unknown keys are errors. Durations are seconds.",
        "`ATOMIZERD_SOCKET`, where clients look for the daemon, also sets `daemon.socket`.",
        "`atomizerd --check-config` prints the effective configuration and exits.",
        "",
        "| key | default | what and why |",
        "|---|---|---|",
    ]
    for key, f in iter_keys():
        default = _get(defaults, key)
        shown = (
            "(see text)"
            if key in ("daemon.runtime_dir", "daemon.state_dir", "sandbox.tmp_dir")
            else _toml_value(default)
        )
        doc = f.metadata.get("doc", "")
        out.append(f"| `{key}` | `{shown}` | {doc} |")
    return "\n".join(out) + "\n"


__all__ = [
    "Config",
    "ConfigError",
    "agent_umask",
    "iter_keys",
    "load",
    "render_docs",
    "render_toml",
    "socket_mode",
]
