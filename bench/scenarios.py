"""Scenario sets for the detector evaluation: diverse, labelled, deterministic by seed.

Each set is a list of ``Case``: normal history to fit on (no labels used) and a labelled file to
score causally. They differ on purpose -- sampling rate, channel count, noise, redundancy, drift,
regime changes and fault shapes -- so defaults chosen on the suite are not tuned to one machine.
Anomalies are long contiguous spans after a normal stretch of the same run, as in SKAB-like
benchmarks.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass
class Case:
    name: str
    features: list[str]
    train: np.ndarray  # (N, F) normal history
    test: np.ndarray  # (T, F)
    label: np.ndarray  # (T,) 0/1
    period_s: float


def _latent_plant(rng, n: int, f: int, k: int, period_s: float, noise: float, regimes: int = 1, t0: int = 0,
                  mix=None, levels=None):
    """F channels = mix @ k slow latent factors (+ operating-point levels) + sensor noise."""
    t = np.arange(t0, t0 + n)
    z = np.zeros((n, k))
    for j in range(k):  # slow oscillation + AR(1) wander per factor
        per = 60 + 40 * j
        e = rng.normal(0, 0.15, n)
        ar = np.zeros(n)
        for i in range(1, n):
            ar[i] = 0.97 * ar[i - 1] + e[i]
        z[:, j] = np.sin(2 * np.pi * t / per + j) + ar
    x = z @ mix
    if regimes > 1:  # piecewise operating points held for 100-300 rows
        lv = np.zeros(n)
        i = 0
        while i < n:
            d = int(rng.integers(100, 300))
            lv[i:i + d] = rng.integers(regimes)
            i += d
        x = x + levels[lv.astype(int)]
    return x + rng.normal(0, noise, x.shape)


def _inject(rng, x: np.ndarray, start: int, end: int, kind: str, chans: np.ndarray, sd: np.ndarray) -> None:
    n = end - start
    ramp = np.minimum(1.0, np.arange(1, n + 1) / max(1, n // 5))[:, None]
    if kind == "shift":
        x[start:end, chans] += rng.choice([-1, 1], len(chans)) * 1.5 * sd[chans] * ramp
    elif kind == "variance":
        x[start:end, chans] += rng.normal(0, 1.5, (n, len(chans))) * sd[chans]
    elif kind == "decorrelate":  # sensors keep their range but stop following the process
        src = x[start:end, chans].copy()
        x[start:end, chans] = src[::-1] * 0.6 + 0.8 * sd[chans] * rng.choice([-1, 1], len(chans))
    elif kind == "drift":
        x[start:end, chans] += rng.choice([-1, 1], len(chans)) * 2.5 * sd[chans] * (np.arange(n) / n)[:, None]
    elif kind == "stuck":
        x[start:end, chans] = x[start, chans] + 1.0 * sd[chans]


def synthetic_set(name: str, seed: int, files: int, f: int, k: int, noise: float, train_rows: int,
                  normal_head: int, anomaly_rows: int, period_s: float, regimes: int = 1,
                  kinds=("shift", "variance", "decorrelate", "drift", "stuck"), noisy_channel: bool = False,
                  redundant: int = 0) -> list[Case]:
    """A SKAB-like rig: one run of history, then files of normal stretch + one anomalous span (+ tail)."""
    rng = np.random.default_rng(seed)
    mix = rng.normal(0, 1, (k, f))
    levels = rng.normal(0, 1.5, (max(1, regimes), f))
    width = f + redundant

    def plant(r, n_all: int) -> np.ndarray:
        x = _latent_plant(r, n_all, f, k, period_s, noise, regimes, mix=mix, levels=levels)
        if redundant:  # near-copies of the first channels (redundant transmitters)
            x = np.concatenate([x, x[:, :redundant] + r.normal(0, noise, (n_all, redundant))], axis=1)
        if noisy_channel:
            x[:, -1] += r.normal(0, 3.0 * x[:, -1].std(), n_all)
        return x

    # the very noisy channel is never the faulty one: its fault would drown in its noise
    return _files(name, seed, files, [f"s{j}" for j in range(width)], plant, train_rows, normal_head,
                  anomaly_rows, period_s, kinds, max_faulty=max(2, width // 3),
                  eligible=width - (1 if noisy_channel else 0))


def _files(name: str, seed: int, files: int, feats: list[str], plant, train_rows: int, normal_head: int,
           anomaly_rows: int, period_s: float, kinds, max_faulty: int | None = None,
           eligible: int | None = None) -> list[Case]:
    """The suite's file layout for any ``plant(rng, n) -> (n, F)``: history, normal stretch, one
    anomalous span of ``kinds[i]`` on 1..``max_faulty`` of the first ``eligible`` channels, tail."""
    cases = []
    for i in range(files):
        r = np.random.default_rng([seed, i])
        tail = anomaly_rows // 3
        n_all = train_rows + normal_head + anomaly_rows + tail
        x = plant(r, n_all)
        sd = x[:train_rows].std(axis=0)
        a = train_rows + normal_head
        kind = kinds[i % len(kinds)]
        f = x.shape[1]
        hi = max_faulty if max_faulty is not None else max(1, f // 3)
        chans = r.choice(eligible if eligible is not None else f, int(r.integers(1, hi + 1)), replace=False)
        _inject(r, x, a, a + anomaly_rows, kind, chans, sd)
        y = np.zeros(n_all, np.int8)
        y[a:a + anomaly_rows] = 1
        cases.append(Case(f"{name}-{i}-{kind}", feats, x[:train_rows].astype(np.float32),
                          x[train_rows:].astype(np.float32), y[train_rows:], period_s))
    return cases


def _pump_skid(rng, n: int) -> np.ndarray:
    """8 channels NONLINEAR in 3 slow factors (speed, system resistance, valve command); noise 2 % of reading."""
    z = _latent_plant(rng, n, 3, 3, 1.0, 0.0, mix=np.eye(3))  # the same slow factors as the linear sets
    speed = 1.0 + 0.25 * np.tanh(z[:, 0])  # per unit of rated speed, drive saturates
    valve = np.clip(0.55 + 0.3 * z[:, 2], 0.05, 1.0)  # opening, on its end stops
    resist = 1.0 + 0.3 * np.tanh(z[:, 1])  # downstream system resistance
    flow = speed * valve / np.sqrt(valve ** 2 + resist * 0.25)  # pump affinity x valve in series (per unit)
    head = speed ** 2 - 0.4 * flow ** 2  # pump curve: head ~ speed^2, falls with flow^2
    power = flow * head / (0.5 + 0.3 * np.tanh(3 * flow))  # hydraulic power / efficiency
    temp = 40 + 25 * (1 - np.exp(-power / 0.6))  # winding temperature saturates with load
    vib = 1.5 * speed ** 2 + 4.0 * np.maximum(0.0, 0.4 - flow) ** 2  # ~ speed^2, + recirculation at low flow
    dp_valve = 0.25 * (flow / valve) ** 2  # valve drop ~ (flow / opening)^2: the whole head when nearly shut
    x = np.column_stack([speed, valve, flow, head, power, temp, vib, dp_valve])
    return x * (1 + rng.normal(0, 0.02, x.shape))


def nonlinear_set(name: str, seed: int, files: int, train_rows: int = 1000, normal_head: int = 300,
                  anomaly_rows: int = 400, kinds=("shift", "variance", "decorrelate", "drift", "stuck")) -> list[Case]:
    """A pump skid at 1 Hz whose 8 channels are nonlinear in its slow factors (no linear mixture)."""
    feats = ["speed", "valve", "flow", "head", "power", "winding_temp", "vibration", "valve_dp"]
    return _files(name, seed, files, feats, _pump_skid, train_rows, normal_head, anomaly_rows, 1.0, kinds)


def _hall_temperature(rng, n: int) -> np.ndarray:
    """One temperature at 5-minute samples: daily cycle (+-4 degC around 21) + AR(1) weather wander + 0.1 degC noise."""
    t = np.arange(n)
    e = rng.normal(0, 0.15, n)
    ar = np.zeros(n)
    for i in range(1, n):
        ar[i] = 0.98 * ar[i - 1] + e[i]
    day = 288  # samples per day at 5 minutes
    x = 21 + 4 * np.sin(2 * np.pi * t / day + rng.uniform(0, 2 * np.pi)) + ar + rng.normal(0, 0.1, n)
    return x[:, None]


def single_channel_set(name: str, seed: int, files: int, train_rows: int = 1728, normal_head: int = 288,
                       anomaly_rows: int = 288, kinds=("shift", "variance", "drift", "stuck")) -> list[Case]:
    """One sensor: six days of history, then a day of normal readings and a day-long fault (+ tail)."""
    return _files(name, seed, files, ["temperature"], _hall_temperature, train_rows, normal_head, anomaly_rows,
                  300.0, kinds)


def simulator_set(name: str, seed: int, kinds=("pump", "motor", "compressor"), train_rows: int = 3600,
                  rows: int = 1500, period_s: float = 1.0, noise: float = 1.0, regimes: bool = True) -> list[Case]:
    """trainer.simulate machines: history and the faulty file are one continuous run (same seed)."""
    from trainer.simulate import FAULTS, FaultSpec, simulate_device

    cases = []
    for i, kind in enumerate(kinds * 2):
        ftype = FAULTS[(seed + i) % len(FAULTS)]
        n_all = train_rows + rows
        start = train_rows + rows // 3
        dur = rows // 2
        d = simulate_device(f"{kind}-{i}", kind, n_all, period_s, seed=seed * 100 + i, noise=noise, regimes=regimes,
                            faults=[FaultSpec(ftype, start, dur, 1.0)])
        cases.append(Case(f"{name}-{kind}-{ftype}", list(d.features), d.values[:train_rows],
                          d.values[train_rows:], d.label[train_rows:], period_s))
    return cases


def scenario_sets(quick: bool = False) -> dict[str, list[Case]]:
    """The suite. ``quick``: fewer, shorter files (tests, smoke runs)."""
    nf = 2 if quick else 5
    sets = {
        # SKAB-like valve/pump rig: 8 channels at 1 Hz, a few hundred rows of history.
        "skab_like": synthetic_set("skab", 1, nf, 8, 3, 0.3, 600, 300, 400, 1.0),
        # Slow plant (minutes/sample), many redundant channels and one very noisy one.
        "slow_redundant": synthetic_set("slow", 2, nf, 12, 4, 0.2, 800, 300, 400, 60.0, noisy_channel=True,
                                        redundant=6),
        # Few channels, noisy, operating-point regime changes in history and test.
        "regimes": synthetic_set("reg", 3, nf, 4, 2, 0.4, 1200, 400, 400, 10.0, regimes=3),
    }
    if not quick:
        # The range: "a few hundred to a few thousand rows", "1 to ~20 channels".
        # SKAB-like rig with only 400 rows of history (under 7 minutes at 1 Hz).
        sets["short_history_400"] = synthetic_set("short", 7, nf, 8, 3, 0.3, 400, 300, 400, 1.0)
        # Three channels, 400 rows: little redundancy to reconstruct from.
        sets["few_channels_400"] = synthetic_set("few", 8, nf, 3, 2, 0.3, 400, 300, 400, 1.0)
        # Twenty channels, 2,000 rows.
        sets["wide_20ch"] = synthetic_set("wide", 9, nf, 20, 5, 0.3, 2000, 300, 400, 1.0)
        sets["simulator"] = simulator_set("sim", 4)
        sets["simulator_noisy_10s"] = simulator_set("simn", 5, period_s=10.0, noise=2.0, train_rows=1000, rows=1200)
        # Pump skid, 8 channels at 1 Hz, 1,000 rows: channels nonlinear in the factors (curves, products, valve stops).
        sets["nonlinear_8ch"] = nonlinear_set("nonlin", 10, nf)
        # ONE channel: a hall temperature (daily cycle + weather wander) at 5 minutes, 1,728 rows (6 days) of history.
        sets["single_channel"] = single_channel_set("single", 11, nf)
    return sets
