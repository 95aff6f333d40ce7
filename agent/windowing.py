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
    contiguous view ``buf[head:head + window]``. The newest row doubles as the carry-forward
    source for missing values, so a complete row costs two row writes and nothing else.
    """

    __slots__ = ("window", "n_features", "buf", "head", "count", "initial")

    def __init__(self, window: int, n_features: int, initial: np.ndarray):
        self.window = window
        self.n_features = n_features
        self.buf = np.zeros((2 * window, n_features), np.float32)
        self.head = 0  # index of the oldest row of the current window
        self.count = 0
        self.initial = np.array(initial, dtype=np.float32, copy=True)  # stands in before any row

    @property
    def last(self) -> np.ndarray:
        """Last good value of each sensor (what a missing value is filled with): a read-only
        copy (it is derived, so writing it would change nothing: that fails loudly instead)."""
        out = self.initial.copy() if self.count == 0 else self.buf[(self.head - 1) % self.window].copy()
        out.flags.writeable = False
        return out

    def push(self, row: np.ndarray) -> None:
        """Append one row (float32, NaN for missing)."""
        r = np.asarray(row, dtype=np.float32)
        self.push_values(r, bool(np.isfinite(r).all()))

    def push_values(self, values, complete: bool) -> None:
        """Append one row given as a float sequence (NaN for missing); ``complete`` = no NaN in it."""
        w, b = self.window, self.buf
        if self.count == 0:
            b[0] = values
            if not complete:
                fill_missing(b[0], self.initial.copy())
            b[1:] = b[0]  # pad: the first row stands in for the rows before it
        else:
            i = self.head
            prev = None if complete else b[(i - 1) % w].copy()  # before the write: window may be 1
            b[i] = values
            if prev is not None:
                fill_missing(b[i], prev)
            b[i + w] = b[i]
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
