"""Fault models for a bundle: a conditional GAN and a fault classifier, compared honestly and exported.

``train_fault_models`` is what ``edge-trainer fit`` calls when the data has a fault column:

1. Hold out the end of each class (or whole groups, e.g. fault episodes, when given): the
   windows of one episode overlap, so a random split would grade the classifier on copies of
   its training data.
2. Train the conditional WGAN-GP on the training part (every class, ``normal`` included, so
   ``edge-agent selftest`` can draw normal windows as well as faulty ones).
3. Grade the GAN (TSTR, discriminative score) and every classifier x augmentation option
   (real only, + SMOTE, + GAN) by macro-F1 on the held-out REAL windows.
4. Ship the MLP (the only model that runs on both runtimes) with the option that scored best
   for it on held-out data, refitted on all real windows; export both graphs with golden vectors.

Why a ``normal`` class: the classifier only sees windows the VAE flagged, but the threshold is a
quantile of normal scores, so some flagged windows are normal. Without a normal class the softmax
must name a fault for them, confidently; with it the agent can report "no known fault" instead.
"""
from __future__ import annotations

import contextlib
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from agent.manifest import ModelEntry, sha256_file

log = logging.getLogger("trainer")

NORMAL = "normal"
OPTIONS = ("real", "smote", "gan")
TFLITE_BATCHES = (1, 8)
NORMAL_CAP = 500  # normal windows are plentiful; more only slows training
AUG_MIN = 200  # augmented classes are brought to max(AUG_MIN, 2 x largest real fault class)
GAN_STEPS = 1500
MLP_SEEDS = 3  # the option choice averages this many MLP seeds: one seed is too noisy on tiny data
TOLERANCE = {"generator": 1e-3, "classifier": 1e-4}  # max abs diff vs PyTorch (generator: scaled units, |x| up to ~20)


@dataclass
class FaultModels:
    models: dict[str, ModelEntry]  # "generator", "classifier"
    classes: list[str]  # index i = one-hot position of the generator's ``cls`` = column i of ``probs``
    latent_dim: int
    metrics: dict[str, float]
    report_path: Path | None = None
    shipped_option: str = "real"
    comparison: list[dict] = field(default_factory=list)  # one row per model x option (held-out macro-F1)


@contextlib.contextmanager
def single_threaded():
    """Models this small run faster on one thread than on two (no thread hand-offs), and far
    faster on a busy machine where OpenMP/torch workers spin waiting for a core."""
    import torch
    from threadpoolctl import threadpool_limits

    old = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with threadpool_limits(1):
            yield
    finally:
        torch.set_num_threads(old)


# ---------------------------------------------------------------- data handling
def holdout_split(y: np.ndarray, groups: np.ndarray | None = None, frac: float = 0.25,
                  seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Per class: the last ``frac`` of its windows (in the given, temporal, order) are held out,
    or with ``groups`` whole groups are. A class with one window (or one group) is training only."""
    rng = np.random.default_rng(seed)
    val = np.zeros(len(y), bool)
    for c in np.unique(y):
        idx = np.flatnonzero(y == c)
        if groups is not None and len(np.unique(groups[idx])) >= 2:
            gs = rng.permutation(np.unique(groups[idx]))
            taken = 0
            for g in gs[:-1]:  # always keep at least one group for training
                if taken >= frac * len(idx):
                    break
                sel = idx[groups[idx] == g]
                val[sel] = True
                taken += len(sel)
        elif groups is None and len(idx) >= 2:  # one episode only: a tail split would leak overlap
            k = max(1, int(round(frac * len(idx))))
            val[idx[-k:]] = True
    return np.flatnonzero(~val), np.flatnonzero(val)


def aug_target(y: np.ndarray, normal_id: int | None) -> int:
    faults = y[y != normal_id] if normal_id is not None else y
    return max(AUG_MIN, 2 * int(np.bincount(faults).max())) if len(faults) else 0


def augment(option: str, x: np.ndarray, y: np.ndarray, n_classes: int, normal_id: int | None,
            gen=None, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Real training windows plus synthetic fault windows for ``option`` (normal is never augmented)."""
    if option == "real":
        return x, y
    target = aug_target(y, normal_id)
    skip = () if normal_id is None else (normal_id,)
    if option == "smote":
        from trainer.augment import oversample

        xs, ys = oversample(x, y, target, seed=seed, skip=skip)
    elif option == "gan":
        from trainer.gan import sample

        counts = np.bincount(y, minlength=n_classes)
        ys = np.concatenate([np.full(max(0, target - counts[c]), c) for c in range(n_classes)
                             if counts[c] > 0 and c not in skip] or [np.zeros(0, np.int64)]).astype(np.int64)
        xs = sample(gen, ys, seed=seed + 1000)
    else:
        raise ValueError(f"unknown augmentation option {option!r}")
    return np.concatenate([x, xs]), np.concatenate([y, ys.astype(y.dtype)])


def macro_f1(y_true: np.ndarray, y_pred: np.ndarray) -> float:
    from sklearn.metrics import f1_score

    # Scored over the classes present in the held-out set; predicting an absent class is an error.
    return float(f1_score(y_true, y_pred, labels=np.unique(y_true), average="macro", zero_division=0))


def compare(x_tr, y_tr, x_te, y_te, n_classes, normal_id, gen, models=None, options=OPTIONS,
            seed: int = 0, mlp_seeds: int = MLP_SEEDS) -> list[dict]:
    """Every model x option, trained on (augmented) training windows, scored on held-out real windows."""
    from trainer.fault_classifier import MODELS, fit_model

    rows = []
    for option in options:
        if option == "gan" and gen is None:
            continue
        xa, ya = augment(option, x_tr, y_tr, n_classes, normal_id, gen, seed)
        for name in models or MODELS:
            t = time.perf_counter()
            seeds = range(seed, seed + (mlp_seeds if name == "mlp" else 1))
            f1 = [macro_f1(y_te, fit_model(name, xa, ya, n_classes, s, normal_id).predict(x_te)) for s in seeds]
            rows.append({"model": name, "option": option, "macro_f1": float(np.mean(f1)),
                         "train_windows": int(len(ya)), "seconds": time.perf_counter() - t})
    return rows


def best_option(rows: list[dict], model: str = "mlp") -> str:
    """Best held-out macro-F1 for ``model``; ties go to the simpler option (real < smote < gan)."""
    cand = [r for r in rows if r["model"] == model]
    best = max(r["macro_f1"] for r in cand)
    return next(o for o in OPTIONS for r in cand if r["option"] == o and r["macro_f1"] >= best - 1e-9)


# ---------------------------------------------------------------- GAN quality
def _discriminate(real: np.ndarray, other: np.ndarray, seed: int) -> float:
    """2-fold cross-validated accuracy of gradient boosting telling ``real`` from ``other`` windows."""
    from sklearn.ensemble import HistGradientBoostingClassifier
    from sklearn.model_selection import StratifiedKFold, cross_val_score

    from trainer.fault_classifier import features_np

    if min(len(real), len(other)) < 4:
        return float("nan")
    f = features_np(np.concatenate([real, other]))
    lab = np.r_[np.zeros(len(real)), np.ones(len(other))]
    clf = HistGradientBoostingClassifier(max_iter=60, learning_rate=0.2, min_samples_leaf=5, random_state=seed)
    return float(np.mean(cross_val_score(clf, f, lab, cv=StratifiedKFold(2, shuffle=True, random_state=seed))))


def gan_quality(gen, x_tr, y_tr, x_te, y_te, seed: int = 0, per_class: int = 100,
                normal_id: int | None = None) -> dict[str, float]:
    """TSTR / TRTR (gradient boosting on window features) and the discriminative score.

    Discriminative score: |accuracy - 0.5| of a classifier telling held-out real windows from as
    many synthetic ones of the same classes; 0 = indistinguishable. Its reference
    ``discriminative_score_real`` puts real TRAINING windows (same classes, as many) in place of
    the synthetic ones: the gap between the training and held-out data itself (later episodes,
    other regimes), which a generator that only saw the training data cannot be expected to close.
    """
    from sklearn.metrics import accuracy_score

    from trainer.fault_classifier import fit_model
    from trainer.gan import sample

    n_classes = gen.n_classes
    present = np.unique(y_tr)
    ys = np.repeat(present, per_class)
    tstr = fit_model("gboost", sample(gen, ys, seed=seed + 2000), ys, n_classes, seed, normal_id).predict(x_te)
    trtr = fit_model("gboost", x_tr, y_tr, n_classes, seed, normal_id).predict(x_te)
    # Equal, duplicate-free draws per class on both sides: a duplicated window is memorised and
    # recognised across folds, which would flatter neither side fairly.
    rng = np.random.default_rng(seed)
    te_idx, tr_idx = [], []
    for c in present:
        a, b = np.flatnonzero(y_te == c), np.flatnonzero(y_tr == c)
        k = min(len(a), len(b))
        te_idx.append(rng.choice(a, k, replace=False))
        tr_idx.append(rng.choice(b, k, replace=False))
    te_idx, tr_idx = np.concatenate(te_idx), np.concatenate(tr_idx)
    real = x_te[te_idx]
    disc = _discriminate(real, sample(gen, y_te[te_idx], seed=seed + 3000), seed)
    disc_real = _discriminate(real, x_tr[tr_idx], seed)
    return {"tstr_accuracy": float(accuracy_score(y_te, tstr)), "tstr_macro_f1": macro_f1(y_te, tstr),
            "trtr_accuracy": float(accuracy_score(y_te, trtr)), "trtr_macro_f1": macro_f1(y_te, trtr),
            "discriminative_accuracy": disc, "discriminative_score": abs(disc - 0.5),
            "discriminative_score_real": abs(disc_real - 0.5)}


# ---------------------------------------------------------------- export
def export_model(model, out_dir: Path, stem: str, inputs: list[str], outputs: list[str],
                 golden_in: list[np.ndarray], tolerance: float) -> ModelEntry:
    """ONNX (dynamic batch, one file) + TFLite per fixed batch + golden npz, as a ModelEntry,
    with trainer.export's recipe (opset, quiet converters, file records) for named inputs/outputs."""
    import torch

    from trainer.export import export_onnx, export_tflite, model_file

    model = model.eval()
    out_dir = Path(out_dir)
    shapes = [tuple(g.shape[1:]) for g in golden_in]
    export_onnx(model, out_dir / f"{stem}.onnx", shapes, inputs, outputs)
    tfl = []
    for b in TFLITE_BATCHES:
        name = f"{stem}_b{b}.tflite"
        export_tflite(model, out_dir / name, b, shapes)
        tfl.append(model_file(out_dir, name, b))
    with torch.no_grad():
        res = model(*[torch.from_numpy(np.ascontiguousarray(g, np.float32)) for g in golden_in])
    res = res if isinstance(res, (tuple, list)) else (res,)
    golden = {f"in_{n}": np.ascontiguousarray(g, np.float32) for n, g in zip(inputs, golden_in)}
    golden.update({f"out_{n}": r.numpy() for n, r in zip(outputs, res)})
    np.savez(out_dir / f"{stem}_golden.npz", **golden)
    return ModelEntry(inputs=inputs, outputs=outputs,
                      files={"onnx": [model_file(out_dir, f"{stem}.onnx")], "tflite": tfl},
                      golden=f"{stem}_golden.npz", golden_sha256=sha256_file(out_dir / f"{stem}_golden.npz"),
                      tolerance=tolerance)


def export_generator(gen, out_dir: Path, seed: int = 0, n: int = 2) -> ModelEntry:
    """Golden inputs: ``n`` noise vectors for every class (batch > 8 exercises LiteRT chunking)."""
    rng = np.random.default_rng(seed)
    cls = np.repeat(np.eye(gen.n_classes, dtype=np.float32), n, axis=0)
    z = rng.standard_normal((len(cls), gen.latent_dim)).astype(np.float32)
    return export_model(gen, out_dir, "generator", ["z", "cls"], ["window"], [z, cls], TOLERANCE["generator"])


def export_classifier(mlp, out_dir: Path, golden_x: np.ndarray) -> ModelEntry:
    return export_model(mlp, out_dir, "classifier", ["x"], ["probs"], [golden_x], TOLERANCE["classifier"])


# ---------------------------------------------------------------- entry point
def train_fault_models(windows: np.ndarray, fault_labels, normal_windows: np.ndarray, out_dir: Path,
                       seed: int = 0, report_dir: Path | None = None, time_budget_s: float = 90,
                       progress: bool = True, groups: np.ndarray | None = None,
                       gan_steps: int = GAN_STEPS) -> FaultModels:
    """Train, compare and export the generator and the classifier into ``out_dir``.

    ``windows`` (N, W, F) scaled fault windows, in temporal order per class unless ``groups``
    (N,) names their episodes; ``fault_labels`` (N,) their fault types; ``normal_windows``
    (M, W, F) scaled normal windows (M = 0: no normal class). ``time_budget_s`` caps GAN
    training at half of it (the GAN runs ``gan_steps`` steps otherwise, so a seed is reproducible).
    """
    with single_threaded():
        return _train(windows, fault_labels, normal_windows, Path(out_dir), seed, report_dir, time_budget_s,
                      progress, groups, gan_steps)


def _train(windows, fault_labels, normal_windows, out_dir, seed, report_dir, time_budget_s, progress, groups,
           gan_steps) -> FaultModels:
    from trainer.fault_classifier import fit_mlp
    from trainer.gan import train_gan

    t0 = time.perf_counter()
    x_f = np.asarray(windows, np.float32)
    labels = np.asarray(fault_labels).astype(str)
    if x_f.ndim != 3 or len(x_f) != len(labels) or len(x_f) == 0:
        raise ValueError(f"need fault windows (N, W, F) with one label each; got {x_f.shape} and {len(labels)} labels")
    x_n = np.asarray(normal_windows, np.float32).reshape((-1,) + x_f.shape[1:])
    if (labels == NORMAL).any():  # "normal" among the fault labels: they are normal windows
        x_n = np.concatenate([x_n, x_f[labels == NORMAL]])
        keep = labels != NORMAL
        x_f, labels = x_f[keep], labels[keep]
        groups = None if groups is None else np.asarray(groups)[keep]
    classes = sorted(set(labels.tolist()))
    if not classes:
        raise ValueError("no fault windows: every label is normal")
    if len(x_n) > NORMAL_CAP:  # evenly spaced, so the held-out tail stays the newest normal data
        x_n = x_n[np.linspace(0, len(x_n) - 1, NORMAL_CAP).round().astype(int)]
    normal_id = None
    if len(x_n):
        classes.append(NORMAL)
        normal_id = len(classes) - 1
    C = len(classes)
    x = np.concatenate([x_f, x_n])
    y = np.concatenate([[classes.index(c) for c in labels], np.full(len(x_n), normal_id or 0)]).astype(np.int64)
    tr, va = holdout_split(y[:len(x_f)], None if groups is None else np.asarray(groups).astype(str), seed=seed)
    k = len(x_n) // 4  # normal windows have no episodes: hold out the newest quarter
    tr = np.r_[tr, len(x_f) + np.arange(len(x_n) - k)]
    va = np.r_[va, len(x_f) + np.arange(len(x_n) - k, len(x_n))]
    x_tr, y_tr, x_va, y_va = x[tr], y[tr], x[va], y[va]
    log.info("fault models: classes %s; %d train / %d held-out windows", classes, len(tr), len(va))

    gan = train_gan(x_tr, y_tr, C, steps=gan_steps, seed=seed, time_budget_s=0.5 * time_budget_s, progress=progress)
    if gan.cut_short:
        log.warning("GAN training cut by the time budget after %d of %d steps (not seed-reproducible)",
                    gan.steps, gan.steps_planned)
    metrics: dict[str, float] = {"gan_seconds": gan.seconds, "gan_steps": float(gan.steps),
                                 "train_windows": float(len(tr)), "heldout_windows": float(len(va))}
    rows: list[dict] = []
    shipped = "real"
    if len(va):
        metrics.update(gan_quality(gan.generator, x_tr, y_tr, x_va, y_va, seed, normal_id=normal_id))
        rows = compare(x_tr, y_tr, x_va, y_va, C, normal_id, gan.generator, seed=seed)
        shipped = best_option(rows)
        for r in rows:
            metrics[f"heldout_macro_f1_{r['model']}_{r['option']}"] = r["macro_f1"]
    else:
        log.warning("no held-out windows (a single window per class?): shipping the MLP on real data, ungraded")
    # Refit on every real window: the held-out part has done its job (choosing the option).
    xa, ya = augment(shipped, x, y, C, normal_id, gan.generator, seed)
    mlp = fit_mlp(xa, ya, C, seed, normal_id)

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    t_exp = time.perf_counter()
    pick = np.concatenate([np.flatnonzero(y == c)[-2:] for c in range(C)])  # two real windows per class
    models = {"generator": export_generator(gan.generator, out_dir, seed),
              "classifier": export_classifier(mlp, out_dir, x[pick])}
    metrics["export_seconds"] = time.perf_counter() - t_exp
    metrics["seconds"] = time.perf_counter() - t0
    result = FaultModels(models, classes, gan.generator.latent_dim, metrics, None, shipped, rows)
    if report_dir is not None:
        from trainer.fault_report import write_fit_report

        result.report_path = write_fit_report(Path(report_dir), result, gan, x_tr, y_tr, seed)
    log.info("fault models: shipped MLP trained on %s (held-out macro-F1 %.3f) in %.1fs", shipped,
             metrics.get(f"heldout_macro_f1_mlp_{shipped}", float("nan")), metrics["seconds"])
    return result
