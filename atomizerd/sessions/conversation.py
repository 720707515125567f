"""Which turn the agent's output belongs to.

The agent is not request/response (docs/agent-protocol.md, "The agent acts on its own"): it
starts turns by itself when a background task or subagent ends or a scheduled prompt fires, and
it takes a line written while a turn runs into that turn. So output is never matched to a
message by counting `result` lines. Every user line the daemon writes carries a uuid, and the
CLI (run with `--replay-user-messages`) echoes the line with that uuid at the moment it takes
it into a turn. `Router` reads the agent's messages in order and says, for each, what it means:

    (nothing open) ── our line's replay ──────────────▶ OWN turn open
    (nothing open) ── turn content, no replay first ──▶ AGENT turn open (the agent's own)
    AGENT open ────── our line's replay ──────────────▶ the agent turn ends there; OWN opens
    any open ──────── a steered line's replay ────────▶ a user message of the open turn
    any open ──────── result ─────────────────────────▶ that turn ends (nothing open)

Task bookkeeping (`task_started`, `task_progress`, `task_notification`) and a subagent's own
messages (they carry `parent_tool_use_id`) never open a turn. The router is pure: it holds no
I/O and no clock, so every interleaving is specified by unit tests.
"""

from __future__ import annotations

import enum
from collections import deque
from dataclasses import dataclass, field

from atomizerd.agents import protocol as proto
from atomizerd.agents.vocabulary import AgentExited, AgentItem, LineTooLong
from atomizerd.sessions import events as ev

# A client's steered lines not taken yet, kept per session (the oldest go first past this).
MAX_UNTAKEN_LINES = 64


class Step(enum.Enum):
    RELAY = "relay"  # content of the open turn
    OPEN_AGENT = "open_agent"  # the agent started a turn by itself: open one, then relay
    OWN_TAKEN = "own_taken"  # the CLI took our line: the turn it answers starts here
    LINE_TAKEN = "line_taken"  # a steered line was taken into the open turn
    LATE_LINE = "late_line"  # a steered line the CLI took only after its turn ended
    TASK = "task"  # task bookkeeping, whether or not a turn is open
    SUBAGENT = "subagent"  # a subagent's message: shown with its parent, never reply text
    QUIET = "quiet"  # activity that belongs to no turn (init, lifecycle notes)


class Open(enum.Enum):
    NONE = "none"
    OWN = "own"
    AGENT = "agent"


def is_turn_content(item: AgentItem) -> bool:
    """What only a turn produces: seen with no turn open, the agent has started one."""
    match item:
        case proto.TextDelta() | proto.MessageDelta() | proto.AssistantMessage():
            return item.parent_tool_use_id is None
        case proto.ToolResult():
            return item.parent_tool_use_id is None
        case (
            proto.ThinkingDelta()
            | proto.AbandonedBlocks()
            | proto.ApiRetry()
            | proto.CompactBoundary()
            | proto.Result()
            | proto.ControlRequest()
            | proto.ControlCancelRequest()
        ):
            return True
        case AgentExited() | LineTooLong():
            return True
    return False


def taken_line(item: AgentItem) -> str | None:
    """The uuid of a written line the CLI says it took into a turn: its replay, or its
    `command_lifecycle` start (which comes first for a slash command such as /compact, whose
    replay follows the command's own output)."""
    if isinstance(item, proto.UserReplay):
        return item.uuid
    if isinstance(item, proto.CommandLifecycle) and item.state == "started":
        return item.command_uuid or None
    return None


def is_subagent(item: AgentItem) -> bool:
    match item:
        case proto.TextDelta() | proto.MessageDelta() | proto.AssistantMessage():
            return item.parent_tool_use_id is not None
        case proto.ToolResult():
            return item.parent_tool_use_id is not None
    return False


def subagent_events(item: AgentItem) -> list[ev.EventKind]:
    """A subagent's calls, shown under the Task tool use that runs it. Its text is its own
    (the task's summary carries its answer), never part of the main reply."""
    match item:
        case proto.AssistantMessage():
            parent = item.parent_tool_use_id or ""
            return [ev.ToolUse(tu.id, tu.name, tu.input_json, parent) for tu in item.tool_uses]
        case proto.ToolResult():
            parent = item.parent_tool_use_id or ""
            return [ev.ToolResult(item.tool_use_id, item.content, item.is_error, parent)]
    return []


@dataclass
class UntakenLines:
    """Lines written into a running turn (steers) whose replay has not come yet, by uuid:
    (text, request_id). They belong to the session, not to one turn: the CLI may take one
    only after the turn it was meant for has ended."""

    lines: dict[str, tuple[str, str]] = field(default_factory=dict)

    def add(self, uuid: str, text: str, request_id: str) -> None:
        self.lines[uuid] = (text, request_id)
        while len(self.lines) > MAX_UNTAKEN_LINES:
            self.lines.pop(next(iter(self.lines)))

    def take(self, uuid: str) -> tuple[str, str] | None:
        return self.lines.pop(uuid, None)

    def __contains__(self, uuid: object) -> bool:
        return uuid in self.lines

    def clear(self) -> None:
        self.lines.clear()


# Causes of the agent's own turns remembered per session (the oldest go first past this).
MAX_CAUSES = 64


@dataclass
class Causes:
    """Why the agent will start turns of its own, in order: a task that ended (its summary),
    a scheduled prompt that fired (its prompt). The CLI starts one turn for each; a turn with
    no cause known is the agent's (AGENT)."""

    pending: deque[tuple[ev.TurnOrigin, str]] = field(
        default_factory=lambda: deque(maxlen=MAX_CAUSES)
    )
    # Prompts of wake-ups the agent scheduled, in the order they will fire.
    prompts: deque[str] = field(default_factory=lambda: deque(maxlen=MAX_CAUSES))

    def task_ended(self, summary: str) -> None:
        self.pending.append((ev.TurnOrigin.TASK, summary))

    def scheduled(self, prompt: str) -> None:
        self.prompts.append(prompt)

    def woke(self) -> None:
        prompt = self.prompts.popleft() if self.prompts else ""
        self.pending.append((ev.TurnOrigin.SCHEDULED, prompt))

    def next(self) -> tuple[ev.TurnOrigin, str]:
        """The origin and the prompt of the agent's next turn of its own."""
        return self.pending.popleft() if self.pending else (ev.TurnOrigin.AGENT, "")

    def clear(self) -> None:
        self.pending.clear()
        self.prompts.clear()


@dataclass
class Router:
    """Routes one job's reading of the agent. The job's own turn is the one answering the
    line it wrote (`own_uuid`), or, for a job that follows a turn the agent started, that
    turn (`own_uuid` "", created with `open` OWN). Any other turn met on the way is an
    AGENT turn of its own (opened, relayed and ended beside the job's turn)."""

    own_uuid: str
    untaken: UntakenLines
    open: Open = Open.NONE
    own_ended: bool = False

    def step(self, item: AgentItem) -> Step:
        line = taken_line(item)
        if line is not None and (line == self.own_uuid or line in self.untaken):
            return self._replay(line)
        if isinstance(item, proto.UserReplay):
            return Step.QUIET  # the replay of a line already taken, or not ours
        if isinstance(item, proto.TASK_MESSAGES):
            return Step.TASK
        if is_subagent(item):
            return Step.SUBAGENT
        if not is_turn_content(item):
            return Step.QUIET
        if self.open is Open.NONE:
            self.open = Open.AGENT
            return Step.OPEN_AGENT
        return Step.RELAY

    def _replay(self, uuid: str) -> Step:
        if uuid and uuid == self.own_uuid and self.open is not Open.OWN:
            self.open = Open.OWN
            return Step.OWN_TAKEN
        if uuid in self.untaken:
            if self.open is Open.NONE:
                self.open = Open.AGENT  # a turn of its own, as if just sent
                return Step.LATE_LINE
            return Step.LINE_TAKEN
        return Step.QUIET

    def ended(self) -> Open:
        """A result (or the agent's end) closed the open turn: which one it was."""
        closed, self.open = self.open, Open.NONE
        if closed is Open.OWN:
            self.own_ended = True
        return closed
