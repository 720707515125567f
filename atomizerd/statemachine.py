"""Explicit lifecycles: a state enum plus the one table of transitions allowed from each state.

Sessions, turns and agents each declare their machine once (see docs/architecture.md for the
diagrams); every change of state goes through `Lifecycle.move`, so an illegal transition is a
bug that fails loudly at the place it happens instead of a corrupted record found later.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from typing import Generic, TypeVar

S = TypeVar("S", bound=enum.Enum)


class IllegalTransition(RuntimeError):
    """A component asked for a transition its lifecycle does not allow (a bug)."""


class Lifecycle(Generic[S]):
    """The current state of one record and the transitions it may take."""

    __slots__ = ("_table", "name", "state")

    def __init__(self, name: str, initial: S, table: Mapping[S, frozenset[S]]) -> None:
        self.name = name
        self.state = initial
        self._table = table

    def move(self, to: S) -> None:
        if to not in self._table[self.state]:
            raise IllegalTransition(f"{self.name}: {self.state.name} -> {to.name} is not allowed")
        self.state = to

    def __repr__(self) -> str:
        return f"<{self.name} {self.state.name}>"
