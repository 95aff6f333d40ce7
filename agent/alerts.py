"""Alert state machine with hysteresis and debounce. Pure: no clock, no I/O.

Deciding is separate from scoring: the scorer returns numbers, this decides.
"""
from __future__ import annotations

from enum import Enum

from agent.manifest import Threshold


class Event(str, Enum):
    RAISED = "raised"
    CLEARED = "cleared"


class AlertState:
    """One device's alert state. ``update(score)`` returns an Event on a transition, else None."""

    __slots__ = ("value", "clear_level", "raise_after", "clear_after", "active", "_above", "_below")

    def __init__(self, threshold: Threshold):
        self.value = threshold.value
        self.clear_level = threshold.value * threshold.clear_ratio if threshold.value > 0 else threshold.value
        self.raise_after = threshold.raise_after
        self.clear_after = threshold.clear_after
        self.active = False
        self._above = 0
        self._below = 0

    def update(self, score: float, clear_score: float | None = None) -> Event | None:
        """``clear_score``: what an active alert's clearing compares with the clear level (None = ``score``)."""
        if not self.active:
            self._above = self._above + 1 if score > self.value else 0
            if self._above >= self.raise_after:
                self.active, self._above, self._below = True, 0, 0
                return Event.RAISED
        else:
            c = score if clear_score is None else clear_score
            self._below = self._below + 1 if c <= self.clear_level else 0
            if self._below >= self.clear_after:
                self.active, self._above, self._below = False, 0, 0
                return Event.CLEARED
        return None
