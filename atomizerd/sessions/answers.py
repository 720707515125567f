"""Clients' answers to a running turn: interrupts, permission decisions, answers to the
agent's questions, and the audit trail they leave.

The first answer wins; a late one is told it came too late (FAILED_PRECONDITION), an unknown
request is NOT_FOUND (docs/architecture.md, "The flow of a permission request").
"""

from __future__ import annotations

from atomizerd.errors import FailedPrecondition, InvalidArgument, NotFound
from atomizerd.model import AuditRecord, Mode
from atomizerd.sessions import checks
from atomizerd.sessions import events as ev
from atomizerd.sessions.approvals import Decision, client_decision
from atomizerd.sessions.table import SessionTable


class Answers:
    def __init__(self, table: SessionTable) -> None:
        self.table = table
        self.config = table.config
        self.store = table.store

    async def interrupt(self, session_id: str) -> str:
        s = self.table.serving(session_id)
        turn = s.turn
        if turn is None:
            raise FailedPrecondition(f"session {s.id!r} has no turn running")
        turn.interrupt()
        return turn.turn_id

    def respond_to_permission(
        self,
        session_id: str,
        request_id: str,
        allow: bool,
        message: str,
        remember: bool,
        updated_input_json: str = "",
        rule: tuple[str, str] | None = None,
        next_mode: str | None = None,
    ) -> Decision:
        s = self.table.serving(session_id)
        if not request_id:
            raise InvalidArgument("request_id is required")
        message = message or ("" if allow else "the user denied this tool use")
        decision = client_decision(allow, message, remember, updated_input_json, rule)
        if next_mode is not None:
            if next_mode not in (Mode.USER, Mode.POWER) or not allow:
                raise InvalidArgument(
                    "mode goes with an allow of ExitPlanMode: MODE_USER or MODE_POWER"
                )
            decision.next_mode = checks.check_mode(self.config, next_mode)
        turn = s.turn
        if turn is not None and turn.approvals is not None:
            approvals = turn.approvals
            if request_id in approvals.pending or request_id in approvals.decided:
                return approvals.answer(request_id, decision)
        earlier = s.decisions.get(request_id)
        if earlier is not None:
            raise FailedPrecondition(
                f"permission request {request_id!r} was already decided "
                f"({'allowed' if earlier.allow else 'denied'} by {earlier.decider})"
            )
        raise NotFound(f"session {s.id!r} has no permission request {request_id!r}")

    def answer_question(
        self, session_id: str, request_id: str, answers: dict[str, str]
    ) -> ev.QuestionAnswered:
        """A client's answer to a question of the running turn (empty answers decline it)."""
        s = self.table.serving(session_id)
        if not request_id:
            raise InvalidArgument("request_id is required")
        turn = s.turn
        if turn is not None and turn.approvals is not None:
            questions = turn.approvals.questions
            if request_id in questions.pending:
                return questions.answer(request_id, answers)
            if request_id in questions.settled:
                raise FailedPrecondition(f"question {request_id!r} has already ended")
        if request_id in s.decisions:
            raise FailedPrecondition(f"question {request_id!r} has already ended")
        raise NotFound(f"session {s.id!r} has no pending question {request_id!r}")

    def audit_events(
        self, session_id: str, page_size: int, page_token: str
    ) -> tuple[list[AuditRecord], str]:
        s = self.table.load(session_id)
        return checks.id_page(
            page_size,
            page_token,
            lambda after, limit: self.store.audit_events(s.id, after_id=after, limit=limit),
            lambda row: row.audit_id,
        )
