"""The bench's bundle and telemetry: a real trained VAE bundle and simulated pump streams.

The bundle is trained once (about 15 s) and cached under ``bench/out/bundle``; the streams
come from the trainer's simulator, a few distinct machines reused round-robin across many
device names, some with developing faults so alerts are raised and cleared during the runs.
"""
from __future__ import annotations

import json
import shutil
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np

T0 = 1_767_225_600.0  # 2026-01-01T00:00:00Z
TOPIC = "factory/{line}/{device}/telemetry"
STREAM_ROWS = 3600


def ensure_bundle(out: Path, log=print) -> Path:
    """Train (or reuse) the bench bundle: pump data, default fit options, int8 variants on.

    A cached bundle is reused only when it was trained with today's fit options and bundle
    contents (a change of defaults -- window, score, ensemble -- or of the files fit writes
    retrains it)."""
    from trainer.fit import FitOptions, fit

    opts = FitOptions(seed=0, progress=False, name="bench", version="bench", time_budget_s=30)
    key = opts.model_dump_json() + " +scorer"  # what fit writes changed too: the fused scorer graph
    bundle = out / "bundle"
    stamp = out / "bundle.fit-options.json"
    if (bundle / "manifest.json").is_file() and stamp.is_file() and stamp.read_text() == key:
        try:
            from agent.manifest import load_manifest
            load_manifest(bundle)
            return bundle
        except Exception:
            pass
    shutil.rmtree(bundle, ignore_errors=True)
    from trainer.simulate import simulate_device, write_csv

    log("training the bench bundle (once, ~60 s; cached in %s)" % bundle)
    out.mkdir(parents=True, exist_ok=True)
    csvs = []
    for seed in range(4):  # four hours of the machine's normal life: its regimes, not one stretch
        d = simulate_device("pump-bench", "pump", STREAM_ROWS, seed=seed)
        csvs.append(write_csv(d, out / f"train-{seed}.csv"))
    fit(csvs, bundle, opts)
    stamp.write_text(key)
    return bundle


@dataclass
class Streams:
    features: list[str]
    values: list[np.ndarray]  # per stream (T, F)
    labels: list[np.ndarray]  # per stream (T,)


def make_streams(n_streams: int = 8, rows: int = STREAM_ROWS, faulty_every: int = 4, severity: float = 1.5) -> Streams:
    """``n_streams`` pumps; every ``faulty_every``-th carries one fault in its second half."""
    from trainer.simulate import FaultSpec, simulate_device

    kinds = ["cavitation", "bearing_wear", "overheating", "imbalance"]
    vals, labs, feats = [], [], None
    for i in range(n_streams):
        faults = []
        if faulty_every and i % faulty_every == faulty_every - 1:
            faults = [FaultSpec(kinds[(i // faulty_every) % len(kinds)], rows // 2, rows // 6, severity=severity)]
        d = simulate_device("pump-bench", "pump", rows, seed=100 + i, faults=faults)
        feats = list(d.features)
        vals.append(np.asarray(d.values, np.float32))
        labs.append(np.asarray(d.label, np.int8))
    return Streams(feats, vals, labs)


def device_name(i: int) -> str:
    return f"pump-{i:05d}"


def payload(features: list[str], ts: float, row: np.ndarray) -> bytes:
    return json.dumps({"ts": round(ts, 3), "values": {f: round(float(v), 4) for f, v in zip(features, row)}},
                      separators=(",", ":")).encode()


def partition_of(device: str, count: int) -> int:
    return zlib.crc32(device.encode()) % count


def messages(streams: Streams, n_devices: int, rows: int, start_row: int = 0, partitions: int = 0,
             topic: str = TOPIC) -> list[tuple[str, bytes, str, float]]:
    """Round-robin telemetry: row r of every device, then row r+1 ... → (topic, payload, device, ts).

    Device i plays stream i % len(streams) shifted by i rows, so devices differ.
    """
    S = len(streams.values)
    topics = []
    for i in range(n_devices):
        dev = device_name(i)
        t = topic.replace("{line}", f"line{i % 4}").replace("{device}", dev)
        if partitions:
            t = t.replace("{partition}", str(partition_of(dev, partitions)))
        topics.append(t)
    out = []
    for r in range(start_row, start_row + rows):
        ts = T0 + r
        for i in range(n_devices):
            v = streams.values[i % S]
            row = v[(r + i * 7) % len(v)]
            out.append((topics[i], payload(streams.features, ts, row), device_name(i), ts))
    return out
