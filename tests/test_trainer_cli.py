"""edge-trainer: help that teaches, one output row per input row, one-line errors, metrics."""
from __future__ import annotations

import csv
import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest

from bundle_factory import make, simulated, write_rows
from trainer import metrics
from trainer.cli import build_parser, main


@pytest.fixture(scope="module")
def made(tmp_path_factory):
    return make(tmp_path_factory.mktemp("bundle"))


@pytest.fixture(scope="module")
def stream_csv(tmp_path_factory):
    features, values, label = simulated(900, seed=0, fault=(600, 850))
    return write_rows(tmp_path_factory.mktemp("stream") / "stream.csv", features, values, label)


def run_cli(*args, timeout=120):
    env = dict(os.environ, PYTHONWARNINGS="ignore")
    return subprocess.run([sys.executable, "-m", "trainer.cli", *map(str, args)], capture_output=True, text=True,
                          timeout=timeout, env=env)


# ---------------------------------------------------------------- help
@pytest.mark.parametrize("verb", ["simulate", "fit", "score", "evaluate"])
def test_help_teaches(verb, capsys):
    with pytest.raises(SystemExit) as e:
        build_parser().parse_args([verb, "--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert "examples:" in out and f"edge-trainer {verb}" in out


# ---------------------------------------------------------------- score / evaluate
def _read(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_score_one_row_per_input_row_and_backends_agree(made, stream_csv, tmp_path):
    outs = {}
    for backend in ("onnxruntime", "litert"):
        out = tmp_path / f"{backend}.csv"
        assert main(["-q", "score", "--bundle", str(made.bundle), "--csv", str(stream_csv), "--out", str(out),
                     "--backend", backend]) == 0
        outs[backend] = _read(out)
    a, b = outs["onnxruntime"], outs["litert"]
    assert len(a) == len(b) == 900
    assert list(a[0]) == ["timestamp", "score", "threshold", "anomaly"]
    assert a[0]["timestamp"].startswith("2026-01-01T00:00:00")
    assert [r["anomaly"] for r in a] == [r["anomaly"] for r in b]
    assert any(r["anomaly"] == "1" for r in a[600:850])
    s = np.array([float(r["score"]) for r in a])
    assert np.median(s[650:850]) > np.median(s[300:600])


def test_score_to_stdout(made, stream_csv, capsys):
    assert main(["score", "--bundle", str(made.bundle), "--csv", str(stream_csv)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == "timestamp,score,threshold,anomaly" and len(lines) == 901


def test_score_is_causal(made, stream_csv, tmp_path):
    """A row's decision uses only rows up to it: scoring a prefix gives the same first rows."""
    features, values, label = simulated(900, seed=0, fault=(600, 850))
    prefix = write_rows(tmp_path / "prefix.csv", features, values[:620], label[:620])
    full, part = tmp_path / "full.csv", tmp_path / "part.csv"
    assert main(["-q", "score", "--bundle", str(made.bundle), "--csv", str(stream_csv), "--out", str(full)]) == 0
    assert main(["-q", "score", "--bundle", str(made.bundle), "--csv", str(prefix), "--out", str(part)]) == 0
    assert _read(full)[:620] == _read(part)


def test_evaluate_writes_metrics(made, stream_csv, tmp_path, capsys):
    rep = tmp_path / "report"
    assert main(["-q", "evaluate", "--bundle", str(made.bundle), "--csv", str(stream_csv), "--label-col", "label",
                 "--report", str(rep)]) == 0
    out = capsys.readouterr().out
    assert "false-alarm rate" in out and "ROC-AUC" in out
    m = json.loads((rep / "metrics.json").read_text())
    for k in ("precision", "recall", "f1", "false_alarm_rate", "missed_alarm_rate", "roc_auc", "pr_auc",
              "mean_detection_delay_rows", "events", "events_detected"):
        assert k in m
    assert m["rows"] == 900 and m["anomalous_rows"] == 250 and m["events"] == 1
    assert m["roc_auc"] > 0.7 and m["events_detected"] == 1
    rows = _read(rep / "scores.csv")
    assert len(rows) == 900 and list(rows[0]) == ["timestamp", "score", "threshold", "anomaly", "label"]


def test_fit_cli_writes_bundle(tmp_path, capsys):
    features, values, _ = simulated(300, seed=5)
    p = write_rows(tmp_path / "h.csv", features, values)
    assert main(["-q", "fit", "--csv", str(p), "--out", str(tmp_path / "b"), "--epochs", "5", "--window", "6",
                 "--no-int8", "--version", "1.0"]) == 0
    assert "threshold" in capsys.readouterr().out
    m = json.loads((tmp_path / "b" / "manifest.json").read_text())
    assert m["name"] == "h" and m["version"] == "1.0" and m["window"] == 6
    assert "refit_windows" in m["training"]["metrics"]  # the default: refit on every normal row
    assert m["training"]["metrics"]["linear_path"] == 0.0  # the default: the VAE without its linear term
    assert main(["-q", "fit", "--csv", str(p), "--out", str(tmp_path / "c"), "--epochs", "5", "--no-int8",
                 "--no-refit", "--linear-path"]) == 0
    metrics = json.loads((tmp_path / "c" / "manifest.json").read_text())["training"]["metrics"]
    assert "refit_windows" not in metrics and metrics["linear_path"] == 1.0


def test_one_channel_fit_and_score(tmp_path):
    # The product takes 1 to ~20 channels: a single sensor (a temperature with a daily-like cycle) must fit,
    # export (both runtimes' golden vectors are checked inside fit) and score, and a large step must score high.
    rng = np.random.default_rng(3)
    t = np.arange(700)
    temp = 21 + 4 * np.sin(2 * np.pi * t / 288) + rng.normal(0, 0.1, len(t))
    hist = write_rows(tmp_path / "one.csv", ["temperature"], temp[:500, None], period_s=300.0)
    test = temp[500:].copy()
    test[100:] += 8.0
    new = write_rows(tmp_path / "new.csv", ["temperature"], test[:, None], period_s=300.0)
    assert main(["-q", "fit", "--csv", str(hist), "--out", str(tmp_path / "b"), "--epochs", "5", "--no-int8"]) == 0
    m = json.loads((tmp_path / "b" / "manifest.json").read_text())
    assert m["features"] == ["temperature"] and len(m["score"]["precision"]) == 1
    outs = {}
    for backend in ("onnxruntime", "litert"):
        out = tmp_path / f"{backend}.csv"
        assert main(["-q", "score", "--bundle", str(tmp_path / "b"), "--csv", str(new), "--out", str(out),
                     "--backend", backend, "--contrib"]) == 0
        outs[backend] = _read(out)
    a, b = outs["onnxruntime"], outs["litert"]
    assert len(a) == len(b) == 200 and [r["anomaly"] for r in a] == [r["anomaly"] for r in b]
    assert all(r["contrib_temperature"] == "1.0000" for r in a[10:])
    s = np.array([float(r["score"]) for r in a])
    assert np.all(np.isfinite(s)) and s[140:].min() > s[:100].max()


def test_simulate_delegates(tmp_path):
    assert main(["simulate", "--out", str(tmp_path / "sim"), "--devices", "1", "--hours", "0.05",
                 "--train-hours", "0"]) == 0
    assert (tmp_path / "sim" / "pump-01.csv").is_file()


# ---------------------------------------------------------------- bad input: one line, no traceback
def _bad_cases(bundle, stream, tmp):
    notnum = tmp / "notnum.csv"
    notnum.write_text("timestamp,a,b\n2026-01-01T00:00:00Z,1,2\n2026-01-01T00:00:01Z,1,oops\n")
    garbage = tmp / "garbage"
    garbage.mkdir()
    (garbage / "manifest.json").write_text("{not json")
    wrongcols = tmp / "wrongcols.csv"
    wrongcols.write_text("timestamp,x\n2026-01-01T00:00:00Z,1\n")
    return [
        ((), 2),
        (("fit",), 2),
        (("fit", "--csv", tmp / "missing.csv", "--out", tmp / "o"), 1),
        (("fit", "--csv", notnum, "--out", tmp / "o"), 1),
        (("fit", "--csv", stream, "--out", tmp / "o", "--features", "nope"), 1),
        (("fit", "--csv", stream, "--out", tmp / "o", "--window", "abc"), 2),
        (("fit", "--csv", stream, "--out", tmp / "o", "--window", "0"), 1),
        (("fit", "--csv", stream, "--out", tmp / "o", "--delimiter", "ab"), 1),
        (("score", "--bundle", tmp / "nobundle", "--csv", stream), 1),
        (("score", "--bundle", garbage, "--csv", stream), 1),
        (("score", "--bundle", bundle, "--csv", wrongcols), 1),
        (("score", "--bundle", bundle, "--csv", tmp / "missing.csv"), 1),
        (("score", "--bundle", bundle, "--csv", stream, "--backend", "tpu"), 2),
        (("evaluate", "--bundle", bundle, "--csv", stream), 2),
        (("evaluate", "--bundle", bundle, "--csv", stream, "--label-col", "nolabel"), 1),
        (("simulate", "--out", tmp / "sim", "--devices", "0"), 1),
        (("simulate",), 2),
    ]


def test_bad_input_is_one_line_error(made, stream_csv, tmp_path):
    failures = []
    for args, code in _bad_cases(made.bundle, stream_csv, tmp_path):
        r = run_cli(*args)
        lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
        ok = (r.returncode == code and len(lines) == 1 and lines[0].startswith("edge-trainer: error: ")
              and "Traceback" not in r.stderr)
        if not ok:
            failures.append(f"{args}: rc={r.returncode} (want {code}) stderr={r.stderr!r}")
    assert not failures, "\n".join(failures)


# ---------------------------------------------------------------- metrics (pure functions)
def test_metrics_match_definitions():
    y = np.array([0, 0, 1, 1, 1, 0, 0, 1, 1, 0])
    pred = np.array([0, 1, 0, 1, 1, 0, 0, 0, 1, 1])
    c = metrics.confusion(y, pred)
    assert c == {"tp": 3, "fp": 2, "tn": 3, "fn": 2}
    r = metrics.rates(c)
    assert r["precision"] == 0.6 and r["recall"] == 0.6 and r["f1"] == pytest.approx(0.6)
    assert r["false_alarm_rate"] == 0.4 and r["missed_alarm_rate"] == 0.4
    assert metrics.spans(y) == [(2, 5), (7, 9)]
    assert metrics.detection_delays(y, pred) == [1, 1]
    assert metrics.detection_delays(y, np.zeros(10)) == [None, None]


def test_auc_against_sklearn():
    sk = pytest.importorskip("sklearn.metrics")
    rng = np.random.default_rng(0)
    y = (rng.random(500) < 0.2).astype(int)
    s = np.round(rng.normal(y * 0.8, 1.0), 1)  # rounding creates ties
    assert metrics.roc_auc(y, s) == pytest.approx(sk.roc_auc_score(y, s), abs=1e-12)
    assert metrics.pr_auc(y, s) == pytest.approx(sk.average_precision_score(y, s), abs=1e-12)
    assert math.isnan(metrics.roc_auc(np.zeros(5), np.arange(5)))


def test_summary_is_json_ready():
    m = metrics.summary(np.zeros(4), np.arange(4.0), np.zeros(4), period_s=2.0)
    json.dumps(m)
    assert m["roc_auc"] is None and m["false_alarm_rate"] == 0.0 and m["events"] == 0
