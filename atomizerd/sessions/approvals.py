"""Governance: live tool approval by clients, remembered rules, and the audit trail.

In user mode the agent runs with `--permission-prompt-tool stdio`, so a tool outside the
allowlist becomes a `can_use_tool` control request. The `Approvals` of a turn turn that into
a `permission_request` event, wait for the first client answer (or a remembered rule, or the
timeout, or the policy when nobody is attached), answer the agent, announce the outcome with
`permission_decided`, and write it to the audit trail.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import structlog

from atomizerd.agents import protocol as proto
from atomizerd.errors import FailedPrecondition, InvalidArgument, NotFound, StoreDown
from atomizerd.model import AuditRecord, Mode, ToolCallRecord
from atomizerd.sessions import events as ev
from atomizerd.sessions.questions import NO_NOTICE, QUESTION_TOOL, NoticeWait, Questions
from atomizerd.sessions.rules import (
    check_rule,
    format_rule,
    parse_suggestions,
    session_rule_update,
)
from atomizerd.store.db import Store
from atomizerd.telemetry import NULL, Telemetry

log = structlog.get_logger("atomizerd.sessions.approvals")

CLIENT, RULE, TIMEOUT, POLICY, MODE = "client", "rule", "timeout", "policy", "mode"
# The tool a plan-mode agent calls to carry out its plan.
EXIT_PLAN_TOOL = "ExitPlanMode"
PLAN_MODE_DENIAL = (
    "plan mode: nothing is changed before the plan is approved; present it with ExitPlanMode"
)


def json_or_text(text: str) -> Any:
    """A tool input as the CLI sent it: JSON, or the text itself when it is not JSON."""
    try:
        return json.loads(text)
    except ValueError:
        return text


def input_digest(tool_input: Any) -> str:
    """A stable digest of a tool input: the trail and the rules never hold file contents."""
    text = json.dumps(tool_input, sort_keys=True, ensure_ascii=False, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()


@dataclass
class Decision:
    allow: bool
    decider: str
    message: str = ""
    remember: bool = False
    tool_name: str = ""
    # What the tool runs with when allowed (None: the input it was asked with).
    updated_input: dict[str, Any] | None = None
    # A client's rule to remember instead of the exact call: (tool name, rule content).
    rule: tuple[str, str] | None = None
    # ExitPlanMode: the mode the session goes on in (a client's choice), and the CLI's
    # permission mode the agent is switched to once it is applied.
    next_mode: Mode | None = None
    cli_mode: str | None = None

    def permission_updates(self) -> list[dict[str, Any]]:
        """What the running agent is told to remember along with an allow."""
        updates = [session_rule_update(*self.rule)] if self.allow and self.rule else []
        if self.allow and self.cli_mode:
            updates.append({"type": "setMode", "mode": self.cli_mode, "destination": "session"})
        return updates


def client_decision(
    allow: bool,
    message: str,
    remember: bool,
    updated_input_json: str = "",
    rule: tuple[str, str] | None = None,
) -> Decision:
    """A client's answer, checked: an edited input must be a JSON object and, like a rule,
    goes only with an allow; a rule is in Claude Code's syntax (sessions/rules.py)."""
    decision = Decision(allow, CLIENT, message, remember)
    if updated_input_json:
        if not allow:
            raise InvalidArgument("updated_input_json goes only with allow")
        try:
            edited = json.loads(updated_input_json)
        except ValueError as e:
            raise InvalidArgument(f"updated_input_json is not valid JSON: {e}") from None
        if not isinstance(edited, dict):
            raise InvalidArgument(
                f"updated_input_json must be a JSON object (the tool's input), "
                f"not {type(edited).__name__}"
            )
        decision.updated_input = edited
    if rule is not None:
        if not allow:
            raise InvalidArgument("a rule goes only with allow (remember a denial with remember)")
        check_rule(*rule)
        decision.rule = (rule[0], rule[1].strip())
    return decision


@dataclass
class PendingRequest:
    request_id: str
    tool_name: str
    tool_input: dict[str, Any]
    tool_use_id: str
    answer: asyncio.Future[Decision] = field(
        default_factory=lambda: asyncio.get_running_loop().create_future()
    )


class Approvals:
    """The permission requests of one turn."""

    def __init__(
        self,
        store: Store,
        session_id: str,
        turn_id: str,
        timeout: float,
        emit: Callable[[ev.EventKind], ev.SessionEvent],
        audience: Callable[[], int],
        leave_plan: Callable[[Mode], str | None] | None = None,
        in_plan: Callable[[], bool] = lambda: False,
        telemetry: Telemetry = NULL,
        notice: NoticeWait = NO_NOTICE,
        question_notice: NoticeWait = NO_NOTICE,
    ) -> None:
        self.store = store
        self.notice = notice
        self.telemetry = telemetry
        # Whether the session is in plan mode now: then no tool that changes anything runs.
        self.in_plan = in_plan
        # Applies an allowed ExitPlanMode: the session's new mode in, the CLI's mode out (None:
        # the session is not in plan mode).
        self.leave_plan = leave_plan
        self.session_id = session_id
        self.turn_id = turn_id
        self.timeout = timeout
        self.emit = emit
        self.audience = audience
        self.pending: dict[str, PendingRequest] = {}
        self.decided: dict[str, Decision] = {}
        self.asked_tool_uses: set[str] = set()
        # Set when the turn ends: every request is settled then, and nothing is emitted after.
        self.closed = False
        # The agent's AskUserQuestion calls reach us as permission requests too.
        self.questions = Questions(emit, audience, timeout, question_notice)

    @property
    def waiting(self) -> bool:
        return bool(self.pending) or bool(self.questions.pending)

    async def decide(
        self, request: proto.ControlRequest, restored: float | None = None
    ) -> Decision:
        """The outcome of one `can_use_tool` request (waits for a client when one is there).

        `restored`: the request was put to clients by the daemon before a restart, with this
        deadline (its event is back in the session's log): it is waited for, not asked again.
        """
        if self.closed:  # the turn has ended: nobody can answer any more
            return Decision(False, POLICY, "the turn has ended")
        payload = request.payload
        tool_name = str(payload.get("tool_name", ""))
        raw_input = payload.get("input")
        tool_input = raw_input if isinstance(raw_input, dict) else {}
        tool_use_id = str(payload.get("tool_use_id", ""))
        self.asked_tool_uses.add(tool_use_id)
        digest = input_digest(tool_input)
        if tool_name == QUESTION_TOOL:
            return await self._ask(request.request_id, tool_input, tool_use_id, digest, restored)
        # A plan is always put to a person: no rule decides it.
        plan = tool_name == EXIT_PLAN_TOOL
        if restored is not None:
            pending = PendingRequest(request.request_id, tool_name, tool_input, tool_use_id)
            self.pending[request.request_id] = pending
            return await self._wait(request, pending, plan, digest, restored - time.time())
        if not plan and self.in_plan():
            return self._settle(
                request.request_id,
                tool_name,
                digest,
                Decision(False, MODE, PLAN_MODE_DENIAL),
            )
        remembered = None if plan else self.store.find_rule(self.session_id, tool_name, digest)
        if remembered is not None:
            return self._settle(
                request.request_id,
                tool_name,
                digest,
                Decision(remembered, RULE, "a rule remembered in this session"),
            )
        told = False
        if self.audience() == 0:
            told = self.notice.applies()
            if not told:
                return self._settle(
                    request.request_id,
                    tool_name,
                    digest,
                    Decision(False, POLICY, "no client is attached to approve this tool use"),
                )
        pending = PendingRequest(request.request_id, tool_name, tool_input, tool_use_id)
        self.pending[request.request_id] = pending
        self.emit(
            ev.PermissionRequest(
                request_id=request.request_id,
                tool_name=tool_name,
                input_json=json.dumps(tool_input, ensure_ascii=False, separators=(",", ":")),
                description=str(payload.get("description", "")),
                tool_use_id=tool_use_id,
                deadline=time.time() + self.timeout,
                suggestions=parse_suggestions(payload.get("permission_suggestions")),
                plan=str(tool_input.get("plan") or "") if plan else "",
            )
        )
        if told and not await self.notice.until_delivered(pending.request_id, pending.answer):
            pending.answer.set_result(
                Decision(
                    False,
                    POLICY,
                    "no client is attached, and the notification of this request was not "
                    f"delivered within {self.notice.wait:g} s (notify.delivery_wait)",
                )
            )
        return await self._wait(request, pending, plan, digest, self.timeout)

    async def _wait(
        self,
        request: proto.ControlRequest,
        pending: PendingRequest,
        plan: bool,
        digest: str,
        timeout: float,
    ) -> Decision:
        """A client's answer to a request they were asked, or the timeout's denial."""
        tool_name = pending.tool_name
        try:
            async with asyncio.timeout(max(timeout, 0.0)):
                decision = await asyncio.shield(pending.answer)
        except TimeoutError:
            # An answer taken in the instant the timeout fired stands: its client was told so.
            if pending.answer.done():
                decision = pending.answer.result()
            else:
                decision = Decision(
                    False,
                    TIMEOUT,
                    f"nobody answered within {self.timeout:g} s (approvals.timeout)",
                )
                pending.answer.set_result(decision)
        finally:
            self.pending.pop(request.request_id, None)
        if request.request_id in self.decided:  # settled by close() at the turn's end
            return self.decided[request.request_id]
        if plan and decision.allow and self.leave_plan is not None:
            decision.cli_mode = self.leave_plan(decision.next_mode or Mode.USER)
        if decision.decider == CLIENT and not plan:
            decision.message = self._remember(tool_name, digest, decision)
        return self._settle(request.request_id, tool_name, digest, decision)

    def _remember(self, tool_name: str, digest: str, decision: Decision) -> str:
        """Stores what a client's answer asks to remember; the detail its audit row gets."""
        notes = [decision.message] if decision.message else []
        if decision.updated_input is not None:
            notes.append(
                f"allowed with an edited input (sha256 {input_digest(decision.updated_input)})"
            )
        try:
            if decision.rule is not None and decision.allow:
                rule = format_rule(*decision.rule)
                self.store.remember_pattern(self.session_id, rule)
                notes.append(f"the rule {rule} is allowed for the rest of the session")
            elif decision.remember:
                notes.append(self._remember_call(tool_name, digest, decision))
        except StoreDown as e:  # the answer stands for this call; only the rule is lost
            log.error("permission rule not remembered", tool=tool_name, error=str(e))
            notes.append("not remembered: the store cannot take writes now")
        return "; ".join(notes)

    def _remember_call(self, tool_name: str, digest: str, decision: Decision) -> str:
        """Remembers the call that runs: the edited one when the client edited the input (the
        one asked for may never run unasked); says exactly what is remembered."""
        edited = decision.updated_input is not None
        remembered = input_digest(decision.updated_input) if edited else digest
        self.store.remember_rule(self.session_id, tool_name, remembered, decision.allow)
        verdict = "allowed" if decision.allow else "denied"
        which = "the edited input" if edited else "this input"
        return (
            f"remembered for the rest of the session: {tool_name} with exactly {which} "
            f"(sha256 {remembered}) is {verdict} without asking"
        )

    async def _ask(
        self,
        request_id: str,
        tool_input: dict[str, Any],
        tool_use_id: str,
        digest: str,
        restored: float | None,
    ) -> Decision:
        def audit(answered: bool, decider: str, detail: str) -> None:
            self.audit(QUESTION_TOOL, digest, answered, decider, detail, kind="question")

        outcome = await self.questions.ask(request_id, tool_input, tool_use_id, audit, restored)
        decision = Decision(
            outcome.answered,
            outcome.decider,
            outcome.message,
            tool_name=QUESTION_TOOL,
            updated_input=outcome.updated_input,
        )
        self.decided[request_id] = decision
        return decision

    def answer(self, request_id: str, decision: Decision) -> Decision:
        """A client's answer; the first one wins."""
        if request_id in self.decided:
            earlier = self.decided[request_id]
            raise FailedPrecondition(
                f"permission request {request_id!r} was already decided "
                f"({'allowed' if earlier.allow else 'denied'} by {earlier.decider})"
            )
        pending = self.pending.get(request_id)
        if pending is None:
            raise NotFound(f"no pending permission request {request_id!r} in this session")
        if decision.next_mode is not None and pending.tool_name != EXIT_PLAN_TOOL:
            raise InvalidArgument("mode goes only with an answer to ExitPlanMode")
        if pending.answer.done():  # answered an instant ago, not yet settled
            raise FailedPrecondition(f"permission request {request_id!r} was already answered")
        decision.tool_name = pending.tool_name
        pending.answer.set_result(decision)
        return decision

    def cancel(self, request_id: str, why: str) -> None:
        self.questions.cancel(request_id, why)
        pending = self.pending.get(request_id)
        if pending is not None and not pending.answer.done():
            pending.answer.set_result(Decision(False, POLICY, why))

    def close(self, why: str) -> None:
        """The turn is ending: every pending request is decided (denied) now, announced and
        audited before the turn's terminal event; later requests are denied silently."""
        self.closed = True
        self.questions.close(why)
        for request_id, pending in list(self.pending.items()):
            digest = input_digest(pending.tool_input)
            if pending.answer.done():  # a client answered an instant ago: that answer stands
                decision = pending.answer.result()
            else:
                decision = Decision(False, POLICY, why)
                pending.answer.set_result(decision)
            self._settle(request_id, pending.tool_name, digest, decision)
        self.pending.clear()

    def _settle(self, request_id: str, tool_name: str, digest: str, d: Decision) -> Decision:
        self.decided[request_id] = d
        self.emit(ev.PermissionDecided(request_id, tool_name, d.allow, d.decider, d.message))
        self.audit(tool_name, digest, d.allow, d.decider, d.message)
        log.info("permission decided", tool=tool_name, allow=d.allow, decider=d.decider)
        self.telemetry.permission_decided(d.decider, d.allow)
        return d

    def audit(
        self,
        tool_name: str,
        digest: str,
        allow: bool,
        decider: str,
        detail: str,
        *,
        kind: str = "permission",
    ) -> None:
        try:
            self._write_audit(tool_name, digest, allow, decider, detail, kind)
        except StoreDown as e:  # the decision stands; only its record is lost
            log.error("audit event not stored", tool=tool_name, error=str(e))

    def audit_unasked(self, calls: Iterable[ToolCallRecord], denied: set[str]) -> None:
        """Tool uses nobody was asked about: allowed by the mode's rules, or denied by the
        CLI's own policy (`denied`: the turn's permission denials)."""
        for call in calls:
            if call.id in self.asked_tool_uses:
                continue
            digest = input_digest(json_or_text(call.input_json))
            if call.id in denied:
                self.audit(call.name, digest, False, POLICY, "denied by the mode's rules")
            else:
                self.audit(call.name, digest, True, MODE, "allowed by the mode's rules")

    def _write_audit(
        self, tool_name: str, digest: str, allow: bool, decider: str, detail: str, kind: str
    ) -> None:
        self.store.add_audit(
            AuditRecord(
                session_id=self.session_id,
                kind=kind,
                allow=allow,
                decider=decider,
                tool_name=tool_name,
                input_digest=digest,
                detail=detail,
                turn_id=self.turn_id,
            )
        )
