"""Scale-out: several agents share the devices by partition, and no device is ever scored by two.

Windows must not be split across processes, so agents do not share one subscription
(``$share`` hands each message to any member). Each agent owns the devices whose
``crc32(name) % count`` is its index; with ``{partition}`` in the topic the broker routes
each device to its agent only, without it every agent receives everything and keeps its own.
"""
from __future__ import annotations

import json
import time
import uuid
import zlib

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from agent.app import App
from agent.config import ConfigError, load_config
from agent.decode import partition_of
from tiny_bundle import make_tiny_bundle

T0 = 1_700_000_000.0
DEVICES = [f"dev-{i:03d}" for i in range(24)]
ROWS = 6


def test_partition_of_is_stable_crc32():
    # Publishers in any language compute the same partition: crc32 of the UTF-8 name, modulo count.
    assert partition_of("pump-07", 4) == zlib.crc32(b"pump-07") % 4 == 0
    counts = [sum(partition_of(d, 4) == k for d in DEVICES) for k in range(4)]
    assert sum(counts) == len(DEVICES) and min(counts) > 0


def test_partition_config_is_validated(tmp_path):
    with pytest.raises(ConfigError, match="index 2 must be < count 2"):
        load_config(topics={"partition": {"index": 2, "count": 2}})
    with pytest.raises(ConfigError, match="needs topics.partition"):
        load_config(topics={"telemetry": ["f/{partition}/+/{device}/telemetry"]})
    cfg = load_config(topics={"telemetry": ["f/p{partition}/+/{device}/telemetry"], "partition": {"index": 1, "count": 3}})
    assert cfg.topics.partition.count == 3


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return make_tiny_bundle(tmp_path_factory.mktemp("tiny"))


def _config(tmp_path, broker, bundle, prefix, index, count, routed):
    pattern = f"{prefix}/p{{partition}}/+/{{device}}/telemetry" if routed else f"{prefix}/+/+/{{device}}/telemetry"
    return load_config(
        agent_id=f"gw-{index}", bundle=str(bundle), state_dir=str(tmp_path / f"state-{index}"),
        mqtt={"host": broker.host, "port": broker.port, "client_id": f"edgewatch-{prefix}-{index}"},
        topics={"telemetry": [pattern], "alerts": f"{prefix}/alerts/{{device}}", "state": f"{prefix}/state/{{device}}",
                "status": f"{prefix}/status/{{agent_id}}", "partition": {"index": index, "count": count}},
        metrics={"enabled": False}, batching={"max_batch": 16, "max_latency_ms": 2},
    )


def _sample(app, name, **labels):
    return app.metrics.registry.get_sample_value(name, labels or None) or 0.0


@pytest.mark.integration
@pytest.mark.parametrize("routed", [True, False], ids=["partition-in-topic", "agent-side-filter"])
def test_two_partitioned_agents_never_score_the_same_device(tmp_path, broker, tiny, routed):
    prefix = f"so-{uuid.uuid4().hex[:8]}"
    apps = [App(_config(tmp_path, broker, tiny, prefix, k, 2, routed)).start() for k in range(2)]
    pub = mqtt.Client(CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5)
    pub.connect(broker.host, broker.port)
    pub.loop_start()
    try:
        for a in apps:
            assert a.link.wait_connected(10)
        time.sleep(0.3)  # SUBACKs
        infos = []
        for t in range(ROWS):
            for dev in DEVICES:
                body = json.dumps({"ts": T0 + t, "values": {"a": 0.1, "b": -0.2, "c": 0.3}}).encode()
                topic = f"{prefix}/p{partition_of(dev, 2)}/line1/{dev}/telemetry"
                infos.append(pub.publish(topic, body, qos=1))
        for i in infos:
            i.wait_for_publish(10)
        total = ROWS * len(DEVICES)
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline and sum(_sample(a, "edgewatch_windows_scored_total") for a in apps) < total:
            time.sleep(0.05)
        scored = [set(a.pipeline.devices) for a in apps]
        assert not scored[0] & scored[1], "a device was scored by both agents"
        assert scored[0] | scored[1] == set(DEVICES)
        for k, devs in enumerate(scored):
            assert all(partition_of(d, 2) == k for d in devs)
        assert sum(_sample(a, "edgewatch_windows_scored_total") for a in apps) == total
        others = [_sample(a, "edgewatch_dropped_messages_total", reason="other_partition") for a in apps]
        if routed:  # the broker delivered each agent its own partition only
            assert others == [0, 0]
        else:  # each agent received everything and kept its own devices' rows
            assert others == [total - ROWS * len(s) for s in scored]
    finally:
        pub.loop_stop()
        pub.disconnect()
        for a in apps:
            a.stop()


@pytest.mark.integration
def test_a_plain_shared_subscription_would_split_one_devices_rows(broker):
    """Why the agents do not use one $share subscription: the broker hands each message to any
    member, so one device's consecutive rows land on different processes (mosquitto: round-robin)."""
    prefix = f"sh-{uuid.uuid4().hex[:8]}"
    got: dict[int, list[int]] = {0: [], 1: []}
    subs = []
    try:
        for k in (0, 1):
            c = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=f"{prefix}-{k}", protocol=mqtt.MQTTv5)
            c.on_message = (lambda k: lambda c, u, m: got[k].append(int(m.payload)))(k)
            c.connect(broker.host, broker.port)
            c.loop_start()
            c.subscribe(f"$share/g/{prefix}/+/+/telemetry", qos=1)
            subs.append(c)
        time.sleep(0.5)
        pub = mqtt.Client(CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5)
        pub.connect(broker.host, broker.port)
        pub.loop_start()
        for i in range(20):
            pub.publish(f"{prefix}/line1/pump-1/telemetry", str(i).encode(), qos=1).wait_for_publish(5)
        pub.loop_stop()
        pub.disconnect()
        deadline = time.monotonic() + 5
        while len(got[0]) + len(got[1]) < 20 and time.monotonic() < deadline:
            time.sleep(0.02)
        assert sorted(got[0] + got[1]) == list(range(20))
        assert got[0] and got[1], "expected the broker to spread one device's rows over both members"
    finally:
        for c in subs:
            c.disconnect()
            c.loop_stop()
