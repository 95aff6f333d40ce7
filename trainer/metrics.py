"""Detection metrics as pure numpy functions (no sklearn at evaluation time).

Conventions: ``y`` is the 0/1 label per row, ``pred`` the agent's 0/1 alert state per row,
``score`` the smoothed score per row (higher = more anomalous). Undefined values (e.g. ROC-AUC
with one class only) are ``nan``; :func:`summary` turns them into ``None`` for JSON.
"""
from __future__ import annotations

import math

import numpy as np


def confusion(y: np.ndarray, pred: np.ndarray) -> dict[str, int]:
    y, pred = np.asarray(y).astype(bool), np.asarray(pred).astype(bool)
    return {"tp": int((y & pred).sum()), "fp": int((~y & pred).sum()),
            "tn": int((~y & ~pred).sum()), "fn": int((y & ~pred).sum())}


def _ratio(a: int, b: int) -> float:
    return a / b if b else math.nan


def rates(c: dict[str, int]) -> dict[str, float]:
    """precision, recall, F1, false-alarm rate FP/(FP+TN), missed-alarm rate FN/(FN+TP)."""
    p = _ratio(c["tp"], c["tp"] + c["fp"])
    r = _ratio(c["tp"], c["tp"] + c["fn"])
    f1 = 2 * p * r / (p + r) if (p + r) > 0 else (0.0 if not (math.isnan(p) or math.isnan(r)) else math.nan)
    if c["tp"] + c["fn"] > 0 and c["tp"] + c["fp"] == 0:
        p, f1 = 0.0, 0.0  # nothing flagged although there were anomalies
    return {"precision": p, "recall": r, "f1": f1,
            "false_alarm_rate": _ratio(c["fp"], c["fp"] + c["tn"]),
            "missed_alarm_rate": _ratio(c["fn"], c["fn"] + c["tp"])}


def roc_auc(y: np.ndarray, score: np.ndarray) -> float:
    """Probability that an anomalous row outscores a normal one (ties count half): Mann-Whitney U."""
    y = np.asarray(y).astype(bool)
    s = np.asarray(score, np.float64)
    n_pos, n_neg = int(y.sum()), int((~y).sum())
    if n_pos == 0 or n_neg == 0:
        return math.nan
    order = np.argsort(s, kind="mergesort")
    ranks = np.empty(len(s), np.float64)
    sorted_s = s[order]
    # Average ranks over ties.
    _, first, counts = np.unique(sorted_s, return_index=True, return_counts=True)
    avg = first + (counts + 1) / 2.0
    ranks[order] = np.repeat(avg, counts)
    return float((ranks[y].sum() - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg))


def pr_auc(y: np.ndarray, score: np.ndarray) -> float:
    """Average precision: sum over distinct score thresholds of (recall step) x precision."""
    y = np.asarray(y).astype(bool)
    s = np.asarray(score, np.float64)
    n_pos = int(y.sum())
    if n_pos == 0:
        return math.nan
    order = np.argsort(-s, kind="mergesort")
    s, y = s[order], y[order]
    last_of_tie = np.r_[np.flatnonzero(np.diff(s)), len(s) - 1]  # a threshold admits a whole tie group
    tp = np.cumsum(y)[last_of_tie]
    fp = (last_of_tie + 1) - tp
    precision = tp / (tp + fp)
    recall = tp / n_pos
    return float(np.sum(np.diff(np.r_[0.0, recall]) * precision))


def spans(y: np.ndarray) -> list[tuple[int, int]]:
    """Contiguous runs of 1 as [start, end) row ranges."""
    y = np.asarray(y).astype(np.int8)
    d = np.diff(np.r_[0, y, 0])
    return list(zip(np.flatnonzero(d == 1).tolist(), np.flatnonzero(d == -1).tolist()))


def detection_delays(y: np.ndarray, pred: np.ndarray) -> list[int | None]:
    """Per labelled span: rows from its start to the first alarm inside it (None = missed)."""
    pred = np.asarray(pred).astype(bool)
    out: list[int | None] = []
    for a, b in spans(y):
        hit = np.flatnonzero(pred[a:b])
        out.append(int(hit[0]) if len(hit) else None)
    return out


def summary(y: np.ndarray, score: np.ndarray, pred: np.ndarray, period_s: float | None = None) -> dict:
    """Every metric of ``edge-trainer evaluate`` in one JSON-ready dict."""
    c = confusion(y, pred)
    delays = detection_delays(y, pred)
    hit = [d for d in delays if d is not None]
    mean_delay = float(np.mean(hit)) if hit else math.nan
    out: dict = {
        "rows": int(len(y)), "anomalous_rows": int(np.sum(y)), **c, **rates(c),
        "roc_auc": roc_auc(y, score), "pr_auc": pr_auc(y, score),
        "events": len(delays), "events_detected": len(hit),
        "event_recall": _ratio(len(hit), len(delays)),
        "mean_detection_delay_rows": mean_delay,
        "detection_delays_rows": delays,
    }
    if period_s:
        out["mean_detection_delay_s"] = mean_delay * period_s if hit else math.nan
    return {k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in out.items()}
