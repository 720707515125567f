"""Turn outcomes the store could not take (a full disk, the database unreachable), stored once
it can again.

A turn's terminal event goes out whatever the store says (docs/architecture.md, "The flow of one
turn"); its outcome then waits here and is retried in the background, oldest first. A session's
own waiting outcomes go first when its next turn opens, so its history stays in order and its
cost base is current before the agent's next report.
"""

from __future__ import annotations

import asyncio
import contextlib
from dataclasses import dataclass
from typing import TYPE_CHECKING

import structlog

from atomizerd.errors import StoreDown
from atomizerd.model import TurnOutcome
from atomizerd.store.db import Store

if TYPE_CHECKING:
    from atomizerd.sessions.session import Session

log = structlog.get_logger("atomizerd.sessions.outcomes")


@dataclass(eq=False)
class _Waiting:
    session: Session
    turn_id: str
    outcome: TurnOutcome
    agent_cost: float | None


class LateOutcomes:
    def __init__(self, store: Store, retry_interval: float) -> None:
        self._store = store
        self._interval = retry_interval
        self._waiting: list[_Waiting] = []
        self._retrier: asyncio.Task[None] | None = None

    def later(
        self, s: Session, turn_id: str, outcome: TurnOutcome, agent_cost: float | None
    ) -> None:
        """Keeps an outcome the store refused; it is retried in the background."""
        self._waiting.append(_Waiting(s, turn_id, outcome, agent_cost))
        if self._retrier is None or self._retrier.done():
            self._retrier = asyncio.ensure_future(self._retry())

    def store_pending(self, s: Session) -> None:
        """Stores the session's refused outcomes now (raises StoreDown if it still can't)."""
        self._store_all([w for w in self._waiting if w.session is s])

    def forget(self, s: Session) -> None:
        """The session is being purged: its outcomes are no longer wanted."""
        self._waiting = [w for w in self._waiting if w.session is not s]

    async def _retry(self) -> None:
        while self._waiting:
            await asyncio.sleep(self._interval)
            with contextlib.suppress(StoreDown):
                self._store_all(list(self._waiting))

    def _store_all(self, waiting: list[_Waiting]) -> None:
        for w in waiting:
            try:
                _, w.session.record = self._store.finish_turn(
                    w.session.id, w.turn_id, w.outcome, agent_cost_usd=w.agent_cost
                )
            except StoreDown:
                raise
            except Exception:  # e.g. the session was purged meanwhile: nothing to store
                log.exception("turn outcome dropped", turn_id=w.turn_id)
            else:
                log.info("turn outcome stored after the store recovered", turn_id=w.turn_id)
            self._waiting.remove(w)
