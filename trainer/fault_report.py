"""Does generative augmentation help the fault classifier? The study, its plots and reports.

``python -m trainer.fault_report --out DIR`` simulates machines of one kind, each running twice
with all six fault types; it trains on the first runs and tests on the second (new episodes,
regimes and noise: no window of a test episode overlaps training), for several amounts of real
fault data per class, several seeds, every classifier x augmentation option. It writes
``report.md``, ``report.json`` and PNG plots, and prints its timings.
``write_fit_report`` writes the smaller report of one ``train_fault_models`` run.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

from trainer.fault_models import NORMAL, OPTIONS, best_option, compare, gan_quality

SIZES = (5, 20, 100)


# ---------------------------------------------------------------- plots (matplotlib, Agg)
def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_channels(path: Path, real, real_y, synth, synth_y, classes, features=None) -> Path:
    """Per class x channel: histogram of every value of real vs synthetic windows."""
    plt = _plt()
    C, F = len(classes), real.shape[2]
    fig, axes = plt.subplots(C, F, figsize=(1.6 * F + 1, 1.1 * C + 1), squeeze=False)
    for i, c in enumerate(classes):
        r, s = real[real_y == i], synth[synth_y == i]
        for j in range(F):
            ax = axes[i, j]
            if len(r) and len(s):
                lo = min(np.percentile(r[..., j], 1), np.percentile(s[..., j], 1))
                hi = max(np.percentile(r[..., j], 99), np.percentile(s[..., j], 99))
                bins = np.linspace(lo, hi + 1e-6, 30)
                ax.hist(r[..., j].ravel(), bins, density=True, alpha=0.5, color="tab:blue", label="real")
                ax.hist(s[..., j].ravel(), bins, density=True, alpha=0.5, color="tab:orange", label="synthetic")
            ax.set_xticks([])
            ax.set_yticks([])
            if i == 0:
                ax.set_title(features[j] if features else f"ch{j}", fontsize=7)
            if j == 0:
                ax.set_ylabel(c, fontsize=7, rotation=0, ha="right")
    axes[0, 0].legend(fontsize=6, loc="upper left")
    fig.suptitle("Scaled values per channel: real (blue) vs GAN (orange)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return path


def plot_f1(path: Path, table: list[dict], sizes) -> Path:
    """Macro-F1 on held-out real windows vs real windows per class: one panel per model."""
    plt = _plt()
    models = list(dict.fromkeys(r["model"] for r in table))
    fig, axes = plt.subplots(1, len(models), figsize=(3.2 * len(models), 3), sharey=True, squeeze=False)
    for ax, m in zip(axes[0], models):
        for o in OPTIONS:
            pts = [(r["size"], r["macro_f1"], r["macro_f1_std"]) for r in table if r["model"] == m and r["option"] == o]
            if pts:
                s, f, e = map(np.array, zip(*sorted(pts)))
                ax.errorbar(s, f, yerr=e, marker="o", capsize=3, label=o)
        ax.set_xscale("log")
        ax.set_xticks(list(sizes), [str(s) for s in sizes])
        ax.set_title(m)
        ax.set_xlabel("real fault windows per class")
        ax.grid(alpha=0.3)
    axes[0, 0].set_ylabel("macro-F1 (held-out real)")
    axes[0, -1].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


# ---------------------------------------------------------------- one fit's report
def write_fit_report(report_dir: Path, result, gan, x_tr, y_tr, seed: int = 0) -> Path:
    from trainer.gan import sample

    report_dir.mkdir(parents=True, exist_ok=True)
    synth_y = np.repeat(np.unique(y_tr), 50)
    plot_channels(report_dir / "fault_gan_channels.png", x_tr, y_tr, sample(gan.generator, synth_y, seed + 4000),
                  synth_y, result.classes)
    m = result.metrics
    lines = ["# Fault models", "", f"Classes: {', '.join(result.classes)}", "",
             f"GAN: {m['gan_steps']:.0f} steps in {m['gan_seconds']:.1f}s. "
             f"TSTR accuracy {m.get('tstr_accuracy', float('nan')):.3f} (TRTR {m.get('trtr_accuracy', float('nan')):.3f}), "
             f"discriminative score {m.get('discriminative_score', float('nan')):.3f} (0 = indistinguishable).", "",
             "| model | option | held-out macro-F1 |", "|---|---|---|"]
    lines += [f"| {r['model']} | {r['option']} | {r['macro_f1']:.3f} |" for r in result.comparison]
    lines += ["", f"Shipped: MLP trained on real + **{result.shipped_option}** windows (best MLP option on "
              "held-out real windows; refitted on all real windows). Only the MLP ships: it runs in ONNX and LiteRT.",
              "", "![channels](fault_gan_channels.png)", ""]
    path = report_dir / "fault_report.md"
    path.write_text("\n".join(lines))
    (report_dir / "fault_report.json").write_text(json.dumps(
        {"classes": result.classes, "shipped_option": result.shipped_option, "metrics": m,
         "comparison": result.comparison}, indent=2) + "\n")
    return path


# ---------------------------------------------------------------- simulated data
def simulated_windows(kind: str = "pump", machines: int = 4, test_machines: int = 0, rows: int = 7200,
                      window: int = 16, seed: int = 0) -> dict:
    """Fault and normal windows from simulated machines, every run with all six faults.

    Split: each of the first ``machines - test_machines`` machines runs twice, an earlier run
    for training and a later run (same machine, new episodes, regimes and noise) for testing --
    a fleet learning from its own past faults. ``test_machines`` > 0 adds machines seen only in
    testing (their runs join the test set), a harder question: generalising to a new machine.
    A fault window lies entirely inside one episode and ends in its last two thirds: early in a
    slowly developing fault the label says "fault" but the signals (and the VAE) do not yet.
    Scaling is the trainer's robust scaler fitted on the training runs' normal rows.
    """
    from agent.windowing import sliding_windows
    from trainer.fit import robust_scaler, scale_windows
    from trainer.simulate import FAULTS, random_faults, simulate_device

    runs = []  # (part, machine, device data)
    for m in range(machines):
        for r, part in enumerate(("train", "test") if m < machines - test_machines else ("test",)):
            faults = random_faults(rows, np.random.default_rng([seed, m, r]), n=len(FAULTS), types=FAULTS)
            run_seed = int(np.random.SeedSequence([seed, m, r]).generate_state(1)[0])
            d = simulate_device(f"{kind}-{m:02d}", kind, rows, 1.0, seed=run_seed, machine_seed=1000 * seed + m,
                                faults=faults)
            runs.append((part, m, d))
    centre, scale = robust_scaler(np.concatenate([d.values[d.label == 0] for p, _, d in runs if p == "train"]))
    parts = {"train": {"x": [], "y": [], "g": []}, "test": {"x": [], "y": [], "g": []}}
    for p, m, d in runs:
        wins = sliding_windows(d.values, window)
        normal_ok = np.convolve(d.label, np.ones(window), "full")[:len(d.label)] == 0
        normal_ok[:window] = False
        for e, f in enumerate(d.faults):
            ends = np.arange(max(f.start + window - 1, f.start + f.duration // 3), f.end)
            _add(parts[p], wins[ends], f.type, f"{p}:{m}:{e}")
        _add(parts[p], wins[np.flatnonzero(normal_ok)[::4]], NORMAL, f"{p}:{m}:n")
    out = {"features": runs[0][2].features, "classes": list(FAULTS) + [NORMAL], "centre": centre, "scale": scale}
    for k, p in parts.items():
        out[k] = (scale_windows(np.concatenate(p["x"]), centre, scale), np.array(p["y"]), np.array(p["g"]))
    return out


def _add(part: dict, x: np.ndarray, label: str, group: str) -> None:
    part["x"].append(x)
    part["y"] += [label] * len(x)
    part["g"] += [group] * len(x)


def _subsample(x, y, classes, n_fault, n_normal, rng, stride=1):
    idx = []
    for i, c in enumerate(classes):
        pool = np.flatnonzero(y == c)[::stride]
        k = n_normal if c == NORMAL else n_fault
        idx.append(rng.choice(pool, size=min(k, len(pool)), replace=False))
    idx = np.concatenate(idx)
    return x[idx], np.array([classes.index(c) for c in y[idx]])


# ---------------------------------------------------------------- the study
def _study_job(job: dict) -> dict:
    """One (size, seed): GAN, its quality, every classifier x option. Runs in a worker process."""
    from trainer.fault_models import single_threaded
    from trainer.gan import sample, train_gan

    with single_threaded():
        x_tr, y_tr, x_te, y_te, seed = job["x_tr"], job["y_tr"], job["x_te"], job["y_te"], job["seed"]
        gan = train_gan(x_tr, y_tr, job["n_classes"], steps=job["gan_steps"], seed=seed, progress=False)
        q = gan_quality(gan.generator, x_tr, y_tr, x_te, y_te, seed, normal_id=job["normal_id"])
        t = time.perf_counter()
        rows = compare(x_tr, y_tr, x_te, y_te, job["n_classes"], job["normal_id"], gan.generator, seed=seed,
                       mlp_seeds=job["mlp_seeds"])
        sy = np.repeat(np.arange(job["n_classes"]), 100)
        return {"size": job["size"], "seed": seed, "rows": rows, "synthetic": (sample(gan.generator, sy, 7), sy),
                "gan": {"size": job["size"], "seed": seed, "gan_seconds": gan.seconds, **q},
                "classifiers_s": time.perf_counter() - t}


def run_augmentation_study(out_dir: Path | None = None, sizes=SIZES, seeds=(0, 1), kind: str = "pump",
                           machines: int = 4, test_machines: int = 0, window: int = 16, n_normal: int = 200,
                           n_test: int = 100, gan_steps: int = 1500, mlp_seeds: int = 1, data: dict | None = None,
                           workers: int = 2, progress: bool = True) -> dict:
    """Macro-F1 on held-out real windows (later runs of the machines, see ``simulated_windows``)
    for every model x option x size, mean/std over seeds.

    Returns {"table": [{model, option, size, macro_f1, macro_f1_std, runs}], "gan": [...], "shipped": {size: option},
    "timings": {...}}; with ``out_dir`` also writes report.md, report.json and the plots. ``workers`` > 1 runs
    the (size, seed) jobs in that many single-threaded processes: the models are too small to use two
    threads well, two processes use two cores fully.
    """
    t0 = time.perf_counter()
    data = data or simulated_windows(kind, machines, test_machines, window=window, seed=0)
    classes = data["classes"]
    x_pool, y_pool, _ = data["train"]
    x_te, y_te = _subsample(*data["test"][:2], classes, n_test, 2 * n_test, np.random.default_rng(12345), stride=4)
    jobs = []
    for size in sizes:
        for seed in seeds:
            x_tr, y_tr = _subsample(x_pool, y_pool, classes, size, n_normal, np.random.default_rng([seed, size]))
            jobs.append({"size": size, "seed": seed, "x_tr": x_tr, "y_tr": y_tr, "x_te": x_te, "y_te": y_te,
                         "n_classes": len(classes), "normal_id": classes.index(NORMAL), "gan_steps": gan_steps,
                         "mlp_seeds": mlp_seeds})
    timings = {"data_s": time.perf_counter() - t0}
    results = []

    def done(r: dict) -> None:
        results.append(r)
        if progress:
            g = r["gan"]
            print(f"size {r['size']:>4} seed {r['seed']}: GAN {g['gan_seconds']:.0f}s, TSTR acc {g['tstr_accuracy']:.3f}, "
                  f"discriminative {g['discriminative_score']:.3f}, classifiers {r['classifiers_s']:.0f}s "
                  f"[{len(results)}/{len(jobs)}, {time.perf_counter() - t0:.0f}s]", flush=True)

    if workers > 1:
        import multiprocessing as mp
        from concurrent.futures import ProcessPoolExecutor, as_completed

        with ProcessPoolExecutor(workers, mp_context=mp.get_context("spawn")) as ex:
            for fut in as_completed([ex.submit(_study_job, j) for j in jobs]):
                done(fut.result())
    else:
        for j in jobs:
            done(_study_job(j))
    results.sort(key=lambda r: (r["size"], r["seed"]))
    runs = [{**row, "size": r["size"], "seed": r["seed"]} for r in results for row in r["rows"]]
    table = []
    for size in sizes:
        for r0 in [r for r in runs if r["size"] == size and r["seed"] == seeds[0]]:
            f = [r["macro_f1"] for r in runs
                 if r["size"] == size and r["model"] == r0["model"] and r["option"] == r0["option"]]
            table.append({"model": r0["model"], "option": r0["option"], "size": size, "macro_f1": float(np.mean(f)),
                          "macro_f1_std": float(np.std(f)), "runs": len(f)})
    shipped = {size: best_option([r for r in table if r["size"] == size]) for size in sizes}
    timings["gan_s_sum"] = sum(r["gan"]["gan_seconds"] for r in results)
    timings["classifiers_s_sum"] = sum(r["classifiers_s"] for r in results)
    timings["total_s"] = time.perf_counter() - t0
    result = {"kind": kind, "classes": classes, "features": data["features"], "sizes": list(sizes), "seeds": list(seeds),
              "test_windows": int(len(y_te)), "normal_train_windows": n_normal, "gan_steps": gan_steps,
              "table": table, "gan": [r["gan"] for r in results], "shipped": shipped, "timings": timings}
    if out_dir is not None:
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        plot_f1(out_dir / "macro_f1.png", table, sizes)
        # The GAN against the real windows it was trained on (largest size, first seed).
        job = next(j for j in jobs if j["size"] == max(sizes) and j["seed"] == seeds[0])
        big = next(r for r in results if r["size"] == max(sizes) and r["seed"] == seeds[0])
        plot_channels(out_dir / "gan_channels.png", job["x_tr"], job["y_tr"], *big["synthetic"], classes, data["features"])
        (out_dir / "report.json").write_text(json.dumps(result, indent=2) + "\n")
        (out_dir / "report.md").write_text(render_markdown(result))
    return result


def render_markdown(res: dict) -> str:
    sizes, models = res["sizes"], list(dict.fromkeys(r["model"] for r in res["table"]))
    cell = {(r["model"], r["option"], r["size"]): r for r in res["table"]}
    L = ["# Fault classifier: does augmentation help?", "",
         f"Simulated `{res['kind']}` machines, classes: {', '.join(res['classes'])}. "
         "Train on the first run of each machine, "
         f"test on {res['test_windows']} held-out REAL windows from later runs of the same machines (new episodes). "
         f"Every option is trained with "
         f"balanced class weights, so augmentation competes with re-weighting, not with an imbalanced baseline. "
         f"{res['normal_train_windows']} normal training windows throughout; seeds {res['seeds']}.", "",
         "## Macro-F1 on held-out real windows (mean ± std over seeds)", "",
         "| model | option | " + " | ".join(f"{s}/class" for s in sizes) + " |",
         "|---|---|" + "---|" * len(sizes)]
    for m in models:
        for o in OPTIONS:
            if (m, o, sizes[0]) in cell:
                L.append(f"| {m} | {o} | " + " | ".join(
                    f"{cell[m, o, s]['macro_f1']:.3f} ± {cell[m, o, s]['macro_f1_std']:.3f}" for s in sizes) + " |")
    L += ["", "![macro-F1](macro_f1.png)", "", "## GAN quality", "",
          "| size | seed | train s | TSTR acc | TRTR acc | discriminative score | real-vs-real reference |",
          "|---|---|---|---|---|---|---|"]
    L += [f"| {g['size']} | {g['seed']} | {g['gan_seconds']:.1f} | {g['tstr_accuracy']:.3f} | {g['trtr_accuracy']:.3f} | "
          f"{g['discriminative_score']:.3f} | {g['discriminative_score_real']:.3f} |" for g in res["gan"]]
    L += ["", "TSTR: gradient boosting trained on synthetic windows only, tested on real held-out windows; TRTR: the same "
          "trained on the real training windows. Discriminative score: |accuracy − 0.5| of a classifier telling real "
          "held-out windows from synthetic ones (0 = indistinguishable); the reference puts real training windows of the "
          "same classes in place of the synthetic ones (the train/test gap itself: later runs, other regimes).", "",
          "![channels](gan_channels.png)", "",
          "## What ships", ""]
    for s, o in res["shipped"].items():
        f = {o2: cell[("mlp", o2, int(s))]["macro_f1"] for o2 in OPTIONS if ("mlp", o2, int(s)) in cell}
        L.append(f"- {s} windows/class: MLP + **{o}** (" + ", ".join(f"{k} {v:.3f}" for k, v in f.items()) + ")")
    L += ["", "Only the MLP ships (it is the model that runs in both ONNX Runtime and LiteRT, features computed "
          "inside its graph). A fit picks its option the same way, on its own held-out windows — whatever wins there, "
          "not the option we hoped for.", "",
          f"Timings: {', '.join(f'{k} {v:.0f}s' for k, v in res['timings'].items())}.", ""]
    return "\n".join(L)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m trainer.fault_report", description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True, type=Path, help="report directory")
    p.add_argument("--kind", default="pump", choices=("pump", "motor", "compressor"))
    p.add_argument("--seeds", type=int, default=2, help="seeds per size (default 2)")
    p.add_argument("--sizes", default=",".join(map(str, SIZES)), help="real fault windows per class (default 5,20,100)")
    p.add_argument("--gan-steps", type=int, default=1500)
    p.add_argument("--workers", type=int, default=2, help="parallel processes (default 2)")
    p.add_argument("--quiet", action="store_true")
    a = p.parse_args(argv)
    res = run_augmentation_study(a.out, sizes=tuple(int(s) for s in a.sizes.split(",")), seeds=tuple(range(a.seeds)),
                                 kind=a.kind, gan_steps=a.gan_steps, workers=a.workers, progress=not a.quiet)
    print(f"wrote {a.out / 'report.md'} ({res['timings']['total_s']:.0f}s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
