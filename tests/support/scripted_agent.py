"""A scripted agent transport, in process: the faults the real CLI won't produce on demand.

It implements the `AgentTransport` the pool and the turn runner use, speaking the domain form
of the CLI's stream-json protocol (`atomizerd.agents.protocol` messages). What it does for a
user message is read from directives in the text, like the fake agent program:

  (none)          "echo: <text>" as one text delta, then a result.
  [[hold]]        one text delta "partial ", then nothing until `release()` or an interrupt.
  [[deltas:N]]    N text deltas "x", then a result.
  [[ask:TOOL]]    a `can_use_tool` request for TOOL; the reply says how it was answered.
  [[spend:N]]     a model call of N input tokens (and N/10 output) of an Opus model, reported
                  as the CLI does (assistant line, then message_delta), before the rest.
  [[plan:TEXT]]   writes TEXT to its plan file (a Write call): `get_plan` answers it after.
  [[abandon]]     two deltas, withdrawn (abandoned_blocks), then the whole reply under a new id.
  [[big:N]]       a tool result of N bytes, then the reply.
  [[schedule]]    calls ScheduleWakeup (the agent then has a prompt pending); `wake_up()`
                  fires it later, as the CLI does.
  [[then-own]]    right after the turn's result, a turn the agent starts by itself.
  [[then-own:open]] the same, still under way (no result yet).
  [[task:ID]]     starts a background task ID (task_started) and ends the turn at once;
                  `end_task(ID)` later ends it the way the CLI does: task_notification, then
                  a turn the agent starts by itself.

Each user line is replayed with its uuid (`--replay-user-messages`) as the turn takes it; a
line written while a turn runs is taken into that turn (replayed before its result), as the
CLI does.

`ScriptedSpawner` starts them and is where tests set faults (die during the handshake, die
before reading the message, slow handshakes and stops) and read what happened (how many were
alive at most at once).
"""

from __future__ import annotations

import asyncio
import itertools
import re
from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from atomizerd.agents import protocol as proto
from atomizerd.agents.transport import LaunchSpec
from atomizerd.agents.vocabulary import AgentExited, AgentItem

_pids = itertools.count(40000)
_DIRECTIVE = re.compile(r"\[\[([a-z-]+)(?::([^\]]*))?\]\]")


@dataclass
class ScriptedSpawner:
    """Starts scripted agents; faults are consumed one spawn at a time."""

    die_during_handshake: int = 0  # this many next spawns exit during `initialize`
    die_before_reading: int = 0  # this many next spawns exit at the first user message
    handshake_seconds: float = 0.0  # virtual seconds each `initialize` takes
    stop_seconds: float = 0.0  # virtual seconds each stop takes
    durable: bool = False  # as under a shim: a planned restart lets them go (detach)
    agents: list[ScriptedAgent] = field(default_factory=list)
    peak_alive: int = 0

    async def __call__(self, spec: LaunchSpec) -> ScriptedAgent:
        agent = ScriptedAgent(self, spec)
        self.agents.append(agent)
        self.peak_alive = max(self.peak_alive, self.alive_count)
        await asyncio.sleep(0)
        return agent

    @property
    def alive_count(self) -> int:
        return sum(1 for a in self.agents if a.alive)

    def alive(self) -> list[ScriptedAgent]:
        return [a for a in self.agents if a.alive]


class ScriptedAgent:
    def __init__(self, spawner: ScriptedSpawner, spec: LaunchSpec) -> None:
        self.spawner = spawner
        self.spec = spec
        self.pid = next(_pids)
        self.pgid = self.pid
        self.start_time: int | None = None  # not a real process: nothing to record
        self.returncode: int | None = None
        self.user_messages: list[str] = []
        self.user_contents: list[list[dict[str, Any]]] = []  # messages with attachments
        self.init_fields: dict[str, Any] | None = None
        self.control_answers: dict[str, Mapping[str, Any]] = {}
        self.interrupts = 0
        self.requests: list[tuple[str, dict[str, Any]]] = []  # other control requests
        self.plan: str | None = None  # the plan file's text `get_plan` answers (None: none)
        self.stops = 0
        self._items: deque[AgentItem] = deque()
        self._taken_mid_turn: list[tuple[str, str]] = []
        self._next_lines: list[tuple[str, str]] = []
        # Whether a line written while a turn runs is taken into it (the CLI's way when a
        # tool result comes next) or waits for a turn of its own (the turn was ending).
        self.take_mid_turn = True
        # (reply, taken_into): the agent starts a turn of its own just as the next line
        # arrives; that line is then taken into it (True) or follows it (False).
        self.interjection: tuple[str, bool] | None = None
        # A task that ends just as the next line arrives: the agent's turn about it is under
        # way (no result) and the line waits for it (`finish_own_turn`).
        self.task_ends_at_next_line: tuple[str, str] | None = None  # (task id, first words)
        # Under a shim: everything said, the turn records left with it, where they begin.
        self.said: list[AgentItem] = []
        self.records: list[bytes] = []
        self.received = 0
        self._kept_from = 0
        self._final: AgentExited | None = None
        self._waiter: asyncio.Future[None] | None = None
        self._release = asyncio.Event()
        self._interrupt = asyncio.Event()
        self._answered: dict[str, asyncio.Future[Mapping[str, Any]]] = {}
        self._play_task: asyncio.Task[None] | None = None
        self._exited = asyncio.Event()

    # --- AgentTransport ---------------------------------------------------------------

    @property
    def alive(self) -> bool:
        return self.returncode is None

    def stderr_tail(self) -> str:
        return "scripted agent stderr"

    async def wait_exit(self) -> None:
        await self._exited.wait()

    async def receive(self) -> AgentItem:
        while True:
            item = self.receive_nowait()
            if item is not None:
                return item
            self._waiter = asyncio.get_running_loop().create_future()
            await self._waiter

    def receive_nowait(self) -> AgentItem | None:
        if self._items:
            self.received += 1
            return self._items.popleft()
        return self._final

    def peek(self) -> AgentItem | None:
        if self._items:
            return self._items[0]
        return self._final

    async def wait_output(self) -> None:
        while not self._items and self._final is None:
            self._waiter = asyncio.get_running_loop().create_future()
            await self._waiter

    async def send_user_message(self, text: str, uuid: str = "") -> None:
        if not self.alive:
            raise AgentExited("the scripted agent is not accepting input", self.returncode)
        if self.spawner.die_before_reading > 0:
            self.spawner.die_before_reading -= 1
            self._exit(-11)
            raise AgentExited("the scripted agent closed its input", -11, "")
        self.user_messages.append(text)
        if self.task_ends_at_next_line is not None:
            task_id, said = self.task_ends_at_next_line
            self.task_ends_at_next_line = None
            self._push(
                proto.TaskNotification(task_id, f"tu_{task_id}", "completed", f"{task_id} done", "")
            )
            self._own_turn_start(said)
            self._next_lines.append((uuid, text))
            return
        if self._play_task is not None and not self._play_task.done():
            if self.take_mid_turn:
                self._taken_mid_turn.append((uuid, text))  # the running turn takes it
            else:
                self._next_lines.append((uuid, text))  # a turn of its own after this one
            return
        if self.interjection is not None:  # the agent began a turn of its own just before
            reply, taken_into = self.interjection
            self.interjection = None
            self._own_turn_start(reply)
            if not taken_into:
                self._push(_result(False, "task-notification"))
        self._interrupt.clear()
        self._play_task = asyncio.ensure_future(self._play(text, uuid))

    async def send_user_content(self, content: list[dict[str, Any]], uuid: str = "") -> None:
        self.user_contents.append(content)
        texts = [b["text"] for b in content if b.get("type") == "text"]
        await self.send_user_message("\n".join(texts), uuid)

    def end_task(self, task_id: str, status: str = "completed", reply: str = "task done") -> None:
        """A background task ends while the agent is idle: the CLI announces it and starts a
        turn of its own (no user line), which ends with a result."""
        self._push(
            proto.TaskNotification(task_id, f"tu_{task_id}", status, f"{task_id} {status}", "")
        )
        self.start_own_turn(reply, origin_kind="task-notification")

    def finish_own_turn(self, rest: str) -> None:
        """Ends the turn `task_ends_at_next_line` began; the line that waited is taken next."""
        self._delta(rest, f"own_rest_{self.pid}")
        self._push(_result(False, "task-notification"))
        if self._next_lines:
            next_uuid, next_text = self._next_lines.pop(0)
            self._play_task = asyncio.ensure_future(self._play(next_text, next_uuid))

    def wake_up(self, reply: str = "woke up") -> None:
        """A prompt the agent scheduled fires: a lifecycle line naming its source, then a turn
        of its own (its result names no origin)."""
        self._push(proto.CommandLifecycle("wake-1", "started", "loop_wakeup"))
        self.start_own_turn(reply)

    def start_own_turn(self, reply: str, origin_kind: str = "") -> None:
        """A turn the agent starts by itself: its output, then a result naming its origin."""
        self._own_turn_start(reply)
        self._push(_result(False, origin_kind))

    def _own_turn_start(self, reply: str) -> None:
        mid = f"own_{len(self._items)}_{self.pid}"
        self._push(proto.Init("scripted", "model", (), (), "default", {}))
        self._delta(reply, mid)

    async def respond_control(self, request_id: str, response: Mapping[str, Any]) -> None:
        if not self.alive:
            raise AgentExited("gone", self.returncode)
        self.control_answers[request_id] = response
        future = self._answered.get(request_id)
        if future is not None and not future.done():
            future.set_result(response)

    async def respond_control_error(self, request_id: str, error: str) -> None:
        await self.respond_control(request_id, {"error": error})

    async def initialize(self, *, timeout: float, **fields: Any) -> dict[str, Any]:
        await asyncio.sleep(self.spawner.handshake_seconds)
        if not self.alive:
            raise AgentExited("exited before answering", self.returncode)
        if self.spawner.die_during_handshake > 0:
            self.spawner.die_during_handshake -= 1
            self._exit(-11)
            raise AgentExited("exited before answering", -11, "")
        self.init_fields = fields
        return {}

    async def request(self, subtype: str, *, timeout: float, **fields: Any) -> dict[str, Any]:
        self.requests.append((subtype, fields))
        if subtype == "get_plan":
            return (
                {"exists": False} if self.plan is None else {"exists": True, "content": self.plan}
            )
        if subtype == "stop_task":  # the CLI ends the task, then tells the model in a turn
            self.end_task(str(fields["task_id"]), status="stopped", reply="stopped it")
        return {}

    async def interrupt(self, *, timeout: float) -> dict[str, Any]:
        self.interrupts += 1
        self._interrupt.set()
        return {}

    async def stop(self, grace: float) -> int | None:
        self.stops += 1
        if self.alive:
            await asyncio.sleep(self.spawner.stop_seconds)
            self._exit(0 if self._play_task is None or self._play_task.done() else -15)
        return self.returncode

    def kill(self) -> None:
        self._exit(-9)

    # --- test controls ------------------------------------------------------------------

    # As under a shim (`durable`): the turn records a daemon leaves are kept, with what the
    # agent said from the running turn's start, for the next daemon (`adopted_again`).
    helper = None
    detached = False

    @property
    def durable(self) -> bool:
        return self.spawner.durable

    @property
    def boundary(self) -> tuple[int, int]:
        """(Where the unread output begins in all it said, how many messages were read.)"""
        return len(self.said) - len(self._items), self.received

    def record(self, payload: bytes) -> None:
        self.records.append(payload)

    def forget_before(self, offset: int) -> None:
        self.records.clear()
        self._kept_from = offset

    def adopted_again(self) -> None:
        """A next daemon adopts it: what it said from the kept point on is read again."""
        self.detached = False
        self._items = deque(self.said[self._kept_from :])
        self.received = 0  # counted by the next daemon's reading, from the kept point

    def detach(self) -> None:
        assert self.durable, "only a durable scripted agent is handed over"
        self.detached = True

    async def drained(self) -> None:
        pass

    def release(self) -> None:
        """Lets a [[hold]] turn finish."""
        self._release.set()

    def crash(self, returncode: int = -11) -> None:
        self._exit(returncode)

    # --- behaviour ------------------------------------------------------------------------

    def _push(self, item: AgentItem) -> None:
        if self._final is not None:
            return
        self.said.append(item)
        self._items.append(item)
        self._wake()

    def _wake(self) -> None:
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)

    def _exit(self, returncode: int) -> None:
        if self.returncode is not None:
            return
        self.returncode = returncode
        self._exited.set()
        self._final = AgentExited("exited", returncode, self.stderr_tail())
        if self._play_task is not None:
            self._play_task.cancel()
        self._wake()

    async def _play(self, text: str, uuid: str) -> None:
        directives = {m.group(1): m.group(2) for m in _DIRECTIVE.finditer(text)}
        plain = _DIRECTIVE.sub("", text).strip()
        mid = f"msg_{len(self.user_messages)}"
        reply = f"echo: {plain}"
        interrupted = False
        self._push(proto.UserReplay(uuid, text))
        if "schedule" in directives:
            tool_use = proto.ToolUse("tu_wake", "ScheduleWakeup", '{"delaySeconds":60}')
            self._push(proto.AssistantMessage("", (tool_use,), message_id=mid))
        if "task" in directives:
            task_id = directives["task"] or "task1"
            self._push(proto.TaskStarted(task_id, f"tu_{task_id}", "local_bash", task_id, True))
        if "plan" in directives:
            self.plan = directives["plan"] or ""
            write = proto.ToolUse("tu_plan", "Write", '{"file_path": "plans/plan.md"}')
            self._push(proto.AssistantMessage("", (write,), message_id=mid + "_plan"))
        if "spend" in directives:
            tokens = int(directives["spend"] or 0)
            call = proto.AssistantMessage(
                "", (), message_id=mid + "_spend", model="claude-opus-test", input_tokens=tokens
            )
            self._push(call)
            self._push(proto.MessageDelta(tokens // 10))
        if "hold" in directives:
            self._delta("partial ", mid)
            interrupted = await self._held()
            reply = "" if interrupted else "done"
        elif "deltas" in directives:
            for _ in range(int(directives["deltas"] or 0)):
                self._delta("x", mid)
                await asyncio.sleep(0)
            reply = ""
        elif "ask" in directives:
            reply = await self._ask(directives["ask"] or "Bash")
        elif "abandon" in directives:
            self._delta("ech", mid)
            self._delta("o", mid, index=1)
            self._push(proto.AbandonedBlocks(message_id=mid, from_block_index=0))
            self._push(_assistant(reply, mid + "_retry"))
            reply = ""
        elif "big" in directives:
            size = int(directives["big"] or 0)
            self._push(
                proto.ToolResult(tool_use_id="toolu_big", content="b" * size, is_error=False)
            )
        if reply and "abandon" not in directives:
            self._delta(reply, mid)
        for taken_uuid, taken_text in self._taken_mid_turn:
            self._push(proto.UserReplay(taken_uuid, taken_text))
            self._delta(f" steered: {taken_text}", mid)
        self._taken_mid_turn.clear()
        self._push(_result(interrupted))
        if directives.get("then-own") == "open":  # ... and that turn is still under way
            self._push(proto.TaskNotification("sub1", "tu_sub1", "completed", "sub1 completed", ""))
            self._own_turn_start("the solver is")
        elif "then-own" in directives:  # a subagent ended before the result: its turn follows
            self.end_task("sub1", reply="right after")
        if self._next_lines:  # lines the turn did not take: the next turn takes the first
            next_uuid, next_text = self._next_lines.pop(0)
            self._play_task = asyncio.ensure_future(self._play(next_text, next_uuid))

    def _delta(self, text: str, message_id: str, index: int = 0) -> None:
        self._push(proto.TextDelta(text, None, message_id, index))

    async def _held(self) -> bool:
        """Waits for release or interrupt; True if interrupted."""
        release = asyncio.ensure_future(self._release.wait())
        interrupt = asyncio.ensure_future(self._interrupt.wait())
        try:
            await asyncio.wait({release, interrupt}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            release.cancel()
            interrupt.cancel()
        self._release.clear()
        return self._interrupt.is_set()

    async def _ask(self, tool: str) -> str:
        request_id = f"req_{self.pid}_{len(self.user_messages)}"
        future: asyncio.Future[Mapping[str, Any]] = asyncio.get_running_loop().create_future()
        self._answered[request_id] = future
        self._push(
            proto.ControlRequest(
                request_id,
                "can_use_tool",
                {"tool_name": tool, "input": {"command": "ls"}, "tool_use_id": f"tu_{request_id}"},
            )
        )
        interrupt = asyncio.ensure_future(self._interrupt.wait())
        try:
            waits: set[asyncio.Future[Any]] = {future, interrupt}
            await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
        finally:
            interrupt.cancel()
        if not future.done():
            self._push(proto.ControlCancelRequest(request_id))
            return ""
        answer = future.result()
        return f"permission {tool}: {answer.get('behavior', 'error')}"


def _assistant(text: str, message_id: str) -> proto.AssistantMessage:
    return proto.AssistantMessage(text=text, tool_uses=(), message_id=message_id)


def _result(interrupted: bool, origin_kind: str = "") -> proto.Result:
    return proto.Result(
        subtype="error_during_execution" if interrupted else "success",
        is_error=interrupted,
        result_text="",
        total_cost_usd=0.0,
        usage={},
        duration_ms=1,
        num_turns=1,
        session_id="scripted",
        stop_reason=None,
        permission_denials=(),
        raw={"origin": {"kind": origin_kind}} if origin_kind else {},
    )
