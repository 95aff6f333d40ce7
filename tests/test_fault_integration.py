"""Fault models end to end: `edge-trainer fit --fault-col` writes a generator and a classifier into
the bundle, a RAISED alert names the fault (classifier run only on the raise), and
`edge-agent selftest` / the canary judge the detector on synthetic faults without raising
real alerts. One real bundle, trained once through the CLI on simulated pump data."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
import uuid
from pathlib import Path

import numpy as np
import pytest

from agent.backends import open_backend
from agent.classify import FaultClassifier, open_classifier
from agent.config import load_config
from agent.manifest import load_manifest, write_manifest
from agent.messages import Alert
from agent.metrics import Metrics
from agent.pipeline import Pipeline
from agent.scoring import Scorer
from agent.selftest import NO_GENERATOR, selftest_bundle
from tiny_bundle import make_tiny_bundle

pytest.importorskip("torch")

FAULTS = ("cavitation", "overheating", "bearing_wear")
T0 = 1_767_225_600.0  # 2026-01-01


def _simulate(path: Path, seed: int, reps: int = 2, start: int = 1500, dur: int = 240, gap: int = 200):
    """One steady pump; each fault twice (two episodes per class), strong enough to be unambiguous."""
    from trainer.simulate import FaultSpec, simulate_device, write_csv

    faults, t = [], start
    for _ in range(reps):
        for f in FAULTS:
            faults.append(FaultSpec(f, t, dur, severity=2.0))
            t += dur + gap
    d = simulate_device("pump-ft", "pump", t + 300, seed=seed, faults=faults, regimes=False)
    write_csv(d, path)
    return d


def _run(args: list[str], timeout: float = 900) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def fault_bundle(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("faults")
    _simulate(d / "train.csv", seed=1)
    out = d / "bundle"
    r = _run(["-m", "trainer.cli", "fit", "--csv", str(d / "train.csv"), "--out", str(out), "--label-col", "label",
              "--fault-col", "fault", "--gan-steps", "400", "--epochs", "60", "--time-budget", "30", "--no-int8",
              "--name", "pump-ft", "--version", "1", "-q"])
    assert r.returncode == 0, r.stderr
    assert "fault models: 4 classes" in r.stdout
    return out


def _live(fault: str = "cavitation", seed: int = 7, mature: bool = False):
    """Another run of the same pump (other seed) with one episode of ``fault`` at rows 300-600;
    ``mature``: 200 normal rows, then straight into the episode's last half (a fault already
    developed when its window reaches the classifier)."""
    from trainer.simulate import FaultSpec, simulate_device

    d = simulate_device("pump-ft", "pump", 700, seed=seed, faults=[FaultSpec(fault, 300, 300, severity=2.0)],
                        regimes=False)
    values = np.concatenate([d.values[:200], d.values[450:600]]) if mature else d.values
    return list(d.features), values


@pytest.fixture(scope="module")
def debounced(fault_bundle, tmp_path_factory) -> Path:
    """The bundle with raise_after = window: the window that raises is entirely post-onset.
    (Debounce lives in the manifest's threshold, not in the model files: no hash changes.)"""
    d = tmp_path_factory.mktemp("debounced") / "bundle"
    shutil.copytree(fault_bundle, d)
    m = load_manifest(d)
    write_manifest(d, m.model_copy(update={"threshold": m.threshold.model_copy(update={"raise_after": m.window})}))
    return d


def _pipeline(bundle: Path, backend: str, alerts: list):
    m = load_manifest(bundle)
    clf = CountingBackend(open_backend(backend, bundle, m, model="classifier"))
    cfg = load_config(agent_id="gw", bundle=str(bundle), backend=backend, batching={"max_batch": 1})
    p = Pipeline(cfg, Scorer(m, open_backend(backend, bundle, m)), Metrics(),
                 lambda topic, payload, st, recv: alerts.append(Alert.model_validate_json(payload)),
                 classifier=FaultClassifier(m, clf), now=lambda: T0)
    return p, clf


def _feed(p: Pipeline, features, values, device: str = "pump-9") -> None:
    for i, row in enumerate(values):
        body = json.dumps({"ts": T0 + i, "values": dict(zip(features, map(float, row)))}).encode()
        p.handle(f"factory/l1/{device}/telemetry", body, T0 + i)
    p.flush()


# ------------------------------------------------------------------ fit


def test_fit_with_fault_column_writes_generator_classifier_report_and_metrics(fault_bundle):
    m = load_manifest(fault_bundle)
    assert set(m.models) == {"vae", "scorer", "generator", "classifier"}
    assert m.classes == sorted(FAULTS) + ["normal"] and m.latent_dim and m.latent_dim > 0
    t = m.training.metrics
    assert 0 < t["fault_gan_steps"] <= 400 and "fault_heldout_macro_f1_mlp_real" in t  # the time budget may cut it
    for f in ("fault_report.md", "fault_report.json", "fault_gan_channels.png"):
        assert (fault_bundle / "report" / f).is_file()
    for backend in ("onnxruntime", "litert"):  # golden-checked on both runtimes
        open_backend(backend, fault_bundle, m, model="generator")
        open_backend(backend, fault_bundle, m, model="classifier")


def test_fit_skips_fault_models_with_one_line_warning_when_too_few_episodes(tmp_path):
    _simulate(tmp_path / "one.csv", seed=2, reps=1, start=900, dur=120, gap=150)
    # one episode per class would pass the count; keep just one class to fall below two episodes
    rows = (tmp_path / "one.csv").read_text().splitlines()
    head, body = rows[0], rows[1:]
    keep = [r for r in body if r.split(",")[-1] in ("", "cavitation")]
    (tmp_path / "few.csv").write_text("\n".join([head, *keep]) + "\n")
    r = _run(["-m", "trainer.cli", "fit", "--csv", str(tmp_path / "few.csv"), "--out", str(tmp_path / "b"),
              "--label-col", "label", "--fault-col", "fault", "--epochs", "5", "--no-int8"])
    assert r.returncode == 0, r.stderr
    warn = [line for line in r.stderr.splitlines() if "skipping fault models" in line]
    assert len(warn) == 1 and "episodes" in warn[0]
    assert set(load_manifest(tmp_path / "b").models) == {"vae", "scorer"}


# ------------------------------------------------------------------ alert payload, classifier on raise only


class CountingBackend:
    def __init__(self, inner):
        self.inner, self.name, self.calls = inner, inner.name, 0

    def run(self, *inputs):
        self.calls += 1
        return self.inner.run(*inputs)


@pytest.mark.parametrize("backend", ["onnxruntime", "litert"])
def test_classifier_runs_only_on_raise(fault_bundle, backend):
    features, values = _live()
    alerts: list[Alert] = []
    p, clf = _pipeline(fault_bundle, backend, alerts)
    _feed(p, features, values)
    raised = [a for a in alerts if a.state == "raised"]
    assert raised, "the cavitation episode raised no alert"
    assert clf.calls == len(raised)  # once per raise, never per scored window
    assert p.metrics.registry.get_sample_value("edgewatch_windows_scored_total") >= len(values) - 1
    assert all(a.fault is None for a in alerts if a.state == "cleared")
    for a in raised:
        assert a.fault is not None and 0 < a.fault.confidence <= 1
        assert a.fault.type in set(FAULTS) | {"unknown"}  # "normal" is reported as "unknown"


@pytest.mark.parametrize("backend", ["onnxruntime", "litert"])
@pytest.mark.parametrize("fault", FAULTS)
def test_alert_names_a_developed_fault(debounced, backend, fault):
    features, values = _live(fault, seed=3, mature=True)
    alerts: list[Alert] = []
    p, _ = _pipeline(debounced, backend, alerts)
    _feed(p, features, values)
    raised = [a for a in alerts if a.state == "raised"]
    assert len(raised) == 1 and raised[0].fault.type == fault and raised[0].fault.confidence > 0.5


def test_bundle_without_classifier_has_no_fault_in_alerts(tmp_path):
    tiny = make_tiny_bundle(tmp_path / "tiny")
    assert open_classifier("onnxruntime", tiny, load_manifest(tiny)) is None


@pytest.mark.integration
def test_raised_alert_on_mosquitto_carries_fault(tmp_path, broker, debounced):
    from test_agent_integration import Collector, agent_config, publisher, wait_until

    from agent.app import App

    features, values = _live("cavitation", seed=3, mature=True)
    prefix = f"ft-{uuid.uuid4().hex[:8]}"
    col = Collector(broker, f"{prefix}/#")
    app = App(agent_config(tmp_path, broker, debounced, prefix)).start()
    try:
        wait_until(lambda: app.link.connected, 10, "connected")
        pub = publisher(broker)
        for i, row in enumerate(values):
            pub.publish(f"{prefix}/l1/pump-3/telemetry",
                        json.dumps({"ts": T0 + i, "values": dict(zip(features, map(float, row)))}), qos=1)
        col.wait(lambda msgs: any(t.startswith(f"{prefix}/alerts/") and b'"raised"' in p for t, p, _ in msgs), 30)
        raised = [a for a in col.alerts(prefix) if a["state"] == "raised"]
        assert raised[0]["fault"]["type"] == "cavitation" and 0 < raised[0]["fault"]["confidence"] <= 1
        pub.loop_stop()
        pub.disconnect()
    finally:
        app.stop()
        col.close()


# ------------------------------------------------------------------ selftest


def _selftest(bundle: Path, *extra: str, backend: str = "onnxruntime") -> subprocess.CompletedProcess:
    import os

    env = {**os.environ, "EDGEWATCH_BUNDLE": str(bundle), "EDGEWATCH_BACKEND": backend}
    return subprocess.run([sys.executable, "-m", "agent.cli", "selftest", *extra], capture_output=True, text=True,
                          timeout=120, env=env)


@pytest.mark.parametrize("backend", ["onnxruntime", "litert"])
def test_selftest_passes_on_a_trained_bundle(fault_bundle, backend):
    r = _selftest(fault_bundle, "--per-class", "10", backend=backend)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "selftest passed" in r.stdout
    for f in FAULTS:
        assert f in r.stdout
    assert "normal" not in [line.split()[0] for line in r.stdout.splitlines()[1:] if line.strip()]


@pytest.mark.parametrize("backend", ["onnxruntime", "litert"])
def test_selftest_fails_when_the_detector_is_blind(fault_bundle, tmp_path, backend):
    blind = tmp_path / "blind"
    shutil.copytree(fault_bundle, blind)
    m = load_manifest(blind)
    # The threshold lives in the manifest, not in the model files: no model hash changes.
    write_manifest(blind, m.model_copy(update={"threshold": m.threshold.model_copy(update={"value": 1e6})}))
    r = _selftest(blind, backend=backend)
    assert r.returncode == 1
    err = r.stderr.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("edge-agent: error: selftest FAILED") and "Traceback" not in r.stderr


def test_selftest_fails_on_a_bundle_without_generator(tmp_path):
    r = _selftest(make_tiny_bundle(tmp_path / "tiny"))
    assert r.returncode == 1
    assert r.stderr.strip() == f"edge-agent: error: {NO_GENERATOR}"


def test_selftest_result_reports_classifier_agreement(fault_bundle):
    res = selftest_bundle(fault_bundle, per_class=5)
    assert [f.fault for f in res.faults] == sorted(FAULTS)
    for f in res.faults:
        assert f.detected <= f.windows == 5 and sum(f.named.values()) == f.detected
        assert f.agreed_whole is not None and 0 <= f.agreed_whole <= 5
    d = res.to_dict()
    assert d["passed"] == res.passed and len(d["faults"]) == 3


# ------------------------------------------------------------------ canary


@pytest.mark.integration
def test_canary_publishes_retained_result_and_metrics_but_no_alert(tmp_path, broker, fault_bundle):
    from test_agent_integration import Collector, agent_config, http_get, wait_until

    from agent.app import App

    prefix = f"ct-{uuid.uuid4().hex[:8]}"
    col = Collector(broker, f"{prefix}/#")
    cfg = agent_config(tmp_path, broker, fault_bundle, prefix,
                       selftest={"interval_s": 3600, "per_class": 5, "topic": f"{prefix}/status/{{agent_id}}/selftest"})
    app = App(cfg).start()
    try:
        col.wait(lambda msgs: any(t == f"{prefix}/status/gw-test/selftest" for t, _, _ in msgs), 60)
        body = json.loads(next(p for t, p, _ in col.msgs if t == f"{prefix}/status/gw-test/selftest"))
        assert body["passed"] is True and {f["fault"] for f in body["faults"]} == set(FAULTS)
        _, text = http_get(app.http.port, "/metrics")
        assert 'edgewatch_selftest_detected{fault="cavitation"}' in text
        assert "edgewatch_selftest_last_success_timestamp_seconds" in text
        time.sleep(0.5)
        assert not [t for t, _, _ in col.msgs if t.startswith(f"{prefix}/alerts/") or t.startswith(f"{prefix}/state/")]
        assert app.pipeline.devices == {}  # no synthetic device reached the real pipeline
    finally:
        app.stop()
        col.close()
    # retained: a late subscriber still gets it
    late = Collector(broker, f"{prefix}/status/gw-test/selftest")
    try:
        late.wait(lambda msgs: any(r for _, _, r in msgs), 10)
    finally:
        late.close()
