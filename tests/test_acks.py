"""Manual acknowledgements: the PUBACKs a checkpoint releases go out as few writes, in order."""
from __future__ import annotations

from types import SimpleNamespace

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from agent.config import load_config
from agent.metrics import Metrics
from agent.mqtt_link import MqttLink
from tiny_bundle import make_tiny_bundle


def _link(tmp_path, protocol: str) -> MqttLink:
    cfg = load_config(agent_id="gw", bundle=str(make_tiny_bundle(tmp_path / "b")), mqtt={"protocol": protocol})
    return MqttLink(cfg, lambda *a: True, Metrics(), manual_ack=True)


def _receive(link: MqttLink, mids: list[int], qos: int = 1) -> None:
    for mid in mids:
        link._cb_message(link.client, None, SimpleNamespace(topic="t", payload=b"{}", mid=mid, qos=qos))


def _bytes_of_one_by_one_acks(protocol: str, mids: list[int], qos: int = 1) -> bytes:
    c = mqtt.Client(CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5 if protocol == "5" else mqtt.MQTTv311)
    c.manual_ack_set(True)
    for mid in mids:
        c.ack(mid, qos)
    return b"".join(bytes(p["packet"]) for p in c._out_packet)


def test_a_chunk_of_pubacks_is_one_write_with_the_bytes_paho_would_send_one_by_one(tmp_path):
    for protocol in ("5", "3.1.1"):
        link = _link(tmp_path / protocol, protocol)
        mids = [1, 2, 300, 65535, 7]
        _receive(link, mids)
        link.ack_through(3)  # tokens 1..3: the first three messages
        out = list(link.client._out_packet)
        assert len(out) == 1 and bytes(out[0]["packet"]) == _bytes_of_one_by_one_acks(protocol, [1, 2, 300])
        link.ack_through(5)
        assert bytes(link.client._out_packet[1]["packet"]) == _bytes_of_one_by_one_acks(protocol, [65535, 7])
        link.ack_through(5)
        assert len(link.client._out_packet) == 2  # nothing acknowledged twice


def test_qos2_telemetry_still_goes_through_client_ack(tmp_path):
    link = _link(tmp_path, "5")
    _receive(link, [10, 11], qos=2)
    link.ack_through(2)
    assert b"".join(bytes(p["packet"]) for p in link.client._out_packet) == _bytes_of_one_by_one_acks("5", [10, 11], 2)


def test_mids_of_a_lost_connection_are_never_acknowledged(tmp_path):
    link = _link(tmp_path, "5")
    _receive(link, [1, 2])
    link._conn += 1  # the connection was lost: those mids mean nothing on the next one
    _receive(link, [1])
    link.ack_through(3)
    assert [bytes(p["packet"]) for p in link.client._out_packet] == [_bytes_of_one_by_one_acks("5", [1])]


def test_a_puback_never_waits_for_the_outbox(tmp_path):
    """The network thread records an alert's PUBACK without touching the outbox, whose lock the
    pipeline holds through a commit's fsync; the "outbox" thread applies it right after."""
    import threading
    import time

    from agent.outbox import Outbox

    cfg = load_config(agent_id="gw", bundle=str(make_tiny_bundle(tmp_path / "b")), mqtt={"alert_linger_s": 0})
    outbox = Outbox(tmp_path / "o.sqlite")
    link = MqttLink(cfg, lambda *a: True, Metrics(), outbox, manual_ack=True)
    link._outbox_thread = threading.Thread(target=link._outbox_loop, name="outbox", daemon=True)
    link._outbox_thread.start()
    a, b = outbox.put_many([("t/a", b"1", None), ("t/b", b"2", None)])
    with outbox._lock:  # the pipeline thread, in the middle of a group commit
        t = time.monotonic()
        link._acked(a, None, True)  # on the network thread: a PUBACK
        assert time.monotonic() - t < 0.2
        assert outbox._db.execute("SELECT count(*) FROM outbox").fetchone()[0] == 2  # not applied yet
    deadline = time.monotonic() + 5
    while outbox.backlog() != 1 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert [e.seq for e in outbox.pending()] == [b]
    link._acked(b, None, True)
    link._stopping = True
    link._done_evt.set()
    link._outbox_thread.join(5)
    link._apply_acks()  # what stop() does after the thread ended
    assert outbox.backlog() == 0
    outbox.close()


@pytest.mark.parametrize("protocol", ["3.1.1", "5"])
def test_the_agents_socket_sends_small_packets_at_once(tmp_path, broker, protocol):
    """TCP_NODELAY on the agent's connection (paho leaves Nagle's algorithm on): an alert or a chunk
    of PUBACKs is a small write, and Nagle held it back until the broker's delayed ACK (measured: the
    publish-to-alert median at 1,000 msg/s was 10 ms, most of it in the sockets)."""
    import socket

    cfg = load_config(agent_id="gw", bundle=str(make_tiny_bundle(tmp_path / "b")),
                      mqtt={"protocol": protocol, "host": broker.host, "port": broker.port})
    link = MqttLink(cfg, lambda *a: True, Metrics(), manual_ack=True)
    link.start()
    try:
        assert link.wait_connected(10)
        assert link.client.socket().getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) != 0
    finally:
        link.stop()


def test_paced_acknowledgements_go_out_in_order_a_chunk_at_a_time(tmp_path):
    """The checkpoint writer's acknowledgements (thousands at once) are queued ACK_CHUNK at a time,
    ACK_PACE_S apart, so an alert published meanwhile waits behind one chunk at most (mosquitto reads
    one packet per socket per pass of its loop); the bytes are the ones paho would send one by one."""
    import time

    from agent.mqtt_link import ACK_CHUNK, ACK_PACE_S

    link = _link(tmp_path, "5")
    mids = list(range(1, 2 * ACK_CHUNK + 45))
    _receive(link, mids)
    t = time.monotonic()
    link.ack_through(len(mids), pace=True)
    took = time.monotonic() - t
    out = [bytes(p["packet"]) for p in link.client._out_packet]
    assert [len(p) // 4 for p in out] == [ACK_CHUNK, ACK_CHUNK, 44]
    assert b"".join(out) == _bytes_of_one_by_one_acks("5", mids)
    assert took >= 2 * ACK_PACE_S * 0.9
    # unpaced (the pipeline thread's call, for the few messages not queued): no waiting, 256 at a time
    link2 = _link(tmp_path / "2", "5")
    _receive(link2, mids)
    link2.ack_through(len(mids))
    assert [len(bytes(p["packet"])) // 4 for p in link2.client._out_packet] == [256, len(mids) - 256]


def test_received_messages_leave_no_cyclic_garbage_and_filtered_callbacks_still_work(tmp_path, broker):
    """paho matches every received topic against its per-filter callbacks with a recursive closure:
    a reference cycle per message that only the cyclic collector frees (~50 collections a second
    and a full one every ~2 s at 7,300 msg/s, every thread stopped meanwhile). The agent's clients
    skip the matching when no filter is registered; with one, paho's matching decides as before."""
    import gc
    import threading
    import time

    from agent.mqtt_link import make_client

    cfg = load_config(agent_id="gw", bundle=str(make_tiny_bundle(tmp_path / "b")),
                      mqtt={"host": broker.host, "port": broker.port})
    c = make_client(cfg, "gc-probe", persistent=False)
    got: list[str] = []
    filtered: list[str] = []
    done = threading.Event()
    n = 300

    def on_message(client, userdata, msg):
        got.append(msg.topic)
        if len(got) + len(filtered) >= n + 10:
            done.set()
    c.on_message = on_message
    c.connect(broker.host, broker.port)
    c.loop_start()
    pub = mqtt.Client(CallbackAPIVersion.VERSION2, client_id="gc-probe-pub")
    pub.connect(broker.host, broker.port)
    pub.loop_start()
    try:
        subscribed = threading.Event()
        c.on_subscribe = lambda *a: subscribed.set()
        c.subscribe("gcprobe/#", qos=0)
        assert subscribed.wait(10)
        gc.collect()
        gc.disable()
        try:
            for i in range(n):
                pub.publish(f"gcprobe/a/{i % 7}", b"x", qos=0).wait_for_publish(5)
            deadline = time.monotonic() + 10
            while len(got) < n and time.monotonic() < deadline:
                time.sleep(0.01)
            assert len(got) == n
            garbage = gc.collect()
        finally:
            gc.enable()
        assert garbage < n // 10, garbage  # ~6 objects per message before (function, 3 cells, tuple, list)

        c.message_callback_add("gcprobe/b/+", lambda client, userdata, msg: (filtered.append(msg.topic), done.set()
                                                                             if len(filtered) >= 10 else None))
        for i in range(10):
            pub.publish(f"gcprobe/b/{i}", b"y", qos=0)
        assert done.wait(10)
        assert filtered == [f"gcprobe/b/{i}" for i in range(10)] and len(got) == n  # not on on_message
    finally:
        pub.loop_stop()
        pub.disconnect()
        c.loop_stop()
        c.disconnect()
