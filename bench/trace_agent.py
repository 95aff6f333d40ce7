"""The agent with latency trace points, for decomposing publish-to-alert latency (bench only).

``python -m bench.trace_agent OUT.json run --config FILE``: installs wrappers around a few of the
agent's functions (no change to the agent's code), runs ``agent.cli``, and at exit writes OUT.json:

- ``take``: every chunk the pipeline thread took from the hand-off: (time, oldest and newest
  receive time in it, count, bytes waiting in the agent's socket receive buffer then)
- ``flush``: every scored batch: (start, scored, end, windows)
- ``deliver``: every batch of alerts handed to the link: (start, after the outbox put, end, [keys])
- ``sock``: alert PUBLISH packets written to the socket by paho: (time, device, ts)
- ``gc``: collections: (start, seconds, generation, thread)
- ``ckpt``: checkpoints taken on the pipeline thread (start, seconds); ``save``/``sync`` on the writer
- ``cpu``: per-thread CPU seconds (name -> utime+stime) at exit

All times are ``time.time()``, the clock the bench's publisher and alert watcher stamp with.
"""
from __future__ import annotations

import atexit
import fcntl
import gc
import json
import re
import struct
import sys
import termios
import threading
import time

_ALERT = re.compile(rb'"device":"([^"]+)","state":"(?:raised|cleared)","ts":"([^"]+)"')


def install(out_path: str) -> None:
    from agent import checkpoint as C
    from agent import mqtt_link as L
    from agent import outbox as O
    from agent import pipeline as P
    import paho.mqtt.client as mc

    now = time.time
    rec: dict = {k: [] for k in ("take", "flush", "deliver", "sock", "gc", "ckpt", "save", "sync", "put", "acks")}
    links: list = []

    def sock_backlog() -> int:
        try:
            s = links[0].client._sock
            return struct.unpack("i", fcntl.ioctl(s.fileno(), termios.FIONREAD, b"\0\0\0\0"))[0]
        except Exception:
            return -1

    orig_link_init = L.MqttLink.__init__

    def link_init(self, *a, **k):
        orig_link_init(self, *a, **k)
        links.append(self)
    L.MqttLink.__init__ = link_init

    orig_take = P.Handoff.take
    take_log = rec["take"]

    def take(self, limit):
        out = orig_take(self, limit)
        if out:
            take_log.append((now(), out[0][2], out[-1][2], len(out), sock_backlog()))
        return out
    P.Handoff.take = take

    orig_flush = P.Pipeline.flush
    orig_score_holder = {}

    def flush(self):
        n = self._n
        if not n:
            return orig_flush(self)
        t0 = now()
        sc = self.scorer
        orig_score = sc.score

        def score(*a, **k):
            r = orig_score(*a, **k)
            orig_score_holder["t"] = now()
            return r
        sc.score = score
        try:
            orig_flush(self)
        finally:
            del sc.score
        rec["flush"].append((t0, orig_score_holder.get("t", t0), now(), n))
    P.Pipeline.flush = flush

    orig_deliver = P.Pipeline._deliver

    def deliver(self):
        keys = []
        for _, payload, _, recv in self._alerts:
            m = _ALERT.search(payload)
            if m:
                keys.append((m.group(1).decode(), m.group(2).decode(), recv))
        t0 = now()
        orig_deliver(self)
        rec["deliver"].append((t0, rec["put"][-1][1] if rec["put"] else t0, now(), keys))
    P.Pipeline._deliver = deliver

    orig_put = O.Outbox.put_many

    def put_many(self, alerts):
        t0 = now()
        r = orig_put(self, alerts)
        rec["put"].append((t0, now(), len(alerts)))
        return r
    O.Outbox.put_many = put_many

    orig_sync = O.Outbox.sync

    def sync(self):
        t0 = now()
        r = orig_sync(self)
        rec["sync"].append((t0, now() - t0, bool(r)))
        return r
    O.Outbox.sync = sync

    orig_send = mc.Client._sock_send

    def sock_send(self, buf):
        n = orig_send(self, buf)
        if n and buf[0] == 0x40:  # PUBACKs (telemetry acknowledgements): time and bytes
            rec["acks"].append((now(), n))
        if b"edgewatch/alerts/" in buf:
            t = now()
            for m in _ALERT.finditer(bytes(buf[:n])):
                rec["sock"].append((t, m.group(1).decode(), m.group(2).decode()))
        return n
    mc.Client._sock_send = sock_send

    orig_ckpt = C.Checkpointer.checkpoint

    def checkpoint(self, wait=False):
        t0 = now()
        orig_ckpt(self, wait)
        rec["ckpt"].append((t0, now() - t0, len(rec["ckpt"])))
    C.Checkpointer.checkpoint = checkpoint

    orig_save = C.StateStore.save

    def save(self, meta, devices, replace_all=False):
        t0 = now()
        orig_save(self, meta, devices, replace_all)
        rec["save"].append((t0, now() - t0, len(devices)))
    C.StateStore.save = save

    gc_start: dict = {}

    def on_gc(phase, info):
        if phase == "start":
            gc_start["t"] = now()
            gc_start["c"] = time.thread_time()
        else:
            t0 = gc_start.get("t", now())
            rec["gc"].append((t0, now() - t0, info["generation"], threading.current_thread().name,
                              time.thread_time() - gc_start.get("c", 0.0), info["collected"]))
    gc.callbacks.append(on_gc)

    import os
    hz = os.sysconf("SC_CLK_TCK")
    rec["cpu"] = []  # (time, {thread name: CPU seconds}) every second

    def thread_cpu() -> dict:
        names = {t.native_id: t.name for t in threading.enumerate()}
        cpu = {}
        for tid in os.listdir("/proc/self/task"):
            try:
                with open(f"/proc/self/task/{tid}/stat") as f:
                    s = f.read()
            except OSError:
                continue
            fields = s[s.rindex(")") + 2:].split()
            name = names.get(int(tid), s[s.index("(") + 1:s.rindex(")")])
            cpu[f"{name}"] = cpu.get(name, 0.0) + (int(fields[11]) + int(fields[12])) / hz
        return cpu

    def census():  # what the collector still walks 12 s in (the frozen start-up heap excluded)
        time.sleep(12.0)
        from collections import Counter
        gc.set_debug(gc.DEBUG_SAVEALL)  # 0.5 s of what the collector frees: what makes cyclic garbage
        time.sleep(0.5)
        gc.set_debug(0)
        rec["garbage"] = Counter(type(o).__name__ for o in gc.garbage).most_common(15)
        rec["garbage_functions"] = Counter(f"{o.__module__}.{o.__qualname__}" for o in gc.garbage
                                           if type(o).__name__ == "function").most_common(5)
        gc.garbage.clear()
        rec["census"] = {"counts": gc.get_count(), "frozen": gc.get_freeze_count(), "stats": gc.get_stats(),
                         **{f"gen{g}": Counter(type(o).__name__ for o in gc.get_objects(g)).most_common(12)
                            for g in (1, 2)}}
    threading.Thread(target=census, name="trace-census", daemon=True).start()

    def sample():
        while True:
            rec["cpu"].append((now(), thread_cpu()))
            time.sleep(1.0)
    threading.Thread(target=sample, name="trace-cpu", daemon=True).start()

    def dump():
        with open(out_path, "w") as f:
            json.dump(rec, f)
    atexit.register(dump)


def main() -> None:
    out = sys.argv[1]
    install(out)
    from agent.cli import main as agent_main
    sys.exit(agent_main(sys.argv[2:]))


if __name__ == "__main__":
    main()


# ---------------------------------------------------------------- analysis (in the bench process)

SEGMENTS = ("pub_send", "broker_to_probe", "pub_to_rx", "rx_to_take", "take_to_flush", "flush_to_deliver",
            "outbox_put", "put_to_publish_call", "publish_call_to_socket", "socket_to_watcher", "total")


def decompose(trace: dict, sent: dict, sent_after: dict, probe: dict, got: dict, t_steady: float) -> dict:
    """Per alert (device, ts) published after ``t_steady`` (epoch), the segments of its latency, in ms:
    p50/p99/max of each, and their means over the slowest 2 % of alerts (what the tail is made of)."""
    import bisect

    import numpy as np

    takes = trace["take"]
    take_last = [t[2] for t in takes]
    flushes = trace["flush"]
    flush_start = [f[0] for f in flushes]
    sock: dict = {}
    for t, d, ts in trace["sock"]:
        sock.setdefault((d, ts), t)
    rows = []
    for d0, put_t, d1, keys in trace["deliver"]:
        fi = bisect.bisect_right(flush_start, d0) - 1
        f = flushes[fi] if fi >= 0 else None
        for d, ts, recv in keys:
            k = (d, ts)
            if k not in sent or sent[k] < t_steady or k not in got:
                continue
            ti = bisect.bisect_left(take_last, recv)
            take = takes[ti] if ti < len(takes) else None
            r = {"key": k, "at": sent[k] - takes[0][0], "total": got[k] - sent[k], "pub_send": sent_after[k] - sent[k],
                 "broker_to_probe": probe[k] - sent[k] if k in probe else float("nan"),
                 "pub_to_rx": recv - sent[k],
                 "rx_to_take": take[0] - recv if take else float("nan"),
                 "sock_backlog": take[4] if take else -1,
                 "take_to_flush": (f[0] - take[0]) if (f and take) else float("nan"),
                 "flush_to_deliver": d0 - f[0] if f else float("nan"),
                 "inference": f[1] - f[0] if f else float("nan"),
                 "outbox_put": put_t - d0,
                 "put_to_publish_call": d1 - put_t,
                 "publish_call_to_socket": sock[k] - d1 if k in sock else float("nan"),
                 "socket_to_watcher": got[k] - sock[k] if k in sock else float("nan")}
            rows.append(r)
    out: dict = {"alerts": len(rows)}
    if not rows:
        return out
    rows.sort(key=lambda r: r["total"])
    tail = rows[int(0.98 * len(rows)):]
    acks = trace["acks"]
    ack_t = [a[0] for a in acks]
    for r in rows[-8:] + rows[len(rows) // 2:len(rows) // 2 + 3]:  # PUBACK bytes written in the 100 ms before the alert
        s_ = sock.get(r["key"])
        if s_ is None:
            continue
        i, j = bisect.bisect_left(ack_t, s_ - 0.1), bisect.bisect_right(ack_t, s_)
        r["ack_bytes_100ms_before"] = sum(a[1] for a in acks[i:j])
        r["last_ack_write_ms_before"] = (s_ - acks[j - 1][0]) * 1e3 if j else None
    for s in SEGMENTS + ("inference",):
        v = np.array([r[s] for r in rows], float) * 1e3
        v = v[~np.isnan(v)]
        tv = np.array([r[s] for r in tail], float) * 1e3
        tv = tv[~np.isnan(tv)]
        out[s] = {"p50": float(np.percentile(v, 50)) if len(v) else float("nan"),
                  "p99": float(np.percentile(v, 99)) if len(v) else float("nan"),
                  "max": float(v.max()) if len(v) else float("nan"),
                  "tail_mean": float(tv.mean()) if len(tv) else float("nan")}
    out["slowest"] = [{k: (round(v * 1e3, 2) if isinstance(v, float) else v) for k, v in r.items()} for r in rows[-8:]]
    out["median_ones"] = rows[len(rows) // 2:len(rows) // 2 + 3]
    out["census"] = trace.get("census")
    out["garbage_0.5s"] = trace.get("garbage")
    out["garbage_functions"] = trace.get("garbage_functions")
    gcs = [g for g in trace["gc"] if g[0] >= t_steady]
    out["gc"] = {"count": len(gcs), "max_ms": max((g[1] for g in gcs), default=0) * 1e3,
                 "max_cpu_ms": max((g[4] for g in gcs), default=0) * 1e3,
                 "by_gen_thread": sorted({(g[2], g[3][:6]): 0 for g in gcs}),
                 "gen2_cpu_ms": [round(g[4] * 1e3, 2) for g in gcs if g[2] == 2],
                 "gen1_cpu_ms_max": max((g[4] for g in gcs if g[2] == 1), default=0) * 1e3,
                 "gen0_cpu_ms_p99": float(np.percentile([g[4] for g in gcs if g[2] == 0], 99)) * 1e3 if gcs else 0,
                 "gen2": sum(1 for g in gcs if g[2] == 2), "over_1ms": sum(1 for g in gcs if g[1] > 1e-3)}
    ck = [c for c in trace["ckpt"] if c[0] >= t_steady]
    out["checkpoint_ms"] = {"count": len(ck), "max": max((c[1] for c in ck), default=0) * 1e3,
                            "mean": (sum(c[1] for c in ck) / len(ck) * 1e3) if ck else 0}
    sv = [c for c in trace["save"] if c[0] >= t_steady]
    out["save_ms_max"] = max((c[1] for c in sv), default=0) * 1e3
    sy = [c for c in trace["sync"] if c[0] >= t_steady and c[2]]
    out["sync_ms_max"] = max((c[1] for c in sy), default=0) * 1e3
    tk = [t for t in takes if t[0] >= t_steady]
    out["takes"] = {"count": len(tk), "mean_chunk": float(np.mean([t[3] for t in tk])) if tk else 0,
                    "sock_backlog_p99": float(np.percentile([t[4] for t in tk], 99)) if tk else 0}
    cpu = [c for c in trace["cpu"] if c[0] >= t_steady]
    if len(cpu) >= 2:
        dt = cpu[-1][0] - cpu[0][0]
        out["thread_cpu_share"] = {n: round((cpu[-1][1].get(n, 0) - cpu[0][1].get(n, 0)) / dt, 3)
                                   for n in cpu[-1][1]}
    return out
