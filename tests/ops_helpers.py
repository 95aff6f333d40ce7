"""Small helpers shared by the production-operations tests (TLS/auth, hot reload, observability)."""
from __future__ import annotations

import json
import threading
import time
import urllib.error
import urllib.request
import uuid

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion


def http_get(port: int, path: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()
    except urllib.error.URLError as e:  # not listening (yet)
        return 0, str(e.reason)


def metric(text: str, name: str) -> float:
    for line in text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[-1])
    raise AssertionError(f"{name} not in /metrics")


def wait_until(pred, timeout: float = 10.0, what: str = "condition", step: float = 0.02):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return
        time.sleep(step)
    raise AssertionError(f"timed out waiting for {what}")


class Subscriber:
    """Records (monotonic time, topic, payload, retain) for everything under ``topic``."""

    def __init__(self, host: str, port: int, topic: str):
        self.msgs: list[tuple[float, str, bytes, bool]] = []
        self.lock = threading.Lock()
        self.c = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=f"t-{uuid.uuid4().hex[:8]}", protocol=mqtt.MQTTv5)
        subscribed = threading.Event()
        self.c.on_connect = lambda c, u, f, rc, p: c.subscribe(topic, qos=1)
        self.c.on_subscribe = lambda *a: subscribed.set()
        self.c.on_message = self._on_message
        self.c.connect(host, port)
        self.c.loop_start()
        assert subscribed.wait(5), "test subscriber got no SUBACK"

    def _on_message(self, c, u, msg):
        with self.lock:
            self.msgs.append((time.monotonic(), msg.topic, msg.payload, bool(msg.retain)))

    def json_on(self, topic: str) -> list[dict]:
        with self.lock:
            return [json.loads(p) for _, t, p, _ in self.msgs if t == topic]

    def alerts(self, prefix: str, since: float = 0.0) -> list[tuple[float, dict]]:
        with self.lock:
            return [(ts, json.loads(p)) for ts, t, p, _ in self.msgs if t.startswith(f"{prefix}/alerts/") and ts >= since]

    def close(self):
        self.c.disconnect()
        self.c.loop_stop()
