"""Factory simulator: determinism, shapes, labels, fault physics, recovery, CSV/manifest output, args."""
from __future__ import annotations

import argparse
import csv
import json
import time
from datetime import datetime, timezone

import numpy as np
import pytest

from trainer.simulate import (FAULTS, KINDS, DeviceData, FaultSpec, add_arguments, random_faults, run, simulate,
                              simulate_device, write_csv)

ROWS, START, DUR = 3000, 1200, 1200  # fault window [1200, 2400), normal tail after it
LATE = slice(START + 3 * DUR // 4, START + DUR)  # last quarter of the fault: developed stage


def pair(kind: str, fault: str, seed: int = 3, **kw) -> tuple[DeviceData, DeviceData, FaultSpec]:
    """The same machine and noise, healthy and with one fault."""
    spec = FaultSpec(fault, START, DUR, **kw)
    clean = simulate_device("m", kind, rows=ROWS, seed=seed)
    return clean, simulate_device("m", kind, rows=ROWS, seed=seed, faults=[spec]), spec


def col(d: DeviceData, sensor: str) -> np.ndarray:
    return d.values[:, d.features.index(sensor)].astype(np.float64)


def test_constants():
    assert FAULTS == ("bearing_wear", "cavitation", "overheating", "imbalance", "sensor_drift", "stuck_sensor")
    assert set(KINDS) == {"pump", "motor", "compressor"}
    for kind, sensors in KINDS.items():
        assert len(sensors) == len(set(sensors)) >= 6, kind
        assert "speed_rpm" in sensors
    assert {"vibration_rms", "bearing_temp", "motor_current", "discharge_pressure", "flow",
            "suction_pressure"} <= set(KINDS["pump"])
    assert {"vibration_x", "vibration_y", "winding_temp", "current", "ambient_temp"} <= set(KINDS["motor"])
    assert {"vibration", "discharge_temp", "discharge_pressure", "current", "oil_temp"} <= set(KINDS["compressor"])


@pytest.mark.parametrize("kind", list(KINDS))
def test_shapes_and_types(kind):
    d = simulate_device(f"{kind}-x", kind, rows=500, period_s=2.0, seed=1)
    assert (d.name, d.kind, d.features) == (f"{kind}-x", kind, KINDS[kind])
    assert d.values.shape == (500, len(KINDS[kind])) and d.values.dtype == np.float32
    assert d.timestamps.dtype == np.float64 and d.timestamps[0] == 1_767_225_600.0
    assert np.all(np.diff(d.timestamps) == 2.0)
    assert d.label.dtype == np.int8 and d.label.shape == (500,) and not d.label.any()
    assert len(d.fault) == 500 and set(d.fault) == {""}
    assert np.isfinite(d.values).all() and len(d) == 500


@pytest.mark.parametrize("kind", list(KINDS))
def test_plausible_ranges(kind):
    d = simulate_device("m", kind, rows=7200, seed=5)
    for s in d.features:
        c = col(d, s)
        if "temp" in s:
            assert 5 < c.min() and c.max() < 130, s
        elif "vibration" in s:
            assert 0 < c.min() and c.max() < 15, s
        elif "pressure" in s or s in ("flow", "current", "motor_current", "speed_rpm", "voltage"):
            assert c.min() > 0, s


def test_deterministic_by_seed():
    a = simulate_device("p", "pump", rows=800, seed=7, faults=[FaultSpec("cavitation", 400, 200)])
    b = simulate_device("p", "pump", rows=800, seed=7, faults=[FaultSpec("cavitation", 400, 200)])
    c = simulate_device("p", "pump", rows=800, seed=8, faults=[FaultSpec("cavitation", 400, 200)])
    np.testing.assert_array_equal(a.values, b.values)
    np.testing.assert_array_equal(a.fault, b.fault)
    assert not np.array_equal(a.values, c.values)


def test_same_machine_other_realisation():
    """Physics follows the machine's identity (name, or machine_seed); the seed only changes noise/regimes."""
    a = simulate_device("m-1", "motor", rows=2000, seed=1, regimes=False)
    b = simulate_device("m-1", "motor", rows=2000, seed=2, regimes=False)
    c = simulate_device("m-2", "motor", rows=2000, seed=2, regimes=False)
    d = simulate_device("m-2", "motor", rows=2000, seed=2, machine_seed=9, regimes=False)
    e = simulate_device("other", "motor", rows=2000, seed=5, machine_seed=9, regimes=False)
    mean = lambda x: x.values[:, x.features.index("current")].mean()  # noqa: E731
    assert not np.array_equal(a.values, b.values)
    assert abs(mean(a) - mean(b)) < 0.01 * mean(a) and abs(mean(d) - mean(e)) < 0.01 * mean(d)
    assert abs(mean(a) - mean(c)) > 0.02 * mean(a) and abs(mean(c) - mean(d)) > 0.02 * mean(c)


def test_physical_coupling():
    d = simulate_device("p", "pump", rows=7200, seed=4)
    corr = lambda a, b: np.corrcoef(col(d, a), col(d, b))[0, 1]  # noqa: E731
    assert corr("speed_rpm", "flow") > 0.5  # affinity law
    assert corr("flow", "motor_current") > 0.6  # power follows flow x head
    assert corr("speed_rpm", "vibration_rms") > 0.5  # unbalance force ~ speed^2
    m = simulate_device("m", "motor", rows=7200, seed=4)
    vx, vy = col(m, "vibration_x"), col(m, "vibration_y")
    assert np.corrcoef(vx, vy)[0, 1] > 0.7  # redundant axes
    assert np.corrcoef(col(m, "speed_rpm"), col(m, "voltage"))[0, 1] > 0.95  # V/f drive


def test_thermal_lag():
    """Temperature follows a load step with a first-order lag, not instantly."""
    d = simulate_device("m", "motor", rows=7200, seed=4, noise=0.0)
    cur, temp = col(d, "current"), col(d, "winding_temp")
    step = int(np.argmax(np.abs(np.diff(cur)) > 0.5 * np.ptp(cur) / 10))  # first regime ramp
    assert np.abs(temp[step + 1] - temp[step]) < 0.2  # no jump at the step
    best = max(range(0, 1500, 50), key=lambda k: np.corrcoef(cur[: len(cur) - k], temp[k:])[0, 1])
    assert best > 0  # temperature lags current


def test_regimes_off_is_steady():
    d = simulate_device("c", "compressor", rows=3000, seed=2, regimes=False)
    rpm = col(d, "speed_rpm")
    assert rpm.std() < 0.01 * rpm.mean()


def test_labels_match_fault_specs():
    specs = [FaultSpec("imbalance", 1000, 300), FaultSpec("stuck_sensor", 1500, 200, sensor="flow")]
    d = simulate_device("p", "pump", rows=2000, seed=1, faults=specs)
    expected = np.zeros(2000, np.int8)
    expected[1000:1300] = expected[1500:1700] = 1
    np.testing.assert_array_equal(d.label, expected)
    assert set(d.fault[1000:1300]) == {"imbalance"} and set(d.fault[1500:1700]) == {"stuck_sensor"}
    assert set(d.fault[d.label == 0]) == {""}
    assert [(f.type, f.start, f.duration, f.sensor) for f in d.faults] == [
        ("imbalance", 1000, 300, None), ("stuck_sensor", 1500, 200, "flow")]


def test_overlapping_faults_are_joined():
    d = simulate_device("p", "pump", rows=1000, seed=1,
                        faults=[FaultSpec("bearing_wear", 300, 300), FaultSpec("overheating", 500, 200)])
    assert d.fault[400] == "bearing_wear" and d.fault[550] == "bearing_wear+overheating" and d.fault[650] == "overheating"


@pytest.mark.parametrize("kind", list(KINDS))
@pytest.mark.parametrize("fault", FAULTS)
def test_recovery_and_untouched_normal_rows(kind, fault):
    """Outside the fault window the data equals the healthy machine's: faults end with a repair."""
    clean, faulty, _ = pair(kind, fault)
    outside = np.r_[0:START, START + DUR:ROWS]
    np.testing.assert_array_equal(faulty.values[outside], clean.values[outside])
    assert not np.array_equal(faulty.values[LATE], clean.values[LATE])
    assert faulty.label[START + DUR:].sum() == 0


def _vib(kind):
    return {"pump": "vibration_rms", "motor": "vibration_x", "compressor": "vibration"}[kind]


@pytest.mark.parametrize("kind", list(KINDS))
def test_bearing_wear(kind):
    clean, faulty, _ = pair(kind, "bearing_wear")
    v = col(clean, _vib(kind))[:START]
    assert col(faulty, _vib(kind))[LATE].mean() > v.mean() + 4 * v.std()
    early = slice(START, START + DUR // 5)  # develops: early stage much milder than the late stage
    early_gain = (col(faulty, _vib(kind))[early] - col(clean, _vib(kind))[early]).mean()
    late_gain = (col(faulty, _vib(kind))[LATE] - col(clean, _vib(kind))[LATE]).mean()
    assert 0 <= early_gain < 0.2 * late_gain
    temp = {"pump": "bearing_temp", "motor": "bearing_temp", "compressor": "oil_temp"}[kind]
    assert (col(faulty, temp) - col(clean, temp))[LATE].mean() > 5


def test_cavitation_pump():
    clean, faulty, _ = pair("pump", "cavitation")
    ps = col(clean, "suction_pressure")[:START]
    assert col(faulty, "suction_pressure")[LATE].mean() < ps.mean() - 5 * ps.std()
    for s in ("flow", "discharge_pressure"):  # unsteady: residual noise grows
        diff = lambda d: np.diff(col(d, s)[LATE]).std()  # noqa: E731
        assert diff(faulty) > 1.5 * diff(clean), s
    v = col(clean, "vibration_rms")[:START]
    assert col(faulty, "vibration_rms")[LATE].max() > v.max() + 3 * v.std()  # bursts


@pytest.mark.parametrize("kind", ["motor", "compressor"])
def test_cavitation_analogues(kind):
    clean, faulty, _ = pair(kind, "cavitation")
    cur = "current"
    assert np.diff(col(faulty, cur)[LATE]).std() > 1.5 * np.diff(col(clean, cur)[LATE]).std()
    v = col(clean, _vib(kind))[:START]
    assert col(faulty, _vib(kind))[LATE].max() > v.max() + 3 * v.std()
    if kind == "compressor":
        assert (col(faulty, "suction_pressure") - col(clean, "suction_pressure"))[LATE].mean() < -0.15


@pytest.mark.parametrize("kind,temp,others", [
    ("pump", "motor_temp", ["motor_current", "flow", "speed_rpm"]),
    ("motor", "winding_temp", ["current", "speed_rpm", "vibration_x"]),
    ("compressor", "oil_temp", ["current", "discharge_pressure", "vibration"]),
])
def test_overheating(kind, temp, others):
    clean, faulty, _ = pair(kind, "overheating")
    assert (col(faulty, temp) - col(clean, temp))[LATE].mean() > 10
    for s in others:  # beyond the normal coupling: load and speed unchanged
        np.testing.assert_array_equal(col(faulty, s), col(clean, s))


@pytest.mark.parametrize("kind", list(KINDS))
def test_imbalance_grows_with_speed(kind):
    rows, start = 20000, 4000
    spec = FaultSpec("imbalance", start, rows - start)
    clean = simulate_device("m", kind, rows=rows, seed=11)
    faulty = simulate_device("m", kind, rows=rows, seed=11, faults=[spec])
    v = _vib(kind)
    x = np.arange(1, rows - start + 1) / (rows - start)
    gain = (col(faulty, v) - col(clean, v))[start:] / (0.2 + 0.8 * x)  # remove the progression
    rpm = col(clean, "speed_rpm")[start:]
    hi, lo = rpm > np.quantile(rpm, 0.8), rpm < np.quantile(rpm, 0.2)
    assert gain[hi].mean() > 1.5 * gain[lo].mean() > 0
    assert (col(faulty, v) / col(clean, v))[-1000:].mean() > 1.5  # developed: well above the healthy machine


@pytest.mark.parametrize("kind", list(KINDS))
def test_sensor_drift(kind):
    sensor = KINDS[kind][1]
    clean, faulty, _ = pair(kind, "sensor_drift", sensor=sensor)
    drift = (col(faulty, sensor) - col(clean, sensor))[START:START + DUR]
    assert abs(drift[-100:].mean()) > 1.5 * col(clean, sensor).std()
    assert abs(drift[:100].mean()) < 0.2 * abs(drift[-100:].mean())  # slow: starts small
    for s in KINDS[kind]:  # only that one channel moves
        if s != sensor:
            np.testing.assert_array_equal(col(faulty, s), col(clean, s))


@pytest.mark.parametrize("kind", list(KINDS))
def test_stuck_sensor(kind):
    clean, faulty, spec = pair(kind, "stuck_sensor")
    (resolved,) = faulty.faults
    assert resolved.sensor in KINDS[kind]
    stuck = col(faulty, resolved.sensor)
    assert np.ptp(stuck[START:START + DUR]) == 0 and stuck[START] == stuck[START - 1]
    assert np.ptp(stuck[START + DUR:]) > 0  # alive again after the repair
    assert np.ptp(col(clean, resolved.sensor)[START:START + DUR]) > 0


def test_severity_scales_effect():
    _, mild, _ = pair("pump", "bearing_wear", severity=0.5)
    clean, strong, _ = pair("pump", "bearing_wear", severity=1.5)
    gain = lambda d: (col(d, "bearing_temp") - col(clean, "bearing_temp"))[LATE].mean()  # noqa: E731
    assert gain(strong) > 2 * gain(mild) > 0


def test_random_faults():
    for seed in range(20):
        rng = np.random.default_rng(seed)
        specs = random_faults(3600, rng, n=2)
        assert len(specs) == 2 and all(f.type in FAULTS for f in specs)
        assert specs[0].start >= 0.4 * 3600
        assert specs[0].end + 180 <= specs[1].start and specs[1].end + 180 <= 3600  # gaps, recovery tail
        assert all(f.duration >= 10 for f in specs)
    a, b = random_faults(3600, 5, n=3), random_faults(3600, 5, n=3)
    assert a == b
    assert {f.type for f in random_faults(1000, 0, n=1, types=["overheating"])} == {"overheating"}
    assert random_faults(1000, 0, n=0) == []
    with pytest.raises(ValueError):
        random_faults(20, 0, n=3)
    with pytest.raises(ValueError):
        random_faults(1000, 0, types=["melted"])


def test_csv_round_trip(tmp_path):
    d = simulate_device("motor-09", "motor", rows=300, seed=2, faults=[FaultSpec("sensor_drift", 150, 100)])
    path = write_csv(d, tmp_path / "sub" / "motor-09.csv")
    with path.open(newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert list(rows[0]) == ["timestamp", *d.features, "label", "fault"]
    assert len(rows) == 300 and rows[0]["timestamp"] == "2026-01-01T00:00:00Z"
    ts = [datetime.fromisoformat(r["timestamp"]).timestamp() for r in rows]
    assert datetime.fromisoformat(rows[0]["timestamp"]).tzinfo == timezone.utc
    np.testing.assert_array_equal(ts, d.timestamps)
    back = np.array([[float(r[s]) for s in d.features] for r in rows], dtype=np.float32)
    np.testing.assert_array_equal(back, d.values)
    np.testing.assert_array_equal([int(r["label"]) for r in rows], d.label)
    assert [r["fault"] for r in rows] == list(d.fault)


def test_csv_subsecond_timestamps(tmp_path):
    d = simulate_device("p", "pump", rows=5, period_s=0.5, seed=0)
    with write_csv(d, tmp_path / "p.csv").open() as fh:
        stamps = [r["timestamp"] for r in csv.DictReader(fh)]
    assert stamps[:2] == ["2026-01-01T00:00:00.000Z", "2026-01-01T00:00:00.500Z"]


def test_simulate_files_and_manifest(tmp_path):
    t0 = time.perf_counter()
    paths = simulate(tmp_path, devices=4, hours=2.0, seed=3, train_hours=1.0)
    assert time.perf_counter() - t0 < 4.0  # used by tests and benchmarks: must stay fast
    assert [p.name for p in paths] == ["pump-01.csv", "motor-02.csv", "compressor-03.csv", "pump-04.csv"]
    man = json.loads((tmp_path / "simulation.json").read_text())
    assert man["seed"] == 3 and man["rows"] == 7200 and len(man["devices"]) == 4
    n_faulty = 0
    for dev, path in zip(man["devices"], paths):
        assert dev["file"] == path.name and dev["features"] == KINDS[dev["kind"]]
        with path.open(newline="") as fh:
            rows = list(csv.DictReader(fh))
        label = np.array([int(r["label"]) for r in rows])
        assert len(rows) == dev["rows"] == 7200
        assert not label[: int(0.4 * 7200)].any()  # normal warm-up
        n_faulty += bool(dev["faults"])
        expected = np.zeros(7200, int)
        for f in dev["faults"]:
            expected[f["start_index"]:f["end_index"]] = 1
            assert rows[f["start_index"]]["timestamp"] == f["start"] and rows[f["start_index"]]["fault"] == f["type"]
            assert f["end_index"] == 7200 or rows[f["end_index"]]["timestamp"] == f["end"]
            assert (f["sensor"] is not None) == (f["type"] in ("sensor_drift", "stuck_sensor"))
        np.testing.assert_array_equal(label, expected)  # healthy devices: no labels at all
        assert 1 <= len(dev["faults"]) <= 2 or not label.any()
        # Training history: normal only, same columns, ends where the device CSV begins.
        with (tmp_path / dev["train_file"]).open(newline="") as fh:
            train = list(csv.DictReader(fh))
        assert len(train) == dev["train_rows"] == 3600 and list(train[0]) == list(rows[0])
        assert {r["label"] for r in train} == {"0"} and {r["fault"] for r in train} == {""}
        assert train[-1]["timestamp"] == "2025-12-31T23:59:59Z"
    assert n_faulty == 2  # about half by default
    # Same seed -> same files
    other = tmp_path / "again"
    simulate(other, devices=4, hours=2.0, seed=3, train_hours=1.0)
    assert (other / "motor-02.csv").read_bytes() == (tmp_path / "motor-02.csv").read_bytes()


def test_simulate_fault_devices_override(tmp_path):
    simulate(tmp_path / "a", devices=3, hours=0.5, seed=1, fault_devices=0)
    assert all(not d["faults"] for d in json.loads((tmp_path / "a/simulation.json").read_text())["devices"])
    assert not (tmp_path / "a/pump-01.train.csv").exists()
    simulate(tmp_path / "b", devices=3, hours=0.5, seed=1, fault_devices=3)
    assert all(d["faults"] for d in json.loads((tmp_path / "b/simulation.json").read_text())["devices"])


def test_simulate_device_bad_args():
    bad = [dict(kind="turbine"), dict(rows=0), dict(period_s=0), dict(noise=-1), dict(seed=-1),
           dict(faults=[FaultSpec("melted", 10, 10)]), dict(faults=[FaultSpec("cavitation", 90, 20)]),
           dict(faults=[FaultSpec("cavitation", 10, 0)]), dict(faults=[FaultSpec("cavitation", 10, 10, severity=0)]),
           dict(faults=[FaultSpec("stuck_sensor", 10, 10, sensor="nope")])]
    for kw in bad:
        with pytest.raises(ValueError):
            simulate_device("x", **{"rows": 100, **kw})


@pytest.mark.parametrize("kw", [dict(devices=0), dict(hours=0), dict(hours=0.001), dict(period_s=-1),
                                dict(fault_devices=5), dict(fault_devices=-1), dict(train_hours=-1)])
def test_simulate_bad_args(tmp_path, kw):
    with pytest.raises(ValueError) as exc:
        simulate(tmp_path, **{"devices": 4, **kw})
    assert "\n" not in str(exc.value)


def _parse(argv):
    p = argparse.ArgumentParser()
    add_arguments(p)
    return p.parse_args(argv)


def test_cli(tmp_path, capsys):
    args = _parse(["--out", str(tmp_path), "--devices", "2", "--hours", "0.25", "--seed", "4", "--train-hours", "0.1"])
    assert (args.devices, args.hours, args.seed, args.period, args.train_hours, args.fault_devices) == (2, 0.25, 4, 1.0, 0.1, None)
    assert run(args) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 5  # 2 device CSVs, 2 training CSVs, the manifest
    assert "pump-01.csv" in lines[0] and "kind=pump" in lines[0] and "rows=900" in lines[0]
    assert (tmp_path / "motor-02.train.csv").exists()
    defaults = _parse(["--out", "x"])
    assert (defaults.devices, defaults.hours, defaults.seed, defaults.period, defaults.train_hours) == (4, 1.0, 0, 1.0, 2.0)
    with pytest.raises(SystemExit):
        _parse([])  # --out is required
    with pytest.raises(ValueError, match="devices"):
        run(_parse(["--out", str(tmp_path / "bad"), "--devices", "0"]))
    with pytest.raises(ValueError, match="fault devices"):
        run(_parse(["--out", str(tmp_path / "bad"), "--devices", "2", "--fault-devices", "3"]))
