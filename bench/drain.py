"""Throughput ceiling: drain a queued QoS 1 backlog from a private mosquitto.

For each contender, the parent (1) creates a persistent session with the contender's client
id and subscription, (2) queues N telemetry messages for it while it is offline, then
(3) starts it in its own process and times the drain from connect to the last message
handled. Contenders alternate (bare, agent, bare, agent, ...) so drift on a noisy machine
hits both alike; the median of the repeats is reported.
"""
from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from bench.broker import Mosquitto, RawPublisher

FILTER = "factory/+/+/telemetry"


def prepare_session(host: str, port: int, client_id: str, filters: list[str], protocol: str = "3.1.1") -> None:
    """Connect once with a persistent session and subscribe (QoS 1), then leave: the broker queues for us."""
    v5 = protocol == "5"
    c = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=client_id, protocol=mqtt.MQTTv5 if v5 else mqtt.MQTTv311,
                    clean_session=None if v5 else False)
    kw = {}
    if v5:
        props = Properties(PacketTypes.CONNECT)
        props.SessionExpiryInterval = 3600
        kw = {"clean_start": True, "properties": props}
    c.connect(host, port, **kw)
    c.loop_start()
    subacked = []
    c.on_subscribe = lambda *a: subacked.append(1)
    c.subscribe([(f, 1) for f in filters])
    deadline = time.monotonic() + 5
    while not subacked and time.monotonic() < deadline:
        time.sleep(0.01)
    c.disconnect()
    c.loop_stop()


def queue_backlog(broker: Mosquitto, msgs: list[tuple], chunk: int = 2000) -> float:
    """Publish all messages (QoS 1) and wait for every PUBACK; returns seconds taken."""
    pub = RawPublisher(broker.host, broker.port, client_id=f"bench-pub-{os.getpid()}-{time.monotonic_ns()}")
    t = time.perf_counter()
    for a in range(0, len(msgs), chunk):
        pub.send(b"".join(pub.packet(m[0], m[1]) for m in msgs[a:a + chunk]))
    pub.wait_acked(len(msgs))
    dt = time.perf_counter() - t
    pub.close()
    return dt


def agent_config(path: Path, broker: Mosquitto, bundle: Path, agent_id: str, state_dir: Path,
                 backend: str = "onnxruntime", telemetry: list[str] | None = None, extra: str = "",
                 metrics_port: int | None = None, protocol: str = "3.1.1",
                 partition: tuple[int, int] | None = None) -> Path:
    tele = telemetry or ["factory/+/{device}/telemetry"]
    part = f"  partition: {{index: {partition[0]}, count: {partition[1]}}}\n" if partition else ""
    metrics = f"{{enabled: true, port: {metrics_port}}}" if metrics_port is not None else "{enabled: false}"
    path.write_text(
        f"agent_id: {agent_id}\nbundle: {bundle}\nbackend: {backend}\nstate_dir: {state_dir}\n"
        f"mqtt: {{host: {broker.host}, port: {broker.port}, protocol: '{protocol}', session_expiry_s: 3600}}\n"
        f"topics:\n  telemetry: {json.dumps(tele)}\n{part}"
        f"metrics: {metrics}\nlog: {{level: INFO}}\n{extra}"
    )
    return path


def run_child(mode: str, n: int, broker: Mosquitto, client_id: str | None = None, config: Path | None = None,
              log: Path | None = None, timeout: float = 300, protocol: str = "3.1.1",
              buffered: bool = False) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "bench.child", mode, "--n", str(n), "--host", broker.host, "--port", str(broker.port),
           "--timeout", str(timeout), "--protocol", protocol]
    if client_id:
        cmd += ["--client-id", client_id]
    if config:
        cmd += ["--config", str(config)]
    if buffered:
        cmd.append("--buffered")
    err = open(log, "ab") if log else subprocess.DEVNULL
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=err, cwd=Path(__file__).resolve().parent.parent)


def child_result(proc: subprocess.Popen, timeout: float = 600) -> dict:
    out, _ = proc.communicate(timeout=timeout)
    lines = [ln for ln in out.decode().splitlines() if ln.startswith("{")]
    if not lines:
        raise RuntimeError(f"bench child exited {proc.returncode} without a result")
    res = json.loads(lines[-1])
    res["seconds"] = res["t1"] - res["t0"]
    return res


def proc_cpu_s(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        parts = f.read().rsplit(")", 1)[1].split()
    return (int(parts[11]) + int(parts[12])) / os.sysconf("SC_CLK_TCK")


def drain_once(broker: Mosquitto, mode: str, msgs: list[tuple], workdir: Path, tag: str, config: Path | None = None,
               client_id: str | None = None, filters: list[str] | None = None, protocol: str = "3.1.1",
               buffered: bool = False) -> dict:
    client_id = client_id or f"bench-{mode}-{tag}"
    prepare_session(broker.host, broker.port, client_id, filters or [FILTER], protocol)
    queue_backlog(broker, msgs)
    b0 = proc_cpu_s(broker.pid)
    res = child_result(run_child(mode, len(msgs), broker, client_id, config, workdir / f"{mode}-{tag}.log",
                                 protocol=protocol, buffered=buffered))
    res["broker_cpu_s"] = proc_cpu_s(broker.pid) - b0
    res["rate"] = len(msgs) / res["seconds"]
    res["cpu_us_per_msg"] = 1e6 * res["cpu_s"] / len(msgs)
    return res


def median_of(runs: list[dict], key: str) -> float:
    return statistics.median(r[key] for r in runs)


def scale_out_once(broker: Mosquitto, bundle: Path, streams, n_agents: int, n_devices: int, rows: int, workdir: Path,
                   tag: str) -> dict:
    """``n_agents`` agent processes, one partition each (``{partition}`` in the topic), drain one backlog."""
    from bench.workload import messages
    msgs = messages(streams, n_devices, rows, partitions=n_agents, topic="factory/p{partition}/{line}/{device}/telemetry")
    procs, cfgs = [], []
    for k in range(n_agents):
        agent_id = f"so{n_agents}-{k}-{tag}"
        cfg = agent_config(workdir / f"{agent_id}.yaml", broker, bundle, agent_id, workdir / f"state-{agent_id}",
                           telemetry=["factory/p{partition}/+/{device}/telemetry"], protocol="5",
                           partition=(k, n_agents))
        prepare_session(broker.host, broker.port, f"edgewatch-{agent_id}", [f"factory/p{k}/+/+/telemetry"], "5")
        cfgs.append((cfg, sum(1 for m in msgs if m[0].split("/")[1] == f"p{k}")))
    queue_backlog(broker, msgs)
    for k, (cfg, n) in enumerate(cfgs):
        procs.append(run_child("agent", n, broker, None, cfg, workdir / f"scaleout-{n_agents}-{k}-{tag}.log", protocol="5"))
    res = [child_result(p) for p in procs]
    t0, t1 = min(r["t0"] for r in res), max(r["t1"] for r in res)
    scored = sum(r["scored"] for r in res)
    return {"agents": n_agents, "messages": len(msgs), "seconds": t1 - t0, "rate": len(msgs) / (t1 - t0),
            "scored": scored, "per_agent": [r["received"] for r in res],
            "other_partition": sum(r["dropped"] for r in res),
            "cpu_us_per_msg": 1e6 * sum(r["cpu_s"] for r in res) / len(msgs)}
