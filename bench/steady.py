"""The agent as a service (``python -m agent.cli run``) under a steady publish rate.

Measures, for one (backend, devices, rate) setting: time to READY (``/readyz`` 200), the
agent's RSS over the run (soak), its CPU per message, and publish-to-alert latency:
every alert names the row (device, ts) that triggered it, and the publisher remembers when
it sent that row, so latency is alert arrival minus publish time on one clock.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import numpy as np
import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion

from bench.broker import Mosquitto, RawPublisher, free_port
from bench.drain import agent_config, proc_cpu_s
from bench.workload import T0, device_name, payload

ROOT = Path(__file__).resolve().parent.parent


def rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def http_status(port: int, path: str) -> int:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=1) as r:
            return r.status
    except Exception:
        return 0


def metrics_text(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
        return r.read().decode()


def histogram_quantiles(text: str, name: str, labels: str, qs=(0.5, 0.99)) -> dict:
    """Quantiles from a Prometheus histogram (upper bound of the bucket holding the quantile)."""
    buckets = []
    for line in text.splitlines():
        if line.startswith(name + "_bucket{") and labels in line:
            le = line.split('le="')[1].split('"')[0]
            buckets.append((float("inf") if le == "+Inf" else float(le), float(line.split()[-1])))
    buckets.sort()
    total = buckets[-1][1] if buckets else 0
    out = {"count": total}
    for q in qs:
        out[f"p{int(q * 100)}_le"] = next((b for b, c in buckets if total and c >= q * total), float("nan"))
    return out


class AlertWatch:
    """Subscribes to alerts in a process of its own (``python -m bench.steady watch``) and records
    arrival time per (device, ts) on the bench clock. Its own process: in the publisher's, the
    subscriber's network thread waited for the GIL behind the publishing loop, and that wait
    (up to ~25 ms, instrumented) was counted as the agent's latency."""

    def __init__(self, broker: Mosquitto, topic: str = "edgewatch/alerts/#", probe: list[str] = ()):
        self.got: dict[tuple[str, str], float] = {}
        self.probe: dict[tuple[str, str], float] = {}  # telemetry seen by the probe subscription (epoch s)
        self._off = time.time() - time.perf_counter()  # epoch -> this process's perf_counter
        self.proc = subprocess.Popen([sys.executable, "-m", "bench.steady", "watch", broker.host, str(broker.port), topic,
                                      *probe], cwd=ROOT, stdout=subprocess.PIPE, text=True)
        if self.proc.stdout.readline().strip() != "subscribed":
            raise RuntimeError("alert watcher did not subscribe")
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            parts = line.rstrip("\n").split("\t")
            if parts[0] == "T":  # a probed telemetry message: T device ts(epoch) arrival(epoch)
                self.probe[(parts[1], iso(float(parts[2])))] = float(parts[3])
                continue
            device, ts, t = parts
            self.got[(device, ts)] = float(t) - self._off

    def close(self):
        self.proc.terminate()
        self.proc.wait(10)
        self._reader.join(5)


def _watch(host: str, port: int, topic: str, probe: list[str] = ()) -> None:
    """The watcher process: one line per alert, device TAB ts TAB arrival (epoch s); with ``probe``
    filters, also one line per telemetry message on them: T TAB device TAB ts TAB arrival."""
    subscribed = threading.Event()
    c = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=f"bench-alerts-{os.getpid()}")

    def on_message(c, u, msg):
        t = time.time()
        a = json.loads(msg.payload)
        if msg.topic.startswith("factory/"):
            sys.stdout.write(f"T\t{msg.topic.split('/')[2]}\t{a['ts']!r}\t{t!r}\n")
        else:
            sys.stdout.write(f"{a['device']}\t{a['ts']}\t{t!r}\n")
        sys.stdout.flush()
    c.on_message = on_message
    c.on_connect = lambda c, *a: c.subscribe([(topic, 1)] + [(p, 0) for p in probe])
    c.on_subscribe = lambda *a: subscribed.set()
    c.connect(host, port)
    c.loop_start()
    if not subscribed.wait(10):
        sys.exit(1)
    print("subscribed", flush=True)
    signal.signal(signal.SIGTERM, lambda *a: sys.exit(0))
    while True:
        time.sleep(3600)


def iso(ts: float) -> str:
    from agent.messages import iso_utc
    return iso_utc(ts)


def latency_rows(features: list[str], n_devices: int, rows: int, faulty_share: float = 0.2, period: int = 40,
                 base: np.ndarray | None = None, scale: np.ndarray | None = None) -> list[list[bytes]]:
    """rows × devices payloads: normal pump data; a share of devices gets a step of 10 scaler units
    on two sensors for half of every ``period`` rows (phases staggered across devices), so alerts
    are raised and cleared all along the run."""
    out = []
    S, F = base.shape
    step = 10 * (scale if scale is not None else base.std(axis=0) + 1e-6)
    faulty = set(range(0, n_devices, max(1, int(round(1 / faulty_share))))) if faulty_share else set()
    for r in range(rows):
        line = []
        for i in range(n_devices):
            row = base[(r + 37 * i) % S].copy()
            if i in faulty and (r + 7 * i) % period >= period // 2:
                for j in (i % F, (i + 3) % F):
                    row[j] += step[j]
            line.append(payload(features, T0 + r, row))
        out.append(line)
    return out


def run_steady(broker: Mosquitto, bundle: Path, workdir: Path, features: list[str], base: np.ndarray, *,
               backend: str = "onnxruntime", n_devices: int = 100, rate: float = 1000.0, seconds: float = 20.0,
               warmup_s: float = 5.0, faulty_share: float = 0.2, tag: str = "steady", extra_cfg: str = "",
               log=print, trace: bool = False, agent_root: Path = ROOT) -> dict:
    """Start the service, publish ``rate`` msg/s round-robin over ``n_devices`` for warmup + seconds.

    ``trace``: run the agent under bench.trace_agent and decompose each alert's latency (res["trace"]).
    ``agent_root``: the source tree the agent runs from (another checkout, for before/after comparisons)."""
    workdir.mkdir(parents=True, exist_ok=True)
    port = free_port()
    agent_id = f"bench-{tag}-{os.getpid()}"
    cfg = agent_config(workdir / f"{tag}.yaml", broker, bundle, agent_id, workdir / f"state-{tag}", backend=backend,
                       metrics_port=port, protocol="5", extra=extra_cfg)
    env = {k: v for k, v in os.environ.items() if not k.startswith("EDGEWATCH_")}
    errlog = open(workdir / f"{tag}.log", "wb")
    t_start = time.perf_counter()
    trace_path = workdir / f"{tag}.trace.json"
    cmd = ["-m", "bench.trace_agent", str(trace_path)] if trace else ["-m", "agent.cli"]
    proc = subprocess.Popen([sys.executable, *cmd, "run", "--config", str(cfg)], cwd=agent_root, env=env,
                            stdout=errlog, stderr=subprocess.STDOUT)
    res: dict = {"backend": backend, "devices": n_devices, "rate_target": rate}
    try:
        while http_status(port, "/readyz") != 200:
            if proc.poll() is not None:
                raise RuntimeError(f"agent exited {proc.returncode}; see {workdir / (tag + '.log')}")
            if time.perf_counter() - t_start > 60:
                raise RuntimeError("agent not ready within 60 s")
            time.sleep(0.01)
        res["startup_s"] = time.perf_counter() - t_start
        res["rss_ready_mb"] = rss_mb(proc.pid)
        # trace: a probe subscription (QoS 0) to up to 20 of the faulting devices' telemetry, so the
        # broker's own delivery time is seen apart from the agent's intake
        step = max(1, int(round(1 / faulty_share))) if faulty_share else n_devices
        probe = [f"factory/+/{device_name(i)}/telemetry" for i in range(0, n_devices, step)][:20] if trace else []
        watch = AlertWatch(broker, probe=probe)
        time.sleep(0.3)
        total_s = warmup_s + seconds
        rows_needed = int(rate * total_s / n_devices) + 2
        from agent.manifest import load_manifest
        scale = np.asarray(load_manifest(bundle).scaler.scale, np.float32)
        table = latency_rows(features, n_devices, min(rows_needed, 600), faulty_share, base=base, scale=scale)
        pub = RawPublisher(broker.host, broker.port, client_id=f"bench-steady-{tag}-{os.getpid()}")
        sent: dict[tuple[str, str], float] = {}
        sent_epoch: dict[tuple[str, str], float] = {}  # trace: publish time (epoch) and after the send returned
        sent_after: dict[tuple[str, str], float] = {}
        rss: list[tuple[float, float]] = []
        names = [device_name(i) for i in range(n_devices)]
        topics = [f"factory/line{i % 4}/{names[i]}/telemetry" for i in range(n_devices)]
        topic_heads = [pub.topic_head(t) for t in topics]
        row_iso = line = None
        tick = 0.005
        per_tick = rate * tick
        n_sent, carry, row, dev = 0, 0.0, 0, 0
        t0 = time.perf_counter()
        next_rss = t0
        cpu0 = cpu_w = None
        sent_w = 0
        while True:
            now = time.perf_counter()
            el = now - t0
            if el >= total_s:
                break
            if cpu0 is None and el >= warmup_s:
                cpu0, cpu_w, sent_w = proc_cpu_s(proc.pid), now, n_sent
                others0 = (proc_cpu_s(broker.pid), proc_cpu_s(watch.proc.pid), time.process_time())
            want = int(el / tick) * per_tick + per_tick
            k = int(want - n_sent)
            if k > 0:
                chunk, keys = [], []
                ep = time.time() if trace else 0.0
                for _ in range(k):
                    if row_iso is None:  # once per row, not per message: this loop shares the agent's 2 cores
                        r = row % len(table)
                        ts = T0 + row  # rows beyond the table repeat it with newer timestamps
                        row_iso = iso(ts)
                        line = table[r] if row < len(table) else [
                            b.replace(f'"ts":{T0 + r}'.encode(), f'"ts":{ts}'.encode(), 1) for b in table[r]]
                    chunk.append(pub.packet_to(topic_heads[dev], line[dev]))
                    key = (names[dev], row_iso)
                    sent[key] = now
                    if trace:
                        keys.append(key)
                    dev += 1
                    if dev == n_devices:
                        dev, row, row_iso = 0, row + 1, None
                pub.send(b"".join(chunk))
                if trace:
                    ep2 = time.time()
                    for key in keys:
                        sent_epoch[key], sent_after[key] = ep, ep2
                n_sent += k
            if now >= next_rss:
                rss.append((now - t0, rss_mb(proc.pid)))
                next_rss += 1.0
            time.sleep(max(0.0, tick - (time.perf_counter() - now)))
        t_end = time.perf_counter()
        cpu1 = proc_cpu_s(proc.pid)
        others1 = (proc_cpu_s(broker.pid), proc_cpu_s(watch.proc.pid), time.process_time())
        time.sleep(0.5)  # last alerts in flight
        text = metrics_text(port)
        watch.close()
        pub.close()
        # Steady state: alerts on rows published after the warm-up (the 1,000 devices' arrival, their
        # first full checkpoint and the start-up collections are not what a running gateway sees).
        t_steady = t0 + warmup_s
        lat_all = [watch.got[k] - sent[k] for k in watch.got if k in sent]
        lat = [watch.got[k] - sent[k] for k in watch.got if k in sent and sent[k] >= t_steady]
        res.update({
            "seconds": seconds, "sent": n_sent, "rate_achieved": (n_sent - sent_w) / (t_end - cpu_w),
            "cpu_us_per_msg": 1e6 * (cpu1 - cpu0) / max(1, n_sent - sent_w),
            "cpu_share": (cpu1 - cpu0) / (t_end - cpu_w),
            # where the rest of the two cores went meanwhile: the broker, the alert watcher, this
            # process (the publisher), and the machine's load average (other jobs)
            "other_cpu_share": {k: (b - a) / (t_end - cpu_w) for k, a, b in zip(("broker", "watcher", "publisher"),
                                                                                 others0, others1)},
            "loadavg": os.getloadavg()[0],
            "rss_mb": rss, "rss_end_mb": rss[-1][1] if rss else float("nan"),
            "alerts": len(lat),
            "alert_latency_ms": {"p50": float(np.percentile(lat, 50)) * 1e3 if lat else float("nan"),
                                 "p99": float(np.percentile(lat, 99)) * 1e3 if lat else float("nan"),
                                 "max": float(max(lat)) * 1e3 if lat else float("nan")},
            "scored_latency": histogram_quantiles(text, "edgewatch_latency_seconds", 'stage="scored"'),
            "published_latency": histogram_quantiles(text, "edgewatch_latency_seconds", 'stage="published"'),
            "inference": histogram_quantiles(text, "edgewatch_inference_seconds", ""),
            "alert_latency_all_ms": {"alerts": len(lat_all),
                                     "p50": float(np.percentile(lat_all, 50)) * 1e3 if lat_all else float("nan"),
                                     "p99": float(np.percentile(lat_all, 99)) * 1e3 if lat_all else float("nan")},
            "latency_samples_ms": [round(x * 1e3, 3) for x in lat[:5000]],
        })
        if trace:  # the trace is written at exit
            proc.terminate()
            proc.wait(60)
            from bench.trace_agent import decompose
            got_epoch = {k: v + watch._off for k, v in watch.got.items()}
            res["trace"] = decompose(json.loads(trace_path.read_text()), sent_epoch, sent_after, watch.probe,
                                     got_epoch, t_steady + watch._off)
        # RSS growth over the run after warm-up: slope of a least-squares line, MB per minute.
        pts = [(t, m) for t, m in rss if t >= warmup_s]
        if len(pts) >= 3:
            t, m = np.array(pts).T
            res["rss_slope_mb_per_min"] = float(np.polyfit(t, m, 1)[0] * 60)
            res["rss_steady_mb"] = float(np.median(m))
            res["rss_max_mb"] = float(m.max())
            third = max(1, len(m) // 3)  # growth = median of the last third minus median of the first third
            res["rss_growth_mb"] = float(np.median(m[-third:]) - np.median(m[:third]))
        return res
    finally:
        proc.terminate()
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        errlog.close()


if __name__ == "__main__" and sys.argv[1:2] == ["watch"]:
    _watch(sys.argv[2], int(sys.argv[3]), sys.argv[4], sys.argv[5:])
