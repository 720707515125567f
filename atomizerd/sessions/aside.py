"""Questions asked aside (AskAside): answered from the conversation so far, never part of it.

The CLI's `side_question` control request makes one model call with the conversation and the
question last, and keeps neither in the conversation (measured: docs/agent-protocol.md). It
works between turns and while a turn runs, so an aside never waits for the running turn. The
question is stored before the agent gets it, the answer when it comes, both with origin
"aside": GetHistory shows them apart, and a reseed or a fork's history never carries them.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass

import structlog

from atomizerd.config import Config
from atomizerd.errors import AtomizerError, FailedPrecondition
from atomizerd.model import MessageRecord
from atomizerd.sessions import checks
from atomizerd.sessions.agentcalls import AgentCalls
from atomizerd.sessions.session import Session
from atomizerd.sessions.table import SessionTable
from atomizerd.store.db import Store

log = structlog.get_logger("atomizerd.sessions.aside")


@dataclass(frozen=True)
class AsideStep:
    """One step of an aside's answer: the stored question first, then text, then the end."""

    question_id: int = 0
    text: str = ""
    done: bool = False
    answer_id: int = 0


class Asides:
    def __init__(self, config: Config, store: Store, table: SessionTable, calls: AgentCalls):
        self.config = config
        self.store = store
        self.table = table
        self.calls = calls
        self._running: set[asyncio.Task[MessageRecord]] = set()

    async def ask(self, session_id: str, text: str) -> AsyncIterator[AsideStep]:
        self.table.check_open()
        checks.check_text(self.config, text)
        s = self.table.serving(session_id)
        self.table.require_open(s)
        if not s.record.agent_started:
            raise FailedPrecondition(
                f"session {s.id!r} has no conversation yet to ask about; send a message first"
            )
        checks.check_budget(s.record)  # an aside is a model call: it costs like a turn
        question = self.store.add_aside_question(s.id, text)
        yield AsideStep(question_id=question.message_id)
        # A caller that goes away does not lose the answer: it is stored all the same.
        task = asyncio.ensure_future(self._answer(s, question))
        self._running.add(task)
        task.add_done_callback(self._settled)
        stored = await asyncio.shield(task)
        if stored.content:
            yield AsideStep(text=stored.content)
        yield AsideStep(done=True, answer_id=stored.message_id)

    async def _answer(self, s: Session, question: MessageRecord) -> MessageRecord:
        try:
            answer = await self.calls.call(
                s,
                "side_question",
                timeout=self.config.agent.stall_timeout,
                start=True,
                question=question.content,
            )
        except AtomizerError as e:
            self.store.add_aside_answer(question, "", "failed", str(e))
            raise
        except asyncio.CancelledError:  # the daemon stops
            self.store.add_aside_answer(question, "", "interrupted", "the daemon stopped first")
            raise
        stored = self.store.add_aside_answer(
            question, str(answer.get("response") or ""), "complete", ""
        )
        log.info("question aside answered", session_id=s.id, message_id=stored.message_id)
        return stored

    def _settled(self, task: asyncio.Task[MessageRecord]) -> None:
        self._running.discard(task)
        if not task.cancelled():
            task.exception()  # retrieved: it reached its caller, or the caller had gone

    def cancel(self) -> None:
        """Shutdown: questions still waiting for the agent are dropped (stored as such)."""
        for task in list(self._running):
            task.cancel()
