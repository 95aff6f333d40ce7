"""``edge-trainer evaluate --report DIR``: metrics table, score-vs-threshold plot with the labelled
spans shaded, PR curve -- as PNG files and one self-contained HTML page (PNGs embedded as base64).

matplotlib with the Agg backend only: no display needed on a build server.
"""
from __future__ import annotations

import base64
import html
import io
from pathlib import Path

import numpy as np

from trainer.metrics import spans


def _fig_png(fig) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    return buf.getvalue()


def pr_curve(y: np.ndarray, score: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(recall, precision) over every distinct score threshold, highest first."""
    y = np.asarray(y).astype(bool)
    order = np.argsort(-np.asarray(score, np.float64), kind="mergesort")
    s, yy = np.asarray(score)[order], y[order]
    last = np.r_[np.flatnonzero(np.diff(s)), len(s) - 1]
    tp = np.cumsum(yy)[last]
    return tp / max(1, int(y.sum())), tp / (last + 1)


def plots(y: np.ndarray, score: np.ndarray, pred: np.ndarray, threshold: float, title: str) -> dict[str, bytes]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out = {}
    t = np.arange(len(score))
    fig, ax = plt.subplots(figsize=(11, 3.6))
    for a, b in spans(y):
        ax.axvspan(a, b, color="tab:red", alpha=0.15, lw=0, label="labelled anomaly" if a == spans(y)[0][0] else None)
    ax.plot(t, score, lw=0.8, color="tab:blue", label="score (smoothed)")
    ax.axhline(threshold, color="k", ls="--", lw=0.9, label="threshold")
    p = np.asarray(pred).astype(bool)
    if p.any():
        ax.fill_between(t, 0, 1, where=p, transform=ax.get_xaxis_transform(), color="tab:orange", alpha=0.25,
                        lw=0, label="alarm")
    ax.set_xlabel("row")
    ax.set_ylabel("score")
    ax.set_title(title)
    ax.legend(loc="upper left", fontsize=8)
    fig.tight_layout()
    out["score.png"] = _fig_png(fig)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(4.5, 4))
    if np.asarray(y).any():
        r, pr = pr_curve(y, score)
        ax.step(np.r_[0, r], np.r_[pr[0] if len(pr) else 1, pr], where="post")
    ax.set_xlabel("recall")
    ax.set_ylabel("precision")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1.02)
    ax.set_title("precision-recall (score)")
    fig.tight_layout()
    out["pr.png"] = _fig_png(fig)
    plt.close(fig)
    return out


def write_report(out_dir: str | Path, metrics: dict, y: np.ndarray, score: np.ndarray, pred: np.ndarray,
                 threshold: float, title: str) -> Path:
    """Write score.png, pr.png and report.html (PNGs embedded) into ``out_dir``; returns the HTML path."""
    d = Path(out_dir)
    d.mkdir(parents=True, exist_ok=True)
    pngs = plots(y, score, pred, threshold, title)
    for name, data in pngs.items():
        (d / name).write_bytes(data)

    def fmt(v) -> str:
        if v is None:
            return "n/a"
        return f"{v:.4f}" if isinstance(v, float) else html.escape(str(v))

    rows = "".join(f"<tr><th>{html.escape(k)}</th><td>{fmt(v)}</td></tr>" for k, v in metrics.items()
                   if not isinstance(v, (list, dict)))
    imgs = "".join(f'<p><img alt="{n}" src="data:image/png;base64,{base64.b64encode(b).decode()}"></p>'
                   for n, b in pngs.items())
    page = (f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
            "<style>body{font-family:sans-serif;margin:2em}table{border-collapse:collapse}"
            "th,td{border:1px solid #ccc;padding:3px 8px;text-align:left}img{max-width:100%}</style></head><body>"
            f"<h1>{html.escape(title)}</h1><table>{rows}</table>{imgs}</body></html>\n")
    path = d / "report.html"
    path.write_text(page)
    return path
