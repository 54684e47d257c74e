"""Bounded concurrent uses per user: the den shell's commands, workspace.exec calls.

Touched on the event loop only, so a plain counter needs no lock.
"""

from __future__ import annotations

from collections import Counter


class UserSlots:
    """How many of something each user runs at once, up to a limit."""

    def __init__(self) -> None:
        self._running: Counter[str] = Counter()

    def take(self, user: str, limit: int) -> bool:
        """One more for ``user``; False (and nothing taken) at ``limit`` already."""
        if self._running[user] >= limit:
            return False
        self._running[user] += 1
        return True

    def count(self, user: str) -> int:
        """How many ``user`` runs now."""
        return self._running[user]

    def release(self, user: str) -> None:
        self._running[user] -= 1
        if self._running[user] <= 0:
            del self._running[user]
