"""Detector evaluation suite: the VAE (through fit's own prepare/train/calibrate and the agent's
score_rows) against PCA T^2/Q and Isolation Forest, on several scenario sets, plus ablations.

    python -m bench.detection [--quick] [--out bench/out] [--sets skab_like,nonlinear_8ch]

Protocol, identical for every detector: fit on the normal history only (no labels); the last
``calibration_fraction`` of it is held out and sets the threshold (same rule); scores are smoothed
causally and decided by the agent's AlertState with the same hysteresis; the labelled file is
scored row by row, causally. Metrics are point-wise and pooled over the files of a set.
Writes ``detection.md``, ``detection.json`` and ``detection.png``.
"""
from __future__ import annotations

import argparse
import json
import math
import tempfile
import time
from pathlib import Path

import numpy as np

from agent.alerts import AlertState
from agent.manifest import Manifest, ModelEntry, Scaler, ScoreSpec, Threshold, Training
from agent.scoring import Scorer, score_rows
from bench.baselines import BASELINES
from bench.scenarios import Case, scenario_sets
from trainer.fit import (FitOptions, _pot_threshold, _threshold_value, calibrate, decision_threshold, prepare,
                         train_detector)
from trainer.data import split_names
from trainer.metrics import confusion, detection_delays, rates
from trainer.vae import TorchBackend


def _write_csv(path: Path, features: list[str], x: np.ndarray, period_s: float) -> Path:
    t = np.arange(len(x)) * period_s + 1.7e9
    # Epoch seconds need their own format: at 6 significant digits every row read "1.7e+09".
    np.savetxt(path, np.column_stack([t, x]), delimiter=",", header=",".join(["ts", *features]), comments="",
               fmt=["%.3f"] + ["%.6g"] * x.shape[1])
    return path


class VaeRun:
    """One trained VAE for one case; decisions re-derived cheaply for decision-level ablations."""

    def __init__(self, case: Case, opts: FitOptions, tmp: Path):
        self.case, self.opts = case, opts
        path = _write_csv(tmp / f"{case.name}.csv", case.features, case.train, case.period_s)
        self.prep = prepare([path], opts)
        W = self.prep.window
        det = train_detector(self.prep, opts.model_copy(update={"threads": 1, "progress": False}))
        # Calibrated on the held-out model, scored with the shipped one, as fit does (the PyTorch models
        # behind the Backend protocol, so the bench skips export: same maths).
        self.backend, self.final = TorchBackend(det.held_out), TorchBackend(det.final)
        self.draft = Manifest(
            name=case.name, version="bench", trainer_version="bench", features=case.features, window=W,
            stride=opts.stride, scaler=Scaler(centre=[float(c) for c in self.prep.centre],
                                              scale=[float(s) for s in self.prep.scale]),
            score=ScoreSpec(kind="vae_recon_mse", tail=1), threshold=Threshold(value=1.0, method="draft"),
            models={"vae": ModelEntry(inputs=["x"], outputs=["y"], files={})},
            training=Training(data_sha256="-", rows=len(case.train), normal_rows=len(case.train), seconds=0.0))

    def decide(self, opts: FitOptions | None = None) -> dict:
        opts = opts or self.opts
        manifest, _ = calibrate(self.draft, self.backend, self.prep, opts)
        res = score_rows(Scorer(manifest, self.final if opts.refit else self.backend), self.case.test)
        return {"score": res["score"], "pred": res["anomaly"].astype(bool), "threshold": manifest.threshold.value,
                "contrib": res["contrib"]}


def _smooth(s: np.ndarray, n: int) -> np.ndarray:
    c = np.concatenate([[0.0], np.cumsum(s)])
    i = np.arange(len(s))
    lo = np.maximum(0, i + 1 - n)
    return (c[i + 1] - c[lo]) / (i + 1 - lo)


def _alert(scores: np.ndarray, thr: Threshold, clear_scores: np.ndarray | None = None) -> np.ndarray:
    st = AlertState(thr)
    out = np.empty(len(scores), bool)
    for i, v in enumerate(scores):
        st.update(float(v), None if clear_scores is None else float(clear_scores[i]))
        out[i] = st.active
    return out


def baseline_decide(kind: str, case: Case, opts: FitOptions) -> dict:
    """Same split, same threshold rule, same smoothing and alert state as the VAE."""
    n = len(case.train)
    cut = int(n * (1 - opts.calibration_fraction))
    model = BASELINES[kind]().fit(case.train[:cut].astype(np.float64))
    cal = _smooth(np.log1p(np.maximum(model.score(case.train.astype(np.float64)), 0) if kind == "pca_t2q"
                           else model.score(case.train.astype(np.float64))), opts.smoothing)[cut:]
    value = _pot_threshold(cal, opts.pot_risk) if opts.threshold_method == "pot" else \
        _threshold_value(cal, opts.quantile, opts.margin)
    thr = decision_threshold(value, "bench", opts)
    cs = thr.clear_smoothing
    raw = model.score(case.test.astype(np.float64))
    t = np.log1p(np.maximum(raw, 0)) if kind == "pca_t2q" else raw
    s = _smooth(t, opts.smoothing)
    return {"score": s, "pred": _alert(s, thr, None if cs is None else _smooth(t, cs)), "threshold": value}


def pooled(cases: list[Case], results: list[dict]) -> dict:
    y = np.concatenate([c.label for c in cases]).astype(bool)
    p = np.concatenate([r["pred"] for r in results])
    r = rates(confusion(y, p))
    delays = [d for c, res in zip(cases, results) for d in detection_delays(c.label, res["pred"])]
    hit = [d for d in delays if d is not None]
    return {"f1": r["f1"], "far": r["false_alarm_rate"], "mar": r["missed_alarm_rate"],
            "precision": r["precision"], "recall": r["recall"],
            "delay": float(np.mean(hit)) if hit else math.nan, "events": f"{len(hit)}/{len(delays)}"}


def bench_options(**kw) -> FitOptions:
    base = dict(progress=False, time_budget_s=20.0, int8=False)
    base.update(kw)
    return FitOptions(**base)


def run_suite(quick: bool = False, ablate: bool = True, sets: dict | None = None, log=print) -> dict:
    sets = sets or scenario_sets(quick)
    opts = bench_options()
    out: dict = {"sets": {}, "ablations": {}, "defaults": opts.model_dump(exclude={"progress", "name", "version"})}
    ablations = {
        "score=norm (diagonal)": dict(score_kind="norm"), "ensemble=1 (retrained)": dict(ensemble=1),
        "smoothing=3": dict(smoothing=3), "smoothing=10": dict(smoothing=10), "smoothing=20": dict(smoothing=20),
        "smoothing=40": dict(smoothing=40),
        "raise_after=2": dict(raise_after=2), "clear_after=3": dict(clear_after=3), "clear_after=30": dict(clear_after=30),
        "clear_ratio=0.7": dict(clear_ratio=0.7), "threshold=pot(1e-3)": dict(threshold_method="pot"),
        "margin=1": dict(margin=1.0), "margin=2": dict(margin=2.0), "quantile=0.999": dict(quantile=0.999),
        "clear_smoothing=off": dict(clear_smoothing=None), "refit=off": dict(refit=False),
        "smoothing=20, refit=off (previous defaults)": dict(smoothing=20, refit=False),
        "tail=window//4": dict(tail=-4), "window=4 (retrained)": dict(window=4),
        "linear_path=on (retrained)": dict(linear_path=True),
    } if ablate else {}
    abl_results: dict[str, dict[str, list]] = {k: {} for k in ablations}
    with tempfile.TemporaryDirectory() as tmp:
        for set_name, cases in sets.items():
            t0 = time.monotonic()
            runs = [VaeRun(c, opts, Path(tmp)) for c in cases]
            res = {"vae": [r.decide() for r in runs]}
            for b in BASELINES:
                res[b] = [baseline_decide(b, c, opts) for c in cases]
            out["sets"][set_name] = {k: pooled(cases, v) for k, v in res.items()}
            out["sets"][set_name]["files"] = len(cases)
            for name, kw in ablations.items():
                if kw.get("tail", 0) < 0:
                    kw = dict(tail=max(1, runs[0].prep.window // -kw["tail"]))
                o = opts.model_copy(update=kw)
                if {"window", "ensemble", "linear_path"} & kw.keys():  # needs its own model
                    abl_results[name][set_name] = pooled(cases, [VaeRun(c, o, Path(tmp)).decide() for c in cases])
                    continue
                abl_results[name][set_name] = pooled(cases, [r.decide(o) for r in runs])
            log(f"{set_name}: " + "  ".join(f"{k} F1 {v['f1']:.3f} FAR {v['far']:.3f}"
                                            for k, v in out["sets"][set_name].items() if isinstance(v, dict))
                + f"  ({time.monotonic() - t0:.0f}s)")
    out["ablations"] = abl_results
    return out


def _f(v) -> str:
    return "n/a" if v is None or (isinstance(v, float) and math.isnan(v)) else (f"{v:.3f}" if isinstance(v, float) else str(v))


def write_report(res: dict, out_dir: Path) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "detection.json").write_text(json.dumps(res, indent=2, default=float) + "\n")
    lines = ["# Detector evaluation (point-wise, pooled over files; no labels in training or calibration)", "",
             "| set | files | detector | F1 | FAR | MAR | precision | recall | mean delay (rows) | events |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for s, d in res["sets"].items():
        for k in ("vae", *BASELINES):
            m = d[k]
            lines.append(f"| {s} | {d['files']} | {k} | {_f(m['f1'])} | {_f(m['far'])} | {_f(m['mar'])} | "
                         f"{_f(m['precision'])} | {_f(m['recall'])} | {_f(m['delay'])} | {m['events']} |")
    lines += ["", "## VAE margin over the baselines (F1 difference)", "", "| set | vs PCA T2/Q | vs IForest |", "|---|---|---|"]
    for s, d in res["sets"].items():
        lines.append(f"| {s} | {d['vae']['f1'] - d['pca_t2q']['f1']:+.3f} | {d['vae']['f1'] - d['iforest']['f1']:+.3f} |")
    if res["ablations"]:
        sets = list(res["sets"])
        lines += ["", "## Ablations (VAE, one setting changed from the defaults; F1 / FAR)", "",
                  "| variant | " + " | ".join(sets) + " | mean F1 |", "|---|" + "---|" * (len(sets) + 1)]
        lines.append("| defaults | " + " | ".join(f"{_f(res['sets'][s]['vae']['f1'])} / {_f(res['sets'][s]['vae']['far'])}"
                                                 for s in sets)
                     + f" | {np.mean([res['sets'][s]['vae']['f1'] for s in sets]):.3f} |")
        for name, d in res["ablations"].items():
            lines.append(f"| {name} | " + " | ".join(f"{_f(d[s]['f1'])} / {_f(d[s]['far'])}" for s in sets)
                         + f" | {np.mean([d[s]['f1'] for s in sets]):.3f} |")
    lines += ["", "Notes: the VAE runs fit's own prepare/train/calibrate and the agent's score_rows; only ONNX/TFLite "
              "export is skipped (the PyTorch model sits behind the Backend protocol; parity tests prove the runtimes "
              "agree). Training budget here is 20 s per file (shared by the ensemble). Window and ensemble ablations retrain.",
              "", "Defaults: `" + json.dumps(res["defaults"]) + "`", ""]
    (out_dir / "detection.md").write_text("\n".join(lines))

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sets = list(res["sets"])
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    w = 0.27
    for i, k in enumerate(("vae", *BASELINES)):
        x = np.arange(len(sets)) + (i - 1) * w
        axes[0].bar(x, [res["sets"][s][k]["f1"] for s in sets], w, label=k)
        axes[1].bar(x, [res["sets"][s][k]["far"] for s in sets], w, label=k)
    for ax, t in zip(axes, ("F1 (higher is better)", "false-alarm rate (lower is better)")):
        ax.set_xticks(np.arange(len(sets)), sets, rotation=20, ha="right", fontsize=8)
        ax.set_title(t)
    axes[0].axhline(0.85, ls="--", c="k", lw=0.8)
    axes[1].axhline(0.10, ls="--", c="k", lw=0.8)
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out_dir / "detection.png", dpi=110)
    plt.close(fig)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.detection", description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="fewer, shorter files; no ablations")
    ap.add_argument("--no-ablations", action="store_true")
    ap.add_argument("--out", default="bench/out", help="output directory (default bench/out)")
    ap.add_argument("--sets", metavar="a,b", help="run only these scenario sets (default: all)")
    a = ap.parse_args(argv)
    sets = scenario_sets(a.quick)
    if a.sets:
        names = split_names(a.sets)
        unknown = [n for n in names if n not in sets]
        if unknown:
            ap.error(f"unknown set(s) {', '.join(unknown)}; known: {', '.join(sets)}")
        sets = {n: sets[n] for n in names}
    import logging

    logging.getLogger("trainer").setLevel(logging.WARNING)
    res = run_suite(quick=a.quick, ablate=not (a.quick or a.no_ablations), sets=sets)
    write_report(res, Path(a.out))
    print((Path(a.out) / "detection.md").read_text())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
