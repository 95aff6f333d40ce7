"""``edge-trainer``: simulate, fit, score, evaluate.

Every user error ends as one line ``edge-trainer: error: ...`` on stderr: exit 2 for a bad
command line (argparse), 1 for bad data or a bad bundle. Never a traceback.
"""
from __future__ import annotations

import argparse
import contextlib
import csv
import json
import logging
import os
import sys
import warnings
from pathlib import Path

import numpy as np

from trainer.errors import InputError

PROG = "edge-trainer"
log = logging.getLogger("trainer")


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line, exit 2 (argparse prints usage first; we keep it to one line)
        self.exit(2, f"{PROG}: error: {message.splitlines()[0]} (see --help)\n")


def _fmt(description: str, examples: str) -> dict:
    return dict(description=description, epilog="examples:\n" + examples,
                formatter_class=argparse.RawDescriptionHelpFormatter)


def _csv_args(p: argparse.ArgumentParser, features: bool = True) -> None:
    g = p.add_argument_group("CSV format")
    g.add_argument("--delimiter", metavar="D", help="field delimiter (default: sniffed from the header: ',', ';' or tab; "
                   "'\\t' for tab)")
    g.add_argument("--time-col", metavar="C", help="time column, epoch s/ms or ISO 8601 (default: a column named "
                   "timestamp/time/datetime/date/ts; 'none' = no time column)")
    if features:
        g.add_argument("--features", metavar="a,b", help="sensor columns to use, in order (default: every numeric "
                       "column except time/label/fault)")
        g.add_argument("--exclude", metavar="x,y", help="columns to leave out of the default feature set")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog=PROG, **_fmt(
        "Train, export and evaluate edgewatch anomaly-detection bundles (VAE on sliding sensor windows).",
        "  edge-trainer simulate --out data --devices 4 --hours 1\n"
        "  edge-trainer fit --csv data/pump-01.train.csv --out bundles/pump\n"
        "  edge-trainer score --bundle bundles/pump --csv data/pump-01.csv --out scores.csv\n"
        "  edge-trainer evaluate --bundle bundles/pump --csv data/pump-01.csv --label-col label --report report/\n"))
    parser.add_argument("-q", "--quiet", action="store_true", help="no progress bar or info messages")
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("-q", "--quiet", action="store_true", default=argparse.SUPPRESS,
                        help="no progress bar or info messages")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    sub.required = True

    p = sub.add_parser("simulate", help="write labelled simulated factory data (one CSV per device)", parents=[common], **_fmt(
        "Simulate pumps, motors and compressors with developing faults (bearing wear, cavitation, "
        "overheating, imbalance, sensor drift, stuck sensor). One CSV per device with label and fault columns, "
        "plus <device>.train.csv with normal history and simulation.json.",
        "  edge-trainer simulate --out data\n  edge-trainer simulate --out data --devices 6 --hours 2 --seed 7\n"))
    try:
        from trainer import simulate as sim
    except ImportError:  # the simulator is optional for fit/score/evaluate
        sim = None
    if sim is not None:
        sim.add_arguments(p)

    p = sub.add_parser("fit", help="train a bundle on normal history", parents=[common], **_fmt(
        "Train the VAE on normal rows (all rows when there is no label column; rows labelled 1 are left out), "
        "calibrate the threshold on the held-out end of the normal history (labels are never used for it), "
        "export ONNX + TFLite (batches 1/8/64, and int8 variants) with golden vectors, and write a verified bundle.",
        "  edge-trainer fit --csv history.csv --out bundles/pump\n"
        "  edge-trainer fit --csv a.csv b.csv --out bundles/pump --exclude setpoint --label-col anomaly\n"
        "  edge-trainer fit --csv plant.csv --delimiter ';' --time-col datetime --features p1,p2,flow --out b\n"))
    p.add_argument("--csv", nargs="+", required=True, metavar="PATH", help="one or more CSVs of the same machine type")
    p.add_argument("--out", required=True, metavar="BUNDLE", help="bundle directory to write")
    _csv_args(p)
    p.add_argument("--label-col", metavar="L", help="0/1 column; rows with 1 are excluded from training and calibration")
    p.add_argument("--fault-col", metavar="F", help="fault type column (empty/'normal' = no fault): also train the "
                   "fault generator and classifier (needs >= 2 fault episodes and >= 5 windows per type); report in "
                   "BUNDLE/report/")
    m = p.add_argument_group("model and calibration")
    from trainer.fit import FitOptions  # one source of truth for the defaults

    d = {k: f.default for k, f in FitOptions.model_fields.items()}
    m.add_argument("--seed", type=int, default=d["seed"], help=f"random seed (default {d['seed']})")
    m.add_argument("--window", type=int, metavar="ROWS", help="rows per window (default: 8, shorter for short data)")
    m.add_argument("--stride", type=int, default=d["stride"], metavar="ROWS",
                   help=f"rows between scored windows (default {d['stride']})")
    m.add_argument("--epochs", type=int, default=d["epochs"], help=f"maximum epochs (default {d['epochs']}; early stopping)")
    m.add_argument("--latent", type=int, metavar="N", help="latent size (default: from window x features)")
    m.add_argument("--hidden", type=int, metavar="N", help="hidden width (default: from window x features)")
    m.add_argument("--linear-path", action="store_true", help="VAE with a linear encoder/decoder term beside its MLP "
                   "(default: without; better on bench.detection's linear-mixture sets, worse on the simulated machines)")
    m.add_argument("--time-budget", type=float, default=d["time_budget_s"], metavar="S",
                   help=f"training time limit in seconds (default {d['time_budget_s']:g})")
    m.add_argument("--tail", type=int, metavar="ROWS", help="score the error of the newest ROWS of each window "
                   "(default: the whole window)")
    m.add_argument("--ensemble", type=int, default=d["ensemble"], metavar="N",
                   help=f"VAEs trained from consecutive seeds, their reconstructions averaged in one exported graph "
                   f"(default {d['ensemble']})")
    m.add_argument("--score", choices=["mahal", "norm"], default=d["score_kind"], dest="score_kind",
                   help="window score: mahal = residuals whitened across channels (redundant sensors count once, "
                   "broken correlations count); norm = per-channel error / its typical value, averaged "
                   f"(default {d['score_kind']})")
    m.add_argument("--smoothing", type=int, default=d["smoothing"], metavar="N",
                   help=f"causal moving average over N scores (default {d['smoothing']})")
    m.add_argument("--quantile", type=float, default=d["quantile"],
                   help=f"calibration score quantile q (default {d['quantile']:g})")
    m.add_argument("--margin", type=float, default=d["margin"],
                   help=f"threshold = q + margin*(q - median) of calibration scores (default {d['margin']:g})")
    m.add_argument("--raise-after", type=int, default=d["raise_after"], metavar="N",
                   help=f"consecutive scores above the threshold before an alert (default {d['raise_after']})")
    m.add_argument("--clear-smoothing", type=int, default=d["clear_smoothing"], metavar="N",
                   help="an alert clears on the mean of the newest N scores (0 or >= --smoothing: on the smoothed "
                   f"score; default {d['clear_smoothing']})")
    m.add_argument("--no-refit", action="store_true", help="ship the model trained on the training rows only (default: "
                   "after calibration, train again on every normal row, the newest included, and ship that)")
    m.add_argument("--no-int8", action="store_true", help="skip the int8 TFLite variants")
    m.add_argument("--gan-steps", type=int, default=d["gan_steps"], metavar="N",
                   help=f"GAN training steps for the fault models, with --fault-col (default {d['gan_steps']})")
    m.add_argument("--name", help="bundle name (default: first CSV's file name)")
    m.add_argument("--version", help="bundle version (default: UTC time YYYY.MM.DD-HHMM)")

    p = sub.add_parser("score", help="score a CSV through the agent's scoring path", parents=[common], **_fmt(
        "Score every row the way the gateway does (same windows, scaling, backend, smoothing and alert state; "
        "causal: a row's decision uses only rows up to it). Writes timestamp,score,threshold,anomaly, "
        "one row per input row.",
        "  edge-trainer score --bundle bundles/pump --csv pump-01.csv --out scores.csv\n"
        "  edge-trainer score --bundle bundles/pump --csv pump-01.csv --backend litert > scores.csv\n"))
    p.add_argument("--bundle", required=True, metavar="BUNDLE")
    p.add_argument("--csv", required=True, metavar="PATH")
    p.add_argument("--out", metavar="FILE", help="output CSV (default: stdout)")
    p.add_argument("--backend", choices=["onnxruntime", "litert"], default="onnxruntime",
                   help="inference runtime (default onnxruntime)")
    p.add_argument("--contrib", action="store_true", help="add one column per sensor, contrib_<sensor>: its share "
                   "of the row's window error (what the alert's top_sensors ranks)")
    _csv_args(p, features=False)

    p = sub.add_parser("evaluate", help="detection metrics against labels", parents=[common], **_fmt(
        "Score a labelled CSV through the agent's scoring path and report precision, recall, F1, false-alarm rate "
        "FP/(FP+TN), missed-alarm rate, ROC-AUC, PR-AUC (on the score) and the mean detection delay (rows from "
        "each labelled span's start to the first alarm in it). Writes metrics.json into --report.",
        "  edge-trainer evaluate --bundle bundles/pump --csv pump-01.csv --label-col label\n"
        "  edge-trainer evaluate --bundle bundles/pump --csv pump-01.csv --label-col label --report out/\n"))
    p.add_argument("--bundle", required=True, metavar="BUNDLE")
    p.add_argument("--csv", required=True, metavar="PATH")
    p.add_argument("--label-col", required=True, metavar="L", help="0/1 label column")
    p.add_argument("--report", metavar="DIR", help="directory for metrics.json, scores.csv (per-row score, "
                   "threshold, alert state and label), report.html with score.png and pr.png")
    p.add_argument("--backend", choices=["onnxruntime", "litert"], default="onnxruntime")
    _csv_args(p, features=False)
    return parser


def _delimiter(text: str | None) -> str | None:
    if text is None:
        return None
    text = {"\\t": "\t", "tab": "\t", "TAB": "\t"}.get(text, text)
    if len(text) != 1:
        raise InputError(f"--delimiter must be one character, got {text!r}")
    return text


def _csv_options(a: argparse.Namespace, features: list[str] | None = None, label: str | None = None):
    from trainer.data import CsvOptions, split_names

    return CsvOptions(
        delimiter=_delimiter(a.delimiter), time_col=a.time_col,
        features=features if features is not None else split_names(getattr(a, "features", None)),
        exclude=split_names(getattr(a, "exclude", None)) or [],
        label_col=label if label is not None else getattr(a, "label_col", None),
        fault_col=getattr(a, "fault_col", None),
    )


def cmd_fit(a: argparse.Namespace) -> int:
    from pydantic import ValidationError

    from trainer.fit import FitOptions, fit

    try:
        opts = FitOptions(
            window=a.window, stride=a.stride, epochs=a.epochs, latent=a.latent, hidden=a.hidden, seed=a.seed,
            time_budget_s=a.time_budget, tail=a.tail, ensemble=a.ensemble, score_kind=a.score_kind,
            smoothing=a.smoothing,
            quantile=a.quantile, margin=a.margin,
            raise_after=a.raise_after, clear_smoothing=a.clear_smoothing or None,
            refit=not a.no_refit, linear_path=a.linear_path, int8=not a.no_int8, name=a.name, version=a.version,
            progress=not a.quiet,
            gan_steps=a.gan_steps,
        )
    except ValidationError as e:
        err = e.errors()[0]
        raise InputError(f"option {err['loc'][0]}: {err['msg']}") from None
    m = fit(a.csv, a.out, opts, _csv_options(a))
    t = m.training.metrics
    print(f"bundle {a.out}: {m.name} {m.version}, {len(m.features)} features, window {m.window}, "
          f"threshold {m.threshold.value:.4g}, calibration false-alarm rate {t['calibration_false_alarm_rate']:.4f}, "
          f"{m.training.seconds:.1f}s")
    if "classifier" in m.models:
        print(f"fault models: {len(m.classes)} classes ({', '.join(m.classes)}), generator + classifier, "
              f"report {Path(a.out) / 'report' / 'fault_report.md'}")
    return 0


def _score(a: argparse.Namespace, label: str | None = None):
    from agent.manifest import load_manifest
    from agent.scoring import open_scorer, score_rows
    from trainer.data import load_csv
    from trainer.export import silenced

    manifest = load_manifest(a.bundle)
    with silenced():  # LiteRT announces its XNNPACK delegate on stderr
        scorer = open_scorer(a.backend, a.bundle, manifest, threads=1)  # what the agent opens: same numbers
    table = load_csv(a.csv, _csv_options(a, features=list(manifest.features), label=label))
    res = score_rows(scorer, table.values)
    return manifest, table, res


def _write_scores(path: Path | None, table, res, thr: float, features: list[str] | None = None) -> None:
    """timestamp,score,threshold,anomaly (+ label when the table has one, + contrib_<sensor> shares when
    ``features`` is given); stdout when path is None."""
    out = open(path, "w", newline="") if path else contextlib.nullcontext(sys.stdout)
    try:
        with out as fh:
            w = csv.writer(fh, lineterminator="\n")
            w.writerow(["timestamp", "score", "threshold", "anomaly"] + (["label"] if table.label is not None else [])
                       + [f"contrib_{f}" for f in features or []])
            label = table.label if table.label is not None else [None] * table.rows
            if features:
                c = res["contrib"].astype(np.float64)
                share = c / np.where(c.sum(axis=1, keepdims=True) > 0, c.sum(axis=1, keepdims=True), 1.0)
            for i, (ts, s, an, y) in enumerate(zip(table.time_text, res["score"], res["anomaly"], label)):
                w.writerow([ts, f"{s:.6g}", f"{thr:.6g}", int(an)] + ([int(y)] if y is not None else [])
                           + ([f"{v:.4f}" for v in share[i]] if features else []))
    except BrokenPipeError:
        if path is not None:
            raise InputError(f"cannot write {path}: broken pipe") from None
        # `score ... | head`: the reader has all it wanted; stop quietly like other Unix tools.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    except OSError as e:
        raise InputError(f"cannot write {path}: {e.strerror or e}") from None


def cmd_score(a: argparse.Namespace) -> int:
    manifest, table, res = _score(a)
    _write_scores(Path(a.out) if a.out else None, table, res, manifest.threshold.value,
                  list(manifest.features) if a.contrib else None)
    if a.out:
        log.info("%d rows scored, %d anomalous -> %s", table.rows, int(res["anomaly"].sum()), a.out)
    return 0


def cmd_evaluate(a: argparse.Namespace) -> int:
    from trainer.metrics import summary

    manifest, table, res = _score(a, label=a.label_col)
    m = summary(table.label, res["score"], res["anomaly"], table.sample_period_s())
    m.update({"bundle": manifest.name, "version": manifest.version, "csv": str(a.csv),
              "threshold": manifest.threshold.value, "backend": a.backend})
    rows = [("rows", m["rows"]), ("anomalous rows", m["anomalous_rows"]), ("precision", m["precision"]),
            ("recall", m["recall"]), ("F1", m["f1"]), ("false-alarm rate", m["false_alarm_rate"]),
            ("missed-alarm rate", m["missed_alarm_rate"]), ("ROC-AUC", m["roc_auc"]), ("PR-AUC", m["pr_auc"]),
            ("events detected", f"{m['events_detected']}/{m['events']}"),
            ("mean detection delay (rows)", m["mean_detection_delay_rows"])]
    if "mean_detection_delay_s" in m:
        rows.append(("mean detection delay (s)", m["mean_detection_delay_s"]))
    for k, v in rows:
        print(f"{k:<30} {'n/a' if v is None else (f'{v:.4f}' if isinstance(v, float) else v)}")
    if a.report:
        d = Path(a.report)
        try:
            d.mkdir(parents=True, exist_ok=True)
            (d / "metrics.json").write_text(json.dumps(m, indent=2) + "\n")
            _write_scores(d / "scores.csv", table, res, manifest.threshold.value)
            from trainer.report import write_report

            page = write_report(d, m, table.label, res["score"], res["anomaly"], manifest.threshold.value,
                                f"{manifest.name} {manifest.version} on {Path(a.csv).name}")
        except OSError as e:
            raise InputError(f"cannot write report to {d}: {e.strerror or e}") from None
        print(f"metrics written to {d / 'metrics.json'} (per-row scores in {d / 'scores.csv'}, report {page})")
    return 0


def cmd_simulate(a: argparse.Namespace) -> int:
    try:
        from trainer import simulate as sim
    except ImportError as e:
        raise InputError(f"the simulator is not available ({e})") from None
    return int(sim.run(a) or 0)


COMMANDS = {"simulate": cmd_simulate, "fit": cmd_fit, "score": cmd_score, "evaluate": cmd_evaluate}


def _setup_logging(quiet: bool) -> None:
    h = logging.StreamHandler(sys.stderr)
    h.setFormatter(logging.Formatter(f"{PROG}: %(message)s"))
    log.handlers[:] = [h]
    log.setLevel(logging.WARNING if quiet else logging.INFO)
    log.propagate = False
    # Converters (torch.onnx, onnxscript, litert-torch, TF) chat on stderr; keep ours readable.
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    os.environ.setdefault("LITERT_TORCH_SHOW_PROGRESS", "n")
    warnings.filterwarnings("ignore")
    for name in ("torch", "onnxscript", "onnx_ir", "torchao", "litert_torch", "jax", "absl", "ai_edge_quantizer"):
        logging.getLogger(name).setLevel(logging.ERROR)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    _setup_logging(args.quiet)
    from agent.manifest import BundleError

    try:
        return COMMANDS[args.command](args)
    except (InputError, BundleError, OSError, ValueError) as e:
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        if isinstance(e, OSError) and getattr(e, "filename", None) and e.strerror:
            msg = f"{e.filename}: {e.strerror}"
        print(f"{PROG}: error: {msg}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"{PROG}: error: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
