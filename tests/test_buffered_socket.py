"""agent.buffered_socket: paho's reads served from one larger recv, on real sockets and a real broker."""
from __future__ import annotations

import socket
import threading
import time

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from agent.buffered_socket import BufferedClient, BufferedSocket
from agent.config import load_config
from agent.mqtt_link import make_client
from bench.broker import RawPublisher


def test_recv_hands_out_the_bytes_in_order_and_counts_what_it_holds():
    a, b = socket.socketpair()
    try:
        b.setblocking(False)
        s = BufferedSocket(b)
        with pytest.raises(BlockingIOError):  # nothing there: what paho expects from its socket
            s.recv(1)
        a.sendall(b"\x30\x05hello\xe0\x00")
        time.sleep(0.05)
        assert s.recv(1) == b"\x30" and s.pending() == 8
        assert s.recv(1) == b"\x05"
        assert s.recv(100) == b"hello\xe0\x00"  # never more than it holds: no blocking read
        assert s.pending() == 0
        a.sendall(b"xyz")
        time.sleep(0.05)
        assert s.recv(3) == b"xyz" and s.pending() == 0
        a.close()
        assert s.recv(1) == b""  # end of stream, as from the socket
        assert s.fileno() == b.fileno()  # select() works on it
    finally:
        b.close()


def _subscriber(broker, client_id: str, received: list, done: threading.Event, n: int) -> mqtt.Client:
    c = BufferedClient(CallbackAPIVersion.VERSION2, client_id=client_id, protocol=mqtt.MQTTv311, clean_session=False)

    def on_message(client, userdata, msg):
        received.append(int(msg.payload))
        if len(received) >= n:
            done.set()

    c.on_message = on_message
    c.connect(broker.host, broker.port)
    return c


def test_a_queued_backlog_arrives_whole_and_in_order(broker):
    """A backlog arrives in reads of many packets. Packets left in the buffer are not waited on:
    paho would wait in select for the socket, which the kernel no longer finds readable (before
    pending() said so, the last packets of each read sat there until the next keepalive)."""
    n, cid = 3000, f"buffered-{time.monotonic_ns()}"
    received, done = [], threading.Event()
    c = _subscriber(broker, cid, received, done, n)
    c.subscribe("buffered/t", 1)
    c.loop_start()
    time.sleep(0.3)
    c.disconnect()
    c.loop_stop()
    pub = RawPublisher(broker.host, broker.port, client_id=f"{cid}-pub")  # the backlog, queued while it is away
    pub.send(b"".join(pub.packet("buffered/t", str(i).encode()) for i in range(n)))
    pub.wait_acked(n)
    pub.close()
    received.clear()
    c = _subscriber(broker, cid, received, done, n)
    c.loop_start()
    try:
        assert done.wait(20), f"{len(received)} of {n} arrived"
        assert received == list(range(n))
        assert isinstance(c.socket(), BufferedSocket)
    finally:
        c.disconnect()
        c.loop_stop()


def test_the_agent_reads_plain_tcp_through_the_buffer(broker):
    cfg = load_config(agent_id="gw", bundle="unused", mqtt={"host": broker.host, "port": broker.port})
    c = make_client(cfg, f"buffered-agent-{time.monotonic_ns()}", persistent=False)
    got, subscribed = threading.Event(), threading.Event()
    c.on_message = lambda *a: got.set()
    c.on_connect = lambda client, *a: client.subscribe("buffered/agent", 1)
    c.on_subscribe = lambda *a: subscribed.set()
    c.connect(broker.host, broker.port)
    c.loop_start()
    try:
        assert subscribed.wait(10)
        pub = RawPublisher(broker.host, broker.port, client_id=f"buffered-agent-pub-{time.monotonic_ns()}")
        pub.send(pub.packet("buffered/agent", b"{}"))
        pub.wait_acked(1)
        pub.close()
        got.wait(10)
        assert got.is_set()
        assert isinstance(c.socket(), BufferedSocket)
        # on_socket_open still reaches the socket through the wrapper: Nagle off (agent.mqtt_link._no_delay)
        assert c.socket().getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) != 0
    finally:
        c.disconnect()
        c.loop_stop()
