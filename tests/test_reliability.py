"""Reliability of the agent's own pieces, and overload against the real agent and mosquitto.

- State checkpoints (agent.checkpoint): crash anywhere, restore, let the "broker" redeliver what
  was not acknowledged, and every device decides exactly what an uninterrupted run decides.
- An alert the broker refuses (PUBACK failure code) is retried with backoff while running.
- An outbox row that can never be published does not wedge start-up.
- Bounded intake: oversized payloads never queue, queued bytes are bounded, drops are counted.
- A flood at many times capacity (bench/faults.py run_flood): memory bounded, /metrics answers,
  every drop counted, and alerts after the flood are exactly the offline ones.
"""
from __future__ import annotations

import json
import random
import signal
import sys
import threading
import time
import uuid
from pathlib import Path

import numpy as np
import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from agent.app import App
from agent.backends import open_backend
from agent.checkpoint import Checkpointer, StateStore
from agent.config import load_config
from agent.manifest import load_manifest
from agent.messages import Alert
from agent.metrics import Metrics
from agent.outbox import Outbox
from agent.pipeline import Pipeline
from agent.scoring import Scorer, score_rows
from conftest import Broker
from tiny_bundle import make_tiny_bundle

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # bench/ is not an installed package
from bench.faults import run_flood  # noqa: E402

T0 = 1_767_225_600.0
FEATURES = ["a", "b", "c"]


# ------------------------------------------------------------------ checkpoints

@pytest.fixture(scope="module")
def bundle(tmp_path_factory):
    # smoothing 3 and a window that matters: the state a crash could lose is more than a flag
    from agent.manifest import write_manifest

    b = make_tiny_bundle(tmp_path_factory.mktemp("ckpt-bundle"), window=6, raise_after=2, clear_after=3)
    m = load_manifest(b)
    write_manifest(b, m.model_copy(update={"score": m.score.model_copy(update={"smoothing": 3, "tail": 2})}))
    return b


def _stream(seed: int, n: int = 240) -> np.ndarray:
    rng = np.random.default_rng(seed)
    x = rng.normal(0, 0.5, (n, 3))
    t = 20
    while t < n:
        k = int(rng.integers(8, 25))
        x[t:t + k, rng.integers(3)] += 10.0
        t += k + int(rng.integers(15, 40))
    x[rng.random((n, 3)) < 0.05] = np.nan
    return x


def _messages(fmt: str, streams: dict[str, np.ndarray]) -> list[tuple[str, bytes]]:
    """Interleaved by row; per_sensor sends one message per present reading."""
    out = []
    n = len(next(iter(streams.values())))
    for t in range(n):
        for dev, x in streams.items():
            ts = T0 + t
            vals = {f: float(v) for f, v in zip(FEATURES, x[t]) if v == v}
            if fmt == "json":
                out.append((f"factory/l1/{dev}/telemetry", json.dumps({"ts": ts, "values": vals}).encode()))
            else:
                for f, v in vals.items():
                    out.append((f"factory/{dev}/{f}", json.dumps({"ts": ts, "value": v}).encode()))
    return out


class Node:
    """One agent process: a pipeline with its checkpointer. ``acked`` is what the broker saw acknowledged."""

    def __init__(self, bundle, fmt: str, state: Path, alerts: list, acked: list):
        pattern = "factory/+/{device}/telemetry" if fmt == "json" else "factory/{device}/{sensor}"
        cfg = load_config(agent_id="gw", bundle=str(bundle), state_dir=str(state),
                          topics={"telemetry": [pattern], "format": fmt}, batching={"max_batch": 4, "max_latency_ms": 0})
        m = load_manifest(bundle)
        self.p = Pipeline(cfg, Scorer(m, open_backend("onnxruntime", bundle, m)), Metrics(),
                          lambda topic, payload, st, recv: alerts.append(Alert.model_validate_json(payload)))
        self.store = StateStore(state / "state.sqlite")
        self.ck = Checkpointer(self.p, self.store, ack=acked.append, receive_maximum=10)  # a checkpoint per 5
        self.ck.restore()

    def feed(self, msgs: list[tuple[str, bytes]], start: int, stop: int) -> None:
        for token in range(start, stop):  # tokens are 1-based message numbers
            topic, payload = msgs[token - 1]
            self.p.submit(topic, payload, T0 + 1e6, token)
            self.ck.tick(self.p.step(idle_wait=0))


@pytest.mark.parametrize("fmt", ["json", "per_sensor"])
def test_crash_anywhere_restore_and_redelivery_decide_exactly_as_an_uninterrupted_run(tmp_path, bundle, fmt):
    streams = {f"d{i}": _stream(i) for i in range(3)}
    msgs = _messages(fmt, streams)

    ref_alerts: list[Alert] = []
    ref = Node(bundle, fmt, tmp_path / "ref", ref_alerts, [])
    ref.feed(msgs, 1, len(msgs) + 1)
    ref.ck.checkpoint(wait=True)
    if fmt == "json":  # and the uninterrupted agent is the offline scorer
        m = load_manifest(bundle)
        offline = Scorer(m, open_backend("onnxruntime", bundle, m))
        for dev, x in streams.items():
            a = score_rows(offline, x)["anomaly"]
            edges = np.flatnonzero(np.diff(np.concatenate([[0], a])))
            assert [(x.state, x.ts) for x in ref_alerts if x.device == dev] == [
                ("raised" if a[t] else "cleared", _iso(T0 + t)) for t in edges]
    assert {a.state for a in ref_alerts} == {"raised", "cleared"}

    rng = random.Random(7)
    alerts: list[Alert] = []
    acked: list[int] = [0]
    node = Node(bundle, fmt, tmp_path / "crashy", alerts, acked)
    pos, crashes = 1, 0
    while pos <= len(msgs):
        stop = min(len(msgs) + 1, pos + rng.randint(1, 60))
        node.feed(msgs, pos, stop)
        if stop > len(msgs):
            node.ck.checkpoint(wait=True)
            break
        # kill -9: no final checkpoint; the broker redelivers everything after the last acknowledgement
        node.ck.wait()  # (a write already under way lands or not; here it lands, so the run is repeatable)
        node.store.close()
        node = Node(bundle, fmt, tmp_path / "crashy", alerts, acked)
        pos = max(acked) + 1
        crashes += 1
    assert crashes > 10
    first = list(dict.fromkeys(a.id for a in alerts))  # consumers de-duplicate on the id
    assert first == [a.id for a in ref_alerts]
    assert len(alerts) >= len(first)  # at-least-once: a repeat is allowed, a loss is not
    # the per-device state ends where the uninterrupted one does
    for name, dev in ref.p.devices.items():
        got = node.p.devices[name]
        assert got.last_ts == dev.last_ts and got.stream.rows == dev.stream.rows
        np.testing.assert_array_equal(got.stream.window.view(), dev.stream.window.view())
        assert got.stream.alert.active == dev.stream.alert.active


def _iso(ts: float) -> str:
    from agent.messages import iso_utc

    return iso_utc(ts)


def test_a_checkpoint_of_another_bundle_carries_windows_and_alert_state(tmp_path, bundle):
    alerts: list[Alert] = []
    msgs = _messages("json", {"d0": _stream(3, 60)})
    node = Node(bundle, "json", tmp_path / "s", alerts, [])
    node.feed(msgs, 1, 31)
    node.p.submit(*msgs[30], T0, 31)  # one more
    node.ck.tick(node.p.step(idle_wait=0))
    node.ck.checkpoint(wait=True)
    node.store.close()
    before = node.p.devices["d0"]

    v2 = tmp_path / "v2"  # same features and window, another version: windows and alert state carry over
    make_tiny_bundle(v2, window=6, version="2.0.0")
    node2 = Node(v2, "json", tmp_path / "s", [], [])
    d = node2.p.devices["d0"]
    np.testing.assert_array_equal(d.stream.window.view(), before.stream.window.view())
    assert d.last_ts == before.last_ts and d.stream.alert.active == before.stream.alert.active
    node2.store.close()

    v3 = tmp_path / "v3"  # another window length: windows restart, the alert state and the time order stay
    make_tiny_bundle(v3, window=4, version="3.0.0")
    node3 = Node(v3, "json", tmp_path / "s", [], [])
    d = node3.p.devices["d0"]
    assert d.stream.rows == 0 and d.last_ts == before.last_ts and d.stream.alert.active == before.stream.alert.active


def test_unreadable_state_is_moved_aside_and_devices_start_fresh(tmp_path, bundle):
    state = tmp_path / "s"
    state.mkdir()
    (state / "state.sqlite").write_bytes(b"this is not a database" * 100)
    node = Node(bundle, "json", state, [], [])
    assert node.p.devices == {}
    assert list(state.glob("state.sqlite.corrupt-*"))
    node.feed(_messages("json", {"d0": _stream(1, 10)}), 1, 11)
    node.ck.checkpoint(wait=True)
    assert StateStore(state / "state.sqlite").load()[1]["d0"][0]["rows"] == 10


def test_a_failed_checkpoint_is_counted_and_telemetry_still_acknowledged(tmp_path, bundle):
    acked: list[int] = []
    node = Node(bundle, "json", tmp_path / "s", [], acked)
    order: list[str] = []
    node.ck.durable = lambda: order.append("outbox flushed")
    node.ck.ack = lambda tok: (acked.append(tok), order.append(tok))
    node.store.close()  # every write now fails
    node.feed(_messages("json", {"d0": _stream(1, 12)}), 1, 13)
    node.ck.checkpoint(wait=True)
    assert node.p.metrics.checkpoint_failures._value.get() >= 1
    assert max(acked) == 12  # monitoring goes on: the broker is never held back by a broken disk
    # and even so the alert outbox was flushed before each acknowledgement of new telemetry
    # (tick() may repeat an acknowledgement of progress already flushed and acknowledged)
    high = 0
    for i, o in enumerate(order):
        if o != "outbox flushed" and o > high:
            assert i and order[i - 1] == "outbox flushed", order
            high = o


def test_an_outbox_that_cannot_be_flushed_is_counted_and_telemetry_still_acknowledged(tmp_path, bundle):
    acked: list[int] = []
    node = Node(bundle, "json", tmp_path / "s", [], acked)

    def broken_disk():
        raise OSError(5, "Input/output error")
    node.ck.durable = broken_disk
    node.feed(_messages("json", {"d0": _stream(1, 12)}), 1, 13)
    node.ck.checkpoint(wait=True)
    assert node.p.metrics.checkpoint_failures._value.get() >= 1
    assert max(acked) == 12


def test_alerts_are_on_disk_before_the_telemetry_behind_them_is_acknowledged(tmp_path, bundle, monkeypatch):
    """The outbox commits an alert without a disk flush (publishing never waits for the disk); the
    checkpointer flushes it (Outbox.sync) before acknowledging the telemetry it was decided from.
    So a power cut either keeps the alert, or loses telemetry the broker still holds and
    redelivers, and the restarted agent decides the same alert again."""
    from test_outbox import fsynced

    flushed = fsynced(monkeypatch)
    outbox = Outbox(tmp_path / "outbox.sqlite")
    cfg = load_config(agent_id="gw", bundle=str(bundle), state_dir=str(tmp_path),
                      topics={"telemetry": ["factory/+/{device}/telemetry"]}, batching={"max_batch": 4, "max_latency_ms": 0})
    m = load_manifest(bundle)
    puts: list[tuple[int, int]] = []  # (progress when persisted, puts so far)

    def sink_many(alerts):
        outbox.put_many([(t, payload, st) for t, payload, st, _ in alerts])
        puts.append((p.progress, outbox._puts))
    p = Pipeline(cfg, Scorer(m, open_backend("onnxruntime", bundle, m)), Metrics(), None, sink_many=sink_many)
    acks: list[tuple[int, int]] = []  # (acknowledged progress, puts flushed by then)
    ck = Checkpointer(p, StateStore(tmp_path / "state.sqlite"), ack=lambda tok: acks.append((tok, outbox._synced)),
                      receive_maximum=10, durable=outbox.sync)
    msgs = _messages("json", {f"d{i}": _stream(i) for i in range(3)})
    for token, (topic, payload) in enumerate(msgs, 1):
        p.submit(topic, payload, T0 + 1e6, token)
        ck.tick(p.step(idle_wait=0))
    ck.checkpoint(wait=True)
    assert puts and acks and max(tok for tok, _ in acks) == len(msgs)
    for tok, synced in acks:
        assert synced >= max((n for prog, n in puts if prog <= tok), default=0), (tok, synced, puts)
    assert str(tmp_path / "outbox.sqlite-wal") in flushed
    outbox.close()


def test_a_checkpoint_is_encoded_off_the_pipeline_thread_and_holds_the_state_it_was_taken_at(tmp_path, bundle, monkeypatch):
    """The pipeline thread only copies the changed devices; JSON encoding, the write and the
    acknowledgements run on the writer thread, and what lands is the state at checkpoint() time
    even if the pipeline has moved on before the writer got to it."""
    import agent.checkpoint as ckmod

    acked: list[int] = []
    node = Node(bundle, "per_sensor", tmp_path / "s", [], acked)
    msgs = _messages("per_sensor", {"d0": _stream(1, 20), "d1": _stream(2, 20)})
    node.feed(msgs, 1, 34)  # checkpoints every 5 messages: the last one holds token 30
    node.ck.wait()
    assert node.ck._saved_progress == 30
    node.ck.batch, node.ck.interval = 10**9, 1e9  # no more checkpoints but ours
    threads = set()
    real_encode = ckmod.encode_snapshot
    monkeypatch.setattr(ckmod, "encode_snapshot", lambda snap: threads.add(threading.current_thread().name) or real_encode(snap))
    gate, real_save = threading.Event(), node.store.save
    progress_seen_by_ack = []

    def ack(token):
        if threading.current_thread().name == "checkpoint":
            progress_seen_by_ack.append((token, node.ck._saved_progress))
        acked.append(token)
    node.ck.ack = ack

    def slow_save(*a, **kw):
        assert gate.wait(10)
        return real_save(*a, **kw)
    node.store.save = slow_save
    want = {n: (d.last_ts, d.stream.rows, d.stream.window.view().copy()) for n, d in node.p.devices.items()}
    want_pending = {n: (p[0], p[1].copy()) for n, p in node.p.assembler._pending.items()}
    node.ck.checkpoint()  # returns before the write
    assert threads <= {"checkpoint"}
    node.feed(msgs, 34, len(msgs) + 1)  # the pipeline moves on (rows, windows, half-assembled rows change)
    assert any(node.p.devices[n].stream.rows != want[n][1] for n in want)
    gate.set()
    node.ck.wait()
    node.store.save = real_save
    assert threads == {"checkpoint"}
    # the acknowledgements ran before the new progress was published to tick() (which acks up to it too)
    assert progress_seen_by_ack == [(33, 30)] and node.ck._saved_progress == 33
    _, saved = node.store.load()
    for name, (ts, rows, view) in want.items():
        st, buf = saved[name]
        assert st["ts"] == ts and st["rows"] == rows
        w = np.frombuffer(buf, np.float32).reshape(-1, 3)
        np.testing.assert_array_equal(w[st["head"]:st["head"] + 6], view)
        if name in want_pending:
            assert st["pending"][0] == want_pending[name][0]
            np.testing.assert_array_equal(np.array(st["pending"][1], np.float32), want_pending[name][1])


@pytest.mark.parametrize("ts,smooth,pending", [
    (1_767_225_600.125, [0.5, 1e-300, 3.0000000000000004, 1e16, -0.0], None),  # the orjson path
    (1_767_225_600.0, [], None),
    (float("-inf"), [], None),  # a per-sensor device with no row yet
    (1_767_225_600.0, [0.5, float("nan")], None),
    (1_767_225_600.0, [float("inf"), 1.0], None),
    (1_767_225_600.0, [1e308, 1e308], None),  # finite values whose sum is not
    (1_767_225_601.0, [0.25], (1_767_225_601.0, np.array([1.5, np.nan, 2.0], np.float32),
                               np.array([True, False, True]), True)),
    (np.float64(1_767_225_600.5), [np.float64(0.5)], None),  # not plain Python values
])
def test_encoded_checkpoint_state_reads_back_as_json_dumps_wrote_it(ts, smooth, pending):
    """encode_snapshot takes orjson where it says the same as json.dumps; the state read back
    (json.loads, as restore() does) is the same value for value, NaN and infinities included."""
    import math

    from agent.checkpoint import encode_snapshot
    snap = ("d0", ts, 3, 12, 12, 0, tuple(smooth), True, 2, 0, b"\x00" * 8, pending)
    name, text, buf = encode_snapshot(snap)
    assert name == "d0" and buf == b"\x00" * 8 and isinstance(text, str)
    want = {"ts": float(ts), "head": 3, "count": 12, "rows": 12, "since": 0, "smooth": [float(x) for x in smooth],
            "active": True, "above": 2, "below": 0}
    if pending is not None:
        want["pending"] = [pending[0], pending[1].tolist(), pending[2].tolist(), pending[3]]
    same = lambda a, b: (a == b or (isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b))  # noqa: E731
                         or (isinstance(a, list) and isinstance(b, list) and len(a) == len(b) and all(map(same, a, b))))
    got = json.loads(text)
    assert got.keys() == want.keys()
    for k in want:
        assert same(got[k], want[k]) and type(got[k]) is type(want[k]), k


def test_state_store_rewrites_a_device_row_in_place(tmp_path):
    """save() of devices already stored replaces their state and window (an upsert), adds the new
    ones, keeps the others; replace_all starts from an empty table."""
    store = StateStore(tmp_path / "state.sqlite")
    store.save({"m": 1}, [("a", '{"v": 1}', b"\x01"), ("b", '{"v": 1}', b"\x01")])
    store.save(None, [("b", '{"v": 2}', b"\x02"), ("c", '{"v": 2}', b"\x02")])
    store.save({"m": 2}, [("b", '{"v": 3}', b"\x03")])
    meta, devices = store.load()
    assert meta == {"m": 2}
    assert devices == {"a": ({"v": 1}, b"\x01"), "b": ({"v": 3}, b"\x03"), "c": ({"v": 2}, b"\x02")}
    store.save(None, [("c", '{"v": 4}', b"\x04")], replace_all=True)
    assert store.load()[1] == {"c": ({"v": 4}, b"\x04")}
    store.close()


# ------------------------------------------------------------------ intake bounds

def test_oversized_payloads_never_queue_and_queued_bytes_are_bounded(tmp_path, bundle):
    cfg = load_config(agent_id="gw", bundle=str(bundle), max_payload_bytes=4096,
                      queue={"max_messages": 10_000, "max_bytes": 65_536, "full_wait_ms": 0})
    m = load_manifest(bundle)
    metrics = Metrics()
    p = Pipeline(cfg, Scorer(m, open_backend("onnxruntime", bundle, m)), metrics, lambda *a: None)
    big = b"x" * 5000
    assert p.submit("factory/l1/d/telemetry", big, T0) is False
    body = json.dumps({"ts": T0, "values": {"a": 1.0}, "pad": "y" * 3900}).encode()
    queued = [p.submit("factory/l1/d/telemetry", body, T0) for _ in range(40)]
    assert 0 < sum(queued) <= 65_536 // len(body) + 1 < 40
    get = metrics.registry.get_sample_value
    assert get("edgewatch_invalid_messages_total", {"reason": "too_large"}) == 1
    assert get("edgewatch_dropped_messages_total", {"reason": "queue_full"}) == 40 - sum(queued)
    while p.step(idle_wait=0):
        pass
    assert get("edgewatch_messages_total", {"result": "ok"}) == 1  # the rest are the same timestamp
    assert get("edgewatch_invalid_messages_total", {"reason": "out_of_order"}) == sum(queued) - 1


# ------------------------------------------------------------------ alerts the broker refuses

def _collector(broker, topic: str) -> tuple[mqtt.Client, list]:
    got: list = []
    c = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=f"t-{uuid.uuid4().hex[:8]}", protocol=mqtt.MQTTv5)
    ready = threading.Event()
    c.on_connect = lambda c, u, f, rc, p: c.subscribe(topic, qos=1)
    c.on_subscribe = lambda *a: ready.set()
    c.on_message = lambda c, u, msg: got.append((msg.topic, msg.payload))
    c.connect(broker.host, broker.port)
    c.loop_start()
    assert ready.wait(10)
    return c, got


def _wait(pred, timeout: float = 15.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def _app_cfg(tmp_path, broker, bundle, prefix: str, **kw):
    return load_config(
        agent_id="gw-rel", bundle=str(bundle), state_dir=str(tmp_path / "state"),
        mqtt={"host": broker.host, "port": broker.port, "reconnect_min_s": 1, "reconnect_max_s": 2,
              "client_id": f"edgewatch-{prefix}"},
        topics={"telemetry": [f"{prefix}/+/{{device}}/telemetry"], "alerts": f"{prefix}/alerts/{{device}}",
                "state": f"{prefix}/state/{{device}}", "status": f"{prefix}/status/{{agent_id}}"},
        metrics={"port": 0}, batching={"max_batch": 8, "max_latency_ms": 2}, **kw)


def test_an_alert_the_broker_refuses_is_retried_with_backoff_while_running(tmp_path):
    prefix = f"rel-{uuid.uuid4().hex[:6]}"
    acl = tmp_path / "acl"
    acl.write_text(f"topic readwrite {prefix}/status/#\ntopic readwrite {prefix}/+/+/telemetry\n"
                   f"topic readwrite {prefix}/state/#\ntopic read {prefix}/alerts/#\n")  # alerts: not writable
    (tmp_path / "b").mkdir()
    broker = Broker(tmp_path / "b", extra_conf=f"acl_file {acl}\n").start()
    bundle = make_tiny_bundle(tmp_path / "bundle")
    app = App(_app_cfg(tmp_path, broker, bundle, prefix)).start()
    sub, got = _collector(broker, f"{prefix}/alerts/#")
    try:
        assert app.link.wait_connected(10)
        for t in range(6):  # a fault: raised after 2 rows
            vals = {"a": 30.0 if t >= 2 else 0.1, "b": 0.0, "c": 0.0}
            app.pipeline.submit(f"{prefix}/l/p1/telemetry", json.dumps({"ts": T0 + t, "values": vals}).encode(), time.time())
        failures = lambda: app.metrics.registry.get_sample_value("edgewatch_alert_publish_failures_total")  # noqa: E731
        _wait(lambda: failures() >= 3, 15, "three refused attempts (backoff 1 s, 2 s)")
        assert app.outbox.backlog() == 1 and got == []
        acl.write_text(acl.read_text().replace(f"topic read {prefix}/alerts/#", f"topic readwrite {prefix}/alerts/#"))
        broker.proc.send_signal(signal.SIGHUP)  # mosquitto re-reads its ACL: the next retry goes through
        _wait(lambda: len(got) == 1, 15, "the alert after the ACL was fixed")
        _wait(lambda: app.outbox.backlog() == 0, 5, "outbox acknowledged")
        assert json.loads(got[0][1])["state"] == "raised"
    finally:
        sub.disconnect()
        sub.loop_stop()
        app.stop()
        broker.stop()


def test_an_outbox_row_that_can_never_be_published_does_not_wedge_start(tmp_path, broker):
    prefix = f"rel-{uuid.uuid4().hex[:6]}"
    ob = Outbox(tmp_path / "state" / "outbox.sqlite")
    ob.put(f"{prefix}/alerts/+", b'{"id": "bad"}', None)  # a wildcard: MQTT cannot publish it, ever
    ob.put(f"{prefix}/alerts/ok", b'{"id": "good"}', None)
    ob.close()
    sub, got = _collector(broker, f"{prefix}/alerts/#")
    app = App(_app_cfg(tmp_path, broker, make_tiny_bundle(tmp_path / "bundle"), prefix)).start()
    try:
        _wait(lambda: got == [(f"{prefix}/alerts/ok", b'{"id": "good"}')], 10, "the good alert")
        _wait(lambda: app.outbox.backlog() == 0, 5, "outbox empty")
    finally:
        sub.disconnect()
        sub.loop_stop()
        app.stop()


# ------------------------------------------------------------------ overload, end to end

@pytest.mark.integration
def test_a_flood_at_many_times_capacity_keeps_the_agent_bounded_responsive_and_correct(tmp_path):
    r = run_flood(flood_seconds=6, devices=4, rate=20, seed=3, calm=5, after=14, workdir=tmp_path)
    t = "\n" + r.table() + ("\nlost: " + ", ".join(r.lost_ids) if r.lost_ids else "")
    print(t)
    assert r.flood_rate >= 3 * r.processed_rate, t  # it was a flood
    assert r.agent_crashes == 0, t
    assert r.metrics_polls >= 5 and r.metrics_failures == 0 and r.metrics_max_s < 5.0, t  # answered throughout
    assert r.memory_ratio <= 1.5, t
    # every message the agent saw is counted by reason: devices beyond the cap, garbage, oversize
    assert r.dropped.get("unknown_device_cap", 0) > 0, t
    assert r.invalid.get("malformed_json", 0) > 0 and r.invalid.get("too_large", 0) > 0, t
    # recovered: the alerts raised after the flood are exactly the offline ones
    assert r.recovery_s < 60, t
    assert r.recovery_alerts_expected > 0, t
    assert r.recovery_alerts_lost == 0 and r.recovery_alerts_unexpected == 0, t


def _consumer(broker, client_id: str) -> tuple[mqtt.Client, list]:
    from paho.mqtt.packettypes import PacketTypes
    from paho.mqtt.properties import Properties

    got: list = []
    ready = threading.Event()
    c = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=client_id, protocol=mqtt.MQTTv5)
    c.on_connect = lambda c, u, f, rc, p: c.subscribe("+/alerts/#", qos=1)
    c.on_subscribe = lambda *a: ready.set()
    c.on_message = lambda c, u, msg: got.append(json.loads(msg.payload))
    props = Properties(PacketTypes.CONNECT)
    props.SessionExpiryInterval = 3600
    c.connect(broker.host, broker.port, clean_start=False, properties=props)
    c.loop_start()
    assert ready.wait(10)
    return c, got


def test_an_alert_acknowledged_just_before_the_broker_is_killed_is_published_again(tmp_path):
    """mosquitto acknowledges an alert once it holds it in memory; a kill -9 before its next
    autosave forgets it, and a consumer that was away never gets it. The agent keeps an
    acknowledged alert for mqtt.alert_linger_s and publishes it again after a reconnect."""
    prefix = f"rel-{uuid.uuid4().hex[:6]}"
    (tmp_path / "b").mkdir()
    broker = Broker(tmp_path / "b").start()  # persistence on, autosave every 30 min (mosquitto's default)
    consumer, got = _consumer(broker, f"consumer-{prefix}")
    consumer.disconnect()
    consumer.loop_stop()
    broker.stop()  # a clean stop saves: the consumer's session and subscription are on disk
    broker.start()
    app = App(_app_cfg(tmp_path, broker, make_tiny_bundle(tmp_path / "bundle"), prefix)).start()
    try:
        assert app.link.wait_connected(10)
        for t in range(4):
            vals = {"a": 30.0 if t >= 2 else 0.1, "b": 0.0, "c": 0.0}
            app.pipeline.submit(f"{prefix}/l/p1/telemetry", json.dumps({"ts": T0 + t, "values": vals}).encode(), time.time())
        _wait(lambda: app.metrics.registry.get_sample_value("edgewatch_alerts_total", {"state": "raised"}) == 1, 10, "alert")
        _wait(lambda: app.outbox.backlog() == 0, 10, "the broker acknowledged the alert")
        broker.kill()  # before any autosave: the broker forgets the alert it acknowledged
        broker.start()
        _wait(lambda: app.link.connected, 15, "reconnect")
        consumer, got = _consumer(broker, f"consumer-{prefix}")
        _wait(lambda: len(got) >= 1, 10, "the alert, published again after the reconnect")
        assert got[0]["state"] == "raised" and got[0]["device"] == "p1"
        consumer.disconnect()
        consumer.loop_stop()
    finally:
        app.stop()
        broker.stop()
