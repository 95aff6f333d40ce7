"""fit: normal history in, a verified bundle out.

    load CSVs → robust scaler → split normal rows BY TIME per file
    [ train | val (early stopping) | calibration (never trained on) ]
    → VAE on scaled sliding windows
    → residual whitening from the held-out windows, threshold from the calibration rows, scored by the
      agent's own Scorer/score_rows
    → refit: the same VAE recipe trained again on every normal window (the newest rows are the ones
      most like what comes next), whitening and threshold kept
    → export ONNX + TFLite + golden vectors + the fused scorer graph → manifest → reload and verify.

Labels (when given) only remove anomalous rows from training and calibration; the threshold
never looks at anomalies, so it means the same on a machine that has no labels at all.
"""
from __future__ import annotations

import hashlib
import logging
import math
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from agent.backends import open_backend
from agent.manifest import (
    MANIFEST_FILE, Manifest, ModelEntry, ScoreSpec, Scaler, Threshold, Training, load_manifest, sha256_file,
    write_manifest,
)
from agent.scoring import CLIP, Scorer, score_rows
from agent.windowing import ffill, sliding_windows
from trainer.data import CsvOptions, Table, load_many
from trainer.errors import InputError

log = logging.getLogger("trainer")


def trainer_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("edgewatch")
    except PackageNotFoundError:
        return "0+unknown"


DEFAULT_WINDOW = 8
MAX_TRAIN_WINDOWS = 20_000  # bounds memory and epoch time on long histories


class FitOptions(BaseModel):
    """Every knob of ``fit``; the defaults are meant to hold across machines without tuning."""

    model_config = ConfigDict(extra="forbid")

    window: int | None = Field(None, ge=2, description="Rows per window; None = 8 (bench.detection and normal pump "
                               "transients, see auto_window), or a tenth of a typical file's normal rows when shorter, at least 2.")
    stride: int = Field(1, ge=1, description="Rows between scored windows on the gateway.")
    epochs: int = Field(300, ge=1, description="Maximum training epochs (early stopping usually ends sooner).")
    latent: int | None = Field(None, ge=1, description="Latent size; None = about sqrt(window*features)/2 in [3, 16].")
    hidden: int | None = Field(None, ge=4, description="Hidden width; None = window*features/2 rounded to a power of 2 in [32, 128].")
    beta: float = Field(0.05, ge=0, description="KL weight (per latent unit, relative to per-element MSE).")
    linear_path: bool = Field(False, description="VAE with a linear encoder/decoder term beside the MLP (trainer.vae."
                              "WindowVAE). bench.detection, eight sets: mean F1 0.812 vs 0.787, false-alarm rate 0.080 vs "
                              "0.095; but worse on the simulator's machines (noisy 10 s set -0.06; bench pumps, 3 seeds x 2 "
                              "stream sets, row F1 0.47 vs 0.56), so off by default (README \"Detection quality\").")
    ensemble: int = Field(3, ge=1, le=16, description="VAEs trained from consecutive seeds whose reconstructions are "
                          "averaged in the exported graph (bench.detection: mean F1 0.709 vs 0.691 for one VAE, "
                          "mostly on the SKAB-like set; less seed-to-seed variation).")
    seed: int = 0
    time_budget_s: float = Field(60.0, gt=0, description="Wall-clock limit for VAE training.")
    calibration_fraction: float = Field(0.25, gt=0, lt=0.6, description="Last part of each file's normal rows held out for calibration.")
    val_fraction: float = Field(0.15, gt=0, lt=0.5, description="Normal rows before the calibration part, held out for early stopping.")
    tail: int | None = Field(None, ge=1, description="Score the error of the newest `tail` rows; None = the whole window "
                             "(bench.detection: mean F1 0.60 vs 0.50 for window // 4).")
    score_kind: Literal["mahal", "norm"] = Field(
        "mahal", description="mahal: each row's residual vector whitened by the residual covariance on held-out "
        "normal windows (half full, half diagonal precision), so redundant channels count once and broken "
        "correlations count; norm: per-channel squared error / its typical value, averaged (bench.detection).")
    # Decision defaults chosen by `python -m bench.detection` (grid over smoothing 3-20, quantile/margin vs POT,
    # raise/clear/clear_ratio; best mean pooled F1 with mean FAR <= 10 % over all scenario sets); margin 1.5 and
    # clear_smoothing 5 later, over 3 training seeds (margin 1-2, clear_smoothing 1/5/10/off, clear_after 5/10);
    # smoothing 30 with the refit, over 2 training seeds (smoothing 20/30/40, margin 1/1.25/1.5).
    smoothing: int = Field(30, ge=1, description="Causal moving average over this many scores (30 with refit: "
                           "bench.detection mean F1 0.760 vs 0.736 at 20, mean of 2 training seeds; false-alarm rate "
                           "0.107 vs 0.104).")
    quantile: float = Field(0.99, gt=0.5, lt=1, description="Quantile of calibration scores the threshold starts from.")
    margin: float = Field(1.5, ge=0, description="Threshold = q + margin * (q - median): head-room in units of the normal "
                          "score spread. 1.5 with clear_smoothing 5 (the faster clearing pays for the lower threshold's "
                          "false alarms): bench.detection mean F1 +0.02 over margin 2 without it on each of 3 seeds, "
                          "on every set, at the same mean false-alarm rate.")
    threshold_method: Literal["quantile", "pot"] = Field(
        "quantile", description="quantile: q + margin*(q - median); pot: peaks-over-threshold GPD fit at risk `pot_risk`.")
    pot_risk: float = Field(1e-3, gt=0, lt=0.1, description="POT: calibrated probability of a normal score above the threshold.")
    raise_after: int = Field(1, ge=1, description="Consecutive scores above the threshold before an alert is raised.")
    clear_after: int = Field(10, ge=1, description="Consecutive scores below the clear level before an alert clears "
                             "(holds the alarm through a long anomalous span).")
    clear_ratio: float = Field(0.9, gt=0, le=1)
    clear_smoothing: int | None = Field(5, ge=1, description="An active alert clears on the moving average of the "
                                        "newest this-many scores (None or >= smoothing: on the smoothed score), so an "
                                        "alarm ends without the whole smoothing lag, which cost ~20-30 false-alarm rows "
                                        "after every anomaly (bench.detection, margin 2: mean FAR 0.120 vs 0.135, F1 -0.005).")
    refit: bool = Field(True, description="After calibration, train the VAE again on every normal row (training, "
                        "early-stopping and calibration parts; each member for its best epoch count) and ship that "
                        "model; the whitening and threshold stay those measured on held-out rows by the first model. "
                        "The newest history is the closest to what the gateway sees next (bench.detection, smoothing "
                        "20, mean of 2 training seeds: false-alarm rate 0.104 vs 0.130, F1 0.736 vs 0.741).")
    int8: bool = Field(True, description="Also export dynamic-range int8 TFLite variants.")
    gan_steps: int = Field(1500, ge=1, description="GAN training steps for the fault models (with a fault column).")
    fault_time_budget_s: float = Field(120.0, gt=0, description="Wall-clock limit for the fault models (GAN: half of it).")
    name: str | None = Field(None, description="Bundle name; None = the first CSV's stem.")
    version: str | None = Field(None, description="Bundle version; None = UTC time YYYY.MM.DD-HHMM.")
    threads: int | None = None
    progress: bool = True


@dataclass
class Segments:
    """One file split by time: rows [0, train_end) train, [train_end, cal_start) val, [cal_start, T) calibration."""

    table: Table
    normal: np.ndarray  # (T,) bool
    train_end: int
    cal_start: int
    filled: np.ndarray | None = None  # (T, F) raw values, NaN carried forward (set once the scaler is known)


def robust_scaler(rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Median and IQR/1.349 per channel, with safe fall-backs.

    When the IQR hides most of the spread (intermittent or two-level channels: IQR 0, std
    not), the std is used; constant channels get 1 % of their magnitude (at least 1e-3), so a
    change on a sensor that never moved in training is loud but finite.
    """
    x = rows.astype(np.float64)
    centre = np.nanmedian(x, axis=0)
    q75, q25 = np.nanpercentile(x, [75, 25], axis=0)
    iqr = (q75 - q25) / 1.349
    std = np.nanstd(x, axis=0)
    scale = np.where(iqr >= 0.2 * std, iqr, std)
    floor = np.maximum(1e-2 * np.abs(centre), 1e-3)
    scale = np.where(std > 0, np.maximum(scale, 1e-6 * np.maximum(1.0, np.abs(centre))), floor)
    centre = np.where(np.isfinite(centre), centre, 0.0)  # all-missing channel: centre 0
    scale = np.where(np.isfinite(scale) & (scale > 0), scale, 1.0)
    return centre, scale


def scale_windows(windows: np.ndarray, centre: np.ndarray, scale: np.ndarray) -> np.ndarray:
    """Exactly the agent Scorer's scaling (float32, same clip), for training and golden inputs."""
    inv = (1.0 / np.asarray(scale, np.float64)).astype(np.float32)
    xs = (np.asarray(windows, np.float32) - np.asarray(centre, np.float32)) * inv
    return np.clip(xs, -CLIP, CLIP, out=xs)


def auto_window(normal_rows_per_file: list[int]) -> int:
    # 8 rows. Window 4 scored a little better on the detection suite (mean pooled F1 0.742 vs 0.709 with the
    # 3-VAE ensemble and the whitened score, same false-alarm rate), but it cannot tell a normal pump
    # transient from a fault: 29 % false alarms on tests/bundle_factory's healthy pump stream, 0 % at 8
    # (test_trainer_fit: fit on its first 400 rows, rows 400-700 scored). Over a longer healthy stretch
    # (rows 400-2000, seeds 0-2) window 8 alarms on 29-78 % of the rows: 400 rows (under 7 minutes)
    # do not cover that pump's slow drift; fit needs history that spans normal operation. Smoothing adds the memory. Short files get shorter windows (the typical file
    # decides, so one stray short file does not shrink every window).
    return int(np.clip(int(np.median(normal_rows_per_file)) // 10, 2, DEFAULT_WINDOW))


def auto_sizes(window: int, n_features: int) -> tuple[int, int]:
    d = window * n_features
    hidden = int(np.clip(2 ** math.ceil(math.log2(max(1, d / 2))), 32, 128))
    latent = int(np.clip(round(math.sqrt(d) / 2), 3, 16))
    return hidden, latent


def _all_normal(normal: np.ndarray, span: int) -> np.ndarray:
    """(T,) True where rows t-span+1..t are all normal (rows before 0 count as row 0)."""
    bad = (~normal).astype(np.int64)
    padded = np.concatenate([np.repeat(bad[:1], span - 1), bad]) if span > 1 else bad
    c = np.concatenate([[0], np.cumsum(padded)])
    return (c[span:] - c[:-span]) == 0


def split_file(table: Table, opts: FitOptions, min_rows: int) -> Segments:
    normal = np.ones(table.rows, bool) if table.label is None else table.label == 0
    idx = np.flatnonzero(normal)
    n, T = len(idx), table.rows
    if n < min_rows:  # too short to split: all of it trains
        return Segments(table, normal, T, T)
    cal_start = int(idx[int(n * (1 - opts.calibration_fraction))])
    train_end = int(idx[int(n * (1 - opts.calibration_fraction - opts.val_fraction))])
    return Segments(table, normal, train_end, cal_start)


def _data_sha(paths: list[Path]) -> str:
    h = hashlib.sha256()
    for p in paths:
        h.update(sha256_file(p).encode())
    return h.hexdigest()


def _threshold_value(scores: np.ndarray, q: float, margin: float) -> float:
    hi = float(np.quantile(scores, q))
    med = float(np.median(scores))
    value = hi + margin * max(hi - med, 0.0)
    # A perfectly flat calibration (constant data) still needs head-room above it.
    return max(value, hi * 1.05, 1e-6)


def _pot_threshold(scores: np.ndarray, risk: float, init_q: float = 0.98) -> float:
    """Peaks over threshold: a generalized Pareto fit to the excesses over the ``init_q`` quantile,
    extrapolated to the score exceeded with probability ``risk`` (Siffer et al., SPOT)."""
    from scipy.stats import genpareto

    s = np.asarray(scores, np.float64)
    t = float(np.quantile(s, init_q))
    exc = s[s > t] - t
    if len(exc) < 10 or float(exc.std()) <= 0:
        return _threshold_value(s, 1 - risk, 0.0)
    c, _, sigma = genpareto.fit(exc, floc=0.0)
    c = float(np.clip(c, -0.5, 0.5))  # a few dozen peaks cannot support a wilder tail
    r = risk * len(s) / len(exc)
    z = t - sigma * math.log(r) if abs(c) < 1e-6 else t + sigma / c * (r ** (-c) - 1)
    return max(float(z), t, 1e-6)


def _version_now() -> str:
    return datetime.now(timezone.utc).strftime("%Y.%m.%d-%H%M")


@dataclass
class Prepared:
    """What fit learns from the files before training: layout, scaler, windows, calibration rows."""

    paths: list[Path]
    tables: list[Table]
    features: list[str]
    normal_rows: int
    window: int
    centre: np.ndarray
    scale: np.ndarray
    x_train: np.ndarray  # scaled training windows
    x_val: np.ndarray  # scaled early-stopping windows
    cal_parts: list[tuple[np.ndarray, np.ndarray]]  # (raw rows incl. context, mask of clean calibration rows)
    cal_windows: np.ndarray  # raw windows ending at the clean calibration rows


def prepare(paths: list[str | Path], opts: FitOptions, csv: CsvOptions | None = None) -> Prepared:
    paths = [Path(p) for p in paths]
    tables = load_many(paths, csv)
    for t in tables:  # a fault column without a label column: rows naming a fault are anomalous
        if t.label is None and t.fault is not None:
            t.label = np.array([not is_normal_fault(f) for f in t.fault], np.int8)
    features = tables[0].features
    F = len(features)
    normal_counts = [int(t.rows if t.label is None else (t.label == 0).sum()) for t in tables]
    total = sum(normal_counts)
    if total == 0:
        raise InputError("no normal rows to train on (every row is labelled anomalous)")
    window = opts.window or auto_window([c for c in normal_counts if c > 0])
    if total < 3 * window + 20:
        raise InputError(f"too little normal data: {total} normal rows, need at least {3 * window + 20} "
                         f"for window {window}")
    ctx = window + opts.smoothing  # real rows before calibration so its windows are not padded
    segs = [split_file(t, opts, 6 * window + 2 * ctx) for t in tables]
    if all(s.cal_start >= s.table.rows for s in segs):
        # No file is long enough alone: hold out the end of the longest one anyway.
        i = int(np.argmax(normal_counts))
        segs[i] = split_file(tables[i], opts, 0)
    # Scaler from the training part only, so calibration stays unseen.
    centre, scale = robust_scaler(np.concatenate([s.table.values[: s.train_end][s.normal[: s.train_end]] for s in segs]))
    c32 = centre.astype(np.float32)
    for s in segs:
        s.filled = ffill(s.table.values, c32)

    def windows(lo_hi) -> np.ndarray:
        out = []
        for s in segs:
            lo, hi = lo_hi(s)
            idx = np.flatnonzero(_all_normal(s.normal, window)[lo:hi]) + lo
            if len(idx):
                out.append(sliding_windows(s.filled, window)[idx])
        return np.concatenate(out) if out else np.zeros((0, window, F), np.float32)

    x_train = windows(lambda s: (0, s.train_end))
    if len(x_train) > MAX_TRAIN_WINDOWS:  # neighbours overlap in all but one row: an even subset loses little
        x_train = x_train[np.linspace(0, len(x_train) - 1, MAX_TRAIN_WINDOWS).round().astype(int)]
    x_train = scale_windows(x_train, centre, scale)
    x_val = scale_windows(windows(lambda s: (s.train_end, s.cal_start)), centre, scale)
    if len(x_train) < 8:
        raise InputError(f"too little normal data to train: {len(x_train)} training windows of {window} rows")
    if len(x_val) == 0:  # tiny data: early stopping watches the newest training windows
        x_val = x_train[-max(1, len(x_train) // 5):]

    cal_parts = []
    for s in segs:
        if s.cal_start < s.table.rows:
            lo = max(0, s.cal_start - ctx)
            clean = _all_normal(s.normal, window + opts.smoothing - 1)[lo:]
            cal_parts.append((s.table.values[lo:], clean & (np.arange(lo, s.table.rows) >= s.cal_start)))
    cal_windows = np.concatenate([sliding_windows(ffill(v, c32), window)[k] for v, k in cal_parts])
    if len(cal_windows) == 0:
        raise InputError("no clean normal rows left for threshold calibration")
    return Prepared(paths, tables, features, total, window, centre, scale, x_train, x_val, cal_parts, cal_windows)


PRECISION_FLOOR = 0.05  # of the median channel error: no direction is more than 1/0.05 = 20x more precise


def residual_precision(backend, x_scaled: np.ndarray, tail: int) -> np.ndarray:
    """Whitening matrix for vae_recon_mahal from held-out normal windows (already scaled).

    P = (M^-1 + diag(M)^-1) / 2, M the second-moment matrix of the per-row residual vectors.
    The full half makes redundant channels count once and a broken correlation count; the
    diagonal half keeps every channel heard on its own. Eigenvalues (and the diagonal) are
    floored at 5 % of the median channel error, so no direction -- e.g. the difference of two
    copies of one transmitter -- is more than 20x more precise than a typical channel.
    """
    r = np.concatenate([backend.run(np.ascontiguousarray(x_scaled[a:a + 512]))[0][:, -tail:, :]
                        - x_scaled[a:a + 512, -tail:, :] for a in range(0, len(x_scaled), 512)])
    r = r.reshape(-1, r.shape[-1]).astype(np.float64)
    m = r.T @ r / max(1, len(r))
    diag = np.diag(m).copy()
    floor = max(PRECISION_FLOOR * float(np.median(diag)), 1e-4)
    w, v = np.linalg.eigh(m)
    full = (v / np.maximum(w, floor)) @ v.T
    p = 0.5 * (full + np.diag(1.0 / np.maximum(diag, floor)))
    return 0.5 * (p + p.T)


def calibrate(manifest: Manifest, backend, prep: Prepared, opts: FitOptions) -> tuple[Manifest, dict[str, float]]:
    """The score's normaliser, then the threshold from the held-out calibration rows.

    mahal: the residual whitening comes from all held-out normal windows (early-stopping and
    calibration: never trained on); norm: the per-channel error scale from the calibration windows.

    Scored through the agent's Scorer/score_rows on ``backend`` (fit passes the held-out model: with
    refit, the shipped model has learnt these rows, so its own scores on them would be optimistic).
    """
    tail = min(opts.tail or prep.window, prep.window)
    if opts.score_kind == "mahal":
        # Whitening from every held-out normal window, calibration rows included: a calibration stretch with
        # normal behaviour the val rows lacked (a colder motor at night, an operating point) must widen the
        # whitening, not blow the threshold up (the demo pumps at window 4: threshold 7.7 and blind with the
        # val rows alone, 4.0 and both faults caught with both; test_trainer_fit pins it).
        held_out = np.concatenate([prep.x_val, scale_windows(prep.cal_windows, prep.centre, prep.scale)])
        score = ScoreSpec(kind="vae_recon_mahal", precision=residual_precision(backend, held_out, tail).tolist(),
                          tail=tail, smoothing=opts.smoothing, transform="log")
    else:
        plain = manifest.model_copy(update={"score": ScoreSpec(kind="vae_recon_mse", tail=tail,
                                                               smoothing=opts.smoothing, transform="log")})
        sc = Scorer(plain, backend)
        w = prep.cal_windows
        typical = np.concatenate([sc.channel_errors(w[a:a + 512]) for a in range(0, len(w), 512)]).mean(axis=0)
        # Floor: no channel counts as more than 20x more precise than the typical one, so a channel
        # the VAE reproduces almost perfectly (constant, slow) cannot turn hair-trigger.
        channel_scale = np.maximum(typical, max(0.05 * float(np.median(typical)), 1e-4))
        score = ScoreSpec(kind="vae_recon_norm", channel_scale=[float(c) for c in channel_scale], tail=tail,
                          smoothing=opts.smoothing, transform="log")
    scored = manifest.model_copy(update={"score": score})
    scorer = Scorer(scored, backend)
    runs = [score_rows(scorer, v)["score"] for v, _ in prep.cal_parts]
    keeps = [k for _, k in prep.cal_parts]
    cal = np.concatenate([r[k] for r, k in zip(runs, keeps)])
    if opts.threshold_method == "pot":
        value = _pot_threshold(cal, opts.pot_risk)
        how = f"POT (GPD over the q0.98 excesses) at risk {opts.pot_risk:g}"
    else:
        value = _threshold_value(cal, opts.quantile, opts.margin)
        how = f"q{opts.quantile:g} + {opts.margin:g}*(q{opts.quantile:g} - median)"
    threshold = decision_threshold(value, f"{how} of {len(cal)} smoothed scores on held-out normal calibration "
                                   f"rows (last {opts.calibration_fraction:.0%} of each file's normal rows)", opts)
    final = scored.model_copy(update={"threshold": threshold})
    metrics = {
        "calibration_rows": float(len(cal)),
        "calibration_false_alarm_rate": _false_alarm_rate(
            [score_rows(Scorer(final, backend), v)["anomaly"] for v, _ in prep.cal_parts], keeps),
        "calibration_score_median": float(np.median(cal)),
        "calibration_score_q": float(np.quantile(cal, opts.quantile)),
    }
    return final, metrics


# ---------------------------------------------------------------- fault models
MIN_FAULT_EPISODES = 2  # fewer: the classifier could only be graded on windows of the episode it learnt
MIN_FAULT_WINDOWS = 5  # per class


def is_normal_fault(name: str) -> bool:
    return name.strip().lower() in ("", "normal", "none", "0", "ok", "nan")


def fault_windows(prep: Prepared) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Raw windows lying entirely inside one fault episode, past its first third (early rows of a
    developing fault look normal), with their fault type and episode id. Overlapping faults
    ("a+b") are skipped: they belong to no single class."""
    W = prep.window
    wins, labels, groups = [], [], []
    c32 = prep.centre.astype(np.float32)
    for fi, t in enumerate(prep.tables):
        if t.fault is None:
            continue
        f = np.asarray([x.strip() for x in t.fault], dtype=object)
        starts = np.flatnonzero(np.r_[True, f[1:] != f[:-1]])
        ends = np.r_[starts[1:], len(f)]
        filled = None
        for a, b in zip(starts, ends):
            name = str(f[a])
            if is_normal_fault(name) or "+" in name:
                continue
            first = a + (b - a) // 3 + W - 1  # window end rows: start >= a + third, end < b
            if first >= b:
                continue
            if filled is None:
                filled = sliding_windows(ffill(t.values, c32), W)
            wins.append(filled[first:b])
            labels += [name] * (b - first)
            groups += [f"{fi}:{a}"] * (b - first)
    if not wins:
        return np.zeros((0, W, len(prep.features)), np.float32), np.zeros(0, str), np.zeros(0, str)
    return np.concatenate(wins), np.asarray(labels), np.asarray(groups)


def train_faults(prep: Prepared, out: Path, opts: FitOptions):
    """Train the GAN + classifier when the data has enough labelled fault episodes, else None."""
    x, y, g = fault_windows(prep)
    classes, counts = np.unique(y, return_counts=True)
    episodes = len(np.unique(g))
    if episodes < MIN_FAULT_EPISODES or len(classes) == 0 or counts.min() < MIN_FAULT_WINDOWS:
        few = ", ".join(f"{c}: {n}" for c, n in zip(classes, counts)) or "none"
        log.warning("skipping fault models: need >= %d fault episodes and >= %d windows per fault type "
                    "(got %d episodes; windows %s)", MIN_FAULT_EPISODES, MIN_FAULT_WINDOWS, episodes, few)
        return None
    from trainer.fault_models import train_fault_models

    log.info("training fault models on %d windows from %d episodes (%s)", len(x), episodes,
             ", ".join(f"{c}: {n}" for c, n in zip(classes, counts)))
    return train_fault_models(scale_windows(x, prep.centre, prep.scale), y, prep.x_train, out, seed=opts.seed,
                              report_dir=out / "report", time_budget_s=opts.fault_time_budget_s,
                              progress=opts.progress, groups=g, gan_steps=opts.gan_steps)


@dataclass
class Detector:
    """The trained VAE(s). ``held_out`` was trained on the training part only: the whitening and the
    threshold are measured on the rows it never saw. ``final`` is what ships: ``held_out`` itself,
    or with ``refit`` the same recipe trained again on every normal window."""

    held_out: object
    final: object
    metrics: dict[str, float]


REFIT_SHARE = 1 / 3  # of the time budget kept for the refit


def _train_members(prep: Prepared, opts: FitOptions, x_train: np.ndarray, x_val: np.ndarray, budget: float,
                   epochs: list[int] | None = None, label: str = "fit vae"):
    """``opts.ensemble`` WindowVAEs from seeds seed, seed+1, ...; ``epochs``: a fixed count per member
    (no early stopping: the refit has no unseen rows left to stop on)."""
    import torch

    from trainer.vae import TrainConfig, WindowVAE, train_vae

    W, F = prep.window, len(prep.features)
    hidden, latent = auto_sizes(W, F)
    hidden, latent = opts.hidden or hidden, opts.latent or latent
    members, results = [], []
    t0 = time.monotonic()
    for k in range(opts.ensemble):
        seed = opts.seed + k
        torch.manual_seed(seed)
        member = WindowVAE(W, F, hidden, latent, linear_path=opts.linear_path)
        # The wall-clock budget is shared: what is left is split evenly over the members still to train.
        left = max(budget - (time.monotonic() - t0), 0.05 * budget)
        n_epochs = opts.epochs if epochs is None else epochs[k]
        cfg = TrainConfig(epochs=n_epochs, beta=opts.beta, time_budget_s=left / (opts.ensemble - k), seed=seed,
                          threads=opts.threads, progress=opts.progress,
                          patience=TrainConfig.patience if epochs is None else n_epochs + 1,
                          desc=f"{label} {k + 1}/{opts.ensemble}" if opts.ensemble > 1 else label)
        results.append(train_vae(member, x_train, x_val, cfg))
        members.append(member)
    return members, results, hidden, latent


def train_detector(prep: Prepared, opts: FitOptions) -> Detector:
    """Train the VAE -- ``opts.ensemble`` members averaged into one graph -- on the training windows;
    with ``opts.refit``, train it again on every normal window (training, early-stopping and
    calibration rows) for as many epochs as each member's best epoch."""
    import torch

    from trainer.vae import EnsembleVAE, TrainConfig, _recon_mse

    def combine(members):
        return members[0] if len(members) == 1 else EnsembleVAE(members).eval()

    log.info("training VAE%s: %d features, window %d, %d train / %d val windows",
             f" ensemble of {opts.ensemble}" if opts.ensemble > 1 else "", len(prep.features), prep.window,
             len(prep.x_train), len(prep.x_val))
    budget = opts.time_budget_s * (1 - REFIT_SHARE if opts.refit else 1.0)
    t0 = time.monotonic()
    members, results, hidden, latent = _train_members(prep, opts, prep.x_train, prep.x_val, budget)
    model = combine(members)
    xv = torch.from_numpy(np.ascontiguousarray(prep.x_val, dtype=np.float32))
    metrics = {
        "ensemble": float(len(members)), "train_loss": float(np.mean([r.train_loss for r in results])),
        "val_recon_mse": _recon_mse(model, xv), "epochs": float(np.mean([r.epochs for r in results])),
        "best_epoch": float(np.mean([r.best_epoch for r in results])),
        "stopped_by_time_budget": float(any(r.stopped == "time_budget" for r in results)),
        "train_seconds": float(sum(r.seconds for r in results)), "hidden": float(hidden), "latent": float(latent),
        "linear_path": float(opts.linear_path),
    }
    final = model
    if opts.refit:
        x_all = np.concatenate([prep.x_train, prep.x_val, scale_windows(prep.cal_windows, prep.centre, prep.scale)])
        if len(x_all) > MAX_TRAIN_WINDOWS:
            x_all = x_all[np.linspace(0, len(x_all) - 1, MAX_TRAIN_WINDOWS).round().astype(int)]
        # "Validation" on seen windows only picks the newest weights; the epoch counts carry the early stopping.
        watch = x_all[np.linspace(0, len(x_all) - 1, min(len(x_all), 1024)).round().astype(int)]
        epochs = [max(r.best_epoch, TrainConfig.warmup_epochs + 1) for r in results]
        log.info("refitting on all %d normal windows for %s epochs", len(x_all), "/".join(map(str, epochs)))
        left = max(opts.time_budget_s - (time.monotonic() - t0), REFIT_SHARE * opts.time_budget_s)
        refit_members, refit_results, _, _ = _train_members(prep, opts, x_all, watch, left, epochs, "refit vae")
        final = combine(refit_members)
        metrics.update({
            "refit_windows": float(len(x_all)), "refit_epochs": float(np.mean([r.epochs for r in refit_results])),
            "refit_seconds": float(sum(r.seconds for r in refit_results)),
            "refit_stopped_by_time_budget": float(any(r.stopped == "time_budget" for r in refit_results)),
        })
        metrics["train_seconds"] += metrics["refit_seconds"]
    return Detector(model, final, metrics)


def fit(paths: list[str | Path], out_dir: str | Path, options: FitOptions | None = None,
        csv: CsvOptions | None = None) -> Manifest:
    """Train, calibrate and export one bundle into ``out_dir``; returns the verified manifest."""
    return fit_with_model(paths, out_dir, options, csv)[0]


def fit_with_model(paths: list[str | Path], out_dir: str | Path, options: FitOptions | None = None,
                   csv: CsvOptions | None = None):
    """:func:`fit`, also returning the trained PyTorch model (parity tests, fault models)."""
    opts = options or FitOptions()
    t_start = time.monotonic()
    prep = prepare(paths, opts, csv)  # before the heavy imports: bad input fails fast

    from trainer.export import INPUTS, OUTPUTS, export_scorer, export_vae, scoring_head, silenced
    from trainer.vae import TorchBackend

    det = train_detector(prep, opts)
    model, train_metrics = det.final, det.metrics

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    for stale in [*out.glob("vae*"), *out.glob("scorer*"), *out.glob("generator*"), *out.glob("classifier*"),
                  *out.glob("report/fault_*"),
                  out / MANIFEST_FILE]:  # no old file may survive next to the new manifest
        if stale.is_file():
            stale.unlink()
    periods = [p for p in (t.sample_period_s() for t in prep.tables) if p]
    draft = Manifest(
        name=opts.name or prep.paths[0].stem, version=opts.version or _version_now(),
        trainer_version=trainer_version(), features=prep.features, window=prep.window, stride=opts.stride,
        sample_period_s=float(f"{np.median(periods):.6g}") if periods else None,
        scaler=Scaler(centre=[float(c) for c in prep.centre], scale=[float(s) for s in prep.scale]),
        score=ScoreSpec(kind="vae_recon_mse", tail=1), threshold=Threshold(value=1.0, method="draft"),
        models={"vae": ModelEntry(inputs=INPUTS, outputs=OUTPUTS, files={})},
        training=Training(data_sha256=_data_sha(prep.paths), rows=sum(t.rows for t in prep.tables),
                          normal_rows=prep.normal_rows, seconds=0.0),
    )
    # Whitening and threshold from the model that never saw the held-out rows (float32 PyTorch: the
    # runtimes agree with it to ~1e-6, tests/test_parity.py).
    manifest, cal_metrics = calibrate(draft, TorchBackend(det.held_out), prep, opts)
    # Golden inputs: real held-out windows, spread over the calibration rows.
    gi = np.linspace(0, len(prep.cal_windows) - 1, num=min(16, len(prep.cal_windows))).round().astype(int)
    t_exp = time.monotonic()
    entry, export_times = export_vae(model, out, scale_windows(prep.cal_windows[gi], prep.centre, prep.scale),
                                     int8=opts.int8)
    export_s = time.monotonic() - t_exp
    manifest = manifest.model_copy(update={"models": {"vae": entry}})
    vae_ort = open_backend("onnxruntime", out, manifest, threads=1)
    t_exp = time.monotonic()
    head = scoring_head(model, manifest)
    if head is not None:  # the fused graph, proven against the numpy score calibration used
        golden_raw = _golden_raw(prep.cal_windows[gi], prep.scale)
        scorer_entry = export_scorer(head, out, golden_raw, Scorer(manifest, vae_ort).score)
        manifest = manifest.model_copy(update={"models": {**manifest.models, "scorer": scorer_entry}})
    export_times["export_scorer_s"] = time.monotonic() - t_exp
    export_s += export_times["export_scorer_s"]
    metrics = {
        **train_metrics, "train_windows": float(len(prep.x_train)), "val_windows": float(len(prep.x_val)),
        **cal_metrics, "export_seconds": export_s, **{k: float(v) for k, v in export_times.items()},
    }
    fm = train_faults(prep, out, opts) if any(t.fault is not None for t in prep.tables) else None
    update = {}
    if fm is not None:
        metrics.update({f"fault_{k}": float(v) for k, v in fm.metrics.items()})
        update = {"models": {**manifest.models, **fm.models}, "classes": fm.classes, "latent_dim": fm.latent_dim}
    training = manifest.training.model_copy(update={"seconds": round(time.monotonic() - t_start, 3), "metrics": metrics})
    manifest = Manifest.model_validate(manifest.model_copy(update={"training": training, **update}).model_dump())
    write_manifest(out, manifest)

    # Prove the bundle the way a gateway will: hashes, schema, golden vectors on every runtime.
    loaded = load_manifest(out)
    with silenced():
        for name in loaded.models:
            open_backend("onnxruntime", out, loaded, model=name)
            open_backend("litert", out, loaded, model=name)
        if any(f.quantization == "dynamic_int8" for f in entry.files.get("tflite", [])):
            open_backend("litert", out, loaded, quantization="dynamic_int8")
    log.info("bundle %s %s written to %s in %.1fs (train %.1fs, export %.1fs); threshold %.4g, "
             "calibration false-alarm rate %.4f", loaded.name, loaded.version, out, time.monotonic() - t_start,
             train_metrics["train_seconds"], export_s, loaded.threshold.value, cal_metrics["calibration_false_alarm_rate"])
    return loaded, model


def decision_threshold(value: float, method: str, opts: FitOptions) -> Threshold:
    """The manifest's decision rule: ``value`` with fit's hysteresis and debounce options
    (clear_smoothing stored only when shorter than the score's smoothing: else it changes nothing)."""
    cs = opts.clear_smoothing
    return Threshold(value=value, method=method, raise_after=opts.raise_after, clear_after=opts.clear_after,
                     clear_ratio=opts.clear_ratio, clear_smoothing=cs if cs is not None and cs < opts.smoothing else None)


def _golden_raw(normal: np.ndarray, scale: np.ndarray) -> np.ndarray:
    """Golden inputs of the fused scorer: normal windows, and the same windows with one sensor
    off by 5 and by 50 scaler units over the newest rows (large scores; the second is clipped)."""
    out = [normal]
    W, F = normal.shape[1:]
    for k in (5.0, 50.0):
        bad = normal.copy()
        for i in range(len(bad)):
            bad[i, W // 2:, i % F] += k * scale[i % F]
        out.append(bad)
    return np.ascontiguousarray(np.concatenate(out), np.float32)


def _false_alarm_rate(active: list[np.ndarray], keep: list[np.ndarray]) -> float:
    """Fraction of clean calibration rows on which the alert (score_rows' decision) is raised."""
    alarms = sum(int(a.astype(bool)[k].sum()) for a, k in zip(active, keep))
    return alarms / max(1, sum(int(k.sum()) for k in keep))
