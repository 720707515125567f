"""The plan the agent works to: `Session.plan` and `plan_updated` events.

Measured (docs/agent-protocol.md, "The agent's plan"): the pinned CLI keeps the plan in a plan
file (written with its Write or Edit tool in plan mode) and answers the `get_plan` control
request with that file's text (`{"exists": true, "content": …, "path": …}`, or
`{"exists": false}` before there is one). `ExitPlanMode` asks with the same text as its `plan`.
It has no TodoWrite among its default tools, so the plan file is the plan. The plan is taken
when the agent asks to leave plan mode (the permission request carries it) and, after a turn
that wrote a file or left plan mode, from `get_plan`, which also sees edits to it made later.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import structlog

from atomizerd.agents.transport import AgentTransport
from atomizerd.agents.vocabulary import AgentError
from atomizerd.errors import AtomizerError
from atomizerd.model import Mode
from atomizerd.sessions import events as ev
from atomizerd.sessions.turn import Emit, Transcript
from atomizerd.store.db import Store

if TYPE_CHECKING:  # the session module imports the turn runner, which imports this
    from atomizerd.sessions.session import Session

log = structlog.get_logger("atomizerd.sessions.planning")

# A plan longer than this is cut (Session.plan travels with every session a client lists).
MAX_PLAN_CHARS = 16 * 1024
# Tools that can write the plan file, and the one that presents the plan.
PLAN_WRITERS = frozenset({"Write", "Edit", "MultiEdit", "ExitPlanMode"})


class PlanKeeper:
    """Stores the session's plan when it changes and tells the session's watchers."""

    def __init__(self, store: Store, s: Session, emit: Emit) -> None:
        self.store = store
        self.s = s
        self.emit = emit

    def set(self, text: str) -> None:
        text = cut(text)
        if not text.strip() or text == self.s.record.plan:
            return
        try:
            record = self.store.update_session(self.s.id, plan=text)
        except AtomizerError as e:  # a full disk costs the stored plan, not the turn
            log.warning("plan not stored", session_id=self.s.id, error=str(e))
            return
        if record is not None:
            self.s.record = record
        self.emit(ev.PlanUpdated(text))

    def watching(self, emit: Emit) -> Emit:
        """`emit`, taking the plan of an ExitPlanMode permission request on its way."""

        def watched(kind: ev.EventKind) -> ev.SessionEvent:
            if isinstance(kind, ev.PermissionRequest) and kind.plan:
                self.set(kind.plan)
            return emit(kind)

        return watched

    async def refresh(self, agent: AgentTransport, timeout: float) -> None:
        """Asks the agent for its plan file's text (its `get_plan`) and keeps it."""
        try:
            answer: dict[str, Any] = await agent.request("get_plan", timeout=timeout)
        except AgentError as e:  # a CLI without it, or one gone: the plan stays as it was
            log.info("the agent did not give its plan", session_id=self.s.id, error=str(e))
            return
        content = answer.get("content")
        if answer.get("exists") and isinstance(content, str):
            self.set(content)


def may_have_planned(s: Session, transcript: Transcript) -> bool:
    """Whether the turn may have written or presented a plan: worth asking for it."""
    if s.record.mode == Mode.PLAN:
        return True
    return any(call.name in PLAN_WRITERS for call in transcript.tool_calls.values())


def cut(text: str) -> str:
    if len(text) <= MAX_PLAN_CHARS:
        return text
    return text[:MAX_PLAN_CHARS] + "\n… (cut at 16 KiB)"
