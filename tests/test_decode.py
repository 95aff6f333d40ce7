"""Decoding: every rejection has a reason label, and nothing but DecodeError escapes."""
from __future__ import annotations

import json
import math
from datetime import datetime, timezone

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from agent.decode import REASONS, DecodeError, PayloadDecoder, SensorRowAssembler, TopicMatcher, parse_ts

FEATURES = ["temp", "vib", "press"]
RECV = 1_700_000_100.0


def dec(fmt="json", **kw) -> PayloadDecoder:
    return PayloadDecoder(FEATURES, fmt, **kw)


def reason(fn, *a) -> str:
    with pytest.raises(DecodeError) as e:
        fn(*a)
    assert e.value.reason in REASONS + ("out_of_order",)
    return e.value.reason


def test_json_row_in_feature_order_with_nan_for_missing():
    d = dec().decode(b'{"ts": 1700000000.5, "values": {"press": 3, "temp": 1.5, "other": 9}}', RECV)
    assert d.ts == 1700000000.5
    assert d.row.dtype == np.float32
    np.testing.assert_array_equal(d.row, np.array([1.5, np.nan, 3.0], np.float32))
    assert d.extras == 1


def test_flat_format_ignores_ts_key():
    d = dec("flat").decode(b'{"ts": "2024-01-01T00:00:00Z", "temp": 1, "vib": 2, "press": 3}', RECV)
    assert d.ts == datetime(2024, 1, 1, tzinfo=timezone.utc).timestamp()
    assert d.extras == 0 and d.row.tolist() == [1, 2, 3]


def test_null_and_nan_mean_missing_numeric_strings_accepted():
    d = dec().decode(b'{"values": {"temp": null, "vib": NaN, "press": "2.5"}}', RECV)
    assert math.isnan(d.row[0]) and math.isnan(d.row[1]) and d.row[2] == 2.5
    assert d.ts == RECV  # absent ts -> receive time


@pytest.mark.parametrize("ts,want", [
    (1700000000, 1700000000.0),
    (1700000000123, 1700000000.123),  # ms
    (1700000000123456, 1700000000.123456),  # µs
    ("1700000000.25", 1700000000.25),
    ("2023-11-14T22:13:20+01:00", 1699996400.0),
    ("2023-11-14T22:13:20.500Z", 1700000000.5),
    ("2023-11-14T22:13:20", 1700000000.0),  # naive = UTC
    (None, RECV),
])
def test_timestamps(ts, want):
    assert parse_ts(ts, RECV) == pytest.approx(want, abs=1e-6)


@pytest.mark.parametrize("payload,want", [
    (b"x" * 1001, "too_large"),
    (b'{"ts": 1, "values": ', "malformed_json"),
    (b"\xff\xfe\x00garbage", "malformed_json"),
    (b"[1, 2, 3]", "not_object"),
    (b'"hello"', "not_object"),
    (b'{"ts": 1700000000, "values": [1, 2]}', "not_object"),
    (b'{"ts": 1700000000}', "not_object"),
    (b'{"ts": "yesterday", "values": {"temp": 1}}', "bad_timestamp"),
    (b'{"ts": true, "values": {"temp": 1}}', "bad_timestamp"),
    (b'{"ts": -5, "values": {"temp": 1}}', "bad_timestamp"),
    (b'{"ts": {"a": 1}, "values": {"temp": 1}}', "bad_timestamp"),
    (b'{"values": {"temp": "hot"}}', "bad_value"),
    (b'{"values": {"temp": true}}', "bad_value"),
    (b'{"values": {"temp": [1]}}', "bad_value"),
    (b'{"values": {"temp": Infinity}}', "non_finite"),
    (b'{"values": {"temp": -Infinity}}', "non_finite"),
    (b'{"values": {"temp": 1e39}}', "non_finite"),  # finite double, infinite float32
    (b'{"values": {"temp": 1' + b"0" * 400 + b"}}", "non_finite"),
    (b'{"values": {"nope": 1}}', "no_known_sensors"),
    (b'{"values": {}}', "no_known_sensors"),
])
def test_rejections(payload, want):
    assert reason(dec(max_payload_bytes=1000).decode, payload, RECV) == want


def test_deeply_nested_json_is_malformed_not_a_crash():
    assert reason(dec(max_payload_bytes=10**7).decode, b"[" * 100_000, RECV) == "malformed_json"


def test_topic_patterns():
    m = TopicMatcher(["factory/+/{device}/telemetry", "site/{device}/#"])
    assert m.subscriptions() == ["factory/+/+/telemetry", "site/+/#"]
    assert m.match("factory/line1/pump-7/telemetry") == ("pump-7", None)
    assert m.match("site/m1/a/b") == ("m1", None)
    assert m.match("site/m1") == ("m1", None)
    assert reason(m.match, "factory/line1/pump-7/other") == "wrong_topic"
    assert reason(m.match, "factory/line1/a/b/telemetry") == "wrong_topic"
    s = TopicMatcher(["plant/{device}/{sensor}"])
    assert s.match("plant/p1/temp") == ("p1", "temp")
    assert TopicMatcher(["x/dev-{device}/t"]).match("x/dev-9/t") == ("9", None)


def test_per_sensor_values_and_row_assembly():
    d = dec("per_sensor")
    assert d.decode_value(b"1.5", RECV) == (RECV, 1.5, False)
    assert d.decode_value(b'{"ts": 1700000000, "value": 2}', RECV) == (1700000000.0, 2.0, True)
    assert reason(d.decode_value, b'{"ts": 1700000000}', RECV) == "bad_value"
    assert reason(d.decode_value, b"Infinity", RECV) == "non_finite"
    a = SensorRowAssembler(3)
    assert a.add("p", 10.0, 0, 1.0, True) == []
    assert a.add("p", 10.0, 2, 3.0, True) == []
    [(ts, row)] = a.add("p", 10.0, 1, 2.0, True)  # complete
    assert ts == 10.0 and row.tolist() == [1, 2, 3] and len(a) == 0
    a.add("p", 11.0, 0, 1.0, True)
    [(ts, row)] = a.add("p", 12.0, 0, 5.0, True)  # ts moved on: partial row out
    assert ts == 11.0 and row[0] == 1 and math.isnan(row[1])
    [(ts, _)] = a.add("q", 1.0, 0, 1.0, False) or [(None, None)]  # noqa: just starts a row
    assert ts is None
    [(ts, row)] = a.add("q", 2.0, 0, 7.0, False)  # same sensor again: previous row out
    assert ts == 1.0 and row[0] == 1


# Any bytes → a Decoded or a DecodeError, never anything else.
json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=True, allow_infinity=True) | st.text(max_size=8),
    lambda c: st.lists(c, max_size=3) | st.dictionaries(st.sampled_from(FEATURES + ["ts", "values", "x"]), c, max_size=4),
    max_leaves=12,
)


@settings(max_examples=300, deadline=None)
@given(st.one_of(st.binary(max_size=64), json_values.map(lambda v: json.dumps(v).encode())))
@pytest.mark.parametrize("fmt", ["json", "flat"])
def test_never_raises_anything_else(fmt, payload):
    d = dec(fmt, max_payload_bytes=4096)
    try:
        out = d.decode(payload, RECV)
    except DecodeError as e:
        assert e.reason in REASONS
    else:
        assert out.row.shape == (3,) and not np.isinf(out.row).any() and math.isfinite(out.ts)
    try:
        d.decode_value(payload, RECV)
    except DecodeError as e:
        assert e.reason in REASONS


@settings(max_examples=100, deadline=None)
@given(st.dictionaries(st.sampled_from(FEATURES), st.floats(-1e30, 1e30), min_size=1))
def test_valid_values_round_trip(values):
    d = dec().decode(json.dumps({"ts": 1700000000, "values": values}).encode(), RECV)
    for k, v in values.items():
        assert d.row[FEATURES.index(k)] == np.float32(v)


_VALUE = st.one_of(st.floats(allow_nan=True, allow_infinity=True), st.floats(-1e6, 1e6), st.integers(-10**40, 10**40),
                   st.booleans(), st.none(), st.sampled_from(["1.5", "hot", "NaN"]), st.just([1.0]))


@given(values=st.one_of(
    st.lists(_VALUE, min_size=3, max_size=3).map(lambda vs: dict(zip(FEATURES, vs))),  # the bundle's order
    st.lists(st.floats(-1e30, 1e30), min_size=3, max_size=3).map(lambda vs: dict(zip(FEATURES, vs))),
    st.dictionaries(st.sampled_from(FEATURES + ["other", "ts"]), _VALUE, max_size=5),  # any order, unknown keys
), ts=st.one_of(st.none(), st.floats(allow_nan=True), st.sampled_from([1700000000.5, 1e11, 1e11 - 1, 2e11, 0.0, -1.0])))
@settings(max_examples=400, deadline=None)
def test_fast_paths_decide_as_the_general_code(values, ts):
    """decode_values' shortcuts (a float ts, a row in the bundle's order with plain floats) give
    exactly what the general loop and parse_ts give: same row, extras, completeness or reason."""
    payload = json.dumps({"ts": ts, "values": values}).encode()  # allow_nan: NaN/Infinity literals (json.loads path)
    fast = dec()
    slow = dec()
    slow._order = None  # never the keys' order: the general loop
    got, want = [], []
    for d, out in ((fast, got), (slow, want)):
        try:
            out.append(d.decode_values(payload, RECV))
        except DecodeError as e:
            out.append(e.reason)
    try:
        want_ts = parse_ts(ts, RECV)
    except DecodeError as e:
        assert got == want == [e.reason]  # the timestamp is checked before the values
        return
    if isinstance(want[0], str) or isinstance(got[0], str):
        assert got == want
        return
    (t1, v1, e1, c1), (t2, v2, e2, c2) = got[0], want[0]
    assert t1 == t2 == want_ts and e1 == e2 and c1 == c2
    assert [type(x) for x in v1] == [type(x) for x in v2]
    np.testing.assert_array_equal(np.array(v1, np.float64), np.array(v2, np.float64))
