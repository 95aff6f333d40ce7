"""One trained bundle per (rows, seed) per test session, for trainer and agent tests.

    from bundle_factory import make_bundle   # tests/ is on sys.path under pytest
    bundle_dir = make_bundle(tmp_path_factory.mktemp("bundle"))

Trains with the default fit options on simulated normal pump data (8 sensors, steady
operating point) when ``trainer.simulate`` exists, else on a small sine mixture. The first
call for a key trains (~10-20 s on 2 cores); later calls return the cached directory.
"""
from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path

import numpy as np

_CACHE: dict[tuple, "Made"] = {}


@dataclass
class Made:
    bundle: Path
    train_csv: Path
    model: object  # the PyTorch WindowVAE, for parity tests


def _sine_rows(rows: int, seed: int, fault: tuple[int, int] | None = None) -> tuple[list[str], np.ndarray, np.ndarray]:
    """Fallback data: 4 correlated sines + noise; a fault offsets one channel and breaks its correlation."""
    rows_all = max(rows, SERIES_ROWS)
    rng = np.random.default_rng(seed)
    t = np.arange(rows_all)
    base = np.stack([np.sin(2 * np.pi * t / 50), np.cos(2 * np.pi * t / 80)], 1)
    mix = np.array([[1.0, 0.5, -0.7, 0.2], [0.3, -1.0, 0.4, 0.9]])
    x = base @ mix + 0.05 * rng.standard_normal((rows_all, 4)) + np.array([10.0, 5.0, 0.0, 100.0])
    label = np.zeros(rows_all, np.int8)
    if fault:
        a, b = fault
        x[a:b, 1] += 2.0
        label[a:b] = 1
    return ["s0", "s1", "s2", "s3"], x[:rows].astype(np.float32), label[:rows]


SERIES_ROWS = 2000  # every stream is a prefix of one realisation, so training and test rows connect


def simulated(rows: int, seed: int, fault: tuple[int, int] | None = None, fault_type: str = "cavitation"):
    """(features, values (T, F), label) of one steady pump, optionally with one fault [start, end).

    Rows are a prefix of one fixed-length realisation per seed: the fault-free rows of a faulty
    stream equal the training rows of the same seed (the simulator shares noise between runs).
    """
    try:
        from trainer.simulate import FaultSpec, simulate_device
    except ImportError:
        return _sine_rows(rows, seed, fault)
    n = max(rows, SERIES_ROWS)
    faults = [FaultSpec(fault_type, fault[0], fault[1] - fault[0], severity=1.5)] if fault else []
    d = simulate_device("pump-test", "pump", n, seed=seed, faults=faults, regimes=False)
    return list(d.features), d.values[:rows], d.label[:rows]


def write_rows(path: Path, features: list[str], values: np.ndarray, label: np.ndarray | None = None,
               period_s: float = 1.0) -> Path:
    """CSV with an ISO timestamp column, the sensors and optionally a label column."""
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["timestamp", *features] + (["label"] if label is not None else []))
        t0 = np.datetime64("2026-01-01T00:00:00")
        for i, row in enumerate(values):
            ts = str(t0 + np.timedelta64(int(i * period_s * 1000), "ms")) + "Z"
            w.writerow([ts, *(f"{v:.6g}" for v in row)] + ([int(label[i])] if label is not None else []))
    return path


def make(tmp_dir: Path, rows: int = 400, seed: int = 0) -> Made:
    key = (rows, seed)
    hit = _CACHE.get(key)
    if hit is not None and (hit.bundle / "manifest.json").is_file():
        return hit
    from trainer.fit import FitOptions, fit_with_model

    tmp_dir = Path(tmp_dir)
    tmp_dir.mkdir(parents=True, exist_ok=True)
    features, values, _ = simulated(rows, seed)
    train_csv = write_rows(tmp_dir / f"train-{rows}-{seed}.csv", features, values)
    bundle = tmp_dir / f"bundle-{rows}-{seed}"
    _, model = fit_with_model([train_csv], bundle, FitOptions(seed=seed, progress=False, name="pump-test",
                                                              version="test"))
    made = Made(bundle, train_csv, model)
    _CACHE[key] = made
    return made


def make_bundle(tmp_dir: Path, rows: int = 400, seed: int = 0) -> Path:
    """Path of a verified bundle trained on ``rows`` normal rows (cached per session)."""
    return make(tmp_dir, rows, seed).bundle
