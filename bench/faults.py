"""Fault injection against the real agent (``edge-agent run`` in a subprocess) and a real mosquitto.

    python -m bench.faults --minutes 10        # the long variant: prints the table
    python -m bench.faults --flood             # overload: a flood at several times capacity

**Faults run.** A seeded stream of several devices (missing and NaN values, extra sensors, a
clock jump forward, faults that raise and clear alerts) is published at a steady rate, QoS 1,
mixed with bad input (malformed JSON, wrong types, Infinity, huge payloads, duplicates and
stale resends, devices beyond the cap). Meanwhile a chaos schedule kill -9s the broker
(persistence on, ``autosave_interval 1``) and the agent (restarted at once, as systemd would),
and once corrupts the bundle on disk and sends SIGHUP: the reload must be refused and scoring
go on; then the bundle is repaired.

Expected alerts come from each device's clean stream run through ``agent.scoring.score_rows``
with the same bundle, as alert ids (``agent.messages.alert_id``); every one must reach a
persistent-session consumer (duplicates are counted, consumers de-duplicate on the id).
Telemetry loss is counted exactly, per device, from the agent's own state after a graceful
stop (rows pushed, ``agent.checkpoint``): a broker killed before it forwarded or saved a
message it acknowledged loses it, and nothing on our side can bring it back. Next to such a
gap a transition may move by at most the rows lost plus a window and the debounce; those are
reported as moved (same state, another row, so another id), never as delivered, and anything
further away counts as lost or unexpected.

**Flood run.** Raw QoS 0 publishers (another process) flood the broker with valid rows from
thousands of devices beyond the cap, garbage and oversized payloads, while the normal QoS 1
stream goes on. /metrics must keep answering, memory stay bounded, every drop be counted,
and the normal devices' alerts (a fault after the flood) arrive as offline scoring says.

Tests call :func:`run_faults` and :func:`run_flood` with small parameters.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import shutil
import signal
import socket
import statistics
import struct
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from bench.broker import free_port, stop_process

T0 = 1_767_225_600.0  # 2026-01-01T00:00:00Z
AGENT_ID = "gw-faults"
TOPIC = "factory/line1/{device}/telemetry"


# ------------------------------------------------------------------ processes

def _wait_port(port: int, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), 0.2).close()
            return True
        except OSError:
            time.sleep(0.05)
    return False


class Mosquitto:
    """A private mosquitto that survives kill -9 as well as mosquitto can: persistence on, saved every second."""

    def __init__(self, workdir: Path, persistence: bool = True, max_queued: int = 1_000_000):
        self.exe = shutil.which("mosquitto") or "/usr/sbin/mosquitto"
        if not os.path.exists(self.exe):
            raise RuntimeError("mosquitto is not installed (apt-get install mosquitto)")
        self.host, self.port, self.workdir = "127.0.0.1", free_port(), workdir
        workdir.mkdir(parents=True, exist_ok=True)
        lines = [f"listener {self.port} 127.0.0.1", "allow_anonymous true",
                 f"max_queued_messages {max_queued}", "max_queued_bytes 0", "sys_interval 1",
                 f"log_dest file {workdir}/mosquitto.log"]
        if persistence:
            lines += ["persistence true", f"persistence_location {workdir}/", "autosave_interval 1"]
        if os.geteuid() == 0:  # else it drops to the mosquitto user and cannot write its persistence file here
            lines.append("user root")
        self.conf = workdir / "mosquitto.conf"
        self.conf.write_text("\n".join(lines) + "\n")
        self.proc: subprocess.Popen | None = None
        self.kills = 0

    def start(self) -> "Mosquitto":
        self.proc = subprocess.Popen([self.exe, "-c", str(self.conf)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        if not _wait_port(self.port, 10):
            raise RuntimeError(f"mosquitto did not open port {self.port}; see {self.workdir}/mosquitto.log")
        return self

    def kill9(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait()
            self.kills += 1

    def stop(self) -> None:
        stop_process(self.proc)


def _proc_status(pid: int) -> dict[str, int]:
    out = {}
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith(("VmRSS:", "VmHWM:")):
                    out[line.split(":")[0]] = int(line.split()[1]) * 1024
    except OSError:
        pass
    return out


class Agent:
    """``python -m agent.cli run`` in a subprocess; kill -9 and restart it, sample its memory."""

    def __init__(self, workdir: Path, broker: Mosquitto, bundle: Path, max_devices: int, extra: str = ""):
        self.workdir = workdir
        self.metrics_port = free_port()
        self.state_dir = workdir / "state"
        self.config = workdir / "agent.yaml"
        self.config.write_text(
            f"agent_id: {AGENT_ID}\nbundle: {bundle}\nstate_dir: {self.state_dir}\nmax_devices: {max_devices}\n"
            # alert_linger_s just above this broker's autosave (every 1-2 s): see MqttConfig.alert_linger_s
            f"mqtt: {{host: {broker.host}, port: {broker.port}, reconnect_min_s: 1, reconnect_max_s: 2, "
            f"alert_linger_s: 4}}\n"
            f"topics: {{telemetry: ['factory/+/{{device}}/telemetry']}}\n"
            f"metrics: {{port: {self.metrics_port}}}\n{extra}"
        )
        self.log = workdir / "agent.log"
        self.proc: subprocess.Popen | None = None
        self.started = 0.0
        self.ready_at: float | None = None  # set once /readyz answered 200 after the last start
        self.restarts = 0  # kill -9 by us
        self.crashes = 0  # exits we did not cause
        self.exit_codes: list[int] = []
        self.peak_rss = 0  # max VmHWM over all processes
        self.rss_samples: list[tuple[float, int]] = []
        self._lock = threading.Lock()

    def start(self) -> "Agent":
        env = {k: v for k, v in os.environ.items() if not k.startswith(("EDGEWATCH_", "NOTIFY_SOCKET", "WATCHDOG_"))}
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen([sys.executable, "-m", "agent.cli", "run", "--config", str(self.config)],
                                         stdout=log, stderr=subprocess.STDOUT, env=env)
        self.started = time.monotonic()
        self.ready_at = None
        return self

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def sample(self) -> None:
        with self._lock:
            if self.alive:
                st = _proc_status(self.proc.pid)
                if st:
                    self.peak_rss = max(self.peak_rss, st.get("VmHWM", 0))
                    self.rss_samples.append((time.monotonic(), st.get("VmRSS", 0)))

    def kill9(self) -> None:
        with self._lock:
            if self.alive:
                st = _proc_status(self.proc.pid)
                self.peak_rss = max(self.peak_rss, st.get("VmHWM", 0))
                self.proc.send_signal(signal.SIGKILL)
                self.proc.wait()
                self.restarts += 1
        self.start()

    def check_crash(self) -> bool:
        """Restart it if it exited on its own (counted as a crash)."""
        with self._lock:
            if self.proc is None or self.proc.poll() is None:
                return False
            self.crashes += 1
            self.exit_codes.append(self.proc.returncode)
        self.start()
        return True

    def http(self, path: str, timeout: float = 5.0) -> tuple[int, str, float]:
        t = time.monotonic()
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.metrics_port}{path}", timeout=timeout) as r:
                return r.status, r.read().decode(), time.monotonic() - t
        except urllib.error.HTTPError as e:
            return e.code, "", time.monotonic() - t
        except OSError:
            return 0, "", time.monotonic() - t

    def ready(self) -> bool:
        return self.alive and self.http("/readyz", 2.0)[0] == 200

    def wait_ready(self, timeout: float = 30.0) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.ready():
                self.ready_at = time.monotonic()
                return True
            self.check_crash()
            time.sleep(0.1)
        return False

    def metrics(self) -> dict[str, float]:
        code, body, _ = self.http("/metrics")
        return parse_metrics(body) if code == 200 else {}

    def stop(self, timeout: float = 20.0) -> int | None:
        if not self.alive:
            return None
        st = _proc_status(self.proc.pid)
        self.peak_rss = max(self.peak_rss, st.get("VmHWM", 0))
        self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            return None

    def kill(self) -> None:
        if self.alive:
            self.proc.kill()
            self.proc.wait()


def parse_metrics(body: str) -> dict[str, float]:
    out = {}
    for line in body.splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            try:
                out[name] = float(value)
            except ValueError:
                pass
    return out


def processed(m: dict[str, float]) -> float:
    return sum(m.get(f'edgewatch_messages_total{{result="{r}"}}', 0.0) for r in ("ok", "invalid", "dropped"))


# ------------------------------------------------------------------ the stream

@dataclass
class Stream:
    device: str
    ts: np.ndarray  # (T,) epoch seconds, strictly increasing (one clock jump forward on one device)
    values: np.ndarray  # (T, F) NaN = missing
    encoding: np.ndarray  # (T,) 0 plain, 1 NaN as null, 2 NaN literal, 3 NaN omitted, 4 extra sensor


def make_streams(features: list[str], centre, scale, devices: int, rows: int, rate: float, seed: int,
                 quiet_until: int = 0) -> list[Stream]:
    """Rows ~ centre + scale * N(0, 0.5); faults add 10 scales on one sensor for 2-5 s every 6-14 s
    (none before row ``quiet_until``)."""
    rng = np.random.default_rng(seed)
    F = len(features)
    centre, scale = np.asarray(centre, float), np.asarray(scale, float)
    out = []
    for d in range(devices):
        x = rng.normal(0.0, 0.5, (rows, F))
        t = quiet_until + int(rng.uniform(3, 8) * rate)
        while t < rows:
            n = int(rng.uniform(2, 5) * rate)
            x[t:t + n, rng.integers(F)] += 10.0
            t += n + int(rng.uniform(4, 10) * rate)
        values = centre + scale * x
        values[rng.random((rows, F)) < 0.02] = np.nan
        ts = T0 + d * 0.001 + np.arange(rows) / rate
        if d == 0:
            ts[rows // 2:] += 7200.0  # the device's clock jumps two hours ahead
        enc = rng.choice(5, rows, p=[0.8, 0.05, 0.05, 0.05, 0.05])
        out.append(Stream(f"dev-{d:02d}", ts, values, enc))
    return out


def row_payload(s: Stream, i: int, features: list[str]) -> bytes:
    e, vals = int(s.encoding[i]), s.values[i]
    parts = []
    for name, v in zip(features, vals.tolist()):
        if v != v:  # NaN: a missing reading, written the way this row's sensor firmware writes it
            if e == 3:
                continue
            parts.append(f'"{name}": {"NaN" if e == 2 else "null"}')
        else:
            parts.append(f'"{name}": {v!r}')
    if e == 4:
        parts.append('"firmware_rev": 7')
    return f'{{"ts": {float(s.ts[i])!r}, "values": {{{", ".join(parts)}}}}}'.encode()


BAD_KINDS = ("malformed", "empty", "wrong_ts", "wrong_values", "string_value", "array", "infinity",
             "unknown_sensors", "huge", "duplicate", "stale", "stranger")


def bad_payload(kind: str, s: Stream, i: int, features: list[str], rng: random.Random) -> tuple[str, bytes]:
    topic = TOPIC.format(device=s.device)
    ts = float(s.ts[i])
    if kind == "malformed":
        return topic, b'{"ts": 17, "values": {"' + features[0].encode()
    if kind == "empty":
        return topic, b""
    if kind == "wrong_ts":
        return topic, json.dumps({"ts": rng.choice([True, "noon", [1], {"t": 1}, -5, 1e300]), "values": {features[0]: 1.0}}).encode()
    if kind == "wrong_values":
        return topic, json.dumps({"ts": ts, "values": rng.choice([[1, 2], "hot", 3, None])}).encode()
    if kind == "string_value":
        return topic, json.dumps({"ts": ts, "values": {features[0]: "hot"}}).encode()
    if kind == "array":
        return topic, b"[1, 2, 3]"
    if kind == "infinity":
        return topic, f'{{"ts": {ts!r}, "values": {{"{features[-1]}": Infinity}}}}'.encode()
    if kind == "unknown_sensors":
        return topic, json.dumps({"ts": ts, "values": {"zz_unknown": 1.0}}).encode()
    if kind == "huge":
        return topic, json.dumps({"ts": ts, "values": {features[0]: 1.0}, "pad": "x" * 70_000}).encode()
    if kind == "duplicate":
        return topic, row_payload(s, i, features)
    if kind == "stale":
        return topic, row_payload(s, max(0, i - rng.randint(1, 20)), features)
    # a device nobody registered: the first few are tracked, the rest hit max_devices
    return TOPIC.format(device=f"stranger-{rng.randint(0, 9)}"), json.dumps({"ts": ts, "values": {features[0]: 0.0}}).encode()


def expected_alerts(bundle: Path, streams: list[Stream]) -> dict[str, list[tuple[str, str, float, int]]]:
    """Offline: each device's clean stream through score_rows → [(alert id, state, ts, row)]."""
    from agent.manifest import load_manifest
    from agent.messages import ModelRef, alert_id, iso_utc
    from agent.scoring import open_scorer, score_rows

    m = load_manifest(bundle)
    scorer = open_scorer("onnxruntime", bundle, m)
    model = ModelRef(name=m.name, version=m.version)
    out = {}
    for s in streams:
        a = score_rows(scorer, s.values)["anomaly"]
        edges = np.flatnonzero(np.diff(np.concatenate([[0], a])))
        out[s.device] = [(alert_id(AGENT_ID, s.device, st, iso_utc(float(s.ts[t])), model), st, float(s.ts[t]), int(t))
                         for t in edges for st in ["raised" if a[t] else "cleared"]]
    return out


# ------------------------------------------------------------------ MQTT clients

def _paho(client_id: str, persistent: bool):
    import paho.mqtt.client as mqtt
    from paho.mqtt.enums import CallbackAPIVersion

    c = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=client_id, protocol=mqtt.MQTTv5)
    c.reconnect_delay_set(1, 1)
    c.max_queued_messages_set(0)
    return c


def _connect(c, broker: Mosquitto, persistent: bool) -> None:
    from paho.mqtt.packettypes import PacketTypes
    from paho.mqtt.properties import Properties

    props = Properties(PacketTypes.CONNECT)
    props.SessionExpiryInterval = 3600 if persistent else 0
    c.connect_async(broker.host, broker.port, keepalive=10, clean_start=not persistent, properties=props)
    c.loop_start()


class Consumer:
    """Persistent-session subscriber to the alerts: what a control room would receive."""

    SYS_DROPPED = "$SYS/broker/publish/messages/dropped"

    def __init__(self, broker: Mosquitto, client_id: str = "faults-consumer"):
        self.got: list[dict] = []  # every delivery, duplicates included
        self.lock = threading.Lock()
        self.subscribed = threading.Event()
        self.broker_dropped = 0.0
        c = self.c = _paho(client_id, True)
        c.on_connect = lambda c, u, f, rc, p: c.subscribe([("edgewatch/alerts/#", 1), (self.SYS_DROPPED, 0)])
        c.message_callback_add(self.SYS_DROPPED, self._on_sys)
        c.on_subscribe = lambda c, u, mid, rcs, p: self.subscribed.set()
        c.on_message = self._on_message
        _connect(c, broker, True)

    def _on_sys(self, c, u, msg) -> None:
        try:
            self.broker_dropped = float(msg.payload)
        except ValueError:
            pass

    def _on_message(self, c, u, msg) -> None:
        try:
            a = json.loads(msg.payload)
        except ValueError:
            return
        a["_t"] = time.monotonic()
        with self.lock:
            self.got.append(a)

    def alerts(self) -> list[dict]:
        with self.lock:
            return list(self.got)

    def close(self) -> None:
        self.c.disconnect()
        self.c.loop_stop()


class Publisher(threading.Thread):
    """Publishes the streams at ``rate`` rows/s per device (QoS 1) with bad input mixed in."""

    def __init__(self, broker: Mosquitto, streams: list[Stream], features: list[str], rate: float,
                 bad_fraction: float, seed: int, start_row: int = 0, stop_row: int | None = None):
        super().__init__(name="publisher", daemon=True)
        self.streams, self.features, self.rate = streams, features, rate
        self.bad_fraction = bad_fraction
        self.rng = random.Random(seed)
        self.rows = len(streams[0].ts)
        self.start_row, self.stop_row = start_row, stop_row if stop_row is not None else self.rows
        self.sent = 0  # QoS 1 messages handed to paho
        self.acked = 0  # PUBACKs from the broker
        self.bad_sent: dict[str, int] = {k: 0 for k in BAD_KINDS}
        self.row_sent_at: dict[int, float] = {}  # row index -> monotonic time it was published
        self.done = threading.Event()
        self._ack_lock = threading.Lock()
        c = self.c = _paho(f"faults-pub-{seed}", False)
        c.max_inflight_messages_set(1000)
        c.on_publish = self._on_publish
        _connect(c, broker, False)

    def _on_publish(self, c, u, mid, rc, p) -> None:
        with self._ack_lock:
            self.acked += 1

    def _pub(self, topic: str, payload: bytes) -> None:
        self.c.publish(topic, payload, qos=1)
        self.sent += 1

    def run(self) -> None:
        t0 = time.monotonic()
        for n, i in enumerate(range(self.start_row, self.stop_row)):
            delay = t0 + n / self.rate - time.monotonic()
            if delay > 0:
                time.sleep(delay)
            self.row_sent_at[i] = time.monotonic()
            for s in self.streams:
                self._pub(TOPIC.format(device=s.device), row_payload(s, i, self.features))
                if self.rng.random() < self.bad_fraction:
                    kind = self.rng.choice(BAD_KINDS)
                    self._pub(*bad_payload(kind, s, i, self.features, self.rng))
                    self.bad_sent[kind] += 1
        self.done.set()

    def wait_acked(self, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with self._ack_lock:
                if self.acked >= self.sent:
                    return True
            time.sleep(0.1)
        return False

    def close(self) -> None:
        self.c.disconnect()
        self.c.loop_stop()


# ------------------------------------------------------------------ report

@dataclass
class Report:
    kind: str = "faults"
    seconds: float = 0.0
    devices: int = 0
    rows_per_device: int = 0
    telemetry_sent: int = 0
    bad_sent: int = 0
    telemetry_lost: int = 0
    devices_with_loss: int = 0
    alerts_expected: int = 0
    alerts_delivered: int = 0
    alerts_lost: int = 0
    alerts_unexpected: int = 0
    alerts_shifted: int = 0
    duplicates: int = 0
    out_of_order: int = 0
    agent_restarts: int = 0
    agent_crashes: int = 0
    broker_kills: int = 0
    reloads_refused: int = 0
    scored_while_corrupt: float = 0.0
    steady_rss_mb: float = 0.0
    peak_rss_mb: float = 0.0
    metrics_polls: int = 0
    metrics_failures: int = 0
    metrics_max_s: float = 0.0
    # flood only
    flood_offered: int = 0
    flood_rate: float = 0.0
    processed_rate: float = 0.0
    dropped: dict = field(default_factory=dict)
    invalid: dict = field(default_factory=dict)
    broker_dropped: float = 0.0
    recovery_s: float = 0.0
    recovery_alerts_expected: int = 0
    recovery_alerts_lost: int = 0
    recovery_alerts_unexpected: int = 0
    alert_latency_max_s: float = 0.0
    notes: list = field(default_factory=list)
    lost_ids: list = field(default_factory=list)

    @property
    def memory_ratio(self) -> float:
        return self.peak_rss_mb / self.steady_rss_mb if self.steady_rss_mb else float("inf")

    def table(self) -> str:
        rows = [
            ("run", f"{self.kind}, {self.seconds:.0f} s, {self.devices} devices x {self.rows_per_device} rows"),
            ("telemetry sent (clean rows)", self.telemetry_sent),
            ("bad messages mixed in", self.bad_sent),
            ("telemetry messages lost", f"{self.telemetry_lost} ({self.devices_with_loss} device(s))"),
            ("alerts expected (offline score_rows)", self.alerts_expected),
            ("alerts delivered (unique ids)", self.alerts_delivered),
            ("alerts LOST", self.alerts_lost),
            ("alerts unexpected", self.alerts_unexpected),
            ("alerts moved by a telemetry gap (same state, other row)", self.alerts_shifted),
            ("duplicate deliveries", self.duplicates),
            ("alerts first delivered out of order", self.out_of_order),
            ("agent kill -9 + restart", self.agent_restarts),
            ("agent crashes (exits we did not cause)", self.agent_crashes),
            ("broker kill -9 + restart", self.broker_kills),
        ]
        if self.kind == "faults":
            rows += [("corrupt-bundle reloads refused", self.reloads_refused),
                     ("windows scored while bundle corrupt", int(self.scored_while_corrupt))]
        else:
            rows += [("flood messages offered", self.flood_offered),
                     ("flood rate offered / agent processed (msg/s)", f"{self.flood_rate:.0f} / {self.processed_rate:.0f}"
                      f" ({self.flood_rate / max(self.processed_rate, 1):.1f}x)"),
                     ("agent drops by reason", ", ".join(f"{k} {v:.0f}" for k, v in self.dropped.items()) or "0"),
                     ("agent invalid by reason", ", ".join(f"{k} {v:.0f}" for k, v in self.invalid.items() if v) or "0"),
                     ("broker drops ($SYS)", int(self.broker_dropped)),
                     ("recovery after the flood (s)", f"{self.recovery_s:.1f}"),
                     ("alerts after the flood: expected / LOST / unexpected",
                      f"{self.recovery_alerts_expected} / {self.recovery_alerts_lost} / {self.recovery_alerts_unexpected}"),
                     ("slowest alert after the flood (row sent -> alert received)", f"{self.alert_latency_max_s:.2f} s")]
        rows += [
            ("peak RSS / steady RSS (MB)", f"{self.peak_rss_mb:.0f} / {self.steady_rss_mb:.0f} = {self.memory_ratio:.2f}x"),
            ("/metrics polls, failures, slowest", f"{self.metrics_polls}, {self.metrics_failures}, {self.metrics_max_s * 1000:.0f} ms"),
        ]
        w = max(len(k) for k, _ in rows)
        lines = [f"{k:<{w}}  {v}" for k, v in rows]
        lines += [f"note: {n}" for n in self.notes]
        return "\n".join(lines)


# ------------------------------------------------------------------ helpers shared by the runs

def _tiny_bundle(path: Path) -> Path:
    """A real bundle in milliseconds (tests/tiny_bundle.py): ONNX zero reconstruction, threshold 8."""
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
    try:
        from tiny_bundle import make_tiny_bundle
    finally:
        sys.path.pop(0)
    return make_tiny_bundle(path)


class _Monitor(threading.Thread):
    """Samples the agent's memory and times /metrics; restarts the agent if it died on its own."""

    def __init__(self, agent: Agent, period: float = 0.25, metrics_every: float = 0.5):
        super().__init__(name="monitor", daemon=True)
        self.agent, self.period, self.metrics_every = agent, period, metrics_every
        self.stop_ev = threading.Event()
        self.paused = threading.Event()  # set while we kill/restart on purpose (see pause())
        # Held through one sample-and-poll: pause() waits for a poll under way, so a poll that began
        # before a deliberate kill -9 cannot fail after it and count as the agent's failure.
        self.lock = threading.Lock()
        self.polls = self.failures = 0
        self.max_s = 0.0
        self.last_metrics: dict[str, float] = {}

    def run(self) -> None:
        last_poll = 0.0
        while not self.stop_ev.wait(self.period):
            with self.lock:
                last_poll = self._tick(last_poll)

    def _tick(self, last_poll: float) -> float:
        a = self.agent
        a.sample()
        if self.paused.is_set() or a.check_crash():
            return last_poll
        now = time.monotonic()
        if a.ready_at is None and a.alive and a.ready():  # e.g. after a restart the monitor made
            a.ready_at = now
        if now - last_poll >= self.metrics_every and a.alive and a.ready_at is not None:
            last_poll = now
            code, body, dt = a.http("/metrics", timeout=5.0)
            self.polls += 1
            self.max_s = max(self.max_s, dt)
            if code != 200:
                self.failures += 1
            else:
                self.last_metrics = parse_metrics(body)
        return last_poll

    @contextlib.contextmanager
    def pause(self):
        """No sampling or polling inside (a deliberate kill and restart)."""
        with self.lock:
            self.paused.set()
        try:
            yield
        finally:
            self.paused.clear()


def _quiesce(agent: Agent, timeout: float, still: float = 2.0) -> bool:
    """Wait until the agent's counters stop moving with nothing queued and no alert unacknowledged."""
    deadline = time.monotonic() + timeout
    last, since = None, time.monotonic()
    while time.monotonic() < deadline:
        m = agent.metrics()
        if m:
            key = (processed(m), m.get("edgewatch_queue_depth"), m.get("edgewatch_outbox_backlog"))
            if key != last:
                last, since = key, time.monotonic()
            elif key[1] == 0 and key[2] == 0 and time.monotonic() - since >= still:
                return True
        else:
            agent.check_crash()
        time.sleep(0.2)
    return False


def _state_rows(state_dir: Path) -> dict[str, int]:
    from agent.checkpoint import StateStore

    store = StateStore(state_dir / "state.sqlite")
    try:
        _, devices = store.load()
    finally:
        store.close()
    return {name: int(st["rows"]) for name, (st, _) in devices.items()}


def _compare(report: Report, streams: list[Stream], expected: dict, delivered: list[dict], rows: dict[str, int],
             near_s: float) -> None:
    """Delivered alerts against the offline transitions, by id. Where a device lost telemetry (the
    broker died before forwarding or saving it) a transition next to the gap can legitimately move
    to a neighbouring row, which changes its id: an expected transition with no exact id but an
    alert of the same state within ``near_s`` seconds plus the device's lost rows counts as moved,
    not lost; a delivered alert with no transition of its state that near is unexpected."""
    first: dict[str, dict] = {}
    for a in delivered:
        first.setdefault(a.get("id"), a)
    ours = {s.device for s in streams}
    report.duplicates = sum(1 for a in delivered if a.get("device") in ours) - sum(
        1 for a in first.values() if a.get("device") in ours)
    from datetime import datetime

    for s in streams:
        dev, T = s.device, len(s.ts)
        exp = expected[dev]
        exp_ids = [e[0] for e in exp]
        got = {i: (a["state"], datetime.fromisoformat(a["ts"]).timestamp()) for i, a in first.items()
               if a.get("device") == dev}
        report.alerts_expected += len(exp)
        lost_rows = T - rows.get(dev, 0)
        report.telemetry_lost += max(0, lost_rows)
        report.devices_with_loss += lost_rows != 0
        near = near_s + max(0, lost_rows) * (s.ts[1] - s.ts[0])  # rows missing can delay a transition by as many
        exact = [e for e in exp if e[0] in got]
        report.alerts_delivered += len(exact)
        for _, st, ts, t in (e for e in exp if e[0] not in got):
            if lost_rows and any(gs == st and abs(gt - ts) <= near for i, (gs, gt) in got.items() if i not in exp_ids):
                report.alerts_shifted += 1
            else:
                report.alerts_lost += 1
                report.lost_ids.append(f"{dev} {st} {ts:.3f} (row {t})")
        for i, (gs, gt) in got.items():
            if i not in exp_ids and not (lost_rows and any(st == gs and abs(ts - gt) <= near for _, st, ts, _ in exp)):
                report.alerts_unexpected += 1
                report.lost_ids.append(f"{dev} unexpected {gs} {gt:.3f}")
        # first deliveries of this device's alerts should come in transition order
        order = sorted((i for i in got if i in exp_ids), key=lambda i: first[i]["_t"])
        report.out_of_order += sum(1 for a, b in zip(order, order[1:]) if exp_ids.index(a) > exp_ids.index(b))
        if lost_rows:
            report.notes.append(f"{dev}: {lost_rows} telemetry row(s) lost; {len(exact)}/{len(exp)} alerts exact")


def _compare_after(report: Report, streams: list[Stream], expected: dict, delivered: list[dict], after_row: int,
                   sent_at: dict[int, float]) -> None:
    """The flood run: every transition of the fault-only-after-the-flood streams must arrive (telemetry
    lost during the flood is before them, and no alert was active then), and nothing else."""
    first: dict[str, dict] = {}
    for a in delivered:
        first.setdefault(a.get("id"), a)
    lat = []
    for s in streams:
        exp = {e[0]: e for e in expected[s.device] if e[3] >= after_row}
        got = {i for i, a in first.items() if a.get("device") == s.device}
        report.recovery_alerts_expected += len(exp)
        missing = [e for i, e in exp.items() if i not in got]
        report.recovery_alerts_lost += len(missing)
        report.lost_ids += [f"{s.device} {st} {ts:.3f} (row {t}, after the flood)" for _, st, ts, t in missing]
        report.recovery_alerts_unexpected += len(got - set(exp))
        lat += [first[i]["_t"] - sent_at[e[3]] for i, e in exp.items() if i in got and e[3] in sent_at]
    report.alert_latency_max_s = max(lat, default=0.0)


# ------------------------------------------------------------------ the faults run

def run_faults(seconds: float = 40.0, devices: int = 6, rate: float = 20.0, seed: int = 1,
               broker_kill_every: tuple[float, float] | None = (4.0, 8.0),
               agent_kill_every: tuple[float, float] | None = (8.0, 14.0),
               corrupt_bundle: bool = True, bad_fraction: float = 0.05, calm: float = 6.0,
               bundle: Path | None = None, workdir: Path | None = None, log=print) -> Report:
    own_tmp = workdir is None
    workdir = Path(tempfile.mkdtemp(prefix="edgewatch-faults-")) if own_tmp else Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    live_bundle = workdir / "bundle"
    if bundle is None:
        _tiny_bundle(live_bundle)
    else:
        shutil.copytree(bundle, live_bundle, dirs_exist_ok=True)
    pristine = workdir / "bundle.pristine"
    shutil.copytree(live_bundle, pristine, dirs_exist_ok=True)

    from agent.manifest import load_manifest

    m = load_manifest(live_bundle)
    rows = int(seconds * rate)
    streams = make_streams(m.features, m.scaler.centre, m.scaler.scale, devices, rows, rate, seed)
    expected = expected_alerts(live_bundle, streams)
    report = Report(seconds=seconds, devices=devices, rows_per_device=rows, telemetry_sent=rows * devices)

    broker = Mosquitto(workdir / "broker").start()
    agent = Agent(workdir, broker, live_bundle, max_devices=devices + 3).start()
    consumer = publisher = monitor = None
    try:
        consumer = Consumer(broker)
        if not consumer.subscribed.wait(10):
            raise RuntimeError("alert consumer could not subscribe")
        if not agent.wait_ready(60):
            raise RuntimeError(f"agent not ready; see {agent.log}")
        time.sleep(1.5)  # both sessions (subscriptions) are in the broker's autosave before any kill
        monitor = _Monitor(agent)
        monitor.start()
        publisher = Publisher(broker, streams, m.features, rate, bad_fraction, seed)
        t_start = time.monotonic()
        publisher.start()

        # calm start: the steady-state memory reference
        time.sleep(calm)
        agent.sample()
        steady = [r for t, r in agent.rss_samples if t >= t_start + calm * 0.5]
        report.steady_rss_mb = (statistics.median(steady) if steady else agent.rss_samples[-1][1]) / 2**20

        next_broker = time.monotonic() + rng.uniform(*broker_kill_every) * 0.5 if broker_kill_every else None
        next_agent = time.monotonic() + rng.uniform(*agent_kill_every) * 0.5 if agent_kill_every else None
        corrupt_at = t_start + seconds * 0.45 if corrupt_bundle else None
        end = t_start + seconds - 3.0
        while not publisher.done.is_set() and time.monotonic() < end:
            now = time.monotonic()
            due = [(t, k) for t, k in ((next_broker, "broker"), (next_agent, "agent"), (corrupt_at, "corrupt"))
                   if t is not None]
            t, kind = min(due) if due else (end, "none")
            if t > now:
                time.sleep(min(t - now, 0.2))
                continue
            if kind == "broker":
                broker.kill9()
                time.sleep(rng.uniform(0.2, 1.5))
                broker.start()
                next_broker = time.monotonic() + rng.uniform(*broker_kill_every)
                log(f"  [{time.monotonic() - t_start:5.1f}s] broker kill -9 #{broker.kills}, restarted")
            elif kind == "agent":
                with monitor.pause():
                    agent.kill9()
                if not agent.wait_ready(60):
                    raise RuntimeError(f"agent did not come back after kill -9; see {agent.log}")
                next_agent = time.monotonic() + rng.uniform(*agent_kill_every)
                log(f"  [{time.monotonic() - t_start:5.1f}s] agent kill -9 #{agent.restarts}, back up")
            elif kind == "corrupt":
                corrupt_at = None
                report.reloads_refused, report.scored_while_corrupt = _corrupt_and_reload(agent, live_bundle, pristine, log)
                log(f"  [{time.monotonic() - t_start:5.1f}s] bundle corrupted, SIGHUP refused: {report.reloads_refused}")
            # one fault at a time, a breath between them
            soon = time.monotonic() + 1.0
            next_broker = None if next_broker is None else max(next_broker, soon)
            next_agent = None if next_agent is None else max(next_agent, soon)

        publisher.join()
        if not publisher.wait_acked(120):
            report.notes.append(f"publisher: {publisher.sent - publisher.acked} message(s) never acknowledged by the broker")
        if not agent.wait_ready(60):
            raise RuntimeError(f"agent not ready at the end; see {agent.log}")
        if not _quiesce(agent, 120):
            report.notes.append("agent did not go quiet within 120 s")
        # the alerts the agent published must reach the consumer; give it a moment after the outbox emptied
        _settle(consumer, 2.0)
        monitor.stop_ev.set()
        monitor.join()
        code = agent.stop()
        if code != 0:
            report.notes.append(f"agent exit code on SIGTERM: {code}")
            report.agent_crashes += 1
        report.seconds = time.monotonic() - t_start
        report.bad_sent = sum(publisher.bad_sent.values())
        report.agent_restarts, report.broker_kills = agent.restarts, broker.kills
        report.agent_crashes += agent.crashes
        report.peak_rss_mb = agent.peak_rss / 2**20
        report.metrics_polls, report.metrics_failures, report.metrics_max_s = monitor.polls, monitor.failures, monitor.max_s
        delivered = consumer.alerts()
        with open(workdir / "alerts.jsonl", "w") as f:  # for a second look after the run
            f.writelines(json.dumps(a) + "\n" for a in delivered)
        _compare(report, streams, expected, delivered, _state_rows(agent.state_dir), _near(m, rate))
        tracebacks = agent.log.read_text(errors="replace").count("Traceback")
        if tracebacks:
            report.notes.append(f"{tracebacks} traceback(s) in {agent.log}")
        return report
    finally:
        if monitor is not None:
            monitor.stop_ev.set()
        agent.kill()
        for c in (publisher, consumer):
            if c is not None:
                c.close()
        broker.stop()
        if own_tmp and os.environ.get("EDGEWATCH_KEEP_FAULTS") is None:
            shutil.rmtree(workdir, ignore_errors=True)


def _near(m, rate: float) -> float:
    """How far a lost row can move a transition: a window, the smoothing and the debounce, in seconds."""
    t = m.threshold
    return (m.window + m.score.smoothing + t.raise_after + t.clear_after + 2) / rate


def _settle(consumer: Consumer, still: float, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    n, since = -1, time.monotonic()
    while time.monotonic() < deadline:
        k = len(consumer.alerts())
        if k != n:
            n, since = k, time.monotonic()
        elif time.monotonic() - since >= still:
            return
        time.sleep(0.1)


def _corrupt_and_reload(agent: Agent, live: Path, pristine: Path, log) -> tuple[int, float]:
    """Overwrite the model with garbage while the agent runs, SIGHUP it, check the refusal and that
    it keeps scoring, then put the bundle back. Returns (reloads refused, windows scored meanwhile)."""
    before = agent.log.read_text(errors="replace").count("refused")
    w0 = agent.metrics().get("edgewatch_windows_scored_total", 0.0)
    onnx = next(live.glob("*.onnx"))
    onnx.write_bytes(os.urandom(256))
    time.sleep(0.3)
    agent.proc.send_signal(signal.SIGHUP)
    deadline = time.monotonic() + 10
    refused = 0
    while time.monotonic() < deadline:
        refused = agent.log.read_text(errors="replace").count("refused") - before
        if refused:
            break
        time.sleep(0.1)
    time.sleep(1.5)  # scoring goes on with the model in memory
    w1 = agent.metrics().get("edgewatch_windows_scored_total", 0.0)
    shutil.copyfile(pristine / onnx.name, onnx)
    return refused, w1 - w0


# ------------------------------------------------------------------ the flood run

def _encode_publish(topic: str, payload: bytes) -> bytes:
    t = topic.encode()
    body = struct.pack("!H", len(t)) + t + payload
    n, rl = len(body), bytearray()
    while True:
        b, n = n % 128, n // 128
        rl.append(b | (0x80 if n else 0))
        if not n:
            break
    return b"\x30" + bytes(rl) + body


def flood_child(host: str, port: int, seconds: float, seed: int, devices: int) -> None:
    """A raw MQTT 3.1.1 QoS 0 publisher: pre-encoded packets, a few syscalls per thousand messages."""
    rng = random.Random(seed)
    packets = []
    for i in range(4000):
        r = rng.random()
        dev = f"flood-{rng.randrange(devices)}"
        topic = TOPIC.format(device=dev)
        if r < 0.80:
            p = json.dumps({"ts": T0 + i, "values": {"a": rng.random(), "b": rng.random(), "c": rng.random()}}).encode()
        elif r < 0.90:
            p = b'{"ts": 1, "values": {'
        elif r < 0.999:
            p = json.dumps({"ts": "noon", "values": {"a": 1}}).encode()
        else:
            p = b"x" * 70_000
        packets.append(_encode_publish(topic, p))
    blob = b"".join(packets)
    s = socket.create_connection((host, port))
    cid = f"flood-{seed}".encode()
    var = b"\x00\x04MQTT\x04\x02\x00\x3c" + struct.pack("!H", len(cid)) + cid
    s.sendall(b"\x10" + bytes([len(var)]) + var)
    s.recv(4)  # CONNACK
    sent, end = 0, time.monotonic() + seconds
    while time.monotonic() < end:
        s.sendall(blob)
        sent += len(packets)
    s.sendall(b"\xe0\x00")  # DISCONNECT
    s.close()
    print(sent, flush=True)


def run_flood(flood_seconds: float = 10.0, devices: int = 4, rate: float = 20.0, seed: int = 2,
              calm: float = 6.0, after: float = 20.0, publishers: int = 1, flood_devices: int = 5000,
              workdir: Path | None = None, log=print) -> Report:
    own_tmp = workdir is None
    workdir = Path(tempfile.mkdtemp(prefix="edgewatch-flood-")) if own_tmp else Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    bundle = _tiny_bundle(workdir / "bundle")
    from agent.manifest import load_manifest

    m = load_manifest(bundle)
    seconds = calm + flood_seconds + after
    rows = int(seconds * rate)
    # faults (alerts) only after the flood: what the agent decides then shows whether it recovered
    after_row = int((calm + flood_seconds + 4.0) * rate)
    streams = make_streams(m.features, m.scaler.centre, m.scaler.scale, devices, rows, rate, seed, quiet_until=after_row)
    expected = expected_alerts(bundle, streams)
    report = Report(kind="flood", devices=devices, rows_per_device=rows, telemetry_sent=rows * devices)

    broker = Mosquitto(workdir / "broker", persistence=False, max_queued=100_000).start()
    agent = Agent(workdir, broker, bundle, max_devices=devices + 20).start()
    consumer = publisher = monitor = None
    children: list[subprocess.Popen] = []
    try:
        consumer = Consumer(broker, "flood-consumer")
        if not consumer.subscribed.wait(10) or not agent.wait_ready(60):
            raise RuntimeError(f"setup failed; see {agent.log}")
        monitor = _Monitor(agent, metrics_every=0.5)
        monitor.start()
        publisher = Publisher(broker, streams, m.features, rate, 0.0, seed)
        t_start = time.monotonic()
        publisher.start()
        time.sleep(calm)
        steady = [r for t, r in agent.rss_samples if t >= t_start + calm * 0.5]
        report.steady_rss_mb = statistics.median(steady) / 2**20
        m0 = agent.metrics()
        t_flood = time.monotonic()
        log(f"  [{t_flood - t_start:5.1f}s] flood: {publishers} raw publisher(s) for {flood_seconds:g} s")
        root = str(Path(__file__).resolve().parent.parent)
        for k in range(publishers):
            children.append(subprocess.Popen(
                [sys.executable, "-m", "bench.faults", "--flood-child", broker.host, str(broker.port),
                 str(flood_seconds), str(seed * 100 + k), str(flood_devices)],
                stdout=subprocess.PIPE, cwd=root))
        offered = 0
        for ch in children:
            out = ch.communicate(timeout=flood_seconds + 60)[0]
            offered += int(out.split()[-1]) if out.split() else 0
        t_end_flood = time.monotonic()
        report.flood_offered = offered
        report.flood_rate = offered / max(t_end_flood - t_flood, 1e-9)
        # recovery: the agent is back to the head of the stream when the broker holds nothing for it
        # and the counters only grow at the normal rate
        normal_rate = devices * rate
        t_rec = None
        prev = None
        while time.monotonic() < t_end_flood + 120:
            mm = agent.metrics()
            if mm:
                p = (time.monotonic(), processed(mm))
                if prev is not None:
                    r = (p[1] - prev[1]) / max(p[0] - prev[0], 1e-9)
                    if mm.get("edgewatch_queue_depth", 1) == 0 and r < 3 * normal_rate + 50:
                        t_rec = p[0]
                        break
                prev = p
            time.sleep(0.5)
        report.recovery_s = (t_rec - t_end_flood) if t_rec else float("inf")
        m1 = agent.metrics()
        report.processed_rate = (processed(m1) - processed(m0)) / max((t_rec or time.monotonic()) - t_flood, 1e-9)
        log(f"  [{time.monotonic() - t_start:5.1f}s] flood over: {offered} offered, recovered after {report.recovery_s:.1f} s")
        publisher.join()
        publisher.wait_acked(60)
        _quiesce(agent, 60)
        _settle(consumer, 2.0)
        monitor.stop_ev.set()
        monitor.join()
        final = agent.metrics()
        report.dropped = {k.split('"')[1]: v for k, v in final.items() if k.startswith("edgewatch_dropped_messages_total")}
        report.invalid = {k.split('"')[1]: v for k, v in final.items() if k.startswith("edgewatch_invalid_messages_total")}
        report.broker_dropped = consumer.broker_dropped
        code = agent.stop()
        if code != 0:
            report.agent_crashes += 1
            report.notes.append(f"agent exit code on SIGTERM: {code}")
        report.seconds = time.monotonic() - t_start
        report.agent_crashes += agent.crashes
        report.peak_rss_mb = agent.peak_rss / 2**20
        report.metrics_polls, report.metrics_failures, report.metrics_max_s = monitor.polls, monitor.failures, monitor.max_s
        _compare(report, streams, expected, consumer.alerts(), _state_rows(agent.state_dir), _near(m, rate))
        _compare_after(report, streams, expected, consumer.alerts(), after_row, publisher.row_sent_at)
        return report
    finally:
        if monitor is not None:
            monitor.stop_ev.set()
        for ch in children:
            if ch.poll() is None:
                ch.kill()
                ch.wait()
        agent.kill()
        for c in (publisher, consumer):
            if c is not None:
                c.close()
        broker.stop()
        if own_tmp and os.environ.get("EDGEWATCH_KEEP_FAULTS") is None:
            shutil.rmtree(workdir, ignore_errors=True)


# ------------------------------------------------------------------ command line

def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--flood-child"]:
        host, port, seconds, seed, devices = argv[1:6]
        flood_child(host, int(port), float(seconds), int(seed), int(devices))
        return 0
    p = argparse.ArgumentParser(prog="python -m bench.faults", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--minutes", type=float, default=10.0, help="streaming time of the faults run (default 10)")
    p.add_argument("--devices", type=int, default=10)
    p.add_argument("--rate", type=float, default=20.0, help="rows per second per device (default 20)")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--bundle", type=Path, help="bundle to serve (default: the tiny test bundle)")
    p.add_argument("--no-broker-kills", action="store_true")
    p.add_argument("--no-agent-kills", action="store_true")
    p.add_argument("--flood", action="store_true", help="run the overload scenario instead")
    p.add_argument("--flood-seconds", type=float, default=20.0)
    p.add_argument("--publishers", type=int, default=1, help="flood publisher processes (default 1)")
    p.add_argument("--workdir", type=Path, help="keep logs, state and broker files here")
    a = p.parse_args(argv)
    if a.flood:
        r = run_flood(flood_seconds=a.flood_seconds, devices=a.devices, rate=a.rate, seed=a.seed,
                      publishers=a.publishers, workdir=a.workdir)
        print(r.table())
        ok = (r.recovery_alerts_lost == 0 and r.recovery_alerts_unexpected == 0 and r.agent_crashes == 0
              and r.memory_ratio <= 1.5 and r.metrics_failures == 0)
    else:
        r = run_faults(seconds=a.minutes * 60, devices=a.devices, rate=a.rate, seed=a.seed,
                       broker_kill_every=None if a.no_broker_kills else (5.0, 15.0),
                       agent_kill_every=None if a.no_agent_kills else (15.0, 40.0),
                       bundle=a.bundle, workdir=a.workdir, calm=15.0)
        print(r.table())
        ok = (r.alerts_lost == 0 and r.alerts_unexpected == 0 and r.agent_crashes == 0 and r.memory_ratio <= 1.5
              and r.metrics_failures == 0)
    if r.lost_ids:
        print("lost:", *r.lost_ids[:20], sep="\n  ")
    print("PASS" if ok else "FAIL")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
