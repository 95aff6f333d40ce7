"""Generative fault models: SMOTE, the conditional GAN, the fault classifier, export parity, the study.

Small on purpose (short GAN runs on a few simulated machines): the whole file stays well
under a minute and a half on two cores.
"""
from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from agent.backends import open_backend  # noqa: E402
from agent.manifest import (Manifest, ModelEntry, Scaler, ScoreSpec, Threshold, Training,  # noqa: E402
                            load_manifest, write_manifest)
from trainer.augment import oversample, smote  # noqa: E402
from trainer.fault_classifier import MODELS, fit_model  # noqa: E402
from trainer.fault_models import (NORMAL, OPTIONS, holdout_split, macro_f1, single_threaded,  # noqa: E402
                                  train_fault_models)
from trainer.fault_report import _subsample, run_augmentation_study, simulated_windows  # noqa: E402
from trainer.gan import sample, train_gan  # noqa: E402

W = 16


@pytest.fixture(scope="module")
def data():
    """Two machines run twice (first run trains, second tests) and one test-only machine; six faults each."""
    d = simulated_windows("pump", machines=3, test_machines=1, rows=3600, window=W, seed=0)
    classes = d["classes"]
    x_tr, y_tr = _subsample(*d["train"][:2], classes, 30, 60, np.random.default_rng(0))
    x_te, y_te = _subsample(*d["test"][:2], classes, 20, 20, np.random.default_rng(1), stride=2)
    return {"classes": classes, "x_tr": x_tr, "y_tr": y_tr, "x_te": x_te, "y_te": y_te, "raw": d}


@pytest.fixture(scope="module")
def gan(data):
    with single_threaded():
        return train_gan(data["x_tr"], data["y_tr"], len(data["classes"]), steps=1000, seed=0, progress=False)


# ---------------------------------------------------------------- SMOTE
def _convex_in(s: np.ndarray, pool: np.ndarray, tol: float = 1e-4) -> bool:
    """Is ``s`` on a segment between two windows of ``pool``?"""
    for a in pool:
        for b in pool:
            d = (b - a).ravel()
            dd = float(d @ d)
            lam = 0.0 if dd == 0 else float((s - a).ravel() @ d) / dd
            if -tol <= lam <= 1 + tol and np.max(np.abs(a + lam * (b - a) - s)) < tol:
                return True
    return False


def test_smote_makes_in_class_convex_combinations():
    rng = np.random.default_rng(0)
    a = rng.normal(0, 1, (6, 4, 3)).astype(np.float32)
    b = rng.normal(10, 1, (5, 4, 3)).astype(np.float32)
    s = smote(a, 40, k=3, rng=rng)
    assert s.shape == (40, 4, 3) and s.dtype == np.float32
    assert all(_convex_in(w, a) for w in s)
    x = np.concatenate([a, b])
    y = np.array(["a"] * 6 + ["b"] * 5)
    xs, ys = oversample(x, y, target=20, seed=1, skip=("b",))
    assert list(ys) == ["a"] * 14  # brought to the target; the skipped class untouched
    assert all(_convex_in(w, a) for w in xs) and not any(_convex_in(w, b) for w in xs)
    assert smote(a[:1], 3).tolist() == np.repeat(a[:1], 3, axis=0).tolist()  # one window: copies


# ---------------------------------------------------------------- GAN
def test_gan_generates_windows_per_class_deterministically(data, gan):
    C = len(data["classes"])
    g = gan.generator
    assert gan.steps == 1000 and not gan.cut_short
    for c in range(C):
        w = sample(g, np.full(5, c), seed=3)
        assert w.shape == (5, W, 8) and w.dtype == np.float32 and np.isfinite(w).all()
    assert np.array_equal(sample(g, np.arange(C), seed=1), sample(g, np.arange(C), seed=1))
    with single_threaded():
        a = train_gan(data["x_tr"], data["y_tr"], C, steps=5, seed=7, progress=False).generator
        b = train_gan(data["x_tr"], data["y_tr"], C, steps=5, seed=7, progress=False).generator
    assert np.array_equal(sample(a, np.arange(C)), sample(b, np.arange(C)))  # same seed, same model


def test_synthetic_windows_are_closest_to_their_own_class(data, gan):
    """Weak but real: each class's mean synthetic window is nearer that class's mean real window
    than any other class's."""
    C = len(data["classes"])
    real_c = np.stack([data["x_tr"][data["y_tr"] == c].mean(0).ravel() for c in range(C)])
    wrong = []
    for c in range(C):
        syn = sample(gan.generator, np.full(100, c), seed=c).mean(0).ravel()
        near = int(np.argmin(np.linalg.norm(real_c - syn, axis=1)))
        if near != c:
            wrong.append((data["classes"][c], data["classes"][near]))
    assert not wrong, f"synthetic windows nearer another class: {wrong}"


# ---------------------------------------------------------------- classifier
def test_classifiers_trained_on_real_beat_chance_on_held_out_runs(data):
    C = len(data["classes"])
    with single_threaded():
        for name in ("gboost", "mlp"):
            pred = fit_model(name, data["x_tr"], data["y_tr"], C, 0, data["classes"].index(NORMAL)).predict(data["x_te"])
            f1 = macro_f1(data["y_te"], pred)
            assert f1 > 2.0 / C, f"{name}: macro-F1 {f1:.3f} is near chance ({1 / C:.3f})"


def test_holdout_split_keeps_groups_whole_and_lone_windows_for_training():
    y = np.array([0] * 8 + [1] * 6 + [2])
    g = np.array(["a"] * 4 + ["b"] * 4 + ["c"] * 3 + ["d"] * 3 + ["e"])
    tr, va = holdout_split(y, g, seed=0)
    assert sorted(np.r_[tr, va].tolist()) == list(range(len(y)))
    for grp in set(g):
        idx = np.flatnonzero(g == grp)
        assert np.isin(idx, va).all() or np.isin(idx, tr).all(), f"group {grp} split"
    assert 14 in tr and set(y[tr]) == {0, 1, 2}
    tr, va = holdout_split(np.array([0] * 8), seed=0)
    assert va.tolist() == [6, 7]  # without groups: the newest quarter


# ---------------------------------------------------------------- entry point + export parity
def _manifest(fm, F: int) -> Manifest:
    return Manifest(
        name="t", version="1", trainer_version="test", features=[f"s{i}" for i in range(F)], window=W,
        scaler=Scaler(centre=[0.0] * F, scale=[1.0] * F), score=ScoreSpec(kind="vae_recon_mse"),
        threshold=Threshold(value=1.0, method="test"),
        models={"vae": ModelEntry(inputs=["x"], outputs=["recon"], files={}), **fm.models},
        classes=fm.classes, latent_dim=fm.latent_dim,
        training=Training(data_sha256="0", rows=1, normal_rows=1, seconds=0.0),
    )


def test_train_fault_models_exports_models_both_runtimes_reproduce(data, tmp_path):
    classes = data["classes"]
    fault = data["y_tr"] != classes.index(NORMAL)
    labels = np.array(classes)[data["y_tr"][fault]]
    fm = train_fault_models(data["x_tr"][fault], labels, data["x_tr"][~fault], tmp_path, seed=0,
                            report_dir=tmp_path / "report", progress=False, gan_steps=100)
    assert fm.classes == sorted(set(labels)) + [NORMAL]
    assert fm.shipped_option in OPTIONS
    assert {(r["model"], r["option"]) for r in fm.comparison} == {(m, o) for m in MODELS for o in OPTIONS}
    for k in ("tstr_accuracy", "discriminative_score", "gan_seconds", f"heldout_macro_f1_mlp_{fm.shipped_option}"):
        assert np.isfinite(fm.metrics[k]), k
    names = {p.name for p in tmp_path.iterdir()}
    for stem in ("generator", "classifier"):
        assert {f"{stem}.onnx", f"{stem}_b1.tflite", f"{stem}_b8.tflite", f"{stem}_golden.npz"} <= names
    assert fm.report_path is not None and fm.report_path.is_file()
    assert (tmp_path / "report" / "fault_gan_channels.png").is_file()

    write_manifest(tmp_path, _manifest(fm, 8))
    m = load_manifest(tmp_path)  # hashes of every file verified
    assert m.models["generator"].inputs == ["z", "cls"] and m.models["classifier"].outputs == ["probs"]
    z = np.random.default_rng(0).standard_normal((11, fm.latent_dim)).astype(np.float32)
    cls = np.eye(len(fm.classes), dtype=np.float32)[np.arange(11) % len(fm.classes)]
    outs = {}
    for backend in ("onnxruntime", "litert"):
        # open_backend proves each model on its golden vectors (tolerance in the entry:
        # generator 1e-3 in scaled units, classifier 1e-4 in probability).
        gen = open_backend(backend, tmp_path, m, model="generator")
        clf = open_backend(backend, tmp_path, m, model="classifier")
        win = gen.run(z, cls)[0]  # 11 = 8 + 1 + 1 + 1 on LiteRT: chunking and padding exercised
        probs = clf.run(win)[0]
        assert win.shape == (11, W, 8) and probs.shape == (11, len(fm.classes))
        np.testing.assert_allclose(probs.sum(1), 1.0, atol=1e-5)
        outs[backend] = (win, probs)
    np.testing.assert_allclose(outs["onnxruntime"][0], outs["litert"][0], atol=1e-3)
    np.testing.assert_allclose(outs["onnxruntime"][1], outs["litert"][1], atol=1e-4)


def test_train_fault_models_rejects_data_without_faults(tmp_path):
    x = np.zeros((4, W, 3), np.float32)
    with pytest.raises(ValueError, match="no fault windows"):
        train_fault_models(x, [NORMAL] * 4, x, tmp_path, progress=False, gan_steps=1)


# ---------------------------------------------------------------- study
def test_augmentation_study_reports_every_model_option_and_size(data):
    res = run_augmentation_study(None, sizes=(5, 10), seeds=(0,), data=data["raw"], n_normal=30, n_test=10,
                                 gan_steps=30, workers=1, progress=False)
    cells = {(r["model"], r["option"], r["size"]) for r in res["table"]}
    assert cells == {(m, o, s) for m in MODELS for o in OPTIONS for s in (5, 10)}
    assert all(0.0 <= r["macro_f1"] <= 1.0 for r in res["table"])
    assert set(res["shipped"]) == {5, 10} and all(o in OPTIONS for o in res["shipped"].values())
    assert len(res["gan"]) == 2 and all("discriminative_score" in g for g in res["gan"])
