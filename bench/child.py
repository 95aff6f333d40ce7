"""Process under test for the drain runs: ``python -m bench.child MODE ...``, one JSON line out.

MODE bare / bare_json: a bare paho-mqtt subscriber (on_message counts, or json.loads and counts).
MODE agent: the real agent (``agent.app.App`` built from a config file, as ``edge-agent run`` does).
Each connects to a session the parent prepared (persistent, subscription in place, backlog queued),
and reports wall-clock start/end of the drain and the process CPU time it spent.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import threading
import time


def _cpu() -> float:
    t = os.times()
    return t.user + t.system


def _rss_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return 0.0


def bare(args, parse: bool) -> dict:
    import paho.mqtt.client as mqtt
    from paho.mqtt.enums import CallbackAPIVersion
    from paho.mqtt.packettypes import PacketTypes
    from paho.mqtt.properties import Properties

    done = threading.Event()
    count = [0]
    loads = json.loads

    def on_message(c, u, msg):
        if parse:
            loads(msg.payload)
        count[0] += 1
        if count[0] >= args.n:
            done.set()

    v5 = args.protocol == "5"
    cls = mqtt.Client
    if args.buffered:  # the agent's reads (agent.buffered_socket), otherwise the same bare subscriber
        from agent.buffered_socket import client_class
        cls = client_class()
    c = cls(CallbackAPIVersion.VERSION2, client_id=args.client_id, protocol=mqtt.MQTTv5 if v5 else mqtt.MQTTv311,
                    clean_session=None if v5 else False)
    c.on_message = on_message
    kw = {}
    if v5:
        props = Properties(PacketTypes.CONNECT)
        props.SessionExpiryInterval = 3600
        kw = {"clean_start": False, "properties": props}
    cpu0, t0 = _cpu(), time.time()
    c.connect(args.host, args.port, **kw)
    c.loop_start()
    ok = done.wait(args.timeout)
    t1, cpu1 = time.time(), _cpu()
    c.disconnect()
    c.loop_stop()
    return {"ok": ok, "t0": t0, "t1": t1, "cpu_s": cpu1 - cpu0, "received": count[0], "rss_mb": _rss_mb()}


def agent(args) -> dict:
    from agent.app import App
    from agent.config import load_config

    try:
        from agent.logging_setup import setup_logging
    except ImportError:  # older layout
        from agent.cli import setup_logging

    cfg = load_config(args.config)
    setup_logging(cfg.log.format, cfg.log.level)  # as the service logs (stderr goes to a file)
    app = App(cfg, args.config)  # bundle loaded and verified here, before the clock starts
    reg = app.metrics.registry
    sample = lambda name, **kw: reg.get_sample_value(name, kw or None) or 0.0  # noqa: E731
    handled = lambda: sum(sample("edgewatch_messages_total", result=r) for r in ("ok", "invalid", "dropped"))  # noqa: E731
    cpu0, t0 = _cpu(), time.time()
    app.start()
    deadline = time.monotonic() + args.timeout
    # Polling the registry every 2 ms costs a few microseconds per poll: negligible next to the drain.
    while handled() < args.n and time.monotonic() < deadline:
        time.sleep(0.002)
    while app.pipeline._n and time.monotonic() < deadline:  # the last micro-batch (latency bound)
        time.sleep(0.001)
    t1, cpu1 = time.time(), _cpu()
    out = {
        "ok": handled() >= args.n, "t0": t0, "t1": t1, "cpu_s": cpu1 - cpu0, "received": handled(),
        "scored": sample("edgewatch_windows_scored_total"), "batches": sample("edgewatch_inference_batches_total"),
        "alerts": sample("edgewatch_alerts_total", state="raised") + sample("edgewatch_alerts_total", state="cleared"),
        "invalid": sample("edgewatch_messages_total", result="invalid"),
        "dropped": sample("edgewatch_messages_total", result="dropped"),
        "inference_s": sample("edgewatch_inference_seconds_sum"), "rss_mb": _rss_mb(),
        "maxrss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }
    app.stop()
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="bench.child")
    p.add_argument("mode", choices=("bare", "bare_json", "agent"))
    p.add_argument("--n", type=int, required=True, help="messages to drain")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int)
    p.add_argument("--client-id")
    p.add_argument("--config")
    p.add_argument("--protocol", choices=("5", "3.1.1"), default="3.1.1", help="bare modes: MQTT version")
    p.add_argument("--timeout", type=float, default=300)
    p.add_argument("--buffered", action="store_true", help="bare modes: read through agent.buffered_socket")
    args = p.parse_args(argv)
    import logging
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
    res = agent(args) if args.mode == "agent" else bare(args, args.mode == "bare_json")
    print(json.dumps(res), flush=True)
    return 0 if res["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
