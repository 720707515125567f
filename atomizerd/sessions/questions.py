"""Questions the agent asks the user: the CLI's `AskUserQuestion` tool.

With `--permission-prompt-tool stdio` the CLI asks us before it runs any tool that needs a
person, and `AskUserQuestion` is one (`requires_user_interaction`): a `can_use_tool` control
request whose input is `{questions: [{question, header, options: [{label, description}],
multiSelect}]}`. It becomes a `question` event; the first `AnswerQuestion` decides it. An answer
is given back to the CLI as an allow whose `updatedInput` is the input plus `answers: {question
text: chosen label}`, and the model then reads "Your questions have been answered: …"
(docs/agent-protocol.md). A declined question, no answer within `approvals.timeout`, nobody
attached to answer, or the turn ending first is a denial that tells the model why. Every
outcome is a `question_answered` event and an audit row (kind `question`); the trail keeps a
digest of the questions, never the answers.

`Approvals` owns one `Questions` per turn and routes the tool's requests here.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import structlog

from atomizerd.errors import FailedPrecondition, InvalidArgument, NotFound
from atomizerd.sessions import events as ev

log = structlog.get_logger("atomizerd.sessions.questions")

QUESTION_TOOL = "AskUserQuestion"
# One answer's text at most (a label, or a person's own words).
MAX_ANSWER_CHARS = 4096
CLIENT, TIMEOUT, POLICY = "client", "timeout", "policy"
DECLINED = "the user chose not to answer these questions"

# (allow, decider, detail) of one settled question, written to the audit trail.
Audit = Callable[[bool, str, str], None]


@dataclass
class Outcome:
    """How a question ended; `updated_input` is what the CLI runs the tool with (answered)."""

    answered: bool
    decider: str
    message: str = ""
    answers: dict[str, str] = field(default_factory=dict)
    updated_input: dict[str, Any] | None = None


@dataclass
class _Pending:
    request_id: str
    tool_input: dict[str, Any]
    items: tuple[ev.QuestionItem, ...]
    audit: Audit
    answer: asyncio.Future[Outcome] = field(
        default_factory=lambda: asyncio.get_running_loop().create_future()
    )


def parse_questions(tool_input: dict[str, Any]) -> tuple[ev.QuestionItem, ...]:
    """The questions of an AskUserQuestion input (leniently: wrong types read as empty)."""
    raw = tool_input.get("questions")
    items = []
    for q in raw if isinstance(raw, list) else []:
        if not isinstance(q, dict) or not isinstance(q.get("question"), str):
            continue
        options = q.get("options")
        items.append(
            ev.QuestionItem(
                question=q["question"],
                header=_text(q.get("header")),
                options=tuple(
                    ev.QuestionOption(_text(o.get("label")), _text(o.get("description")))
                    for o in (options if isinstance(options, list) else [])
                    if isinstance(o, dict)
                ),
                multi_select=q.get("multiSelect") is True,
            )
        )
    return tuple(items)


def _text(value: object) -> str:
    return value if isinstance(value, str) else ""


@dataclass(frozen=True)
class NoticeWait:
    """With nobody attached: whether a webhook is told of requests of this kind
    (notify.webhooks), and how to wait (at most `wait` seconds) for that notification's
    delivery before the request's own timeout starts."""

    told: Callable[[], bool] = lambda: False
    delivered: Callable[[str, float], Awaitable[bool]] | None = None
    wait: float = 0.0

    def applies(self) -> bool:
        return self.delivered is not None and self.told()

    async def until_delivered(self, request_id: str, answer: asyncio.Future[Any]) -> bool:
        """Nobody attached, a webhook told: the request's `approvals.timeout` counts from when
        its notification was delivered (docs/clients.md), so a person can act on it. True
        once delivered, or answered meanwhile (a client attached)."""
        assert self.delivered is not None
        delivery = asyncio.ensure_future(self.delivered(request_id, self.wait))
        either: set[asyncio.Future[Any]] = {delivery, answer}
        try:
            await asyncio.wait(either, return_when=asyncio.FIRST_COMPLETED)
        finally:
            delivery.cancel()
        if answer.done():
            return True
        return delivery.done() and not delivery.cancelled() and bool(delivery.result())


NO_NOTICE = NoticeWait()  # no webhook: nobody attached means nobody will be told


class Questions:
    """The questions of one turn."""

    def __init__(
        self,
        emit: Callable[[ev.EventKind], ev.SessionEvent],
        audience: Callable[[], int],
        timeout: float,
        notice: NoticeWait = NO_NOTICE,
    ) -> None:
        self.emit = emit
        self.audience = audience
        self.timeout = timeout
        self.notice = notice
        self.pending: dict[str, _Pending] = {}
        self.settled: dict[str, Outcome] = {}
        self.closed = False

    async def ask(
        self,
        request_id: str,
        tool_input: dict[str, Any],
        tool_use_id: str,
        audit: Audit,
        restored: float | None = None,
    ) -> Outcome:
        """Asks the session's clients and waits for the first answer (or the timeout).
        `restored`: asked before a restart with this deadline; only waited for now."""
        if self.closed:  # the turn has ended: nothing more is emitted for it
            return Outcome(False, POLICY, "the turn has ended")
        items = parse_questions(tool_input)
        timeout = self.timeout
        if restored is not None:
            timeout = max(restored - time.time(), 0.0)
        elif not items:
            return self._settle(request_id, Outcome(False, POLICY, "no question to ask"), audit)
        notified = False
        if restored is None and self.audience() == 0:
            notified = self.notice.applies()
            if not notified:
                outcome = Outcome(False, POLICY, "no client is attached to answer the questions")
                return self._settle(request_id, outcome, audit)
        pending = _Pending(request_id, tool_input, items, audit)
        self.pending[request_id] = pending
        if restored is None:
            self.emit(ev.Question(request_id, items, tool_use_id, time.time() + timeout))
        if notified and not await self.notice.until_delivered(pending.request_id, pending.answer):
            pending.answer.set_result(
                Outcome(
                    False,
                    POLICY,
                    "no client is attached, and the notification of the questions was not "
                    f"delivered within {self.notice.wait:g} s (notify.delivery_wait)",
                )
            )
        try:
            outcome = await asyncio.wait_for(asyncio.shield(pending.answer), timeout)
        except TimeoutError:
            outcome = Outcome(
                False, TIMEOUT, f"nobody answered within {self.timeout:g} s (approvals.timeout)"
            )
            if not pending.answer.done():
                pending.answer.set_result(outcome)
        finally:
            self.pending.pop(request_id, None)
        if request_id in self.settled:  # settled by close() at the turn's end
            return self.settled[request_id]
        return self._settle(request_id, outcome, audit)

    def answer(self, request_id: str, answers: dict[str, str]) -> ev.QuestionAnswered:
        """A client's answer (empty: declined); the first one wins."""
        pending = self.pending.get(request_id)
        if pending is None:
            raise NotFound(f"no pending question {request_id!r} in this session")
        if pending.answer.done():
            raise FailedPrecondition(f"question {request_id!r} was already answered")
        texts = [item.question for item in pending.items]
        for question, answer in answers.items():
            if question not in texts:
                raise InvalidArgument(
                    f"{question[:200]!r} is not one of the questions of {request_id!r}; "
                    f"they are: {', '.join(repr(t[:200]) for t in texts)}"
                )
            if not answer.strip():
                raise InvalidArgument(f"the answer to {question[:200]!r} is empty")
            if len(answer) > MAX_ANSWER_CHARS:
                raise InvalidArgument(
                    f"the answer to {question[:200]!r} is {len(answer)} characters; "
                    f"the limit is {MAX_ANSWER_CHARS}"
                )
        if answers:
            ordered = {t: answers[t] for t in texts if t in answers}
            outcome = Outcome(True, CLIENT, "", ordered, {**pending.tool_input, "answers": ordered})
        else:
            outcome = Outcome(False, CLIENT, DECLINED)
        pending.answer.set_result(outcome)
        return _event(request_id, outcome)

    def cancel(self, request_id: str, why: str) -> None:
        pending = self.pending.get(request_id)
        if pending is not None and not pending.answer.done():
            pending.answer.set_result(Outcome(False, POLICY, why))

    def close(self, why: str) -> None:
        """The turn is ending: pending questions end unanswered now (an answer that came an
        instant ago stands), announced and audited before the turn's terminal event; later
        questions end silently."""
        self.closed = True
        for request_id, pending in list(self.pending.items()):
            if not pending.answer.done():
                pending.answer.set_result(Outcome(False, POLICY, why))
            self._settle(request_id, pending.answer.result(), pending.audit)
        self.pending.clear()

    def _settle(self, request_id: str, outcome: Outcome, audit: Audit) -> Outcome:
        self.settled[request_id] = outcome
        self.emit(_event(request_id, outcome))
        detail = "answered" if outcome.answered else f"not answered: {outcome.message}"
        audit(outcome.answered, outcome.decider, detail)
        log.info("question settled", answered=outcome.answered, decider=outcome.decider)
        return outcome


def _event(request_id: str, outcome: Outcome) -> ev.QuestionAnswered:
    return ev.QuestionAnswered(
        request_id,
        tuple(outcome.answers.items()),
        outcome.answered,
        outcome.decider,
        outcome.message,
    )
