"""Plan mode: the agent plans before it acts.

A plan-mode session's agent runs with `--permission-mode plan` (and user mode's allowlist and
sandbox): the CLI lets it only read and write its plan file. When the plan is ready the agent
calls `ExitPlanMode`, which reaches the session's clients as a `permission_request` for that
tool carrying the plan (the CLI puts the plan file's text in the tool's input). A client that
allows it chooses where the session goes on: user mode, or power mode where the policy allows
it. The session's mode is changed (stored, audited as a mode switch) and the agent is told to
leave plan mode in the allow answer (`updatedPermissions` `setMode`: `default`, or
`bypassPermissions`, which the CLI accepts from an agent started with
`--allow-dangerously-skip-permissions`); it goes on with the same turn (docs/agent-protocol.md).
A denial leaves the session in plan mode, and the model reads why.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import structlog

from atomizerd.model import AuditRecord, Mode
from atomizerd.sessions.approvals import CLIENT
from atomizerd.store.db import Store

if TYPE_CHECKING:
    from atomizerd.sessions.session import Session
    from atomizerd.sessions.turns import Turn

log = structlog.get_logger("atomizerd.sessions.plans")

# The CLI's permission mode each session mode goes on in after its plan was approved.
CLI_MODE_AFTER_PLAN = {Mode.USER: "default", Mode.POWER: "bypassPermissions"}


def leave_plan(store: Store, s: Session, turn: Turn, mode: Mode) -> str | None:
    """An allowed ExitPlanMode: the session goes on in `mode`; returns the CLI's permission
    mode to switch the agent to (None: the session is not in plan mode, nothing changes)."""
    if s.record.mode != Mode.PLAN:
        return None
    with store.atomic():
        # The next message carries the new mode's context (the CLI keeps the first prompt).
        record = store.update_session(s.id, mode=mode, context_stale=True)
        store.add_audit(
            AuditRecord(
                session_id=s.id,
                kind="mode_switch",
                allow=True,
                decider=CLIENT,
                detail=f"{Mode.PLAN} -> {mode} (plan approved)",
                turn_id=turn.turn_id,
            )
        )
    if record is not None:
        s.record = record
    turn.left_plan = mode
    log.info("plan approved; session leaves plan mode", session_id=s.id, mode=mode)
    return CLI_MODE_AFTER_PLAN[mode]
