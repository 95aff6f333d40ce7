"""The synthetic-fault selftest and its canary, on tiny torch-free bundles whose "generator" is an
ONNX graph emitting a fixed scaled pattern per class (plus z x 0), run by the real onnxruntime.

With the tiny bundle's VAE (``recon = 0``) a window scores the scaled energy of its newest row,
so a class pattern of +10 on one of three sensors scores ~33 (threshold 8: detected) and +1
scores ~0.3 (missed). The trained-bundle cases live in tests/test_fault_integration.py.
"""
from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

from agent.backends import open_backend
from agent.classify import FaultClassifier
from agent.config import load_config
from agent.manifest import load_manifest, write_manifest
from agent.metrics import Metrics
from agent.scoring import Scorer
from agent.selftest import NO_GENERATOR, Canary, run_selftest, selftest_bundle
from tiny_bundle import make_fault_bundle, make_tiny_bundle

def _open(d):
    m = load_manifest(d)
    return m, Scorer(m, open_backend("onnxruntime", d, m)), open_backend("onnxruntime", d, m, model="generator")


def test_detector_is_judged_per_fault_type(tmp_path):
    m, scorer, gen = _open(make_fault_bundle(tmp_path / "b", {"spike": 10.0, "faint": 1.0}))
    res = run_selftest(m, scorer, gen, per_class=6)
    by = {f.fault: f for f in res.faults}
    assert set(by) == {"spike", "faint"}  # never "normal"
    assert by["spike"].detected == 6 and by["faint"].detected == 0
    assert all(f.lead_in_alarms == 0 for f in res.faults)  # the synthetic normal lead-in stays quiet
    assert not res.passed and res.failed == ["faint"]
    assert res.summary().startswith("selftest FAILED") and "faint 0%" in res.summary()
    assert by["spike"].agreement is None  # no classifier in this bundle: nothing to agree with


def test_unscaling_round_trips_through_the_scorer(tmp_path):
    # Raw units far from the scaled ones: the generator's windows are unscaled (x*scale+centre)
    # and re-scaled by the Scorer, so detection does not depend on the scaler.
    d = make_fault_bundle(tmp_path / "b", {"spike": 10.0}, centre=[100.0, -5.0, 3.0], scale=[7.0, 0.01, 250.0])
    m, scorer, gen = _open(d)
    assert run_selftest(m, scorer, gen, per_class=3).passed


def test_min_detected_is_the_pass_criterion(tmp_path):
    m, scorer, gen = _open(make_fault_bundle(tmp_path / "b", {"spike": 10.0, "faint": 1.0}))
    assert run_selftest(m, scorer, gen, per_class=2, min_detected=0.0).passed
    assert not run_selftest(m, scorer, gen, per_class=2, min_detected=0.5).passed


class NormalSayer:
    """A classifier backend that says "normal" for everything (counts its calls)."""

    name = "fake"

    def __init__(self, classes):
        self.classes, self.calls = classes, 0

    def run(self, x):
        self.calls += 1
        p = np.full((len(x), len(self.classes)), 0.1 / max(1, len(self.classes) - 1), np.float32)
        p[:, self.classes.index("normal")] = 0.9
        return [p]


def test_classifier_agreement_is_reported_not_judged(tmp_path):
    m, scorer, gen = _open(make_fault_bundle(tmp_path / "b", {"spike": 10.0}))
    fake = NormalSayer(list(m.classes))
    res = run_selftest(m, scorer, gen, FaultClassifier(m, fake), per_class=4)
    assert res.passed and fake.calls == 2  # one batched call for the whole windows, one for the raise windows
    f = res.faults[0]
    assert f.named == {"unknown": 4} and f.agreement == 0.0 and f.agreement_whole == 0.0
    assert "unknown 4" in res.table()


# ------------------------------------------------------------------ CLI


def _cli(bundle, *args):
    import os

    env = {**os.environ, "EDGEWATCH_BUNDLE": str(bundle)}
    return subprocess.run([sys.executable, "-m", "agent.cli", "selftest", *args], capture_output=True, text=True,
                          timeout=60, env=env)


def test_cli_pass_prints_table_and_exits_0(tmp_path):
    r = _cli(make_fault_bundle(tmp_path / "b", {"spike": 10.0, "step": 6.0}), "--per-class", "3")
    assert r.returncode == 0, r.stderr
    lines = r.stdout.strip().splitlines()
    assert lines[0].split()[:2] == ["fault", "detected"]
    assert lines[-1].startswith("selftest passed")
    assert r.stderr == ""


def test_cli_fails_in_one_line_when_the_threshold_is_absurd(tmp_path):
    d = make_fault_bundle(tmp_path / "b", {"spike": 10.0})
    m = load_manifest(d)
    write_manifest(d, m.model_copy(update={"threshold": m.threshold.model_copy(update={"value": 1e9})}))
    r = _cli(d)
    assert r.returncode == 1
    assert len(r.stderr.strip().splitlines()) == 1
    assert r.stderr.startswith("edge-agent: error: selftest FAILED: detector missed synthetic faults")


def test_cli_fails_without_a_generator(tmp_path):
    r = _cli(make_tiny_bundle(tmp_path / "b"))
    assert r.returncode == 1 and r.stderr == f"edge-agent: error: {NO_GENERATOR}\n"


def test_cli_json(tmp_path):
    r = _cli(make_fault_bundle(tmp_path / "b", {"spike": 10.0}), "--per-class", "2", "--json")
    body = json.loads(r.stdout[: r.stdout.rindex("}") + 1])
    assert body["passed"] and body["faults"][0]["fault"] == "spike" and body["faults"][0]["detected"] == 2


# ------------------------------------------------------------------ canary


def _canary(tmp_path, bundle):
    sent = []
    cfg = load_config(agent_id="gw-1", bundle=str(bundle), selftest={"interval_s": 60, "per_class": 3})
    metrics = Metrics()
    c = Canary(cfg, lambda: bundle, metrics, lambda topic, payload, qos, retain: sent.append((topic, payload, qos, retain)))
    return c, sent, metrics


def test_canary_reports_metrics_and_a_retained_result_only(tmp_path):
    d = make_fault_bundle(tmp_path / "b", {"spike": 10.0, "faint": 1.0})
    c, sent, metrics = _canary(tmp_path, d)
    res = c.run_once()
    assert not res.passed
    [(topic, payload, qos, retain)] = sent  # one message, and it is not an alert
    assert topic == "edgewatch/status/gw-1/selftest" and retain and qos == 1
    body = json.loads(payload)
    assert body["passed"] is False and body["agent"] == "gw-1"
    g = metrics.registry.get_sample_value
    assert g("edgewatch_selftest_detected", {"fault": "spike"}) == 1.0
    assert g("edgewatch_selftest_detected", {"fault": "faint"}) == 0.0
    assert not g("edgewatch_selftest_last_success_timestamp_seconds")


def test_canary_success_timestamp_and_error_report(tmp_path):
    c, sent, metrics = _canary(tmp_path, make_fault_bundle(tmp_path / "b", {"spike": 10.0}))
    assert c.run_once().passed
    assert metrics.registry.get_sample_value("edgewatch_selftest_last_success_timestamp_seconds") > 0
    c2, sent2, _ = _canary(tmp_path, make_tiny_bundle(tmp_path / "plain"))
    assert c2.run_once() is None  # no generator: reported, never raised
    assert json.loads(sent2[0][1])["error"] == NO_GENERATOR


def test_selftest_bundle_refuses_a_bundle_without_generator(tmp_path):
    from agent.manifest import BundleError

    with pytest.raises(BundleError, match="no generator"):
        selftest_bundle(make_tiny_bundle(tmp_path / "b"))
