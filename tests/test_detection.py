"""The detection suite in miniature: on a small scenario (two files of a slow, redundant plant) the VAE, under the shipped
defaults and the same label-free protocol, beats both classic baselines (measured, not hard-coded)."""
from __future__ import annotations

import math
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # bench/ is not an installed package
from bench.baselines import BASELINES  # noqa: E402
from bench.detection import run_suite, write_report  # noqa: E402
from bench.scenarios import synthetic_set  # noqa: E402


def test_vae_beats_pca_and_iforest_on_a_small_scenario(tmp_path):
    # Two files of the slow redundant plant (12 channels + 6 redundant + 1 very noisy), as in the suite.
    sets = {"tiny": synthetic_set("tiny", 2, 2, 12, 4, 0.2, 800, 300, 400, 60.0, noisy_channel=True, redundant=6)}
    res = run_suite(sets=sets, ablate=False, log=lambda *_: None)
    m = res["sets"]["tiny"]
    for b in BASELINES:
        assert not math.isnan(m["vae"]["f1"])
        assert m["vae"]["f1"] > m[b]["f1"], (b, m)
    write_report(res, tmp_path)
    assert (tmp_path / "detection.md").read_text().count("| tiny |") == 4  # 3 detectors + the margin row
    assert (tmp_path / "detection.png").stat().st_size > 0


def test_the_suite_writes_csvs_whose_time_column_keeps_the_sampling_period(tmp_path):
    import numpy as np

    from bench.detection import _write_csv
    from trainer.data import load_csv

    x = np.random.default_rng(0).normal(size=(50, 2)).astype(np.float32)
    table = load_csv(_write_csv(tmp_path / "a.csv", ["a", "b"], x, 60.0))
    assert table.sample_period_s() == 60.0  # at "%.6g" every epoch second read 1.7e+09: no period at all
    assert np.allclose(table.values, x, rtol=1e-5, atol=1e-6)
