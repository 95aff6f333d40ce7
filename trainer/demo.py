"""End-to-end demo: simulate → train → broker → agent → replay with faults → live alerts.

Runs the real commands a plant engineer would run (printed as they run), against
mosquitto when it is installed and the embedded Python broker otherwise.

    python -m trainer.demo [--out demo-out] [--rate 300] [--minutes 40]
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

from trainer.simulate import FaultSpec, simulate_device, write_csv

DEVICES = {  # name -> faults injected into its live stream (row indexes at 1 Hz)
    "pump-01": [],
    "pump-02": [FaultSpec("bearing_wear", start=900, duration=900)],
    "pump-03": [],
    "pump-04": [FaultSpec("cavitation", start=1500, duration=600)],
}
LINE = "line1"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _say(msg: str) -> None:
    print(msg, flush=True)


def _run(cmd: list[str]) -> None:
    _say("$ " + " ".join(cmd))
    subprocess.run(cmd, check=True)


def _bin(name: str) -> str:
    """Console script next to this interpreter (the venv's), else on PATH."""
    here = Path(sys.executable).parent / name
    return str(here) if here.exists() else name


class DemoBroker:
    """mosquitto on a free port when installed, else the embedded broker."""

    def __init__(self, workdir: Path):
        self.port = _free_port()
        self.proc = None
        self.embedded = None
        if shutil.which("mosquitto"):
            conf = workdir / "mosquitto.conf"
            conf.write_text(f"listener {self.port} 127.0.0.1\nallow_anonymous true\nmax_queued_messages 100000\n")
            self.proc = subprocess.Popen(["mosquitto", "-c", str(conf)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            self.kind = "mosquitto"
        else:
            from agent.broker import EmbeddedBroker

            self.embedded = EmbeddedBroker(host="127.0.0.1", port=self.port)
            self.embedded.start()
            self.kind = "embedded Python broker (mosquitto not installed)"
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                socket.create_connection(("127.0.0.1", self.port), 0.2).close()
                return
            except OSError:
                time.sleep(0.05)
        raise RuntimeError("broker did not start")

    def stop(self) -> None:
        if self.proc:
            self.proc.terminate()
            self.proc.wait(5)
        if self.embedded:
            self.embedded.stop()


def _spans(label: np.ndarray) -> list[tuple[int, int]]:
    d = np.diff(np.concatenate([[0], label.astype(int), [0]]))
    return list(zip(np.flatnonzero(d == 1), np.flatnonzero(d == -1)))


def _metric(text: str, name: str, **labels) -> float:
    total = 0.0
    for line in text.splitlines():
        if not line.startswith(name):
            continue
        head, _, val = line.rpartition(" ")
        if head.split("{")[0] != name:
            continue
        if all(f'{k}="{v}"' in head for k, v in labels.items()):
            total += float(val)
    return total


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m trainer.demo", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="demo-out", help="working directory (recreated)")
    ap.add_argument("--rate", type=float, default=300.0, help="replay speed, rows per second per device")
    ap.add_argument("--minutes", type=float, default=45.0, help="minutes of live stream per device (1 row/s)")
    ap.add_argument("--train-hours", type=float, default=2.0, help="hours of normal history to train on")
    args = ap.parse_args(argv)

    out = Path(args.out).resolve()
    shutil.rmtree(out, ignore_errors=True)
    (out / "data").mkdir(parents=True)
    rows = int(args.minutes * 60)
    t0 = time.monotonic()

    _say(f"== 1. simulate {len(DEVICES)} pumps: {args.train_hours:g} h of normal history each, "
         f"then {args.minutes:g} min live with injected faults")
    train_files, live = [], {}
    for i, (name, faults) in enumerate(DEVICES.items()):
        faults = [f for f in faults if f.start + f.duration <= rows]
        hist = simulate_device(name, "pump", rows=int(args.train_hours * 3600), seed=100 + i, regimes=True,
                               start_epoch=1_767_225_600.0)
        train_files.append(write_csv(hist, out / "data" / f"{name}.train.csv"))
        data = simulate_device(name, "pump", rows=rows, seed=200 + i, faults=faults,
                               start_epoch=float(hist.timestamps[-1]) + 1.0)
        live[name] = (write_csv(data, out / "data" / f"{name}.csv"), data)
        _say(f"   {name}: " + (", ".join(f"{f.type} rows {f.start}-{f.start + f.duration}" for f in faults) or "healthy"))

    _say("\n== 2. train the bundle (VAE on normal history, threshold on held-out normal data)")
    bundle = out / "bundle"
    t_fit = time.monotonic()
    _run([_bin("edge-trainer"), "fit", "--csv", *map(str, train_files), "--out", str(bundle),
          "--label-col", "label", "--exclude", "fault"])
    fit_s = time.monotonic() - t_fit
    manifest = json.loads((bundle / "manifest.json").read_text())
    size_kb = sum(p.stat().st_size for p in bundle.iterdir()) / 1024
    _say(f"   trained in {fit_s:.0f} s; bundle {manifest['name']} {manifest['version']}: window {manifest['window']}, "
         f"threshold {manifest['threshold']['value']:.3f}, {size_kb:.0f} KiB")

    broker = DemoBroker(out)
    _say(f"\n== 3. broker: {broker.kind} on 127.0.0.1:{broker.port}")
    metrics_port = _free_port()
    cfg = out / "agent.yaml"
    cfg.write_text(
        f"agent_id: demo-gateway\nbundle: {bundle}\nstate_dir: {out / 'state'}\n"
        f"mqtt:\n  host: 127.0.0.1\n  port: {broker.port}\n"
        f"metrics:\n  host: 127.0.0.1\n  port: {metrics_port}\n"
    )
    agent = None
    import paho.mqtt.client as mqtt

    alerts: list[dict] = []
    lock = threading.Lock()

    def on_message(_c, _u, msg):
        try:
            a = json.loads(msg.payload)
        except ValueError:
            return
        with lock:
            alerts.append(a)
        top = ", ".join(s["sensor"] for s in a.get("top_sensors", [])[:3])
        fault = a.get("fault") or {}
        guess = f"  fault={fault.get('type')} ({fault.get('confidence', 0):.0%})" if fault else ""
        _say(f"   ALERT {a['state'].upper():7s} {a['device']}  at {a['ts']}  score {a['score']:.2f} "
             f"(threshold {a['threshold']:.2f})  top: {top}{guess}")

    sub = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="edgewatch-demo-console")
    sub.on_message = on_message
    try:
        sub.connect("127.0.0.1", broker.port)
        sub.subscribe("edgewatch/alerts/#", qos=1)
        sub.loop_start()

        _say("\n== 4. start the agent")
        _say(f"$ edge-agent run --config {cfg}")
        log = open(out / "agent.log", "w")
        agent = subprocess.Popen([_bin("edge-agent"), "run", "--config", str(cfg)], stdout=log, stderr=subprocess.STDOUT)
        ready_url = f"http://127.0.0.1:{metrics_port}/readyz"
        deadline = time.monotonic() + 60
        t_start = time.monotonic()
        while True:
            if agent.poll() is not None:
                raise RuntimeError(f"agent exited with {agent.returncode}; see {out / 'agent.log'}")
            try:
                if urllib.request.urlopen(ready_url, timeout=1).status == 200:
                    break
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"agent not ready after 60 s; see {out / 'agent.log'}")
            time.sleep(0.1)
        _say(f"   ready in {time.monotonic() - t_start:.1f} s; metrics on http://127.0.0.1:{metrics_port}/metrics")

        _say(f"\n== 5. replay the live streams at {args.rate:g} rows/s per device; alerts as they arrive:")
        reps = []
        for name, (path, _) in live.items():
            cmd = [_bin("edge-agent"), "replay", "--csv", str(path), "--rate", str(args.rate),
                   "--broker", f"127.0.0.1:{broker.port}", "--device", name, "--line", LINE]
            reps.append(subprocess.Popen(cmd, stdout=subprocess.DEVNULL))
        _say("$ " + " ".join(cmd) + "   (one per device)")
        for r in reps:
            if r.wait() != 0:
                raise RuntimeError("replay failed")
        time.sleep(2.0)  # let the last windows score and alerts arrive
        metrics = urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=5).read().decode()
    finally:
        sub.loop_stop()
        if agent and agent.poll() is None:
            agent.send_signal(signal.SIGTERM)
            try:
                agent.wait(10)
            except subprocess.TimeoutExpired:
                agent.kill()
        broker.stop()

    _say("\n== 6. summary: alerts against the injected faults")
    period = 1.0
    ok = True
    for name, (_, data) in live.items():
        mine = [a for a in alerts if a["device"] == name and a["state"] == "raised"]
        spans = _spans(np.asarray(data.label))
        t_of = {round(float(t), 3): i for i, t in enumerate(data.timestamps)}
        hits, false = [], 0
        for a in mine:
            ts = datetime.fromisoformat(a["ts"].replace("Z", "+00:00")).timestamp()
            row = t_of.get(round(ts, 3))
            span = next(((s, e) for s, e in spans if row is not None and s <= row < e + 60), None)
            if span:
                hits.append(((row - span[0]) * period, span))
            else:
                false += 1
        detected = {s for _, s in hits}
        fault_txt = ", ".join(f"{f}" for f in sorted({x for x in data.fault if x})) or "none"
        delay = f", first alert {min(d for d, _ in hits):.0f} s after onset" if hits else ""
        verdict = ("detected" if len(detected) == len(spans) else "MISSED") if spans else ("quiet" if not false else "")
        if spans and len(detected) < len(spans) or false:
            ok = False
        _say(f"   {name}: injected {fault_txt:13s} raised {len(mine)}  {verdict}{delay}"
             + (f"  false alerts {false}" if false else ""))
    n_ok = _metric(metrics, "edgewatch_messages_total", result="ok")
    lat_sum = _metric(metrics, "edgewatch_latency_seconds_sum")
    lat_n = _metric(metrics, "edgewatch_latency_seconds_count")
    inf_sum = _metric(metrics, "edgewatch_inference_seconds_sum")
    inf_n = _metric(metrics, "edgewatch_inference_seconds_count")
    _say(f"\n   messages scored {n_ok:.0f}; windows {_metric(metrics, 'edgewatch_windows_scored_total'):.0f}; "
         f"alerts raised {_metric(metrics, 'edgewatch_alerts_total', state='raised'):.0f}, "
         f"cleared {_metric(metrics, 'edgewatch_alerts_total', state='cleared'):.0f}")
    if lat_n:
        _say(f"   mean receive→alert latency {1000 * lat_sum / lat_n:.1f} ms; "
             f"mean inference call {1000 * inf_sum / max(inf_n, 1):.2f} ms")
    _say(f"   /metrics was served at http://127.0.0.1:{metrics_port}/metrics (snapshot in {out / 'metrics.txt'})")
    (out / "metrics.txt").write_text(metrics)
    (out / "alerts.json").write_text(json.dumps(alerts, indent=1))
    _say(f"   bundle: {bundle}   alerts: {out / 'alerts.json'}   agent log: {out / 'agent.log'}")
    _say(f"\n   demo finished in {time.monotonic() - t0:.0f} s" + ("" if ok else " (see MISSED / false alerts above)"))
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except subprocess.CalledProcessError as e:
        print(f"demo: error: {' '.join(map(str, e.cmd[:2]))} failed with exit code {e.returncode}", file=sys.stderr)
        sys.exit(1)
    except (RuntimeError, OSError) as e:
        print(f"demo: error: {e}", file=sys.stderr)
        sys.exit(1)
    except KeyboardInterrupt:
        sys.exit(130)
