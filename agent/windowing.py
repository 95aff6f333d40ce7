"""Pure windowing: per-device ring buffers and the equivalent offline sliding windows.

Both produce the same windows for the same rows: before ``window`` rows have arrived,
the window is padded by repeating the first row, so the first rows of a stream get a
decision too. Missing values (NaN) are carried forward from the last good value of that
sensor, or the scaler centre when the sensor has never been seen.
"""
from __future__ import annotations

import numpy as np


def fill_missing(row: np.ndarray, last: np.ndarray) -> np.ndarray:
    """Replace non-finite entries of ``row`` in place by ``last``; update ``last``. Returns row."""
    bad = ~np.isfinite(row)
    if bad.any():
        row[bad] = last[bad]
    last[:] = row
    return row


def ffill(rows: np.ndarray, initial: np.ndarray) -> np.ndarray:
    """Offline twin of :func:`fill_missing` over a whole (T, F) array (returns a copy)."""
    out = np.array(rows, dtype=np.float32, copy=True)
    last = np.array(initial, dtype=np.float32, copy=True)
    bad_any = ~np.isfinite(out).all(axis=1)
    if not bad_any.any():
        return out
    for t in range(out.shape[0]):
        fill_missing(out[t], last) if bad_any[t] else last.__setitem__(slice(None), out[t])
    return out


class RingWindow:
    """Fixed-size window over the newest rows of one device, without per-row allocation.

    Rows are written twice (at ``i`` and ``i + window``) so the current window is always a
    contiguous view ``buf[head:head + window]``.
    """

    __slots__ = ("window", "n_features", "buf", "head", "count", "last")

    def __init__(self, window: int, n_features: int, initial: np.ndarray):
        self.window = window
        self.n_features = n_features
        self.buf = np.zeros((2 * window, n_features), np.float32)
        self.head = 0  # index of the oldest row of the current window
        self.count = 0
        self.last = np.array(initial, dtype=np.float32, copy=True)

    def push(self, row: np.ndarray) -> None:
        """Append one row (float32, NaN for missing)."""
        w = self.window
        r = fill_missing(np.asarray(row, dtype=np.float32).copy(), self.last)
        if self.count == 0:
            self.buf[:] = r  # pad: the first row stands in for the rows before it
        else:
            i = self.head
            self.buf[i] = r
            self.buf[i + w] = r
            self.head = (i + 1) % w
        self.count += 1

    def view(self) -> np.ndarray:
        """The current window (oldest first) as a (window, F) view; valid until the next push."""
        return self.buf[self.head:self.head + self.window]


def sliding_windows(rows: np.ndarray, window: int) -> np.ndarray:
    """All windows ending at each row of a filled (T, F) array: shape (T, window, F).

    Row t's window holds rows t-window+1..t, the first row repeated where t < window-1.
    Returns a read-only strided view (no copy).
    """
    rows = np.asarray(rows, dtype=np.float32)
    pad = np.repeat(rows[:1], window - 1, axis=0)
    full = np.concatenate([pad, rows]) if window > 1 else rows
    v = np.lib.stride_tricks.sliding_window_view(full, window, axis=0)  # (T, F, window)
    return v.transpose(0, 2, 1)
