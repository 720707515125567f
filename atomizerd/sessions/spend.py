"""What a running turn has cost so far, estimated, and whether it crossed a spending cap.

The CLI reports cost only with a turn's `result` (docs/agent-protocol.md, "Live usage"):
per-message `usage` carries tokens, and `get_usage` answers the cumulative figure of finished
turns. So mid-turn the daemon prices the tokens itself, at list prices per million tokens by
model family. Unknown models are priced as the dearest family: a cap then stops a turn early
rather than late. The agent's own figure replaces the estimate at the turn's end.
"""

from __future__ import annotations

from dataclasses import dataclass

from atomizerd.model import SessionRecord
from atomizerd.sessions import events as ev


@dataclass(frozen=True, slots=True)
class Prices:
    """USD per million tokens."""

    input: float
    output: float
    cache_write: float
    cache_read: float


def _family(input_price: float, output_price: float) -> Prices:
    # Cache writes cost 1.25 times input, cache reads a tenth of it (the API's rule).
    return Prices(input_price, output_price, input_price * 1.25, input_price * 0.1)


_FAMILIES: tuple[tuple[str, Prices], ...] = (
    ("opus", _family(5.0, 25.0)),
    ("sonnet", _family(3.0, 15.0)),
    ("haiku", _family(1.0, 5.0)),
)
_DEAREST = max((p for _, p in _FAMILIES), key=lambda p: p.output)


def prices(model: str) -> Prices:
    name = model.lower()
    for family, p in _FAMILIES:
        if family in name:
            return p
    return _DEAREST


def call_cost(usage: ev.LiveUsage, model: str) -> float:
    """One model call's cost as its usage stands (input apart from the cache's parts)."""
    p = prices(model)
    return (
        usage.input_tokens * p.input
        + usage.output_tokens * p.output
        + usage.cache_creation_input_tokens * p.cache_write
        + usage.cache_read_input_tokens * p.cache_read
    ) / 1_000_000


def over_cap(record: SessionRecord, turn_cost: float) -> str | None:
    """Why a turn that has cost `turn_cost` so far must stop (None: it may go on)."""
    if record.turn_budget_usd > 0 and turn_cost >= record.turn_budget_usd:
        return (
            f"the turn's cost, about {turn_cost:.4f} USD so far, reached its cap of "
            f"{record.turn_budget_usd:g} USD (turn_budget_usd): the turn is stopped"
        )
    if record.budget_usd > 0 and record.total_cost_usd + turn_cost >= record.budget_usd:
        return (
            f"the session's cost, about {record.total_cost_usd + turn_cost:.4f} USD with this "
            f"turn so far, reached its budget of {record.budget_usd:g} USD: the turn is stopped"
        )
    return None
