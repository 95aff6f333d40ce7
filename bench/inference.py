"""Inference inside the agent vs the bare runtime, onnxruntime vs LiteRT, float32 vs int8; and a
cProfile of the hot path. In-process, no broker: these are per-window CPU costs."""
from __future__ import annotations

import cProfile
import io
import logging
import pstats
import time
from pathlib import Path

import numpy as np

from agent.backends import available
from agent.config import load_config
from agent.manifest import load_manifest
from agent.metrics import Metrics
from agent.pipeline import Pipeline
from agent.scoring import Scorer, open_scorer, score_rows
from agent.windowing import ffill, sliding_windows


def _best(fn, repeat: int, number: int) -> float:
    """Seconds per call: the median of ``repeat`` timings of ``number`` calls."""
    fn()
    runs = []
    for _ in range(repeat):
        t = time.perf_counter()
        for _ in range(number):
            fn()
        runs.append((time.perf_counter() - t) / number)
    return float(np.median(runs))


def _windows(m, rows: np.ndarray, n: int) -> np.ndarray:
    filled = ffill(rows, np.asarray(m.scaler.centre, np.float32))
    return np.ascontiguousarray(sliding_windows(filled, m.window)[-n:])


def _bare_call(backend):
    """The runtime's own call on one batch, without the agent's wrapper (the fused scorer graph
    takes raw windows, the VAE scaled ones)."""
    if backend.name == "onnxruntime":
        sess, name = backend._sess, backend._inputs[0]
        return lambda xs: sess.run(None, {name: xs})
    fixed = backend._by_batch[-1]  # the largest fixed batch: the agent's 64-window batches land here
    it, din, dout = fixed.it, fixed.inputs[0]["index"], fixed.outputs[0]["index"]

    def call(xs):
        it.set_tensor(din, xs)
        it.invoke()
        return it.get_tensor(dout)
    return call


def per_window_costs(bundle: Path, streams, batch: int = 64, quick: bool = True) -> dict:
    """Scorer.score against the bare runtime call of the graph it runs, per variant; the bundle's
    fused scorer graph (agent default) and the numpy score around the VAE graph, interleaved."""
    m = load_manifest(bundle)
    wins = _windows(m, streams.values[0], batch)
    rep, num = (5, 40) if quick else (7, 200)
    out: dict = {"batch": batch, "variants": {}}
    variants = [("onnxruntime", "float32")]
    if "litert" in available():
        variants.append(("litert", "float32"))
        q = [f for f in m.models["vae"].files.get("tflite", []) if f.quantization == "dynamic_int8"]
        if q:
            variants.append(("litert", "dynamic_int8"))
        else:
            out["int8_note"] = "the bundle has no dynamic_int8 TFLite files"
    for name, quant in variants:
        sc = open_scorer(name, bundle, m, quantization=quant)  # what the agent runs
        numpy_sc = Scorer(m, sc.backend)  # the VAE graph with the score in numpy
        xs = np.ascontiguousarray(numpy_sc.scale(wins))
        bare = _bare_call(sc.head) if sc.head is not None else _bare_call(sc.backend)
        bare_in = wins if sc.head is not None else xs
        bare_vae = _bare_call(sc.backend)
        t = {"bare": [], "score": [], "bare_vae": [], "numpy": []}
        for _ in range(3):  # interleaved: drift hits every contender alike
            t["bare"].append(_best(lambda: bare(bare_in), rep, num))
            t["score"].append(_best(lambda: sc.score(wins), rep, num))
            t["bare_vae"].append(_best(lambda: bare_vae(xs), rep, num))
            t["numpy"].append(_best(lambda: numpy_sc.score(wins), rep, num))
        t = {k: float(np.median(v)) for k, v in t.items()}
        out["variants"][f"{name}/{quant}"] = {
            "graph": "fused scorer" if sc.head is not None else "vae + numpy score",
            "bare_us_per_window": 1e6 * t["bare"] / batch, "scorer_us_per_window": 1e6 * t["score"] / batch,
            "scorer_over_bare": t["score"] / t["bare"],
            "numpy_path_us_per_window": 1e6 * t["numpy"] / batch, "bare_vae_us_per_window": 1e6 * t["bare_vae"] / batch,
            "numpy_path_over_bare_vae": t["numpy"] / t["bare_vae"],
        }
    out["flush"] = flush_cost(bundle, streams, batch, quick)
    ort = out["variants"]["onnxruntime/float32"]
    out["flush"]["flush_over_bare"] = out["flush"]["flush_us_per_window"] / ort["bare_us_per_window"]
    return out


def flush_cost(bundle: Path, streams, batch: int, quick: bool) -> dict:
    """Pipeline.flush per window (scale, infer, score, decide, metrics) on full batches of distinct devices."""
    from bench.workload import messages
    logging.disable(logging.WARNING)
    try:
        m = load_manifest(bundle)
        cfg = load_config(agent_id="bench", bundle=str(bundle), batching={"max_batch": batch, "max_latency_ms": 1e4})
        p = Pipeline(cfg, open_scorer("onnxruntime", bundle, m), Metrics(), lambda *a: None)
        msgs = messages(streams, batch, 60 if quick else 200)  # one row of each of `batch` devices, row after row
        t_flush, windows = 0.0, 0
        for i in range(0, len(msgs), batch):
            # batch-1 windows (the batch-th would make handle() flush by itself): time just the flush
            for topic, body, _, ts in msgs[i:i + batch - 1]:
                p.handle(topic, body, ts)
            windows += p._n
            t = time.perf_counter()
            p.flush()
            t_flush += time.perf_counter() - t
            topic, body, _, ts = msgs[i + batch - 1]
            p.handle(topic, body, ts)
            p.flush()
        return {"flush_us_per_window": 1e6 * t_flush / windows}
    finally:
        logging.disable(logging.NOTSET)


def quantisation_quality(bundle: Path, streams) -> dict:
    """Score every stream with LiteRT float32 and int8: score error, decision agreement, F1 vs labels."""
    m = load_manifest(bundle)
    q = [f for f in m.models["vae"].files.get("tflite", []) if f.quantization == "dynamic_int8"]
    if "litert" not in available():
        return {"note": "LiteRT is not installed"}
    if not q:
        return {"note": "the bundle has no dynamic_int8 TFLite files"}
    ref = open_scorer("onnxruntime", bundle, m)
    f32 = open_scorer("litert", bundle, m)
    i8 = open_scorer("litert", bundle, m, quantization="dynamic_int8")
    thr = m.threshold.value
    out = {}
    for label, sc in (("litert/float32", f32), ("litert/dynamic_int8", i8)):
        err, agree, tp, fp, fn, n = [], 0, 0, 0, 0, 0
        for rows, lab in zip(streams.values, streams.labels):
            a, b = score_rows(ref, rows), score_rows(sc, rows)
            err.append(np.abs(a["score"] - b["score"]))
            agree += int((a["anomaly"] == b["anomaly"]).sum())
            n += len(lab)
            pred = b["anomaly"].astype(bool)
            tp += int((pred & (lab > 0)).sum())
            fp += int((pred & (lab == 0)).sum())
            fn += int((~pred & (lab > 0)).sum())
        e = np.concatenate(err)
        out[label] = {"score_abs_err_max": float(e.max()), "score_abs_err_mean": float(e.mean()),
                      "score_err_over_threshold_max": float(e.max() / thr),
                      "decision_agreement_vs_onnx": agree / n, "f1": 2 * tp / max(1, 2 * tp + fp + fn),
                      "precision": tp / max(1, tp + fp), "recall": tp / max(1, tp + fn)}
    tp = fp = fn = 0
    for rows, lab in zip(streams.values, streams.labels):
        pred = score_rows(ref, rows)["anomaly"].astype(bool)
        tp += int((pred & (lab > 0)).sum())
        fp += int((pred & (lab == 0)).sum())
        fn += int((~pred & (lab > 0)).sum())
    out["onnxruntime/float32"] = {"f1": 2 * tp / max(1, 2 * tp + fp + fn), "precision": tp / max(1, tp + fp),
                                  "recall": tp / max(1, tp + fn)}
    return out


def profile_pipeline(bundle: Path, streams, n_devices: int = 100, rows: int = 200, top: int = 14) -> dict:
    """cProfile of Pipeline.handle/flush over a backlog (no broker): where the pipeline thread's time goes."""
    from bench.workload import messages
    logging.disable(logging.WARNING)
    try:
        m = load_manifest(bundle)
        cfg = load_config(agent_id="bench", bundle=str(bundle))
        mk = lambda: Pipeline(cfg, open_scorer("onnxruntime", bundle, m), Metrics(), lambda *a: None)  # noqa: E731
        msgs = messages(streams, n_devices, rows)
        p = mk()
        t = time.perf_counter()
        for topic, body, _, ts in msgs:
            p.handle(topic, body, ts)
        p.flush()
        plain = (time.perf_counter() - t) / len(msgs)
        p = mk()
        prof = cProfile.Profile()
        prof.enable()
        for topic, body, _, ts in msgs:
            p.handle(topic, body, ts)
        p.flush()
        prof.disable()
    finally:
        logging.disable(logging.NOTSET)
    st = pstats.Stats(prof, stream=io.StringIO())
    total = sum(v[2] for v in st.stats.values())
    rows_out = []
    for (fname, line, func), (cc, nc, tt, ct, callers) in sorted(st.stats.items(), key=lambda kv: -kv[1][2])[:top]:
        short = fname.split("site-packages/")[-1].split("/work/main/")[-1].split("lib/python3")[-1]
        rows_out.append({"function": f"{short}:{line}({func})", "tottime_share": tt / total, "calls": nc})
    return {"us_per_message": plain * 1e6, "top": rows_out}
