"""Property-based fuzzing of the decoder and the pipeline, with a real bundle on the real
onnxruntime backend: random bytes, random JSON structures, adversarial values and timestamps
(NaN, ±Infinity, huge ints, clock jumps, duplicates, out of order), random and hostile topics,
oversized payloads, devices beyond the cap, bursts into a full queue — in all three payload
formats.

Invariants, checked after every message:
- nothing raises (not the intake, not the loop, not a flush, not an alert);
- every message is counted exactly once: ok, invalid (by a known reason) or dropped (by a known
  reason), and the per-reason counters add up to the totals;
- state stays consistent: devices within the cap and equal to the gauge, windows finite, ring
  indices in range, alerts valid, alternating raised/cleared per device in timestamp order,
  and the alert state machine agreeing with the last alert sent.
"""
from __future__ import annotations

import json
import os
import math
import time

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from agent.backends import open_backend
from agent.config import load_config
from agent.decode import REASONS, DecodeError, PayloadDecoder
from agent.manifest import load_manifest
from agent.messages import Alert
from agent.metrics import DROP_REASONS, INVALID_REASONS, Metrics
from agent.pipeline import Pipeline
from agent.scoring import Scorer
from tiny_bundle import make_tiny_bundle

FEATURES = ["a", "b", "c"]
T0 = 1_767_225_600.0
MAX_PAYLOAD = 2048
MAX_DEVICES = 3
BIG = "__BIG__"  # an integer literal of 5000 digits (beyond Python's int parsing limit), spliced in when sent
DEVICES = [f"p{i}" for i in range(5)]  # more than the cap
TOPIC_PATTERN = {"json": "factory/+/{device}/telemetry", "flat": "factory/+/{device}/telemetry",
                 "per_sensor": "factory/{device}/{sensor}"}


# ------------------------------------------------------------------ strategies

# A small alphabet keeps generation fast (10,000 examples in CI) and still hostile: MQTT
# separators and wildcards, NUL, non-ASCII, digits and what makes numbers and dates.
ALPHABET = "ab/+#\x00\u00e9\u2603\U0001f600 0123456789.eE-:TZ{}[]\"\\"


def text(max_size: int):
    return st.text(alphabet=ALPHABET, max_size=max_size)


json_leaf = st.one_of(st.none(), st.booleans(), st.integers(), st.floats(), text(max_size=12))
json_any = st.recursive(json_leaf, lambda ch: st.lists(ch, max_size=4) | st.dictionaries(text(max_size=6), ch, max_size=4),
                        max_leaves=6)

numbers = st.one_of(
    st.floats(-1e6, 1e6),
    st.floats(),  # NaN, ±inf, subnormals, ±1.8e308
    st.integers(-(10**40), 10**40),
    st.sampled_from([0, -0.0, 3.4028235e38, 3.5e38, -3.5e38, 1e-310, 2**63, 10**400, BIG, 25.0, 30.0]),
)
values = st.one_of(
    numbers, numbers, numbers,
    st.none(), st.booleans(), text(max_size=8),
    st.sampled_from(["1.5", "nan", "inf", "-Infinity", "1e999", " 2 ", "", "0x10"]),
    st.lists(st.integers(), max_size=2), st.dictionaries(text(max_size=3), st.integers(), max_size=2),
)
timestamps = st.one_of(
    st.integers(-12, 12),  # offsets from the example's base: in order, duplicates, out of order
    st.none(),  # receive time
    st.sampled_from([
        "jump+1d", "jump-1d", 0, -1, 1e11, 1.767e12, 1.767e15, 1.767e18, 1e300, 2.6e11, 10**400, float("nan"),
        float("inf"), True, "noon", "", "1e400", "2026-01-01T00:00:00Z", "2026-01-01T00:00:00+14:00",
        "0001-01-01T00:00:00+14:00", "9999-12-31T23:59:59-14:00", "1970-01-01T00:00:00Z", [1], {"t": 1}, BIG,
    ]),
)
sensor_names = st.one_of(st.sampled_from(FEATURES), st.sampled_from(FEATURES), st.sampled_from(["zz", "ts", "value", ""]),
                         text(max_size=5))


TOPICS = {
    "per_sensor": [f"factory/{d}/{s}" for d in DEVICES for s in FEATURES + ["zz"]],
    "json": [f"factory/{line}/{d}/telemetry" for line in ("l1", "l2") for d in DEVICES],
}
TOPICS["flat"] = TOPICS["json"]
HOSTILE_TOPICS = ["factory/l1/p+1/telemetry", "factory/l1/p#/telemetry", "factory/l1/\x00/telemetry",
                  "factory/l1/" + "d" * 300 + "/telemetry", "factory//telemetry", "factory/l1/p1/telemetry/x",
                  "factory/p1/", "factory/p1/a/b"]
READINGS = [0.1, -0.4, 0.7, 0.0, -1.0, 0.25, 30.0, -30.0, None, "skip"]  # 30: a fault, None/"skip": missing
HUGE = b'{"ts": 1, "values": {"a": ' + b"1" * (MAX_PAYLOAD + 10) + b"}}"

# Strategies are built once: hypothesis validates each new strategy object, which costs more
# than drawing from it, and 10,000 examples draw a few hundred thousand times.
percent = st.integers(0, 99)
tenth = st.integers(0, 9)
topic_of = {fmt: st.sampled_from(t) for fmt, t in TOPICS.items()}
hostile_topic = st.one_of(text(max_size=30), st.sampled_from(HOSTILE_TOPICS))
raw_bytes = st.binary(max_size=64)
reading_row = st.lists(st.sampled_from(READINGS), min_size=3, max_size=3)
row_offset = st.integers(-2, 12)
value_map = st.dictionaries(sensor_names, values, max_size=4)


@st.composite
def telemetry(draw, fmt: str) -> dict:
    ts = draw(timestamps)
    vals = draw(value_map)
    if fmt == "flat":
        body = dict(vals)
    elif draw(tenth) == 0:
        body = {"values": draw(json_any)}  # values of the wrong shape
    else:
        body = {"values": vals}
    if draw(tenth):
        body["ts"] = ts
    if draw(tenth) == 0:
        body["extra"] = draw(json_any)
    return body


telemetry_of = {fmt: telemetry(fmt) for fmt in TOPICS}


@st.composite
def message(draw, fmt: str) -> tuple[str, object]:
    """(topic, payload spec): the payload is bytes, or a JSON-able object whose "ts" offsets are
    resolved against the example's clock when sent."""
    k = draw(percent)
    topic = draw(hostile_topic) if k < 6 else draw(topic_of[fmt])
    if k < 12:
        return topic, draw(raw_bytes)
    if k < 18:
        return topic, json.dumps(draw(json_any)).encode()
    if k < 20:
        return topic, HUGE
    if fmt == "per_sensor":
        if k < 60:
            return topic, draw(values)
        return topic, {"ts": draw(timestamps), "value": draw(values)}
    if k < 40:  # well-formed rows with extreme but legal readings: windows fill, alerts fire
        row = draw(reading_row)
        body = {"ts": draw(row_offset), "values": {f: v for f, v in zip(FEATURES, row) if v != "skip"}}
        return topic, body if fmt == "json" else {"ts": body["ts"], **body["values"]}
    return topic, draw(telemetry_of[fmt])


message_lists = {fmt: st.lists(message(fmt), min_size=1, max_size=8) for fmt in TOPICS}
formats = st.sampled_from(["json", "json", "flat", "per_sensor"])


# ------------------------------------------------------------------ the rig

@pytest.fixture(scope="module")
def scorer(tmp_path_factory):
    b = make_tiny_bundle(tmp_path_factory.mktemp("fuzz-bundle"), features=FEATURES, window=4,
                         threshold=8.0, raise_after=2, clear_after=2)
    m = load_manifest(b)
    return b, Scorer(m, open_backend("onnxruntime", b, m))


def _resolve(spec, base: float):
    """Turn the strategy's symbolic timestamps into the example's numbers."""
    if isinstance(spec, bytes):
        return spec
    if isinstance(spec, dict) and "ts" in spec:
        t = spec["ts"]
        if isinstance(t, int) and not isinstance(t, bool) and -12 <= t <= 12:
            spec = {**spec, "ts": base + t}
        elif t in ("jump+1d", "jump-1d"):
            spec = {**spec, "ts": base + (86_400 if t == "jump+1d" else -86_400)}
    try:
        return json.dumps(spec).replace(f'"{BIG}"', "9" * 5000).encode()  # NaN, Infinity: literals as devices send them
    except (ValueError, TypeError):
        return repr(spec).encode()


_CONFIGS: dict = {}


def _config(bundle, fmt: str, queue: int):
    key = (fmt, queue)
    if key not in _CONFIGS:
        _CONFIGS[key] = load_config(
            agent_id="gw-fuzz", bundle=str(bundle), max_devices=MAX_DEVICES, max_payload_bytes=MAX_PAYLOAD,
            topics={"telemetry": [TOPIC_PATTERN[fmt]], "format": fmt, "dead_letter": "dead/{agent_id}"},
            batching={"max_batch": 3, "max_latency_ms": 0}, queue={"max_messages": queue, "full_wait_ms": 0},
        )
    return _CONFIGS[key]


def _value(child) -> float:
    return child._value.get()  # a counter child's value without a registry-wide collect()


class Rig:
    """A fresh pipeline per example (clean, replayable state); one Metrics per session, read as deltas."""

    metrics: Metrics | None = None

    def __init__(self, bundle, scorer, fmt: str, queue: int = 10_000):
        cfg = _config(bundle, fmt, queue)
        if Rig.metrics is None:
            Rig.metrics = Metrics()
        self.metrics = Rig.metrics
        self.metrics.devices.set(0)
        self.alerts: list[Alert] = []
        self.dead: list[str] = []
        self.p = Pipeline(cfg, scorer, self.metrics, self.sink, dead_letter=lambda t, p, r: self.dead.append(r),
                          now=lambda: T0 + 1e6)

    def sink(self, topic, payload, state_topic, recv):
        a = Alert.model_validate_json(payload)
        assert topic == f"edgewatch/alerts/{a.device}" and state_topic == f"edgewatch/state/{a.device}"
        self.alerts.append(a)

    def counted(self) -> float:
        m = self.metrics.messages
        return sum(_value(m.labels(r)) for r in ("ok", "invalid", "dropped"))

    def check_counters(self) -> None:
        m = self.metrics
        invalid = sum(_value(m.invalid.labels(r)) for r in INVALID_REASONS)
        dropped = sum(_value(m.dropped.labels(r)) for r in DROP_REASONS)
        assert invalid == _value(m.messages.labels("invalid"))
        assert dropped == _value(m.messages.labels("dropped"))
        # no reason outside the documented lists (a new child would be a label nobody dashboards)
        assert {k[0] for k in m.invalid._metrics} <= set(INVALID_REASONS)
        assert {k[0] for k in m.dropped._metrics} <= set(DROP_REASONS)
        assert all(r in INVALID_REASONS for r in self.dead)

    def check_state(self) -> None:
        p = self.p
        assert p._n == 0 and p.queue.qsize() == 0
        assert len(p.devices) <= MAX_DEVICES
        assert self.metrics.devices._value.get() == len(p.devices)
        by_dev: dict[str, list[Alert]] = {}
        for a in self.alerts:
            by_dev.setdefault(a.device, []).append(a)
        for name, dev in p.devices.items():
            w = dev.stream.window
            assert np.isfinite(w.buf).all(), name
            assert 0 <= w.head < w.window and w.count >= 0 and dev.stream.rows >= 0
            assert dev.last_ts == float("-inf") or 0 < dev.last_ts <= 253_402_300_799.0
            seq = by_dev.get(name, [])
            assert [a.state for a in seq] == ["raised", "cleared"] * (len(seq) // 2) + ["raised"] * (len(seq) % 2)
            assert all(x.ts < y.ts for x, y in zip(seq, seq[1:])), [a.ts for a in seq]
            assert dev.stream.alert.active == (len(seq) % 2 == 1)
            assert all(math.isfinite(a.score) and a.top_sensors for a in seq)
        assert set(by_dev) <= set(p.devices)


def _check_decoder(fmt: str, payload: bytes) -> None:
    """The decoder on its own: a well-formed result or a DecodeError with a known reason."""
    d = PayloadDecoder(FEATURES, fmt, MAX_PAYLOAD)
    try:
        if fmt == "per_sensor":
            ts, v, given = d.decode_value(payload, T0)
            assert math.isnan(v) or abs(v) <= 3.4028235e38
        else:
            r = d.decode(payload, T0)
            assert r.row.dtype == np.float32 and r.row.shape == (3,)
            assert not np.isinf(r.row).any() and r.extras >= 0
            ts = r.ts
        assert 0 < ts <= 253_402_300_799.0
    except DecodeError as e:
        assert e.reason in REASONS, e.reason


# ------------------------------------------------------------------ the properties

@st.composite
def examples(draw):
    fmt = draw(formats)
    msgs = draw(message_lists[fmt])
    burst = draw(tenth) == 0  # everything submitted at once into a queue of 4
    return fmt, msgs, burst


FUZZ_EXAMPLES = int(os.environ.get("EDGEWATCH_FUZZ_EXAMPLES", "10000"))


def test_random_input_never_crashes_and_every_message_is_counted_once(scorer):
    bundle, sc = scorer
    ran = [0]

    @settings(max_examples=FUZZ_EXAMPLES, deadline=None,
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
    @given(examples())
    def prop(ex):
        ran[0] += 1
        fmt, msgs, burst = ex
        rig = Rig(bundle, sc, fmt, queue=4 if burst else 10_000)
        base = T0 + 1000.0
        payloads = [(topic, _resolve(spec, base + 20 * i)) for i, (topic, spec) in enumerate(msgs)]
        start = rig.counted()
        if burst:
            for topic, payload in payloads:
                _check_decoder(fmt, payload)
                rig.p.submit(topic, payload, time.time())
            while rig.p.step(idle_wait=0):
                pass
            assert rig.counted() - start == len(payloads)
        else:
            for topic, payload in payloads:
                _check_decoder(fmt, payload)
                before = rig.counted()
                rig.p.submit(topic, payload, time.time())
                rig.p.step(idle_wait=0)
                assert rig.counted() == before + 1, (topic, payload[:200])
                rig.check_state()
        rig.p.flush()
        rig.check_counters()
        rig.check_state()

    prop()
    assert ran[0] >= FUZZ_EXAMPLES  # not silently cut short by a settings profile or a filter
