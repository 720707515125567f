"""What the agent is told beyond the user's text: a changed study or mode's context with the
next message, and a new conversation seeded from the stored history when its transcript is
gone.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import structlog

from atomizerd import ids
from atomizerd.agents.pool import AgentPool
from atomizerd.atomizer.prompt import history_seed
from atomizerd.config import Config
from atomizerd.errors import AtomizerError
from atomizerd.model import SessionRecord
from atomizerd.sessions.turn import Turn
from atomizerd.store.db import Store

if TYPE_CHECKING:
    from atomizerd.sessions.session import Session

log = structlog.get_logger("atomizerd.sessions.context")


class AgentContext:
    def __init__(
        self,
        config: Config,
        store: Store,
        pool: AgentPool,
        context_text: Callable[[SessionRecord], str],
    ) -> None:
        self.config = config
        self.store = store
        self.pool = pool
        self.context_text = context_text

    def _update(self, s: Session, **fields: Any) -> SessionRecord:
        record = self.store.update_session(s.id, **fields)
        if record is None:
            raise AtomizerError(f"session {s.id!r} vanished from the store")
        return record

    def reseed(self, s: Session) -> None:
        """The agent's transcript is gone: a new conversation, seeded from our own store."""
        limit = self.config.agent.history_seed_messages
        recent = self.store.recent_messages(s.id, limit)
        s.record = self._update(
            s, agent_session_id=ids.new_agent_session_id(), agent_started=False, agent_cost_usd=0.0
        )
        self.pool.seed_next_spawn(s.id, history_seed(recent))
        log.warning(
            "agent conversation lost; reseeded from stored history",
            session_id=s.id,
            messages=len(recent),
        )

    def text_for(self, s: Session, turn: Turn) -> str:
        """The text written to the agent. The CLI keeps a resumed conversation's first system
        prompt, so a study or mode that changed since then reaches the model with the next
        user message."""
        record = s.record
        if not (record.context_stale and record.agent_started):
            return turn.text
        try:
            context = self.context_text(record)
            s.record = self._update(s, context_stale=False)
        except AtomizerError as e:  # e.g. the study folder is gone: the next message retries
            log.warning("changed context not sent", session_id=s.id, error=str(e))
            return turn.text
        return f"<atomizer-context>\n{context}\n</atomizer-context>\n\n{turn.text}"
