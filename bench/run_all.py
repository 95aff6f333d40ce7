"""``python -m bench.run_all [--quick] [--soak-minutes M]``: the gateway benchmarks, side by side.

Every figure is a ratio or a comparison made in the same run (machines are noisy): the agent
against a bare paho subscriber draining the same backlog from the same private mosquitto,
in-agent inference against the bare runtime call on the same batch, and so on. Prints a table
and writes ``bench/out/results.json`` and ``bench/out/bench.png``. See bench/README.md.
"""
from __future__ import annotations

import argparse
import json
import platform
import shutil
import statistics
import sys
import time
from pathlib import Path

OUT = Path(__file__).resolve().parent / "out"


def log(msg: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def throughput(broker, bundle, streams, work, quick: bool) -> dict:
    from bench import drain
    from bench.workload import messages

    n_dev = 100 if quick else 1000
    rows = 200 if quick else 100
    reps = 2 if quick else 3
    msgs = messages(streams, n_dev, rows)
    # bare_buffered: the bare subscriber reading through the agent's buffered socket, for context
    # (the targets compare the agent with plain paho).
    contenders = [("bare", "5"), ("agent", "5"), ("bare_buffered", "5"), ("bare", "3.1.1"), ("bare_json", "3.1.1"),
                  ("agent", "3.1.1")]
    runs: dict[str, list[dict]] = {f"{m}/{p}": [] for m, p in contenders}
    for rep in range(reps):
        for name, proto in contenders:
            mode, buffered = name.removesuffix("_buffered"), name.endswith("_buffered")
            tag = f"{rep}-{proto.replace('.', '')}"
            cfg = cid = None
            if mode == "agent":
                aid = f"drain-{tag}"
                cfg = drain.agent_config(work / f"{aid}.yaml", broker, bundle, aid, work / f"state-{aid}", protocol=proto)
                cid = f"edgewatch-{aid}"
            r = drain.drain_once(broker, mode, msgs, work, f"{tag}{'b' if buffered else ''}", cfg, cid, protocol=proto,
                                 buffered=buffered)
            runs[f"{name}/{proto}"].append(r)
            log(f"drain {name:13s} MQTT {proto:5s}: {r['rate']:8.0f} msg/s, {r['cpu_us_per_msg']:5.1f} us CPU/msg")
    out = {"messages": len(msgs), "devices": n_dev, "repeats": reps, "contenders": {}}
    for k, rs in runs.items():
        out["contenders"][k] = {
            "rate_median": statistics.median(r["rate"] for r in rs), "rates": [r["rate"] for r in rs],
            "cpu_us_per_msg": statistics.median(r["cpu_us_per_msg"] for r in rs),
            "broker_cpu_us_per_msg": statistics.median(1e6 * r["broker_cpu_s"] / len(msgs) for r in rs),
            "dropped": max(r.get("dropped", 0) for r in rs), "scored_min": min(r.get("scored", len(msgs)) for r in rs),
        }
    c = out["contenders"]
    # Ratio per repeat (each pair ran back to back), then the median: drift hits both alike.
    out["ratio_agent_v5_over_bare_v5"] = statistics.median(
        a["rate"] / b["rate"] for a, b in zip(runs["agent/5"], runs["bare/5"]))
    out["ratio_agent_311_over_bare_311"] = statistics.median(
        a["rate"] / b["rate"] for a, b in zip(runs["agent/3.1.1"], runs["bare/3.1.1"]))
    out["ratio_agent_v5_over_bare_311"] = c["agent/5"]["rate_median"] / c["bare/3.1.1"]["rate_median"]
    # CPU per message decides capacity once the gateway is saturated; it is also less sensitive
    # than wall-clock rates to other load on the machine.
    out["cpu_ratio_bare_v5_over_agent_v5"] = c["bare/5"]["cpu_us_per_msg"] / c["agent/5"]["cpu_us_per_msg"]
    out["cpu_ratio_bare_311_over_agent_311"] = c["bare/3.1.1"]["cpu_us_per_msg"] / c["agent/3.1.1"]["cpu_us_per_msg"]
    return out


def scale_out(broker, bundle, streams, work, quick: bool) -> dict:
    from bench import drain

    n_dev, rows = (200, 100) if quick else (1000, 100)
    res = []
    for n in (1, 2, 4):
        r = drain.scale_out_once(broker, bundle, streams, n, n_dev, rows, work, f"s{n}")
        log(f"scale-out {n} agent(s): {r['rate']:8.0f} msg/s aggregate, per agent {r['per_agent']}")
        res.append(r)
    for r in res:
        r["speedup"] = r["rate"] / res[0]["rate"]
    return {"devices": n_dev, "messages": res[0]["messages"], "runs": res}


def steady_runs(broker, bundle, streams, work, quick: bool, soak_minutes: float, capacity: float) -> dict:
    from agent.backends import available
    from bench import steady

    base = streams.values[0]
    out: dict = {}
    rate = 0.5 * capacity
    log(f"latency: 1000 devices at {rate:.0f} msg/s (50 % of the measured agent drain rate)")
    for key, share in (("latency", 0.02), ("latency_storm", 0.2)):
        # 2 % of the devices go in and out of a fault (a few alerts a second); then an alert storm (20 %).
        out[key] = steady.run_steady(broker, bundle, work, streams.features, base, n_devices=1000, rate=rate,
                                     seconds=(15 if quick else 60) if key == "latency" else (10 if quick else 30),
                                     warmup_s=5, faulty_share=share, tag=key)
        lat = out[key]["alert_latency_ms"]
        log(f"{key}: {out[key]['alerts']} alerts, p50 {lat['p50']:.1f} ms, p99 {lat['p99']:.1f} ms")
    backends = ["onnxruntime"] + (["litert"] if "litert" in available() else [])
    out["memory"] = []
    for be in backends:
        for n in (10, 1000):
            soak = soak_minutes * 60 if n == 1000 else (10 if quick else 30)  # both backends soak
            r = steady.run_steady(broker, bundle, work, streams.features, base, backend=be, n_devices=n, rate=n * 1.0,
                                  seconds=soak, warmup_s=5, faulty_share=0.1, tag=f"mem-{be}-{n}")
            r.pop("latency_samples_ms", None)
            log(f"memory {be:11s} {n:5d} devices @1 msg/s: ready in {r['startup_s']:.2f} s, RSS "
                f"{r.get('rss_steady_mb', float('nan')):.1f} MB, slope {r.get('rss_slope_mb_per_min', float('nan')):+.2f} "
                f"MB/min over {soak:.0f} s, {r['cpu_us_per_msg']:.0f} us CPU/msg")
            out["memory"].append(r)
    return out


def table(res: dict) -> list[tuple[str, str, str, str]]:
    """(figure, measured, target, verdict) rows."""
    rows = []

    def ok(b):
        return "PASS" if b else "FAIL"
    t = res.get("throughput")
    if t:
        c = t["contenders"]
        for k in ("bare/3.1.1", "bare_json/3.1.1", "bare/5", "bare_buffered/5", "agent/5", "agent/3.1.1"):
            if k not in c:
                continue
            rows.append((f"drain rate {k}", f"{c[k]['rate_median']:,.0f} msg/s ({c[k]['cpu_us_per_msg']:.0f} us CPU/msg)", "", ""))
        r = t["ratio_agent_v5_over_bare_v5"]
        rows.append(("agent / bare, MQTT 5 (agent default)", f"{r:.2f}x", ">= 0.8x", ok(r >= 0.8)))
        r = t["ratio_agent_311_over_bare_311"]
        rows.append(("agent / bare, MQTT 3.1.1", f"{r:.2f}x", ">= 0.8x", ok(r >= 0.8)))
        rows.append(("bare / agent CPU per message, MQTT 5 / 3.1.1",
                     f"{t['cpu_ratio_bare_v5_over_agent_v5']:.2f}x / {t['cpu_ratio_bare_311_over_agent_311']:.2f}x", "", ""))
        rows.append(("messages dropped by the agent in a drain", f"{max(c[k]['dropped'] for k in c if k.startswith('agent')):.0f}", "0",
                     ok(max(c[k]['dropped'] for k in c if k.startswith('agent')) == 0)))
    s = res.get("steady")
    if s:
        L = s["latency"]
        rows.append((f"publish-to-alert p50 / p99 @{L['rate_achieved']:.0f} msg/s (50% capacity)",
                     f"{L['alert_latency_ms']['p50']:.1f} / {L['alert_latency_ms']['p99']:.1f} ms ({L['alerts']} alerts)",
                     "p99 < 20 ms", ok(L["alert_latency_ms"]["p99"] < 20)))
        A = L.get("alert_latency_all_ms")
        if A:
            rows.append(("  same, warm-up included (1,000 devices arriving)",
                         f"{A['p50']:.1f} / {A['p99']:.1f} ms ({A['alerts']} alerts)", "", ""))
        S = s.get("latency_storm")
        if S:
            rows.append((f"  same, alert storm (20% of devices faulting)",
                         f"{S['alert_latency_ms']['p50']:.1f} / {S['alert_latency_ms']['p99']:.1f} ms ({S['alerts'] / S['seconds']:.0f} alerts/s)",
                         "p99 < 20 ms", ok(S["alert_latency_ms"]["p99"] < 20)))
        sl = L["scored_latency"]
        rows.append(("receive-to-decision p50 / p99 (agent histogram, bucket bound)",
                     f"<= {sl['p50_le'] * 1e3:g} / <= {sl['p99_le'] * 1e3:g} ms", "", ""))
        for m in s["memory"]:
            rss, slope = m.get("rss_steady_mb", float("nan")), m.get("rss_slope_mb_per_min", float("nan"))
            grow = m.get("rss_growth_mb", float("nan"))
            rows.append((f"RSS {m['backend']} {m['devices']} devices, {m['seconds']:.0f} s",
                         f"{rss:.1f} MB, max {m.get('rss_max_mb', float('nan')):.1f}; last third vs first third {grow:+.1f} MB",
                         "< 150 MB, no growth", ok(m.get("rss_max_mb", 1e9) < 150 and grow < 2.0)))
        for m in s["memory"]:
            if m["devices"] == 1000 and m["alerts"]:
                a = m["alert_latency_ms"]
                rows.append((f"publish-to-alert p50 / p99, {m['backend']}, 1000 sensors @1 msg/s, {m['seconds']:.0f} s",
                             f"{a['p50']:.1f} / {a['p99']:.1f} ms ({m['alerts']} alerts)", "p99 < 20 ms", ok(a["p99"] < 20)))
        st = [m["startup_s"] for m in s["memory"]] + [L["startup_s"]]
        rows.append(("startup to READY (readyz 200), median", f"{statistics.median(st):.2f} s (n={len(st)})", "", ""))
        for m in s["memory"]:
            if m["devices"] == 1000 and m["backend"] == "onnxruntime":
                rows.append(("agent CPU per message @1000 msg/s", f"{m['cpu_us_per_msg']:.0f} us ({100 * m['cpu_share']:.1f} % of a core)", "", ""))
    i = res.get("inference")
    if i:
        for k, v in i["variants"].items():
            rows.append((f"inference {k}: Scorer.score vs bare runtime ({v.get('graph', 'vae + numpy score')})",
                         f"{v['scorer_us_per_window']:.2f} vs {v['bare_us_per_window']:.2f} us/window = {v['scorer_over_bare']:.2f}x",
                         "<= 1.5x", ok(v["scorer_over_bare"] <= 1.5)))
            if "numpy_path_us_per_window" in v:
                rows.append((f"  same, numpy score around the bare VAE graph",
                             f"{v['numpy_path_us_per_window']:.2f} vs {v['bare_vae_us_per_window']:.2f} us/window = "
                             f"{v['numpy_path_over_bare_vae']:.2f}x", "", ""))
        f = i["flush"]
        rows.append(("Pipeline.flush (score+decide+metrics) vs bare ORT", f"{f['flush_us_per_window']:.2f} us/window = {f['flush_over_bare']:.1f}x", "", ""))
        if "int8_note" in i:
            rows.append(("int8 variant", i["int8_note"], "", ""))
    q = res.get("quantisation")
    if q and "note" not in q:
        for k in ("litert/float32", "litert/dynamic_int8"):
            v = q[k]
            rows.append((f"{k} vs onnxruntime: score error", f"max {v['score_abs_err_max']:.3g} ({100 * v['score_err_over_threshold_max']:.2f} % of threshold), decisions agree {100 * v['decision_agreement_vs_onnx']:.2f} %", "", ""))
            rows.append((f"{k}: row F1 (float ORT {q['onnxruntime/float32']['f1']:.3f})", f"{v['f1']:.3f}", "", ""))
    so = res.get("scale_out")
    if so:
        for r in so["runs"]:
            rows.append((f"scale-out {r['agents']} agent process(es)", f"{r['rate']:,.0f} msg/s ({r['speedup']:.2f}x)", "", ""))
    p = res.get("profile")
    if p:
        rows.append(("pipeline thread alone (no broker)", f"{p['us_per_message']:.1f} us/message", "", ""))
    return rows


def plot(res: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(2, 2, figsize=(13, 9))
    t = res.get("throughput")
    if t:
        c = t["contenders"]
        keys = list(c)
        a = ax[0, 0]
        a.bar(range(len(keys)), [c[k]["rate_median"] for k in keys],
              color=["#888" if k.startswith("bare") else "#2a7" for k in keys])
        for j, k in enumerate(keys):
            a.scatter([j] * len(c[k]["rates"]), c[k]["rates"], color="k", s=8, zorder=3)
        a.set_xticks(range(len(keys)), [k.replace("/", "\nMQTT ") for k in keys], fontsize=8)
        a.set_ylabel("msg/s")
        a.set_title(f"Drain of a {t['messages']:,}-message QoS 1 backlog ({t['devices']} devices)")
    so = res.get("scale_out")
    if so:
        a = ax[0, 1]
        n = [r["agents"] for r in so["runs"]]
        a.plot(n, [r["rate"] for r in so["runs"]], "o-", color="#2a7")
        a.set_xticks(n)
        a.set_xlabel("agent processes (partitions)")
        a.set_ylabel("msg/s, all agents")
        a.set_title(f"Scale-out on {platform.machine()} with 2 cores")
        a.set_ylim(bottom=0)
    s = res.get("steady")
    if s:
        a = ax[1, 0]
        lat = sorted(s["latency"].get("latency_samples_ms", []))
        if lat:
            a.plot(lat, [(j + 1) / len(lat) for j in range(len(lat))], color="#2a7")
            a.axvline(20, color="r", ls="--", lw=1, label="target p99 20 ms")
            a.set_xscale("log")
            a.legend()
        a.set_xlabel("publish-to-alert latency, ms")
        a.set_ylabel("fraction of alerts")
        a.set_title(f"Latency at {s['latency']['rate_achieved']:.0f} msg/s (50 % of capacity)")
        a = ax[1, 1]
        for m in s["memory"]:
            ts = [p[0] for p in m["rss_mb"]]
            a.plot(ts, [p[1] for p in m["rss_mb"]], label=f"{m['backend']} {m['devices']} dev")
        a.axhline(150, color="r", ls="--", lw=1, label="target 150 MB")
        a.set_xlabel("seconds since the load started (agent READY)")
        a.set_ylabel("agent RSS, MB")
        a.set_title("Memory (agent process)")
        a.legend(fontsize=8)
        a.set_ylim(0, 170)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.run_all", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="a few minutes: fewer messages, repeats and a short soak")
    p.add_argument("--soak-minutes", type=float, default=None, help="memory soak (default 0.5 with --quick, else 10)")
    p.add_argument("--out", type=Path, default=OUT, help=f"output directory (default {OUT})")
    p.add_argument("--only", default="", help="comma list of sections: throughput,scale_out,steady,inference,profile")
    args = p.parse_args(argv)
    soak = args.soak_minutes if args.soak_minutes is not None else (0.5 if args.quick else 10.0)
    only = set(filter(None, args.only.split(",")))
    want = lambda s: not only or s in only  # noqa: E731

    from bench import inference
    from bench.broker import Mosquitto
    from bench.workload import ensure_bundle, make_streams

    out = args.out
    out.mkdir(parents=True, exist_ok=True)
    work = out / "work"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir()
    t_start = time.time()
    bundle = ensure_bundle(out, log)
    streams = make_streams()
    res: dict = {"mode": "quick" if args.quick else "full", "soak_minutes": soak, "python": sys.version.split()[0],
                 "machine": f"{platform.machine()} {platform.processor() or ''}".strip(), "cpus": __import__("os").cpu_count(),
                 "started": time.strftime("%Y-%m-%dT%H:%M:%S"), "loadavg_start": __import__("os").getloadavg()}
    with Mosquitto(work / "broker") as broker:
        if want("throughput"):
            res["throughput"] = throughput(broker, bundle, streams, work, args.quick)
        if want("scale_out"):
            res["scale_out"] = scale_out(broker, bundle, streams, work, args.quick)
        if want("steady"):
            cap = res.get("throughput", {}).get("contenders", {}).get("agent/5", {}).get("rate_median", 10_000.0)
            res["steady"] = steady_runs(broker, bundle, streams, work, args.quick, soak, cap)
    if want("inference"):
        log("inference: in-agent vs bare runtime, ORT vs LiteRT, int8")
        res["inference"] = inference.per_window_costs(bundle, streams, quick=args.quick)
        res["quantisation"] = inference.quantisation_quality(bundle, make_streams(faulty_every=1, severity=3.0))
    if want("profile"):
        res["profile"] = inference.profile_pipeline(bundle, streams)
    res["seconds"] = time.time() - t_start
    res["loadavg_end"] = __import__("os").getloadavg()
    rows = table(res)
    res["table"] = [dict(zip(("figure", "measured", "target", "verdict"), r)) for r in rows]
    (out / "results.json").write_text(json.dumps(res, indent=1, default=float))
    plot(res, out / "bench.png")
    w = max(len(r[0]) for r in rows)
    print(f"\nedgewatch bench ({res['mode']}, {res['cpus']} CPUs, {res['seconds']:.0f} s, load average "
          f"{res['loadavg_start'][0]:.1f} at start, {res['loadavg_end'][0]:.1f} at end)")
    for r in rows:
        print(f"  {r[0]:<{w}}  {r[1]:<58} {r[2]:<20} {r[3]}")
    if res.get("profile"):
        print("\n  where the pipeline thread's time goes (cProfile, share of total):")
        for f in res["profile"]["top"][:10]:
            print(f"    {100 * f['tottime_share']:5.1f} %  {f['function']}")
    print(f"\nwrote {out / 'results.json'} and {out / 'bench.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
