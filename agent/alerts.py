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

    def update(self, score: float, recent: float | None = None) -> Event | None:
        """``recent``: a shorter average of the same scores (Threshold.clear_smoothing), or None.
        With it, an active alert clears on ``recent`` alone (the end of an anomaly is seen without
        the whole smoothing lag), and raising needs both above the threshold: else the lagging
        ``score`` would raise an alert again right after ``recent`` cleared it."""
        if not self.active:
            s = score if recent is None else min(score, recent)
            self._above = self._above + 1 if s > self.value else 0
            if self._above >= self.raise_after:
                self.active, self._above, self._below = True, 0, 0
                return Event.RAISED
        else:
            c = score if recent is None else recent
            self._below = self._below + 1 if c <= self.clear_level else 0
            if self._below >= self.clear_after:
                self.active, self._above, self._below = False, 0, 0
                return Event.CLEARED
        return None
