"""Labelled factory data: physics-inspired pumps, motors and compressors with developing faults.

Pure numpy + stdlib csv, deterministic by seed. The machine physics lives in
``trainer/sim_machines.py``; this module places faults, labels rows, writes CSVs and the
``simulation.json`` manifest, and provides the ``edge-trainer simulate`` arguments.

Fault model: each fault has an onset row and a duration; its intensity (severity x progression)
grows from onset, and at the end the machine is repaired -- rows after a fault are exactly the
rows the healthy machine would have produced (same noise), so alerts can clear.
Physical faults apply to every kind (for a motor, "cavitation" means the driven pump cavitates;
for a compressor, inlet starvation). Sensor faults hit one channel (``FaultSpec.sensor``, or
one chosen from the fault seed and reported in ``DeviceData.faults``).
"""
from __future__ import annotations

import argparse
import csv
import json
import math
import zlib
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np

from trainer.sim_machines import KINDS, MODELS, RESOLUTION, Faults, make_drivers, machine_params

__all__ = ["KINDS", "FAULTS", "FaultSpec", "DeviceData", "simulate_device", "random_faults", "write_csv",
           "simulate", "add_arguments", "run"]

FAULTS: tuple[str, ...] = ("bearing_wear", "cavitation", "overheating", "imbalance", "sensor_drift", "stuck_sensor")
SENSOR_FAULTS = ("sensor_drift", "stuck_sensor")
# How each fault develops with x = fraction of its duration elapsed (0 < x <= 1).
_PROGRESSION = {
    "bearing_wear": lambda x: x**2,  # wear accelerates
    "cavitation": lambda x: np.minimum(1.0, x / 0.2),  # suction collapses quickly, then persists
    "overheating": lambda x: x,  # cooling degrades steadily
    "imbalance": lambda x: 0.2 + 0.8 * x,  # noticeable at onset (lost weight / deposit), then builds up
    "sensor_drift": lambda x: x,
    "stuck_sensor": lambda x: np.ones_like(x),
}
_PHYSICAL = {"bearing_wear": "wear", "cavitation": "cav", "overheating": "heat", "imbalance": "imb"}
_NOT_FAULTABLE = {"ambient_temp", "voltage"}  # reference channels: a fault there says nothing about the machine
KIND_ORDER = ("pump", "motor", "compressor")
START_EPOCH = 1_767_225_600.0  # 2026-01-01T00:00:00Z
MANIFEST = "simulation.json"


@dataclass
class FaultSpec:
    type: str
    start: int  # first faulty row
    duration: int  # rows; the fault covers [start, start + duration)
    severity: float = 1.0
    sensor: str | None = None  # sensor faults only

    @property
    def end(self) -> int:
        return self.start + self.duration


@dataclass
class DeviceData:
    name: str
    kind: str
    features: list[str]
    timestamps: np.ndarray  # float64 epoch seconds
    values: np.ndarray  # (T, F) float32
    label: np.ndarray  # (T,) int8, 1 inside a fault
    fault: np.ndarray  # (T,) str, fault type ("" when normal, "a+b" where faults overlap)
    faults: list[FaultSpec] = field(default_factory=list)  # resolved specs (sensor filled in)
    period_s: float = 1.0

    def __len__(self) -> int:
        return len(self.timestamps)


def _check(ok: bool, msg: str) -> None:
    if not ok:
        raise ValueError(msg)


def _is_int(x) -> bool:
    return isinstance(x, (int, np.integer)) and not isinstance(x, bool)


def _validate_faults(faults: list[FaultSpec], rows: int, features: list[str]) -> None:
    for f in faults:
        _check(f.type in FAULTS, f"unknown fault type {f.type!r} (known: {', '.join(FAULTS)})")
        _check(_is_int(f.start) and _is_int(f.duration), f"fault {f.type}: start and duration must be integers")
        _check(f.duration >= 1, f"fault {f.type}: duration must be at least 1 row (got {f.duration})")
        _check(0 <= f.start and f.end <= rows,
               f"fault {f.type}: rows {f.start}..{f.end} fall outside 0..{rows}")
        _check(math.isfinite(f.severity) and f.severity > 0, f"fault {f.type}: severity must be > 0 (got {f.severity})")
        _check(f.sensor is None or f.sensor in features,
               f"fault {f.type}: unknown sensor {f.sensor!r} (known: {', '.join(features)})")


def simulate_device(name: str, kind: str = "pump", rows: int = 3600, period_s: float = 1.0, seed: int = 0,
                    faults: list[FaultSpec] | None = None, noise: float = 1.0,
                    start_epoch: float = START_EPOCH, regimes: bool = True,
                    machine_seed: int | None = None) -> DeviceData:
    """Simulate one machine. ``seed`` drives regimes, noise and fault details; the physical
    constants come from the machine's identity (kind + name), or from ``machine_seed`` when given,
    so the same machine with another seed is another stretch of its life (e.g. training history).
    ``regimes=False`` holds one steady operating point (no load changes or transients)."""
    _check(kind in KINDS, f"unknown machine kind {kind!r} (known: {', '.join(KINDS)})")
    _check(_is_int(rows) and rows >= 1, f"rows must be a positive integer (got {rows!r})")
    _check(math.isfinite(period_s) and period_s > 0, f"period_s must be > 0 (got {period_s})")
    _check(math.isfinite(noise) and noise >= 0, f"noise must be >= 0 (got {noise})")
    _check(math.isfinite(start_epoch), f"start_epoch must be finite (got {start_epoch})")
    _check(_is_int(seed) and seed >= 0, f"seed must be a non-negative integer (got {seed!r})")
    _check(machine_seed is None or (_is_int(machine_seed) and machine_seed >= 0),
           f"machine_seed must be a non-negative integer (got {machine_seed!r})")
    features = KINDS[kind]
    faults = list(faults or [])
    _validate_faults(faults, rows, features)
    seed = int(seed)
    # A stable hash (not hash(), which is salted per process) so a name always means the same machine.
    identity = [zlib.crc32(f"{kind}:{name}".encode()), 1] if machine_seed is None else [int(machine_seed)]
    params = machine_params(kind, np.random.default_rng([*identity, 0]))
    drivers = make_drivers(kind, rows, period_s, start_epoch, np.random.default_rng([seed, 1]), params, regimes)

    # Fault intensities over time; sensor faults get their channel resolved here.
    intensity = {k: np.zeros(rows) for k in _PHYSICAL.values()}
    active = np.zeros(rows, dtype=bool)
    resolved: list[FaultSpec] = []
    fault_rng = np.random.default_rng([seed, 3])
    for f in faults:
        sl = slice(f.start, f.end)
        x = np.arange(1, f.duration + 1) / f.duration
        prog = f.severity * _PROGRESSION[f.type](x)
        if f.type in _PHYSICAL:
            intensity[_PHYSICAL[f.type]][sl] += prog
            f = replace(f, sensor=None)
        elif f.sensor is None:
            f = replace(f, sensor=str(fault_rng.choice([s for s in features if s not in _NOT_FAULTABLE])))
        active[sl] = True
        resolved.append(f)

    def run_model(fx_arrays: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        # Fresh generators each run: the faulty and the healthy run share every normal noise draw.
        fx = Faults(**fx_arrays, rng=np.random.default_rng([seed, 4]))
        return MODELS[kind](drivers, params, fx, np.random.default_rng([seed, 2]), noise)

    clean = run_model({k: np.zeros(rows) for k in intensity})
    signals = dict(clean)
    if any(v.any() for v in intensity.values()):
        faulty = run_model(intensity)
        # Repair ends a fault: outside fault windows the machine is the healthy one (thermal state included).
        signals = {s: np.where(active, faulty[s], clean[s]) for s in features}

    drift_sign = np.random.default_rng([seed, 5])
    for f in resolved:
        if f.type == "sensor_drift":  # slow calibration drift, scaled to the channel's normal spread
            ch = clean[f.sensor]
            scale = max(2.0 * float(np.std(ch)), 0.1 * abs(float(np.median(ch))), 10 * RESOLUTION[kind][f.sensor])
            x = np.arange(1, f.duration + 1) / f.duration
            signals[f.sensor] = signals[f.sensor].copy()
            signals[f.sensor][f.start:f.end] += drift_sign.choice([-1.0, 1.0]) * f.severity * scale * x
    values = np.empty((rows, len(features)), dtype=np.float32)
    for j, s in enumerate(features):
        res = RESOLUTION[kind][s]
        values[:, j] = np.round(signals[s] / res) * res  # transmitter resolution
    for f in resolved:
        if f.type == "stuck_sensor":  # frozen at the last reading before the fault
            j = features.index(f.sensor)
            values[f.start:f.end, j] = values[max(f.start - 1, 0), j]

    label = active.astype(np.int8)
    fault = np.full(rows, "", dtype=object)
    for f in resolved:
        seg = fault[f.start:f.end]
        fault[f.start:f.end] = [f.type if not v else (v if f.type in v.split("+") else f"{v}+{f.type}") for v in seg]
    timestamps = start_epoch + np.arange(rows, dtype=np.float64) * period_s
    return DeviceData(name, kind, list(features), timestamps, values, label, fault.astype(str), resolved, float(period_s))


def random_faults(rows: int, rng, n: int = 1, types=FAULTS, min_gap: int | None = None) -> list[FaultSpec]:
    """``n`` non-overlapping faults after a normal warm-up (the first 40 % of rows), sorted by start.

    Each fault sits in its own slot of the remaining rows and is followed by at least ``min_gap``
    normal rows (default rows // 20) so the machine is seen recovering. ``rng``: Generator or seed.
    """
    rng = np.random.default_rng(rng)
    types = tuple(types)
    _check(_is_int(rows) and rows >= 1, f"rows must be a positive integer (got {rows!r})")
    _check(_is_int(n) and n >= 0, f"n must be a non-negative integer (got {n!r})")
    _check(len(types) > 0 and all(t in FAULTS for t in types), f"fault types must be among {', '.join(FAULTS)}")
    gap = max(1, rows // 20) if min_gap is None else int(min_gap)
    _check(gap >= 0, f"min_gap must be >= 0 (got {min_gap})")
    if n == 0:
        return []
    warmup = math.ceil(0.4 * rows)
    slot = (rows - warmup) // n
    room = slot - gap
    _check(room >= 4, f"{rows} rows are too few for {n} fault(s) with a {gap}-row gap after each")
    chosen = rng.choice(len(types), size=n, replace=n > len(types))
    out = []
    for i, t in enumerate(chosen):
        duration = int(rng.integers(max(2, int(0.4 * room)), max(3, int(0.75 * room)) + 1))
        lo = warmup + i * slot
        start = int(rng.integers(lo, lo + room - duration + 1))
        out.append(FaultSpec(types[int(t)], start, duration, round(float(rng.uniform(0.8, 1.2)), 2)))
    return out


def _iso(epochs: np.ndarray) -> np.ndarray:
    """ISO 8601 UTC strings; milliseconds only when some timestamp is fractional."""
    ms = np.round(np.asarray(epochs, dtype=np.float64) * 1000.0).astype(np.int64)
    unit = "s" if np.all(ms % 1000 == 0) else "ms"
    return np.char.add(np.datetime_as_string(ms.astype("datetime64[ms]"), unit=unit), "Z")


def iso(epoch: float) -> str:
    return str(_iso(np.array([epoch]))[0])


def write_csv(data: DeviceData, path) -> Path:
    """CSV: timestamp (ISO 8601 UTC), the sensor columns (at sensor resolution), label, fault."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    res = RESOLUTION.get(data.kind, {})
    decimals = [max(0, -math.floor(math.log10(res[s]) + 1e-9)) if s in res else 6 for s in data.features]
    cols = [_iso(data.timestamps)]
    cols += [np.char.mod(f"%.{d}f", data.values[:, j].astype(np.float64)) for j, d in enumerate(decimals)]
    cols += [data.label.astype(str), np.asarray(data.fault, dtype=str)]
    with path.open("w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["timestamp", *data.features, "label", "fault"])
        w.writerows(zip(*[c.tolist() for c in cols]))
    return path


def _fault_entry(f: FaultSpec, data: DeviceData) -> dict:
    t0, p = float(data.timestamps[0]), data.period_s
    return {"type": f.type, "sensor": f.sensor, "severity": f.severity,
            "start_index": f.start, "end_index": f.end, "duration": f.duration,  # end is exclusive
            "start": iso(t0 + f.start * p), "end": iso(t0 + f.end * p),
            "start_epoch": t0 + f.start * p, "end_epoch": t0 + f.end * p}


def _split(d: DeviceData, n: int) -> tuple[DeviceData, DeviceData]:
    """Rows [0, n) and [n, T) of one run; fault indices re-based on the second part."""
    def part(sl: slice, faults: list[FaultSpec]) -> DeviceData:
        return DeviceData(d.name, d.kind, d.features, d.timestamps[sl], d.values[sl], d.label[sl], d.fault[sl],
                          faults, d.period_s)

    return (part(slice(0, n), []),
            part(slice(n, None), [replace(f, start=f.start - n) for f in d.faults if f.start >= n]))


def simulate(out_dir, devices: int = 4, hours: float = 1.0, seed: int = 0, period_s: float = 1.0,
             fault_devices: int | None = None, train_hours: float | None = None) -> list[Path]:
    """Write ``<kind>-NN.csv`` per device (+ ``<name>.train.csv`` with ``train_hours`` of normal
    history ending where the device CSV starts) and ``simulation.json``.

    About half the devices (``fault_devices`` overrides) get one or two faults after a normal
    first 40 %; the others stay fault-free. Returns the device CSV paths, in device order.
    """
    _check(_is_int(devices) and devices >= 1, f"devices must be a positive integer (got {devices!r})")
    _check(math.isfinite(hours) and hours > 0, f"hours must be > 0 (got {hours})")
    _check(math.isfinite(period_s) and period_s > 0, f"period must be > 0 seconds (got {period_s})")
    _check(_is_int(seed) and seed >= 0, f"seed must be a non-negative integer (got {seed!r})")
    rows = int(round(hours * 3600 / period_s))
    _check(rows >= 50, f"hours={hours} at period {period_s}s gives {rows} rows; need at least 50")
    n_faulty = math.ceil(devices / 2) if fault_devices is None else fault_devices
    _check(_is_int(n_faulty) and 0 <= n_faulty <= devices,
           f"fault devices must be between 0 and {devices} (got {fault_devices!r})")
    train_rows = 0
    if train_hours is not None:
        _check(math.isfinite(train_hours) and train_hours >= 0, f"train hours must be >= 0 (got {train_hours})")
        train_rows = int(round(train_hours * 3600 / period_s))
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)

    plan = np.random.default_rng([seed, 7])  # which devices fail and how
    faulty = {int(i) for i in plan.permutation(devices)[:n_faulty]}
    deck = [FAULTS[int(i)] for i in plan.permutation(len(FAULTS))]  # deal types so a run covers many kinds of fault
    paths, entries = [], []
    for i in range(devices):
        kind = KIND_ORDER[i % len(KIND_ORDER)]
        name = f"{kind}-{i + 1:02d}"
        dev_seed = int(np.random.SeedSequence([seed, i]).generate_state(1)[0])
        faults: list[FaultSpec] = []
        if i in faulty:
            n = 2 if plan.random() < 0.5 and rows >= 200 else 1
            types = [deck.pop(0) if deck else FAULTS[int(plan.integers(len(FAULTS)))] for _ in range(n)]
            faults = random_faults(rows, plan, n=n, types=types)
        if train_rows:
            # History and device file are ONE run of the machine (thermal state, regimes and noise continue
            # across the boundary); two separate runs made e.g. winding_temp jump 50 -> 81 at the seam.
            run_all = simulate_device(name, kind, train_rows + rows, period_s, seed=dev_seed,
                                      faults=[replace(f, start=f.start + train_rows) for f in faults],
                                      start_epoch=START_EPOCH - train_rows * period_s, machine_seed=dev_seed)
            train, data = _split(run_all, train_rows)
        else:
            data = simulate_device(name, kind, rows, period_s, seed=dev_seed, faults=faults,
                                   start_epoch=START_EPOCH, machine_seed=dev_seed)
        paths.append(write_csv(data, out / f"{name}.csv"))
        entry = {"name": name, "kind": kind, "features": data.features, "file": paths[-1].name, "rows": rows,
                 "start": iso(data.timestamps[0]), "end": iso(data.timestamps[-1] + period_s),
                 "faults": [_fault_entry(f, data) for f in data.faults], "train_file": None, "train_rows": 0}
        if train_rows:
            entry["train_file"] = write_csv(train, out / f"{name}.train.csv").name
            entry["train_rows"] = train_rows
        entries.append(entry)
    manifest = {"version": 1, "generator": "edgewatch.trainer.simulate", "seed": seed, "period_s": period_s,
                "hours": hours, "train_hours": train_hours, "rows": rows, "start": iso(START_EPOCH),
                "end": iso(START_EPOCH + rows * period_s), "fault_types": list(FAULTS), "devices": entries}
    (out / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    return paths


# ---------------------------------------------------------------- CLI (edge-trainer simulate)
def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", required=True, metavar="DIR", help="output directory")
    parser.add_argument("--devices", type=int, default=4, metavar="N", help="number of machines (default 4)")
    parser.add_argument("--hours", type=float, default=1.0, metavar="H", help="hours per device CSV (default 1)")
    parser.add_argument("--seed", type=int, default=0, metavar="S", help="random seed (default 0)")
    parser.add_argument("--period", type=float, default=1.0, metavar="SECONDS", help="sample period (default 1 s)")
    parser.add_argument("--train-hours", type=float, default=2.0, metavar="H",
                        help="hours of normal history per device in <name>.train.csv; 0 = none (default 2)")
    parser.add_argument("--fault-devices", type=int, default=None, metavar="N",
                        help="how many devices get faults (default: about half)")


def run(args: argparse.Namespace) -> int:
    simulate(args.out, devices=args.devices, hours=args.hours, seed=args.seed, period_s=args.period,
             fault_devices=args.fault_devices, train_hours=args.train_hours or None)
    out = Path(args.out)
    manifest = json.loads((out / MANIFEST).read_text())
    for d in manifest["devices"]:
        faults = ", ".join(f"{f['type']}{'(' + f['sensor'] + ')' if f['sensor'] else ''} "
                           f"{f['start']}..{f['end']}" for f in d["faults"]) or "none"
        print(f"{out / d['file']}  device={d['name']} kind={d['kind']} rows={d['rows']} faults: {faults}")
        if d["train_file"]:
            print(f"{out / d['train_file']}  device={d['name']} kind={d['kind']} rows={d['train_rows']} "
                  f"faults: none (training history)")
    print(f"{out / MANIFEST}  manifest: {len(manifest['devices'])} devices")
    return 0
