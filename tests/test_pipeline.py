"""The hot path without a broker: micro-batching, decisions, bad input, caps. Time is injected."""
from __future__ import annotations

import json

import numpy as np
import pytest

from agent.backends import open_backend
from agent.config import load_config
from agent.manifest import load_manifest
from agent.messages import Alert
from agent.metrics import Metrics
from agent.pipeline import Pipeline
from agent.scoring import Scorer, score_rows
from tiny_bundle import make_tiny_bundle

T0 = 1_700_000_000.0


class Counting:
    """Wraps a real backend and counts inference calls (the runtime itself is not mocked)."""

    def __init__(self, inner):
        self.inner, self.name, self.calls, self.sizes = inner, inner.name, 0, []

    def run(self, *inputs):
        self.calls += 1
        self.sizes.append(inputs[0].shape[0])
        return self.inner.run(*inputs)


class FakeClock:
    def __init__(self):
        self.t = 100.0

    def __call__(self):
        return self.t


@pytest.fixture(scope="module")
def bundle(tmp_path_factory):
    return make_tiny_bundle(tmp_path_factory.mktemp("bundle"))


class Rig:
    def __init__(self, bundle, **cfg):
        self.manifest = load_manifest(bundle)
        self.backend = Counting(open_backend("onnxruntime", bundle, self.manifest))
        self.cfg = load_config(agent_id="gw", bundle=str(bundle), **cfg)
        self.metrics = Metrics()
        self.clock = FakeClock()
        self.alerts: list[tuple[str, Alert, str]] = []
        self.p = Pipeline(self.cfg, Scorer(self.manifest, self.backend), self.metrics, self.sink,
                          clock=self.clock, now=lambda: T0 + 1e6)

    def sink(self, topic, payload, state_topic, recv):
        self.alerts.append((topic, Alert.model_validate_json(payload), state_topic))

    def send(self, device, ts, values, topic=None):
        body = json.dumps({"ts": ts, "values": dict(zip("abc", map(float, values)))}).encode()
        self.p.handle(topic or f"factory/l1/{device}/telemetry", body, ts)

    def sample(self, name, **labels):
        return self.metrics.registry.get_sample_value(name, labels or None) or 0.0


def test_a_cleared_alert_reports_the_score_the_clear_was_decided_on(tmp_path):
    """Regression (the demo, 2026-12-01): with clear_smoothing an alert clears on the mean of the
    newest scores, but the cleared alert carried the long smoothed score, still above the threshold
    ("ALERT CLEARED ... score 3.23 (threshold 2.64)"). It now carries the mean the clear compared."""
    from agent.manifest import write_manifest

    b = make_tiny_bundle(tmp_path / "b", threshold=8.0, clear_after=2)
    m = load_manifest(b)
    write_manifest(b, m.model_copy(update={
        "score": m.score.model_copy(update={"smoothing": 10}),
        "threshold": m.threshold.model_copy(update={"clear_smoothing": 2})}))
    r = Rig(b, batching={"max_batch": 1, "max_latency_ms": 0})
    for t in range(80):
        v = np.zeros(3)
        if 20 <= t < 45:
            v[2] += 10
        r.send("sick", T0 + t, v)
    r.p.flush()
    (_, raised, _), (_, cleared, _) = r.alerts
    assert (raised.state, cleared.state) == ("raised", "cleared")
    assert raised.score > raised.threshold
    assert cleared.score < cleared.threshold * 0.9  # what the clear compared: below the clear level


def test_one_inference_call_per_micro_batch_across_devices(bundle):
    r = Rig(bundle, batching={"max_batch": 4, "max_latency_ms": 5})
    for i, dev in enumerate(["p1", "p2", "p3"]):
        r.send(dev, T0, [0, 0, 0])
    assert r.backend.calls == 0  # waiting for the batch to fill
    r.clock.t += 0.004
    r.p.poll()
    assert r.backend.calls == 0  # deadline not reached
    r.clock.t += 0.002
    r.p.poll()
    assert r.backend.sizes == [3]  # latency bound: one call for three devices
    for k in range(2):  # 6 windows: one full batch now, two wait
        for dev in ["p1", "p2", "p3"]:
            r.send(dev, T0 + 1 + k, [0, 0, 0])
    assert r.backend.sizes == [3, 4]
    r.p.flush()
    assert r.backend.sizes == [3, 4, 2]
    assert r.sample("edgewatch_inference_batches_total") == 3
    assert r.sample("edgewatch_windows_scored_total") == 9
    assert r.sample("edgewatch_messages_total", result="ok") == 9
    assert r.sample("edgewatch_devices") == 3


def test_live_decisions_equal_offline_score_rows(bundle):
    """Interleaved devices, batched live scoring == score_rows on each device's table."""
    rng = np.random.default_rng(7)
    r = Rig(bundle, batching={"max_batch": 16, "max_latency_ms": 5})
    tables = {}
    for d, dev in enumerate(["m1", "m2", "m3"]):
        rows = rng.normal(size=(300, 3)).astype(np.float32)
        if dev != "m2":
            rows[100 + 40 * d: 130 + 40 * d, d] += 10.0  # a fault on m1 and m3
        rows[5, 1] = np.nan  # a missing value is filled the same way online and offline
        tables[dev] = rows
    for t in range(300):
        for dev, rows in tables.items():
            r.p.handle(f"factory/l1/{dev}/telemetry",
                       json.dumps({"ts": T0 + t, "values": {k: (None if np.isnan(v) else float(v)) for k, v in zip("abc", rows[t])}}).encode(),
                       T0 + t)
    r.p.flush()
    assert max(r.backend.sizes) == 16 and len(r.backend.sizes) < 300 * 3 / 8
    offline = Scorer(r.manifest, open_backend("onnxruntime", bundle, r.manifest))
    for dev, rows in tables.items():
        ref = score_rows(offline, rows)
        edges = np.flatnonzero(np.diff(np.concatenate([[0], ref["anomaly"]])))
        want = [("raised" if ref["anomaly"][t] else "cleared", t) for t in edges]
        got = [(a.state, round(_epoch(a.ts) - T0)) for _, a, _ in r.alerts if a.device == dev]
        assert got == want, dev
        assert want or dev == "m2"
        gauge = r.sample("edgewatch_score", device=dev)
        assert gauge == pytest.approx(ref["score"][-1], rel=1e-5)
    assert not [a for _, a, _ in r.alerts if a.device == "m2"]


def _epoch(iso: str) -> float:
    from datetime import datetime

    return datetime.fromisoformat(iso).timestamp()


def test_fault_raises_once_and_clears_with_hysteresis(bundle):
    r = Rig(bundle, batching={"max_batch": 8, "max_latency_ms": 0})
    rng = np.random.default_rng(1)
    for t in range(120):
        for dev in ("sick", "well"):
            v = rng.normal(size=3) * 0.5
            if dev == "sick" and 40 <= t < 60:
                v[2] += 10
            r.send(dev, T0 + t, v)
        r.p.poll()
    r.p.flush()
    states = [(a.device, a.state) for _, a, _ in r.alerts]
    assert states == [("sick", "raised"), ("sick", "cleared")]
    topic, raised, state_topic = r.alerts[0]
    assert topic == "edgewatch/alerts/sick" and state_topic == "edgewatch/state/sick"
    assert raised.ts == "2023-11-14T22:14:01.000Z"  # row 41: raise_after=2 consecutive scores
    assert raised.score > raised.threshold == 8.0
    assert raised.top_sensors[0].sensor == "c" and raised.top_sensors[0].share > 0.9
    assert raised.model.name == "tiny" and raised.fault is None and raised.agent == "gw"
    cleared = r.alerts[1][1]
    assert cleared.id != raised.id and cleared.score <= 4.0  # below value * clear_ratio
    assert r.sample("edgewatch_alerts_total", state="raised") == 1
    assert r.sample("edgewatch_alerts_total", state="cleared") == 1


def test_out_of_order_and_duplicates_are_counted_and_skipped(bundle):
    r = Rig(bundle)
    r.send("p", T0 + 10, [0, 0, 0])
    r.send("p", T0 + 10, [50, 50, 50])  # duplicate
    r.send("p", T0 + 5, [50, 50, 50])  # older
    r.send("q", T0 + 1, [0, 0, 0])  # other devices keep their own clock
    r.send("p", T0 + 11, [0, 0, 0])
    r.p.flush()
    assert r.sample("edgewatch_invalid_messages_total", reason="out_of_order") == 2
    assert r.sample("edgewatch_messages_total", result="invalid") == 2
    assert r.sample("edgewatch_messages_total", result="ok") == 3
    assert r.p.devices["p"].stream.rows == 2


def test_device_cap(bundle):
    r = Rig(bundle, max_devices=2)
    for i, dev in enumerate(["a", "b", "c", "a", "d"]):
        r.send(dev, T0 + i, [0, 0, 0])
    assert sorted(r.p.devices) == ["a", "b"]
    assert r.sample("edgewatch_dropped_messages_total", reason="unknown_device_cap") == 2
    assert r.sample("edgewatch_messages_total", result="dropped") == 2


def test_invalid_payloads_counted_by_reason_and_dead_lettered(bundle):
    r = Rig(bundle)
    dead = []
    r.p.dead_letter = lambda topic, payload, reason: dead.append(reason)
    r.p.handle("factory/l1/p/telemetry", b"{nope", T0)
    r.p.handle("factory/l1/p/telemetry", b'{"values": {"zzz": 1}}', T0)
    r.p.handle("factory/l1/p/other", b'{"values": {"a": 1}}', T0)
    r.p.handle("factory/l1/p/telemetry", b'{"values": {"a": 1, "extra": 2, "more": 3}}', T0)
    assert dead == ["malformed_json", "no_known_sensors", "wrong_topic"]
    assert r.sample("edgewatch_messages_total", result="invalid") == 3
    assert r.sample("edgewatch_invalid_messages_total", reason="wrong_topic") == 1
    assert r.sample("edgewatch_unknown_sensor_values_total") == 2
    assert r.sample("edgewatch_messages_total", result="ok") == 1


def test_queue_full_drops_are_counted_and_step_drains(bundle):
    r = Rig(bundle, queue={"max_messages": 3}, batching={"max_latency_ms": 0})
    body = lambda t: json.dumps({"ts": T0 + t, "values": {"a": 0, "b": 0, "c": 0}}).encode()  # noqa: E731
    ok = [r.p.submit("factory/l1/p/telemetry", body(t), T0) for t in range(5)]
    assert ok == [True, True, True, False, False]
    assert r.sample("edgewatch_dropped_messages_total", reason="queue_full") == 2
    assert r.p.step(idle_wait=0) == 3
    assert r.sample("edgewatch_windows_scored_total") == 3
    assert r.sample("edgewatch_queue_depth") == 0


def test_per_sensor_topics_assemble_rows(bundle):
    r = Rig(bundle, topics={"telemetry": ["plant/{device}/{sensor}"], "format": "per_sensor"})
    for t in range(3):
        for s in "abc":
            r.p.handle(f"plant/m1/{s}", json.dumps({"ts": T0 + t, "value": 1.0}).encode(), T0)
    r.p.handle("plant/m1/zzz", b"1", T0)
    r.p.flush()
    assert r.sample("edgewatch_windows_scored_total") == 3
    assert r.sample("edgewatch_messages_total", result="ok") == 9
    assert r.sample("edgewatch_invalid_messages_total", reason="no_known_sensors") == 1


def test_inference_failure_costs_one_batch_not_the_loop(bundle):
    r = Rig(bundle)
    r.backend.inner = type("Broken", (), {"run": lambda self, *a: 1 / 0})()
    r.send("p", T0, [0, 0, 0])
    r.p.flush()
    assert r.sample("edgewatch_inference_errors_total") == 1
    r.backend.inner = open_backend("onnxruntime", bundle, r.manifest)
    r.send("p", T0 + 1, [0, 0, 0])
    r.p.flush()
    assert r.sample("edgewatch_windows_scored_total") == 1


def test_bundle_swap_keeps_windows_and_active_alerts(bundle, tmp_path):
    r = Rig(bundle, batching={"max_latency_ms": 0})
    for t in range(10):
        r.send("p", T0 + t, [0, 0, 20 if t >= 5 else 0])
        r.p.poll()
    assert [a.state for _, a, _ in r.alerts] == ["raised"]
    v2 = make_tiny_bundle(tmp_path / "v2", version="2.0.0")
    m2 = load_manifest(v2)
    r.p.request_swap(Scorer(m2, open_backend("onnxruntime", v2, m2)))
    r.p.step(idle_wait=0)
    dev = r.p.devices["p"]
    assert dev.stream.rows == 10 and dev.stream.alert.active  # carried over
    np.testing.assert_array_equal(dev.stream.window.view()[-1], [0, 0, 20])
    for t in range(10, 14):
        r.send("p", T0 + t, [0, 0, 0])
        r.p.poll()
    cleared = r.alerts[-1][1]
    assert cleared.state == "cleared" and cleared.model.version == "2.0.0"

    # New features and window: windows restart, the alert state still carries over.
    v3 = make_tiny_bundle(tmp_path / "v3", features=("a", "b", "c", "d"), window=4, version="3.0.0")
    m3 = load_manifest(v3)
    for t in (20, 21):
        r.send("p", T0 + t, [0, 0, 50])
        r.p.poll()
    assert r.alerts[-1][1].state == "raised"
    r.p.request_swap(Scorer(m3, open_backend("onnxruntime", v3, m3)))
    r.p.step(idle_wait=0)
    assert r.p.devices["p"].stream.rows == 0 and r.p.devices["p"].stream.alert.active
    assert r.p.decoder.features == ["a", "b", "c", "d"]
    r.p.handle("factory/l1/p/telemetry", b'{"ts": 1700000030, "values": {"a": 0, "b": 0, "c": 0, "d": 0}}', T0)
    r.p.flush()
    assert r.sample("edgewatch_windows_scored_total") == 17


def test_alerts_of_one_batch_are_one_outbox_commit_each_durable_before_its_publish(bundle, tmp_path):
    """Group commit: the alerts decided in one micro-batch are written to the outbox in one
    transaction (one fsync), and every one of them is in the outbox before any is published."""
    from agent.mqtt_link import MqttLink
    from agent.outbox import Outbox
    from test_outbox import _Commits

    cfg = load_config(agent_id="gw", bundle=str(bundle), batching={"max_batch": 64, "max_latency_ms": 1e4})
    m = load_manifest(bundle)
    outbox = Outbox(tmp_path / "outbox.sqlite")
    link = MqttLink(cfg, lambda *a: None, Metrics(), outbox)  # never connected: paho keeps what is published
    commits = _Commits(outbox._db)
    durable_at_publish = []
    real_publish = link.client.publish

    def publish(topic, payload=None, qos=0, retain=False, properties=None):
        if topic.startswith("edgewatch/alerts/"):
            with _Peek(tmp_path / "outbox.sqlite") as other:
                durable_at_publish.append(other.count())
        return real_publish(topic, payload, qos=qos, retain=retain, properties=properties)

    link.client.publish = publish
    calls = []
    p = Pipeline(cfg, Scorer(m, open_backend("onnxruntime", bundle, m)), Metrics(), sink=None,
                 sink_many=lambda alerts: calls.append(len(alerts)) or link.send_alerts(alerts),
                 clock=FakeClock(), now=lambda: T0 + 1e6)
    devices = [f"p{i}" for i in range(5)]
    for t in range(3):  # raise_after=2: the second faulty row of each device raises
        for dev in devices:
            body = json.dumps({"ts": T0 + t, "values": {"a": 50.0 if t else 0.0, "b": 0.0, "c": 0.0}}).encode()
            p.handle(f"factory/l1/{dev}/telemetry", body, T0)
        p.flush()
    assert calls == [5]  # one hand-over of the batch's five alerts
    assert commits.n == 1  # one outbox transaction for them
    assert durable_at_publish == [5] * 5  # all five were durable before the first went out
    assert outbox.backlog() == 5
    outbox.close()


class _Peek:
    """A second, independent connection: sees only what the outbox has committed."""

    def __init__(self, path):
        import sqlite3
        self.db = sqlite3.connect(path)

    def __enter__(self):
        return self

    def __exit__(self, *a):
        self.db.close()

    def count(self) -> int:
        return int(self.db.execute("SELECT count(*) FROM outbox").fetchone()[0])


def test_batch_deadline_counts_from_arrival_and_late_arrivals_ride_along(bundle):
    """max_latency_ms bounds a window's wait from its message's ARRIVAL: time queued counts, and
    messages that queue up while a batch waits for its deadline are scored with it, at that
    deadline (not in a new batch with a deadline of its own, one max_latency later)."""
    r = Rig(bundle, batching={"max_batch": 64, "max_latency_ms": 5})
    flushed_at = []
    run = r.backend.run
    r.backend.run = lambda *a: flushed_at.append(r.clock.t) or run(*a)
    q = r.p.queue
    arrivals = []  # (clock, device) messages to arrive during the next wait

    def wait(timeout, wake_at=1):  # simulated time: what arrives during the wait, then the wake-up
        for t, dev in arrivals:
            r.clock.t = t
            r.p.submit(f"factory/l1/{dev}/telemetry", body(dev), T0)
        arrivals.clear()
        r.clock.t = max(r.clock.t, start + timeout if r.p._n else r.clock.t)
        return bool(q._q)
    q.wait = wait
    body = lambda dev: json.dumps({"ts": T0, "values": {"a": 0, "b": 0, "c": 0}}).encode()  # noqa: E731

    start = r.clock.t = 100.0
    r.p.submit("factory/l1/p0/telemetry", body("p0"), T0)  # arrives at 100.000
    r.clock.t = 100.004  # the pipeline gets to it 4 ms later (busy elsewhere)
    start = 100.004
    arrivals[:] = [(100.0045, "p1"), (100.0047, "p2"), (100.0049, "p3")]
    assert r.p.step(idle_wait=0) == 4
    assert r.backend.sizes == [4]  # one batch: the three late arrivals rode along
    assert flushed_at == [pytest.approx(100.005)]  # 5 ms after p0 ARRIVED, not after it was handled
