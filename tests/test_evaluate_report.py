"""edge-trainer evaluate --report writes the HTML page and PNG plots; score --contrib adds per-sensor shares."""
from __future__ import annotations

import csv

import numpy as np
import pytest

from bundle_factory import make, simulated, write_rows
from trainer.cli import main


@pytest.fixture(scope="module")
def made(tmp_path_factory):
    return make(tmp_path_factory.mktemp("bundle"))


@pytest.fixture(scope="module")
def stream_csv(tmp_path_factory):
    features, values, label = simulated(600, seed=0, fault=(350, 550))
    return write_rows(tmp_path_factory.mktemp("stream") / "stream.csv", features, values, label)


def test_evaluate_writes_html_and_png(made, stream_csv, tmp_path, capsys):
    rep = tmp_path / "report"
    assert main(["-q", "evaluate", "--bundle", str(made.bundle), "--csv", str(stream_csv), "--label-col", "label",
                 "--report", str(rep)]) == 0
    assert "report.html" in capsys.readouterr().out
    for name in ("score.png", "pr.png"):
        assert (rep / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    page = (rep / "report.html").read_text()
    assert page.startswith("<!doctype html>") and page.count("data:image/png;base64,") == 2
    assert "false_alarm_rate" in page and "f1" in page


def test_score_contrib_columns(made, stream_csv, tmp_path):
    out = tmp_path / "s.csv"
    assert main(["-q", "score", "--bundle", str(made.bundle), "--csv", str(stream_csv), "--out", str(out),
                 "--contrib"]) == 0
    rows = list(csv.DictReader(open(out)))
    from agent.manifest import load_manifest

    feats = load_manifest(made.bundle).features
    assert len(rows) == 600 and list(rows[0])[-len(feats):] == [f"contrib_{f}" for f in feats]
    shares = np.array([[float(r[f"contrib_{f}"]) for f in feats] for r in rows])
    assert np.allclose(shares.sum(axis=1), 1.0, atol=1e-3)
