"""fit: CSV loading, scaling, the bundle it writes, and that a fault scores higher than normal."""
from __future__ import annotations

import json

import numpy as np
import onnx
import pytest

from agent.backends import open_backend
from agent.manifest import load_manifest
from agent.scoring import Scorer, score_rows
from bundle_factory import make, simulated, write_rows
from trainer.data import CsvOptions, load_csv, load_many
from trainer.errors import InputError
from trainer.fit import FitOptions, auto_window, fit, robust_scaler


@pytest.fixture(scope="session")
def made(tmp_path_factory):
    return make(tmp_path_factory.mktemp("bundle"))


# ---------------------------------------------------------------- CSV loading
def _write(path, text):
    path.write_text(text)
    return path


def test_sniffs_semicolon_and_iso_time(tmp_path):
    p = _write(tmp_path / "a.csv", "datetime;a;b\n2026-01-01T00:00:00Z;1.5;2\n2026-01-01 00:00:01;;3\n")
    t = load_csv(p)
    assert t.features == ["a", "b"] and t.time_col == "datetime"
    assert np.isnan(t.values[1, 0]) and t.values[1, 1] == 3
    assert t.timestamps[1] - t.timestamps[0] == 1.0
    assert t.sample_period_s() == 1.0


def test_tab_epoch_ms_and_decimal_comma(tmp_path):
    p = _write(tmp_path / "a.tsv", "time\tx\n1767225600000\t1,5\n1767225601000\t2,5\n")
    t = load_csv(p)
    assert t.timestamps[0] == 1767225600.0 and t.values[:, 0].tolist() == [1.5, 2.5]


def test_no_time_column_uses_row_index_and_skips_label_like_columns(tmp_path):
    p = _write(tmp_path / "a.csv", "a,b,anomaly,status_text\n1,2,0,ok\n3,4,1,ok\n")
    t = load_csv(p)
    assert t.time_col is None and t.timestamps.tolist() == [0, 1]
    assert t.features == ["a", "b"]  # ground truth and text never become sensors


def test_time_column_detected_by_loose_name_or_content(tmp_path):
    p = _write(tmp_path / "a.csv", '\ufeff"Time Stamp";x\r\n2026-01-01 00:00:00;1\r\n2026-01-01 00:00:02;2\r\n')
    assert load_csv(p).time_col == "Time Stamp" and load_csv(p).sample_period_s() == 2.0
    p = _write(tmp_path / "b.csv", "when,x\n2026-01-01T00:00:00Z,1\n2026-01-01T00:00:01Z,2\n")
    assert load_csv(p).time_col == "when" and load_csv(p).features == ["x"]


def test_features_exclude_label_and_fault(tmp_path):
    p = _write(tmp_path / "a.csv", "ts,a,b,c,lab,kind\n0,1,2,3,0,\n1,1,2,3,1,cavitation\n")
    t = load_csv(p, CsvOptions(exclude=["b"], label_col="lab", fault_col="kind"))
    assert t.features == ["a", "c"] and t.label.tolist() == [0, 1] and t.fault == ["", "cavitation"]
    t = load_csv(p, CsvOptions(features=["c", "a"]))
    assert t.features == ["c", "a"] and t.values[0].tolist() == [3, 1]


@pytest.mark.parametrize("text, opts, match", [
    ("a,b\n1,2\n3,x\n", CsvOptions(), r"a\.csv: line 3, column 'b': not a number: 'x'"),
    ("a,b\n1,2\n", CsvOptions(features=["a", "zz"]), r"unknown feature column 'zz'"),
    ("a,b\n1,2\n", CsvOptions(label_col="y"), r"unknown label column 'y'"),
    ("a,b\n1,2\n", CsvOptions(exclude=["q"]), r"unknown excluded column 'q'"),
    ("a,b\n1,2,3\n", CsvOptions(), r"line 2: 3 cells, header has 2"),
    ("a,b\n", CsvOptions(), r"no data rows"),
    ("", CsvOptions(), r"empty file"),
    ("time,a\nyesterday,1\n", CsvOptions(), r"column 'time': not a timestamp"),
    ("a,lab\n1,maybe\n", CsvOptions(label_col="lab"), r"label must be 0/1"),
    ("a,a\n1,2\n", CsvOptions(), r"appears twice"),
])
def test_bad_csv_one_line_errors(tmp_path, text, opts, match):
    p = _write(tmp_path / "a.csv", text)
    with pytest.raises(InputError, match=match) as e:
        load_csv(p, opts)
    assert "\n" not in str(e.value)


def test_missing_file(tmp_path):
    with pytest.raises(InputError, match="no such file"):
        load_csv(tmp_path / "nope.csv")


def test_load_many_needs_same_features(tmp_path):
    a = _write(tmp_path / "a.csv", "a,b\n1,2\n")
    b = _write(tmp_path / "b.csv", "a,c\n1,2\n")
    with pytest.raises(InputError, match=r"b\.csv: unknown feature column 'b'"):
        load_many([a, b])


# ---------------------------------------------------------------- scaling and sizing
def test_robust_scaler_safe_for_constant_and_intermittent_channels():
    rng = np.random.default_rng(0)
    x = np.stack([rng.normal(5, 2, 1000), np.full(1000, 7.0), (rng.random(1000) < 0.1) * 1.0,
                  np.zeros(1000)], 1)
    centre, scale = robust_scaler(x)
    assert centre[1] == 7.0 and np.all(scale > 0) and np.all(np.isfinite(scale))
    assert abs(scale[0] - 2) < 0.3  # IQR/1.349 estimates the std of a normal channel
    assert scale[2] > 0.2  # IQR 0 on a 10 % on/off channel: the std is used instead
    assert scale[1] == pytest.approx(0.07) and scale[3] == pytest.approx(1e-3)  # constant: 1 % of magnitude


def test_auto_window():
    assert auto_window([5000]) == 8 and auto_window([400, 3000]) == 8  # the default (bench.detection)
    assert auto_window([30]) == 3 and auto_window([10]) == 2


# ---------------------------------------------------------------- training
def test_training_is_seed_deterministic_and_respects_the_time_budget():
    import torch

    from trainer.vae import TrainConfig, WindowVAE, train_vae

    x = np.random.default_rng(0).normal(size=(200, 8, 3)).astype(np.float32)

    def run(seed, **kw):
        torch.manual_seed(seed)
        m = WindowVAE(8, 3, 32, 3)
        r = train_vae(m, x[:160], x[160:], TrainConfig(seed=seed, progress=False, **kw))
        return r, torch.cat([p.detach().flatten() for p in m.parameters()])

    (_, a), (_, b) = run(1, epochs=25), run(1, epochs=25)
    assert torch.equal(a, b)
    r, _ = run(1, epochs=10_000, patience=10_000, time_budget_s=0.5)
    assert r.stopped == "time_budget" and r.seconds < 5


def test_linear_path_is_a_linear_term_beside_the_mlp():
    """With the MLP's output layers at zero, the VAE with its linear term is exactly linear (a PCA-like core:
    x -> B A x); without the term it is constant. Its export: test_trainer_cli's `fit --linear-path`, which
    checks the golden vectors in onnxruntime and LiteRT."""
    import torch

    from trainer.vae import WindowVAE

    torch.manual_seed(0)
    for linear_path in (True, False):
        m = WindowVAE(4, 2, 32, 3, linear_path=linear_path).eval()
        with torch.no_grad():
            for layer in (m.to_stats, m.decoder[-1]):
                layer.weight.zero_()
                layer.bias.zero_()
            x = torch.randn(6, 4, 2)
            y = m(x)
            if linear_path:
                want = (x.flatten(1) @ m.lin_enc.weight.T @ m.lin_dec.weight.T).unflatten(1, (4, 2))
                torch.testing.assert_close(y, want)
                torch.testing.assert_close(m(2 * x), 2 * y)
            else:
                assert m.lin_enc is None and float(y.abs().max()) == 0.0


def test_ensemble_reconstruction_is_the_members_mean():
    import torch

    from trainer.vae import EnsembleVAE, WindowVAE

    torch.manual_seed(0)
    members = [WindowVAE(8, 3, 32, 3).eval() for _ in range(3)]
    ens = EnsembleVAE(members).eval()
    x = torch.randn(5, 8, 3)
    with torch.no_grad():
        want = torch.stack([m(x) for m in members]).mean(0)
        torch.testing.assert_close(ens(x), want, rtol=1e-5, atol=1e-6)
    assert (ens.window, ens.n_features) == (8, 3)


def test_refit_ships_a_model_trained_on_every_normal_row_calibrated_on_the_held_out_one(tmp_path):
    """The shipped VAE has also learnt the calibration rows (the newest history); the held-out one
    has not, and it is the one the whitening and threshold come from. --no-refit ships that one."""
    import torch

    from trainer.fit import prepare, scale_windows, train_detector
    from trainer.vae import _recon_mse

    features, values, _ = simulated(400, seed=4)
    prep = prepare([write_rows(tmp_path / "h.csv", features, values)], FitOptions(progress=False))
    opts = FitOptions(progress=False, ensemble=2, time_budget_s=30)
    det = train_detector(prep, opts)
    cal = torch.from_numpy(scale_windows(prep.cal_windows, prep.centre, prep.scale))
    assert det.final is not det.held_out
    assert _recon_mse(det.final, cal) < _recon_mse(det.held_out, cal)
    n_all = len(prep.x_train) + len(prep.x_val) + len(prep.cal_windows)
    assert det.metrics["refit_windows"] == n_all and det.metrics["refit_epochs"] >= 21
    alone = train_detector(prep, opts.model_copy(update={"refit": False}))
    assert alone.final is alone.held_out and "refit_windows" not in alone.metrics


# ---------------------------------------------------------------- the bundle
def test_fit_writes_a_valid_verified_bundle(made):
    m = load_manifest(made.bundle)  # hashes, schema, consistency
    names = {f.path for fs in m.models["vae"].files.values() for f in fs}
    assert {"vae.onnx", "vae_b1.tflite", "vae_b8.tflite", "vae_b64.tflite"} <= names
    assert {f.batch for f in m.models["vae"].files["tflite"]} == {1, 8, 64}
    assert m.models["vae"].inputs == ["x"] and m.models["vae"].outputs == ["recon"]
    assert m.models["vae"].golden == "vae_golden.npz"
    assert m.score.kind == "vae_recon_mahal" and m.score.transform == "log"
    p = np.asarray(m.score.precision)
    assert p.shape == (8, 8) == (len(m.features),) * 2 and np.allclose(p, p.T) and np.linalg.eigvalsh(p).min() > 0
    assert "held-out normal calibration" in m.threshold.method and m.threshold.value > 0
    assert m.window == 8 and m.training.rows == 400 and m.training.normal_rows == 400
    assert m.sample_period_s == 1.0
    t = m.training.metrics
    assert t["calibration_rows"] > 50 and 0 <= t["calibration_false_alarm_rate"] <= 0.05
    assert t["ensemble"] == 3  # three VAEs, one exported graph (their mean reconstruction)
    # The requirement: 400 rows x 8 channels fit (train + export + verify) in < 60 s on 2 cores.
    assert m.training.seconds < 60, m.training.seconds
    with np.load(made.bundle / "vae_golden.npz") as g:
        assert g["in_x"].shape == (16, m.window, 8) and g["out_recon"].shape == g["in_x"].shape


def test_onnx_is_one_file_with_dynamic_batch(made):
    model = onnx.load(str(made.bundle / "vae.onnx"), load_external_data=False)
    assert not any(t.data_location == onnx.TensorProto.EXTERNAL for t in model.graph.initializer)
    assert max(o.version for o in model.opset_import if o.domain in ("", "ai.onnx")) >= 17
    (inp,), (out,) = model.graph.input, model.graph.output
    assert (inp.name, out.name) == ("x", "recon")
    assert inp.type.tensor_type.shape.dim[0].dim_param  # symbolic batch


def test_int8_variant_when_present_passes_its_golden_check(made):
    m = load_manifest(made.bundle)
    q = [f for f in m.models["vae"].files["tflite"] if f.quantization == "dynamic_int8"]
    if not q:
        pytest.skip("int8 variant was skipped by the exporter for this model")
    open_backend("litert", made.bundle, m, quantization="dynamic_int8")


def test_injected_fault_scores_higher_than_normal(made):
    m = load_manifest(made.bundle)
    scorer = Scorer(m, open_backend("onnxruntime", made.bundle, m))
    _, values, label = simulated(1200, seed=0, fault=(700, 1000))
    res = score_rows(scorer, values)
    normal, faulty = res["score"][400:700], res["score"][750:1000]
    assert np.median(faulty) > np.median(normal)
    assert res["anomaly"][700:1000].any(), "the fault never raised an alert"
    assert res["anomaly"][400:700].mean() < 0.05


def test_labelled_rows_are_left_out_of_training(tmp_path):
    features, values, _ = simulated(500, seed=3)
    values = values.copy()
    label = np.zeros(len(values), np.int8)
    label[100:150] = 1
    values[100:150] += 1000.0  # would wreck the scaler if it were used
    p = write_rows(tmp_path / "l.csv", features, values, label)
    m = fit([p], tmp_path / "b", FitOptions(epochs=15, window=8, progress=False, int8=False),
            CsvOptions(label_col="label"))
    assert m.training.normal_rows == 450 and m.training.rows == 500
    assert np.all(np.abs(np.array(m.scaler.centre) - np.median(np.delete(values, range(100, 150), 0), 0))
                  < 5 * np.array(m.scaler.scale))
    assert "label" not in m.features


def test_fit_refuses_too_little_data(tmp_path):
    p = _write(tmp_path / "s.csv", "a,b\n" + "".join(f"{i},{i % 3}\n" for i in range(20)))
    with pytest.raises(InputError, match="too little normal data"):
        fit([p], tmp_path / "b", FitOptions(progress=False))


def test_refit_replaces_stale_files(made, tmp_path):
    import shutil

    b = tmp_path / "b"
    shutil.copytree(made.bundle, b)
    (b / "vae_b64_int8.tflite").write_bytes(b"stale")
    m = fit([made.train_csv], b, FitOptions(epochs=5, window=4, progress=False, int8=False, version="v2"))
    assert m.version == "v2" and not (b / "vae_b64_int8.tflite").exists()
    assert json.loads((b / "manifest.json").read_text())["window"] == 4


def test_calibration_rows_with_unseen_normal_behaviour_do_not_blind_the_detector(tmp_path):
    """Regression (the demo pumps, 2026-12-01): the last quarter of each pump's 2 h history (the
    calibration rows) has normal behaviour the earlier rows lack (the motor runs colder). With
    window 4 and the residual whitening taken from the early-stopping rows alone the calibration
    scores exploded, the threshold rose to 7.7 and the cavitation fault went unseen; whitening
    from every held-out normal row keeps the threshold sane (4.0) and catches it."""
    from trainer.demo import DEVICES
    from trainer.simulate import simulate_device, write_csv

    hist, live = [], {}
    for i, (name, faults) in enumerate(DEVICES.items()):
        h = simulate_device(name, "pump", rows=7200, seed=100 + i, regimes=True, start_epoch=1_767_225_600.0)
        hist.append(write_csv(h, tmp_path / f"{name}.train.csv"))
        live[name] = simulate_device(name, "pump", rows=2700, seed=200 + i, faults=faults,
                                     start_epoch=float(h.timestamps[-1]) + 1.0)
    m = fit(hist, tmp_path / "b", FitOptions(window=4, progress=False, int8=False, ensemble=1, time_budget_s=30),
            CsvOptions(label_col="label", exclude=["fault"]))
    scorer = Scorer(m, open_backend("onnxruntime", tmp_path / "b", m))
    cav = live["pump-04"]
    res = score_rows(scorer, cav.values)
    assert res["anomaly"][cav.label == 1].mean() > 0.5, m.threshold.value
    for healthy in ("pump-01", "pump-03"):
        assert score_rows(scorer, live[healthy].values)["anomaly"].mean() < 0.05
