"""Scoring core shared by the gateway and the trainer: scale → reconstruct → score → decide.

``Scorer`` turns a batch of raw windows into scores and per-sensor contributions with one
backend call: the bundle's fused ``scorer`` graph (scaling, VAE, residual score and
contributions in one runtime call) when it has one, else the ``vae`` graph with the scaling
and the score computed here in numpy (bundles from before the fused graph; int8 variants;
the trainer's own calibration, which is the reference the fused graph is checked against). ``DeviceStream`` holds one device's causal state (window, smoothing, alert
state). ``score_rows`` runs a whole table through exactly these pieces, so offline
``edge-trainer score`` decides what the live agent decides for the same stream.
"""
from __future__ import annotations

from collections import deque
from dataclasses import dataclass
from itertools import islice

import numpy as np

from agent.alerts import AlertState, Event
from pathlib import Path

from agent.backends import FORMAT, Backend, open_backend
from agent.manifest import Manifest
from agent.windowing import RingWindow, ffill, sliding_windows

# Scaled inputs are clipped: a wild reading must score high, not overflow the network.
CLIP = 20.0


class Scorer:
    """Stateless batch scoring of raw windows through one backend. One thread at a time per
    instance (as for a LiteRT interpreter): the hot path reuses its buffers between calls;
    results are always fresh arrays."""

    def __init__(self, manifest: Manifest, backend: Backend, head: Backend | None = None):
        self.manifest = manifest
        self.backend = backend  # the VAE: scaled windows -> reconstruction
        self.head = head  # the fused scorer graph: raw windows -> (score, contributions), or None
        self.centre = np.asarray(manifest.scaler.centre, np.float32)
        self.inv_scale = (1.0 / np.asarray(manifest.scaler.scale, np.float64)).astype(np.float32)
        spec = manifest.score
        self.tail = spec.tail
        self.log = spec.transform == "log"
        cs = spec.channel_scale if spec.kind == "vae_recon_norm" else None
        self.inv_channel = None if cs is None else (1.0 / np.maximum(np.asarray(cs, np.float64), 1e-12)).astype(np.float32)
        self.precision = np.asarray(spec.precision, np.float32) if spec.kind == "vae_recon_mahal" else None
        if self.precision is not None:
            n_f = len(manifest.features)
            # (tail*F, F): mean over the tail rows per channel; (tail*F,): mean over all terms (= sum over F / F).
            self._tail_mean = np.tile(np.eye(n_f, dtype=np.float32), (self.tail, 1)) * np.float32(1.0 / self.tail)
            self._all_mean = np.full(self.tail * n_f, 1.0 / (self.tail * n_f), np.float32)
        # Hot-path buffers (allocation only: the arithmetic and its order are the plain numpy
        # expressions'). The model is tiny (~0.5 us per window), so numpy's per-call and
        # broadcasting overheads on (B, W, F) arrays with F ~ 8 cost more than the model.
        self._wf = (manifest.window, len(manifest.features))
        self._tiles: tuple[np.ndarray, ...] | None = None  # centre, 1/scale, -CLIP, CLIP repeated over windows
        self._xs: np.ndarray | None = None  # scaled input, reused batch to batch
        self._dt: np.ndarray | None = None  # channel_errors: squared residuals, (tail, B, F): time-major
        self._mr: np.ndarray | None = None  # vae_recon_mahal: residuals and P-weighted residuals, (2 B tail, F)

    def scale(self, windows: np.ndarray) -> np.ndarray:
        w = np.asarray(windows, np.float32)
        if w.ndim >= 2 and w.shape[-2:] == self._wf and w.flags.c_contiguous:
            xs = np.empty(w.shape, np.float32)
            self._scale_flat(w.reshape(-1), xs.reshape(-1))
            return xs
        xs = (w - self.centre) * self.inv_scale
        return np.clip(xs, -CLIP, CLIP, out=xs)

    def _scale_flat(self, w: np.ndarray, out: np.ndarray) -> None:
        """:meth:`scale` of whole windows, flattened: the same float32 operations, element by element,
        as ``clip((w - centre) * inv_scale)``, on contiguous memory against constants repeated to
        length instead of broadcast over an 8-wide last axis (one inner loop, not one per row)."""
        k = w.size
        t = self._tiles
        if t is None or t[0].size < k:
            reps = max(k, 64 * self._wf[0] * self._wf[1]) // self._wf[1]
            t = self._tiles = (np.tile(self.centre, reps), np.tile(self.inv_scale, reps),
                               np.full(reps * self._wf[1], -CLIP, np.float32), np.full(reps * self._wf[1], CLIP, np.float32))
        np.subtract(w, t[0][:k], out=out)
        np.multiply(out, t[1][:k], out=out)
        np.maximum(out, t[2][:k], out=out)  # np.clip(out, -CLIP, CLIP), NaN included, without its wrapper
        np.minimum(out, t[3][:k], out=out)  # (array bounds: a Python scalar costs more than the loop here)

    def residuals(self, windows: np.ndarray) -> np.ndarray:
        """Reconstruction minus scaled input over the window's tail: (B, tail, F)."""
        xs = self.scale(windows)
        recon = self.backend.run(xs)[0]
        return recon[:, -self.tail:, :] - xs[:, -self.tail:, :]

    def _run_buffered(self, windows: np.ndarray) -> tuple[np.ndarray, np.ndarray] | None:
        """(scaled input, reconstruction) of a non-empty, contiguous (B, W, F) batch, the input
        scaled into a buffer reused batch to batch; None for anything else (the plain path)."""
        w = np.asarray(windows, np.float32)
        if not (w.ndim == 3 and w.shape[1:] == self._wf and w.flags.c_contiguous and w.shape[0]):
            return None
        n = w.shape[0]
        if self._xs is None or self._xs.shape[0] < n:
            self._xs = np.empty((max(n, 64), *self._wf), np.float32)
        xs = self._xs[:n]
        self._scale_flat(w.reshape(-1), xs.reshape(-1))
        return xs, self.backend.run(xs)[0]

    def channel_errors(self, windows: np.ndarray) -> np.ndarray:
        """Squared reconstruction error per channel over the window's tail: (B, F)."""
        run = self._run_buffered(windows)
        if run is None:
            d = self.residuals(windows)
            return np.mean(d * d, axis=1)
        # = np.mean(d * d, axis=1) of residuals(), bit for bit, without temporaries: scaled input in a
        # reused buffer, residuals squared time-major (T, B, F) so that the sum over the tail runs
        # over contiguous (B, F) planes -- in the same order, t = 0, 1, ... -- then divided by T.
        # np.mean divides in float64 and rounds to float32; a float32 division is that same number
        # (float64 has more than 2 x 24 + 2 bits, so rounding twice equals rounding once).
        xs, recon = run
        n, _, F = xs.shape
        T = self.tail
        if self._dt is None or self._dt.shape[1] < n:
            self._dt = np.empty((T, max(n, 64), F), np.float32)
        d = self._dt[:, :n, :]
        np.subtract(recon[:, -T:, :].transpose(1, 0, 2), xs[:, -T:, :].transpose(1, 0, 2), out=d)
        np.multiply(d, d, out=d)
        out = np.empty((n, F), np.float32)
        np.add.reduce(d, axis=0, out=out)
        np.true_divide(out, np.float32(T), out=out)
        return out

    def score(self, windows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Raw windows (B, W, F) → (scores (B,), per-sensor contributions (B, F))."""
        if len(windows) == 0:  # (a fixed-batch LiteRT graph cannot run an empty batch)
            return np.zeros(0), np.zeros((0, len(self.manifest.features)), np.float32)
        if self.head is not None:
            s, contrib = self.head.run(np.ascontiguousarray(windows, np.float32))
            return s.astype(np.float64), contrib
        if self.precision is not None:
            return self._score_mahal(windows)
        contrib = self.channel_errors(windows)
        if self.inv_channel is not None:
            contrib *= self.inv_channel
        s = contrib.mean(axis=1, dtype=np.float64)
        if self.log:
            s = np.log1p(s)
        return s, contrib

    def _score_mahal(self, windows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """vae_recon_mahal: r' P r per row = sum over channels of r_c (P r)_c, averaged over the tail
        rows, over F. Those per-channel terms are the contributions (a negative cross-term -- a
        channel that explains another's error -- counts as 0). Reused buffers on the hot path: the
        model costs ~1 us per window, so temporaries would cost as much as the model."""
        run = self._run_buffered(windows)
        if run is None:
            d = self.residuals(windows)
            terms = np.mean(d * (d @ self.precision), axis=1)
            s = np.add.reduce(terms, axis=1, dtype=np.float64)
            s *= 1.0 / terms.shape[1]
        else:
            xs, recon = run
            n, _, F = xs.shape
            T = self.tail
            if self._mr is None or self._mr.shape[0] < 2 * n * T:
                self._mr = np.empty((2 * max(n, 64) * T, F), np.float32)
            d, pd = self._mr[:n * T], self._mr[n * T:2 * n * T]
            np.subtract(recon[:, -T:, :], xs[:, -T:, :], out=d.reshape(n, T, F))
            np.matmul(d, self.precision, out=pd)
            np.multiply(pd, d, out=pd)
            # Means over the tail (per channel) and over tail x channels as two small matrix products:
            # numpy's reduction over a middle axis of a (B, T, F) array costs ~15 us at B=64, these ~3.
            flat = pd.reshape(n, T * F)
            terms = flat @ self._tail_mean
            s = (flat @ self._all_mean).astype(np.float64)
        contrib = np.maximum(terms, np.float32(0.0), out=terms)
        if self.log:
            np.maximum(s, 0.0, out=s)
            np.log1p(s, out=s)
        return s, contrib


def open_scorer(backend: str, bundle_dir: str | Path, manifest: Manifest, threads: int = 1,
                quantization: str = "float32", check_golden: bool = True) -> Scorer:
    """The bundle's VAE and, when the bundle has one in this format and quantisation, its fused
    scorer graph, both opened with ``backend`` and proven on their golden vectors."""
    vae = open_backend(backend, bundle_dir, manifest, "vae", threads, quantization, check_golden)
    entry = manifest.models.get("scorer")
    head = None
    if entry is not None and any(f.quantization == quantization for f in entry.files.get(FORMAT[backend], [])):
        head = open_backend(backend, bundle_dir, manifest, "scorer", threads, quantization, check_golden)
    return Scorer(manifest, vae, head)


class Smoother:
    """Causal moving average over the last ``n`` scores (exact mean, no running-sum drift)."""

    __slots__ = ("_q",)

    def __init__(self, n: int):
        self._q: deque[float] = deque(maxlen=n)

    def __call__(self, s: float) -> float:
        self._q.append(float(s))
        return sum(self._q) / len(self._q)

    def recent(self, k: int) -> float:
        """Mean of the newest ``k`` scores (all of them when fewer): the same queue, no extra state."""
        n = min(k, len(self._q))
        return sum(islice(reversed(self._q), n)) / n


@dataclass(slots=True)
class Decision:
    score: float  # smoothed score compared with the threshold
    anomaly: bool  # alert state after this score
    event: Event | None  # transition, if any


class DeviceStream:
    """Causal per-device state: the window buffer, score smoothing and the alert state."""

    __slots__ = ("window", "smoother", "alert", "rows", "since_scored", "stride", "clear_n")

    def __init__(self, manifest: Manifest):
        self.window = RingWindow(manifest.window, len(manifest.features), np.asarray(manifest.scaler.centre, np.float32))
        self.smoother = Smoother(manifest.score.smoothing)
        self.alert = AlertState(manifest.threshold)
        self.rows = 0
        self.since_scored = 0
        self.stride = manifest.stride
        cs = manifest.threshold.clear_smoothing
        # Clearing on a shorter average of the same scores (a suffix of the smoother's queue).
        self.clear_n = cs if cs is not None and cs < manifest.score.smoothing else None

    def push(self, row: np.ndarray) -> bool:
        """Add a row; True when a window is due for scoring."""
        self.window.push(row)
        return self._due()

    def push_values(self, values, complete: bool) -> bool:
        """:meth:`push` for a row given as a float sequence (``complete``: no NaN in it)."""
        self.window.push_values(values, complete)
        return self._due()

    def _due(self) -> bool:
        self.rows += 1
        self.since_scored += 1
        if self.since_scored >= self.stride or self.rows == 1:
            self.since_scored = 0
            return True
        return False

    def decide(self, raw_score: float) -> Decision:
        s, ev = self.advance(raw_score)
        return Decision(s, self.alert.active, ev)

    def advance(self, raw_score: float) -> tuple[float, Event | None]:
        """:meth:`decide` as (smoothed score, transition or None), without the Decision object
        (the agent's per-window path: one allocation less per window)."""
        s = self.smoother(raw_score)
        return s, self.alert.update(s, None if self.clear_n is None else self.smoother.recent(self.clear_n))

    def event_score(self, score: float, event: Event) -> float:
        """The score an alert reports: the one its decision compared with the threshold -- the smoothed
        ``score`` for a raise; for a clear, the mean of the newest ``clear_n`` scores when the bundle
        clears on it (the long mean may still stand above the threshold then)."""
        return self.smoother.recent(self.clear_n) if event is Event.CLEARED and self.clear_n is not None else score


def top_sensors(contrib: np.ndarray, features: list[str], k: int = 3) -> list[dict]:
    """The k sensors explaining most of one window's error, with their share of it."""
    total = float(contrib.sum()) or 1.0
    idx = np.argsort(contrib)[::-1][:k]
    return [{"sensor": features[i], "share": round(float(contrib[i]) / total, 4)} for i in idx]


def score_rows(scorer: Scorer, rows: np.ndarray, batch: int = 512) -> dict[str, np.ndarray]:
    """Score a (T, F) table row by row, causally, exactly as one device's live stream is scored.

    Returns arrays of length T: ``score`` (smoothed), ``anomaly`` (0/1 alert state) and
    ``contrib`` (T, F). Rows between strided windows carry the last decision.
    """
    m = scorer.manifest
    filled = ffill(rows, np.asarray(m.scaler.centre, np.float32))
    T = filled.shape[0]
    stream = DeviceStream(m)
    due = np.zeros(T, bool)
    for t in range(T):  # same stride bookkeeping as live
        stream.rows += 1
        stream.since_scored += 1
        if stream.since_scored >= stream.stride or stream.rows == 1:
            stream.since_scored = 0
            due[t] = True
    idx = np.flatnonzero(due)
    wins = sliding_windows(filled, m.window)
    raw = np.empty(len(idx))
    contrib_due = np.empty((len(idx), filled.shape[1]), np.float32)
    for a in range(0, len(idx), batch):
        s, c = scorer.score(np.ascontiguousarray(wins[idx[a:a + batch]]))
        raw[a:a + batch] = s
        contrib_due[a:a + batch] = c
    score = np.empty(T)
    anomaly = np.zeros(T, np.int8)
    contrib = np.zeros((T, filled.shape[1]), np.float32)
    j = -1
    last = Decision(0.0, False, None)
    for t in range(T):
        if due[t]:
            j += 1
            last = stream.decide(raw[j])
            contrib[t] = contrib_due[j]
        elif j >= 0:
            contrib[t] = contrib_due[j]
        score[t] = last.score
        anomaly[t] = last.anomaly
    return {"score": score, "anomaly": anomaly, "contrib": contrib}
