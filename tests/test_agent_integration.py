"""The real agent against a real mosquitto: telemetry in, alerts out, metrics over HTTP,
availability, broker outages and restarts. Bundles are real (onnxruntime)."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path

import numpy as np
import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from agent.app import App
from agent.config import load_config
from agent.outbox import Outbox
from conftest import Broker
from tiny_bundle import make_tiny_bundle

pytestmark = pytest.mark.integration
T0 = 1_700_000_000.0


# ------------------------------------------------------------------ helpers

class Collector:
    """A paho subscriber that records (topic, payload, retain) and lets tests wait for a condition."""

    def __init__(self, broker, topic: str, client_id: str | None = None, persistent: bool = False):
        self.msgs: list[tuple[str, bytes, bool]] = []
        self.cv = threading.Condition()
        self.c = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=client_id or f"t-{uuid.uuid4().hex[:8]}",
                             protocol=mqtt.MQTTv5)
        self.c.on_connect = lambda c, u, f, rc, p: c.subscribe(topic, qos=1)
        self.c.on_message = self._on_message
        self.c.reconnect_delay_set(1, 1)
        props = Properties(PacketTypes.CONNECT)
        props.SessionExpiryInterval = 300 if persistent else 0
        self.c.connect(broker.host, broker.port, clean_start=not persistent, properties=props)
        self.c.loop_start()

    def _on_message(self, c, u, msg):
        with self.cv:
            self.msgs.append((msg.topic, msg.payload, bool(msg.retain)))
            self.cv.notify_all()

    def wait(self, pred, timeout: float = 10.0):
        with self.cv:
            assert self.cv.wait_for(lambda: pred(self.msgs), timeout), f"timed out; got {self.msgs[-5:]}"

    def alerts(self, prefix: str) -> list[dict]:
        with self.cv:
            return [json.loads(p) for t, p, _ in self.msgs if t.startswith(f"{prefix}/alerts/")]

    def close(self):
        self.c.disconnect()
        self.c.loop_stop()


def publisher(broker) -> mqtt.Client:
    c = mqtt.Client(CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5)
    c.connect(broker.host, broker.port)
    c.loop_start()
    return c


def telemetry(t: float, values) -> bytes:
    return json.dumps({"ts": t, "values": dict(zip("abc", map(float, values)))}).encode()


def rows_with_fault(seed: int, n: int = 120, fault: tuple[int, int] | None = None, sensor: int = 1) -> np.ndarray:
    rows = np.random.default_rng(seed).normal(size=(n, 3)) * 0.5
    if fault:
        rows[fault[0]:fault[1], sensor] += 10.0
    return rows


def agent_config(tmp_path: Path, broker, bundle: Path, prefix: str, **kw):
    return load_config(
        agent_id=kw.pop("agent_id", "gw-test"),
        bundle=str(bundle),
        state_dir=str(tmp_path / "state"),
        mqtt={"host": broker.host, "port": broker.port, "reconnect_min_s": 1, "reconnect_max_s": 1,
              "client_id": f"edgewatch-{prefix}", **kw.pop("mqtt", {})},
        topics={"telemetry": [f"{prefix}/+/{{device}}/telemetry"], "alerts": f"{prefix}/alerts/{{device}}",
                "state": f"{prefix}/state/{{device}}", "status": f"{prefix}/status/{{agent_id}}",
                "dead_letter": f"{prefix}/dead/{{agent_id}}"},
        metrics={"port": 0},
        batching={"max_batch": 32, "max_latency_ms": 2},
        **kw,
    )


def http_get(port: int, path: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()


def metric(text: str, name: str) -> float:
    for line in text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[-1])
    raise AssertionError(f"{name} not in /metrics")


def wait_until(pred, timeout: float = 10.0, what: str = "condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return
        time.sleep(0.02)
    raise AssertionError(f"timed out waiting for {what}")


@pytest.fixture
def own_broker(fresh_broker):
    """A restartable mosquitto whose persistence works (sessions survive a stop/start)."""
    return fresh_broker


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return make_tiny_bundle(tmp_path_factory.mktemp("tiny"))


@pytest.fixture
def prefix():
    return f"it-{uuid.uuid4().hex[:8]}"


# ------------------------------------------------------------------ tests

def test_fault_on_one_device_raises_then_clears_and_metrics_show_it(tmp_path, broker, tiny, prefix):
    app = App(agent_config(tmp_path, broker, tiny, prefix)).start()
    sub = Collector(broker, f"{prefix}/#")
    pub = publisher(broker)
    try:
        assert app.link.wait_connected(10)
        data = {"pump-1": rows_with_fault(1), "pump-2": rows_with_fault(2, fault=(50, 70)), "pump-3": rows_with_fault(3)}
        infos = []
        for t in range(120):
            for dev, rows in data.items():
                infos.append(pub.publish(f"{prefix}/line1/{dev}/telemetry", telemetry(T0 + t, rows[t]), qos=1))
        for bad in (b"{not json", b'{"ts": 1, "values": {"zzz": 1}}', b'{"ts": "noon", "values": {"a": 1}}'):
            infos.append(pub.publish(f"{prefix}/line1/pump-9/telemetry", bad, qos=1))
        for i in infos:
            i.wait_for_publish(10)

        sub.wait(lambda ms: any(t == f"{prefix}/alerts/pump-2" and b'"cleared"' in p for t, p, _ in ms))
        wait_until(lambda: app.metrics.registry.get_sample_value("edgewatch_windows_scored_total") == 360, what="all scored")
        # the three bad payloads may be decoded after the last window is scored
        wait_until(lambda: app.metrics.registry.get_sample_value("edgewatch_messages_total", {"result": "invalid"}) == 3,
                   what="bad payloads counted")
        wait_until(lambda: app.outbox.backlog() == 0, what="PUBACKs")  # the consumer may see it before we do
        alerts = sub.alerts(prefix)
        assert [(a["device"], a["state"]) for a in alerts] == [("pump-2", "raised"), ("pump-2", "cleared")]
        # the alerts were flushed to disk before the telemetry behind them was acknowledged
        assert app.checkpoints.durable == app.outbox.sync
        wait_until(lambda: app.outbox._synced == app.outbox._puts >= 1, what="outbox flushed by a checkpoint")
        raised = alerts[0]
        assert raised["top_sensors"][0]["sensor"] == "b"
        assert raised["model"] == {"name": "tiny", "version": "1.0.0"} and len(raised["id"]) == 32
        assert raised["ts"] == "2023-11-14T22:14:11.000Z"  # second row of the fault (raise_after=2)

        status, body = http_get(app.http.port, "/metrics")
        assert status == 200
        assert metric(body, 'edgewatch_messages_total{result="ok"}') == 360
        assert metric(body, 'edgewatch_messages_total{result="invalid"}') == 3
        assert metric(body, 'edgewatch_invalid_messages_total{reason="malformed_json"}') == 1
        assert metric(body, 'edgewatch_invalid_messages_total{reason="no_known_sensors"}') == 1
        assert metric(body, 'edgewatch_invalid_messages_total{reason="bad_timestamp"}') == 1
        assert metric(body, 'edgewatch_alerts_total{state="raised"}') == 1
        assert metric(body, 'edgewatch_alerts_total{state="cleared"}') == 1
        assert metric(body, "edgewatch_mqtt_connected") == 1
        assert metric(body, "edgewatch_devices") == 3
        assert metric(body, "edgewatch_outbox_backlog") == 0
        assert metric(body, "edgewatch_inference_batches_total") < 360  # micro-batched
        assert 'edgewatch_bundle_info{backend="onnxruntime",name="tiny",version="1.0.0"} 1.0' in body
        assert http_get(app.http.port, "/readyz")[0] == 200
        assert http_get(app.http.port, "/healthz")[0] == 200
        assert http_get(app.http.port, "/nope")[0] == 404
        sub.wait(lambda ms: sum(t == f"{prefix}/dead/gw-test" for t, _, _ in ms) == 3)
        dead = [json.loads(p) for t, p, _ in sub.msgs if t == f"{prefix}/dead/gw-test"]
        assert sorted(d["reason"] for d in dead) == ["bad_timestamp", "malformed_json", "no_known_sensors"]
        assert dead[0]["topic"] == f"{prefix}/line1/pump-9/telemetry"
    finally:
        pub.loop_stop()
        app.stop()
    # Retained state and status outlive the agent: a newcomer sees the current state and "offline".
    late = Collector(broker, f"{prefix}/#")
    try:
        late.wait(lambda ms: {t for t, _, r in ms if r} >= {f"{prefix}/state/pump-2", f"{prefix}/status/gw-test"})
        retained = {t: p for t, p, r in late.msgs if r}
        assert json.loads(retained[f"{prefix}/state/pump-2"])["state"] == "cleared"
        assert retained[f"{prefix}/status/gw-test"] == b"offline"
    finally:
        late.close()
        sub.close()


def test_alert_raised_while_broker_is_down_is_delivered_after_restart(tmp_path, own_broker, tiny, prefix):
    fresh_broker = own_broker
    # The consumer has a persistent session, so the broker keeps its subscription across the outage.
    sub = Collector(fresh_broker, f"{prefix}/alerts/#", client_id=f"consumer-{prefix}", persistent=True)
    app = App(agent_config(tmp_path, fresh_broker, tiny, prefix)).start()
    try:
        assert app.link.wait_connected(10)
        time.sleep(0.3)  # let the consumer's SUBACK land before the outage
        fresh_broker.stop()
        wait_until(lambda: not app.link.connected, what="agent to notice the outage")
        assert http_get(app.http.port, "/readyz")[0] == 503
        rows = rows_with_fault(5, n=40, fault=(20, 40), sensor=0)
        for t in range(40):  # messages that were already received when the broker went away
            app.pipeline.submit(f"{prefix}/l/press-1/telemetry", telemetry(T0 + t, rows[t]), time.time())
        wait_until(lambda: app.metrics.registry.get_sample_value("edgewatch_alerts_total", {"state": "raised"}) == 1,
                   what="alert raised")
        assert app.outbox.backlog() == 1  # persisted, not lost, not acked
        assert app.metrics.registry.get_sample_value("edgewatch_outbox_backlog") == 1
        fresh_broker.start()
        sub.wait(lambda ms: any(b'"raised"' in p for _, p, _ in ms), timeout=15)
        wait_until(lambda: app.outbox.backlog() == 0, what="outbox acked")
        [alert] = sub.alerts(prefix)
        assert alert["device"] == "press-1" and alert["top_sensors"][0]["sensor"] == "a"
        assert app.link.connected and http_get(app.http.port, "/readyz")[0] == 200
    finally:
        app.stop()
        sub.close()


def test_outbox_left_by_a_previous_run_is_sent_at_start(tmp_path, broker, tiny, prefix):
    ob = Outbox(tmp_path / "state" / "outbox.sqlite")
    ob.put(f"{prefix}/alerts/old-1", b'{"id": "x1"}', f"{prefix}/state/old-1")
    ob.put(f"{prefix}/alerts/old-2", b'{"id": "x2"}', None)
    ob.close()
    sub = Collector(broker, f"{prefix}/#")
    time.sleep(0.2)
    app = App(agent_config(tmp_path, broker, tiny, prefix)).start()
    try:
        sub.wait(lambda ms: sum(t.startswith(f"{prefix}/alerts/") for t, _, _ in ms) == 2)
        assert [p for t, p, _ in sub.msgs if "/alerts/" in t] == [b'{"id": "x1"}', b'{"id": "x2"}']  # in order
        wait_until(lambda: app.outbox.backlog() == 0, what="outbox acked")
    finally:
        app.stop()
        sub.close()


def test_refused_connack_is_not_connected(tmp_path, tiny, prefix):
    pw = tmp_path / "passwd"
    pw.write_text("")
    subprocess.run(["mosquitto_passwd", "-b", str(pw), "agent", "s3cret"], check=True, capture_output=True)
    (tmp_path / "b").mkdir()
    b = Broker(tmp_path / "b", extra_conf=f"allow_anonymous false\npassword_file {pw}\n").start()
    wrong, right = tmp_path / "wrong", tmp_path / "right"
    wrong.write_text("nope\n")
    right.write_text("s3cret\n")
    try:
        app = App(agent_config(tmp_path, b, tiny, prefix, mqtt={"username": "agent", "password_file": str(wrong)}))
        app.start()
        try:
            wait_until(lambda: app.link.last_refusal is not None, what="CONNACK refusal")
            assert not app.link.connected
            assert app.metrics.registry.get_sample_value("edgewatch_mqtt_connected") == 0
            code, body = http_get(app.http.port, "/readyz")
            assert code == 503 and "not connected" in body
        finally:
            app.stop()
        app = App(agent_config(tmp_path, b, tiny, prefix, mqtt={"username": "agent", "password_file": str(right)}))
        app.start()
        try:
            assert app.link.wait_connected(10)
        finally:
            app.stop()
    finally:
        b.stop()


def _spawn_agent(tmp_path: Path, broker, bundle: Path, prefix: str, agent_id: str) -> subprocess.Popen:
    cfg = tmp_path / f"{agent_id}.yaml"
    cfg.write_text(
        f"agent_id: {agent_id}\nbundle: {bundle}\nstate_dir: {tmp_path / agent_id}\n"
        f"mqtt: {{host: {broker.host}, port: {broker.port}}}\n"
        f"topics:\n  telemetry: ['{prefix}/+/{{device}}/telemetry']\n  status: '{prefix}/status/{{agent_id}}'\n"
        f"metrics: {{enabled: false}}\n"
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("EDGEWATCH_")}
    return subprocess.Popen([sys.executable, "-m", "agent.cli", "run", "--config", str(cfg)],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env)


def test_status_online_then_offline_on_sigterm_and_last_will_on_kill9(tmp_path, broker, tiny, prefix):
    sub = Collector(broker, f"{prefix}/status/#")
    status = lambda agent: [p for t, p, _ in sub.msgs if t == f"{prefix}/status/{agent}"]  # noqa: E731
    try:
        graceful = _spawn_agent(tmp_path, broker, tiny, prefix, "gw-term")
        killed = _spawn_agent(tmp_path, broker, tiny, prefix, "gw-kill")
        sub.wait(lambda ms: status("gw-term")[-1:] == [b"online"] and status("gw-kill")[-1:] == [b"online"], 20)

        graceful.send_signal(signal.SIGHUP)  # systemctl reload: same bundle, verified again, kept running
        time.sleep(0.5)
        assert graceful.poll() is None
        graceful.send_signal(signal.SIGTERM)
        out = graceful.communicate(timeout=15)[0].decode()
        assert graceful.returncode == 0, out
        assert "received SIGHUP; reloading" in out and "now serving bundle tiny 1.0.0" in out
        assert "received SIGTERM; stopping" in out and "Traceback" not in out
        sub.wait(lambda ms: status("gw-term")[-1:] == [b"offline"])

        killed.send_signal(signal.SIGKILL)  # no goodbye: the broker publishes the last will
        killed.wait(10)
        sub.wait(lambda ms: status("gw-kill")[-1:] == [b"offline"])
    finally:
        for p in (locals().get("graceful"), locals().get("killed")):
            if p is not None and p.poll() is None:
                p.kill()
                p.wait()
        sub.close()


@pytest.mark.parametrize("protocol", ["5", "3.1.1"])
def test_telemetry_sent_while_agent_is_down_is_scored_after_restart(tmp_path, broker, tiny, prefix, protocol):
    """Persistent session: the broker queues QoS 1 telemetry for the agent's client id."""
    cfg = agent_config(tmp_path, broker, tiny, prefix, mqtt={"protocol": protocol})
    app = App(cfg).start()
    assert app.link.wait_connected(10)
    time.sleep(0.2)  # SUBACK
    app.stop()
    pub = publisher(broker)
    try:
        rows = rows_with_fault(9, n=30)
        for t in range(30):
            pub.publish(f"{prefix}/l/late-1/telemetry", telemetry(T0 + t, rows[t]), qos=1).wait_for_publish(5)
    finally:
        pub.disconnect()
        pub.loop_stop()
    app = App(cfg).start()
    try:
        wait_until(lambda: app.metrics.registry.get_sample_value("edgewatch_windows_scored_total") == 30,
                   what="queued telemetry scored")
    finally:
        app.stop()


def _notify_socket(tmp_path, monkeypatch):
    import socket

    path = tmp_path / "notify.sock"
    s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    s.bind(str(path))
    s.settimeout(0.1)
    monkeypatch.setenv("NOTIFY_SOCKET", str(path))
    monkeypatch.setenv("WATCHDOG_USEC", "200000")  # ping every 0.1 s
    monkeypatch.delenv("WATCHDOG_PID", raising=False)
    return s


def _collect(sock, seconds: float) -> list[str]:
    out, deadline = [], time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            out.append(sock.recv(4096).decode())
        except OSError:
            pass
    return out


def test_systemd_ready_only_once_connected_watchdog_from_the_loop(tmp_path, broker, tiny, prefix, monkeypatch):
    sock = _notify_socket(tmp_path, monkeypatch)
    try:
        # Broker unreachable: the loop is healthy (watchdog) but the service is not ready.
        cfg = agent_config(tmp_path, broker, tiny, prefix, mqtt={"port": 1})
        app = App(cfg).start()
        try:
            msgs = _collect(sock, 0.8)
            assert "WATCHDOG=1" in msgs and not any(m.startswith("READY=1") for m in msgs)
        finally:
            app.stop()
        assert "STOPPING=1" in _collect(sock, 0.2)

        app = App(agent_config(tmp_path, broker, tiny, prefix)).start()
        try:
            msgs = _collect(sock, 0.8)
            assert any(m.startswith("READY=1") for m in msgs) and app.link.connected
            assert msgs.count("WATCHDOG=1") >= 3
        finally:
            app.stop()
    finally:
        sock.close()


def test_reload_swaps_a_good_bundle_and_refuses_a_bad_one(tmp_path, broker, prefix):
    import shutil

    live = tmp_path / "bundle"
    make_tiny_bundle(live, version="1.0.0")
    path = tmp_path / "agent.yaml"
    path.write_text(f"agent_id: gw-r\nbundle: {live}\nstate_dir: {tmp_path / 'state'}\n"
                    f"mqtt: {{host: {broker.host}, port: {broker.port}}}\nmetrics: {{port: 0}}\n"
                    f"topics: {{telemetry: ['{prefix}/+/{{device}}/telemetry']}}\n")
    app = App(load_config(path), str(path)).start()
    info = lambda: app.metrics.registry.get_sample_value(  # noqa: E731
        "edgewatch_bundle_info", {"name": "tiny", "version": "2.0.0", "backend": "onnxruntime"})
    try:
        shutil.rmtree(live)
        make_tiny_bundle(live, version="2.0.0", threshold=9.0)
        assert app.reload()
        assert info() == 1 and app.metrics.registry.get_sample_value("edgewatch_threshold") == 9.0
        wait_until(lambda: app.pipeline.manifest.version == "2.0.0", what="swap in the loop")

        (live / "vae.onnx").write_bytes(b"tampered")
        assert not app.reload()  # refused: hashes
        assert app.pipeline.manifest.version == "2.0.0" and app.manifest.version == "2.0.0"
        path.write_text(path.read_text() + "bogus: 1\n")
        assert not app.reload()  # refused: config
        app.pipeline.submit(f"{prefix}/l/p/telemetry", telemetry(T0, [0, 0, 0]), time.time())
        wait_until(lambda: app.metrics.registry.get_sample_value("edgewatch_windows_scored_total") == 1,
                   what="still scoring")
    finally:
        app.stop()


# ------------------------------------------------------------------ the real VAE bundle

@pytest.fixture(scope="module")
def vae_bundle(tmp_path_factory):
    bundle_factory = pytest.importorskip("bundle_factory")
    return bundle_factory.make_bundle(tmp_path_factory.mktemp("vae"))


@pytest.mark.parametrize("backend", ["onnxruntime", "litert"])
def test_trained_vae_bundle_end_to_end_matches_offline_scoring(tmp_path, broker, vae_bundle, prefix, backend):
    """A trained VAE bundle, through mosquitto, decides exactly what offline score_rows decides."""
    from agent.backends import available
    from agent.manifest import load_manifest
    from agent.scoring import open_scorer, score_rows
    from bundle_factory import simulated

    if backend not in available():
        pytest.skip(f"{backend} runtime not installed")
    features, normal, _ = simulated(400, 0)  # the machine and operating point the bundle learnt
    _, faulty, _ = simulated(400, 0, fault=(200, 300))
    data = {"pump-ok": normal, "pump-bad": faulty}
    m = load_manifest(vae_bundle)
    offline = open_scorer(backend, vae_bundle, m)  # what edge-trainer score runs
    expected = {}
    for dev, rows in data.items():
        a = score_rows(offline, rows)["anomaly"]
        edges = np.flatnonzero(np.diff(np.concatenate([[0], a])))
        expected[dev] = [("raised" if a[t] else "cleared", t) for t in edges]
    bad = expected["pump-bad"]
    assert expected["pump-ok"] == [] and bad and [s for s, _ in bad] == ["raised", "cleared"] * (len(bad) // 2)
    assert 200 <= bad[0][1] < 300  # raised inside the fault (and cleared after it)

    app = App(agent_config(tmp_path, broker, vae_bundle, prefix, backend=backend)).start()
    sub = Collector(broker, f"{prefix}/alerts/#")
    pub = publisher(broker)
    try:
        assert app.link.wait_connected(10)
        infos = []
        for t in range(400):
            for dev, rows in data.items():
                body = json.dumps({"ts": T0 + t, "values": dict(zip(features, map(float, rows[t])))}).encode()
                infos.append(pub.publish(f"{prefix}/line1/{dev}/telemetry", body, qos=1))
        for i in infos:
            i.wait_for_publish(10)
        wait_until(lambda: app.metrics.registry.get_sample_value("edgewatch_windows_scored_total") == 800, what="scored")
        sub.wait(lambda ms: len(ms) == len(bad))
        got = [(a["state"], round(_epoch(a["ts"]) - T0)) for a in sub.alerts(prefix)]
        assert [a["device"] for a in sub.alerts(prefix)] == ["pump-bad"] * len(bad)
        assert got == bad
        assert sub.alerts(prefix)[0]["model"] == {"name": m.name, "version": m.version}
    finally:
        pub.loop_stop()
        app.stop()
        sub.close()


def _epoch(iso: str) -> float:
    from datetime import datetime

    return datetime.fromisoformat(iso).timestamp()


def test_agent_drains_a_burst_through_the_embedded_broker(tmp_path, tiny, prefix):
    """Regression: the demo's fallback broker capped in-flight messages at 100 while the agent acks
    telemetry only at checkpoints, so a burst trickled in at ~100 msg/s and most of the demo went unscored."""
    from agent.broker import EmbeddedBroker

    eb = EmbeddedBroker(host="127.0.0.1", port=0).start()
    app = App(agent_config(tmp_path, eb, tiny, prefix)).start()
    pub = publisher(eb)
    try:
        assert app.link.wait_connected(10)
        rows = rows_with_fault(5, n=1000)
        infos = [pub.publish(f"{prefix}/line1/pump-{d}/telemetry", telemetry(T0 + t, rows[t]), qos=1)
                 for t in range(1000) for d in range(2)]
        for i in infos:
            i.wait_for_publish(10)
        wait_until(lambda: app.metrics.registry.get_sample_value("edgewatch_windows_scored_total") == 2000,
                   timeout=8, what="the whole burst scored")
    finally:
        pub.disconnect()
        pub.loop_stop()
        app.stop()
        eb.stop()


def test_startup_objects_are_frozen_out_of_the_garbage_collector(tmp_path, broker, tiny, prefix):
    """A full GC pass walks every tracked object while holding the GIL: the objects that live as
    long as the process are frozen at start, so such a pass costs the pipeline little."""
    import gc

    gc.unfreeze()
    app = App(agent_config(tmp_path, broker, tiny, prefix))
    try:
        assert gc.get_freeze_count() == 0
        app.start()
        assert gc.get_freeze_count() > 10_000  # the runtimes, the bundle, the metrics...
    finally:
        app.stop()
        gc.unfreeze()
