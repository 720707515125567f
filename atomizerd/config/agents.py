"""The agents' sections: the agent processes, their pool, the reaper, approvals, budgets and
attachments."""

from __future__ import annotations

from dataclasses import dataclass

from atomizerd.config.fields import _doc


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
    titles: bool = _doc(
        "Ask the agent for a session title after the first completed turn (one more model "
        "call, without tools); off: sessions are titled only by RenameSession.",
        default=True,
    )
    first_event_timeout: float = _doc(
        "A turn with no event from the agent for this long fails (FIRST_EVENT_TIMEOUT). "
        "Generous: the first turn after a spawn includes CLI start-up and the model's latency.",
        default=120.0,
        check="positive",
    )
    stall_timeout: float = _doc(
        "A turn whose agent writes nothing for this long fails (STALL_TIMEOUT). API retries "
        "are output, so a slow-but-retrying API does not trip it.",
        default=600.0,
        check="positive",
    )
    turn_timeout: float = _doc(
        "A turn running longer than this is stopped (TURN_TIMEOUT): long tool runs are normal "
        "in optimization studies, so this is a backstop, not a latency target.",
        default=3600.0,
        check="positive",
    )
    task_timeout: float = _doc(
        "A task the agent runs on its own (a background or long Bash command, a subagent) "
        "that runs longer than this is stopped (the CLI's stop_task), with a notice to the "
        "session. A day: solver runs take hours, and an agent with a running task keeps its "
        "pool slot, so a forgotten task must not hold it forever.",
        default=86400.0,
        check="positive",
    )
    task_output_bytes: int = _doc(
        "Bytes of a background command's output file streamed to clients as task_output per "
        "task and per second (the rest stays in the file, paged with GetTaskOutput). A solver "
        "can write megabytes a second; the stream is for following it, not a copy.",
        default=16384,
        check="positive",
    )
    stop_grace: float = _doc(
        "When stopping an agent: seconds to wait after closing stdin, and again after "
        "SIGTERM, before SIGKILL.",
        default=3.0,
        check="positive",
    )
    write_timeout: float = _doc(
        "How long a write to the agent's stdin (a user message, a control request or answer) "
        "may wait for the agent to take it; then the write fails (the agent is stuck and not "
        "reading). 10 s: the CLI reads its input continuously, so even a message of "
        "`daemon.max_message_bytes` is taken in milliseconds; without a bound a hung agent "
        "would hold the turn forever.",
        default=10.0,
        check="positive",
    )
    max_line_bytes: int = _doc(
        "Longest stdout line read from the agent. Tool results can carry base64 images of "
        "many MiB; a longer line fails that turn, not the daemon.",
        default=64 * 1024 * 1024,
        check="positive",
    )
    stderr_tail_bytes: int = _doc(
        "How much of the agent's stderr is kept (the newest bytes) for failure reports.",
        default=64 * 1024,
        check="positive",
    )
    spawn_retries: int = _doc(
        "How many times an agent that dies before it received the turn's message (a crash at "
        "start-up, an exit during its handshake, a closed stdin at the first write) is started "
        "again before the turn fails. Safe because nothing was sent; each retry is a "
        "NOTICE_KIND_AGENT_RESTARTED notice. 2: a transient crash is absorbed, a CLI that "
        "always crashes fails the turn within seconds.",
        default=2,
        check="non_negative",
    )
    spawn_retry_backoff: float = _doc(
        "Seconds before the first such restart; doubled for each later one, so a crashing CLI "
        "is not restarted in a tight loop.",
        default=0.5,
        check="non_negative",
    )
    checkpoint_interval: float = _doc(
        "While a reply streams, what it has said so far is stored at most this often (and "
        "after every `checkpoint_bytes`), so a turn cut off by a crash or kill keeps its "
        "partial reply. Never a write per delta: 0.5 s bounds both the writes and what a kill "
        "can lose.",
        default=0.5,
        check="positive",
    )
    checkpoint_bytes: int = _doc(
        "Reply text streamed since the last checkpoint that triggers the next one sooner.",
        default=64 * 1024,
        check="positive",
    )
    history_seed_messages: int = _doc(
        "When a session's agent transcript is gone, a new conversation is seeded with this "
        "many of its last stored messages.",
        default=10,
    )
    version_timeout: float = _doc(
        "How long `<command> --version` may take at start-up (reported by GetStatus).",
        default=10.0,
        check="positive",
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
        check="positive",
    )
    spool_bytes: int = _doc(
        "Most a shim keeps, on disk under `<state_dir>/agent-spool`, of a running turn's "
        "output and events for the next daemon. A turn that writes more before a restart "
        "cannot be adopted (it ends as interrupted, as without a shim); the agent is never "
        "slowed for it. 256 MiB: far above any realistic turn, a bound on the disk it takes.",
        default=256 * 1024 * 1024,
        check="positive",
    )


@dataclass
class PoolConfig:
    max_live: int = _doc(
        "Live agent processes at most. Each costs ~200 MiB, so this is the memory bound; the "
        "least-recently-used idle process is evicted (and resumed later) when full.",
        default=8,
        check="positive",
    )
    max_queued: int = _doc(
        "Turns that may wait for a process when all are busy; beyond it RESOURCE_EXHAUSTED.",
        default=64,
        check="non_negative",
    )
    queue_timeout: float = _doc(
        "How long a turn waits for a free process before failing with RESOURCE_EXHAUSTED.",
        default=300.0,
        check="positive",
    )
    max_queued_per_session: int = _doc(
        "Messages that may wait behind a session's running turn; beyond it RESOURCE_EXHAUSTED.",
        default=8,
        check="non_negative",
    )
    spares: int = _doc(
        "Agents kept started and initialized ahead of need, per mode in `pool.spare_modes`, "
        "counted inside `max_live`: a new session adopts one at CreateSession, so its first "
        "message skips the CLI's start-up (~0.4 s). Only a session a spare fits adopts one "
        "(no client-chosen id, no study, default model and budgets: what is fixed at spawn); "
        "others spawn as before. Spares are the first agents evicted "
        "when the pool is full and are never started while a turn waits. 0 turns them off.",
        default=1,
        check="non_negative",
    )
    spare_modes: list[str] = _doc(
        "The modes spares are kept for (`user`, `power`; power only when enabled).",
        default_factory=lambda: ["user"],
    )


@dataclass
class ReaperConfig:
    interval: float = _doc("Seconds between reaper passes.", default=300.0, check="positive")
    idle_timeout: float = _doc(
        "An idle agent process older than this is stopped; its session stays and resumes "
        "on its next message.",
        default=3600.0,
        check="positive",
    )
    retention: float = _doc(
        "Sessions inactive longer than this are purged with their history. 30 days: a study "
        "runs for days or weeks and people come back to its discussion; 0 keeps forever.",
        default=30 * 24 * 3600.0,
        check="non_negative",
    )
    purge_archived: bool = _doc(
        "Also purge archived sessions (ArchiveSession) after `retention`. Off: an archived "
        "session was put away to be kept, and stays until it is terminated with purge.",
        default=False,
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
        "the turn counts as busy, not stalled, meanwhile. A permission request or question "
        "nobody is attached to is denied at once, unless a webhook is told of it "
        "(`notify.webhooks` with `permission_request` / `question`): then it counts from when "
        "that notification was "
        "delivered (waiting at most `notify.delivery_wait` for the delivery), so the person "
        "told has all of it to act.",
        default=60.0,
        check="positive",
    )


@dataclass
class BudgetConfig:
    session_usd: float = _doc(
        "Spending cap of a session in USD, 0 for none. A session at its cap refuses new "
        "messages (RESOURCE_EXHAUSTED); CreateSession may lower it per session.",
        default=0.0,
        check="non_negative",
    )
    turn_usd: float = _doc(
        "Spending cap of one turn in USD, 0 for none (--max-budget-usd). Costs a fresh agent "
        "process per turn, since the CLI takes the cap at start-up.",
        default=0.0,
        check="non_negative",
    )


@dataclass
class AttachmentsConfig:
    max_bytes: int = _doc(
        "Largest file sent with a message (SendMessage `attachments`), in bytes; bigger is "
        "INVALID_ARGUMENT. 5 MiB: the model API's limit for one image; a PDF or a data file "
        "of a study's size fits too.",
        default=5 * 1024 * 1024,
        check="positive",
    )
    max_message_bytes: int = _doc(
        "The most bytes of attachments one message may carry, all together. 20 MiB stays "
        "under the model API's request limit once base64 has grown it by a third.",
        default=20 * 1024 * 1024,
        check="positive",
    )
    max_count: int = _doc(
        "The most attachments one message may carry.",
        default=20,
        check="positive",
    )
