"""The agent's one MQTT connection (paho-mqtt 2.x, callback API v2).

- Persistent session (MQTT 5 ``clean_start=False`` + session expiry, or 3.1.1
  ``clean_session=False``) so the broker queues QoS 1 telemetry while the agent restarts.
- Subscriptions live in a registry, not in the connection: every accepted CONNACK
  re-subscribes everything, then publishes the retained ``online`` birth message. A refused
  CONNACK is not "connected".
- The network thread only hands messages off (``on_message`` callback → bounded queue).
- Alerts: outbox first, then QoS 1 publish; the outbox row is deleted on PUBACK. paho keeps
  unacknowledged and not-yet-sent QoS 1 messages in its ordered queue across reconnects,
  so alerts raised while disconnected go out, in order, after the reconnect; alerts left
  in the outbox by a previous process are queued again at start.
"""
from __future__ import annotations

import logging
import ssl
import threading
import time
import uuid
from typing import Callable

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion, MQTTErrorCode
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from agent.config import AgentConfig, ConfigError
from agent.metrics import Metrics
from agent.outbox import Outbox

log = logging.getLogger(__name__)

OnMessage = Callable[[str, bytes, float], None]  # (topic, payload, receive epoch seconds)


class LinkError(Exception):
    pass


def make_client(cfg: AgentConfig, client_id: str, persistent: bool) -> mqtt.Client:
    m = cfg.mqtt
    v5 = m.protocol == "5"
    client = mqtt.Client(
        CallbackAPIVersion.VERSION2,
        client_id=client_id,
        protocol=mqtt.MQTTv5 if v5 else mqtt.MQTTv311,
        clean_session=None if v5 else not persistent,
    )
    if m.username:
        client.username_pw_set(m.username, m.password())
    if m.tls.enabled:
        try:
            client.tls_set(
                ca_certs=str(m.tls.ca_file) if m.tls.ca_file else None,
                certfile=str(m.tls.cert_file) if m.tls.cert_file else None,
                keyfile=str(m.tls.key_file) if m.tls.key_file else None,
                cert_reqs=ssl.CERT_REQUIRED,
            )
        except (OSError, ssl.SSLError) as e:
            raise ConfigError(f"mqtt.tls: cannot load certificates: {e}") from None
        client.tls_insecure_set(m.tls.insecure)
    return client


def _connect_args(cfg: AgentConfig, persistent: bool) -> dict:
    m = cfg.mqtt
    if m.protocol != "5":
        return {}
    props = Properties(PacketTypes.CONNECT)
    props.SessionExpiryInterval = m.session_expiry_s if persistent else 0
    return {"clean_start": not persistent, "properties": props}


class MqttLink:
    def __init__(self, cfg: AgentConfig, on_message: OnMessage, metrics: Metrics, outbox: Outbox | None = None):
        self.cfg = cfg
        self.metrics = metrics
        self.outbox = outbox
        self.status_topic = cfg.status_topic
        self._on_message = on_message
        self._subs: dict[str, int] = {}  # registry: filter -> qos, independent of the connection
        self._connected = threading.Event()
        self._lock = threading.Lock()  # guards the two dicts below; never held while calling paho
        self._inflight: dict[int, tuple[int | None, float | None]] = {}  # mid -> (outbox seq, t0)
        self._early: dict[int, bool] = {}  # PUBACKs that beat _track (mid -> success)
        self.last_refusal: str | None = None
        self._stopping = False
        c = self.client = make_client(cfg, cfg.client_id, persistent=True)
        c.suppress_exceptions = True  # a bug in a callback must not kill the network thread
        c.enable_logger(logging.getLogger("paho"))
        c.will_set(self.status_topic, b"offline", qos=1, retain=True)
        c.reconnect_delay_set(cfg.mqtt.reconnect_min_s, cfg.mqtt.reconnect_max_s)
        c.max_queued_messages_set(0)  # unbounded: alerts are never dropped by paho while offline
        c.on_connect = self._cb_connect
        c.on_disconnect = self._cb_disconnect
        c.on_message = self._cb_message
        c.on_publish = self._cb_publish
        c.on_subscribe = self._cb_subscribe

    # ------------------------------------------------------------ lifecycle

    @property
    def connected(self) -> bool:
        return self._connected.is_set()

    def wait_connected(self, timeout: float) -> bool:
        return self._connected.wait(timeout)

    def subscribe(self, topic_filter: str, qos: int = 1) -> None:
        self._subs[topic_filter] = qos
        if self.connected:
            self.client.subscribe(topic_filter, qos)

    def start(self) -> None:
        """Queue the outbox left by a previous run, then connect in the background (retries forever)."""
        if self.outbox is not None:
            pending = self.outbox.pending()
            if pending:
                log.warning("re-sending %d alert(s) left unacknowledged in the outbox", len(pending))
            for e in pending:
                self._publish_alert(e.seq, e.topic, e.payload, e.state_topic, None)
            self._update_backlog()
        m = self.cfg.mqtt
        log.info("connecting to mqtt://%s:%d as %s (MQTT %s)", m.host, m.port, self.cfg.client_id, m.protocol)
        self.client.connect_async(m.host, m.port, m.keepalive, **_connect_args(self.cfg, persistent=True))
        self.client.loop_start()

    def drain(self, timeout: float) -> bool:
        """Wait for outstanding alert PUBACKs; True if none is left."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with self._lock:
                if not any(seq is not None for seq, _ in self._inflight.values()):
                    return True
            if not self.connected:
                return False
            time.sleep(0.02)
        return False

    def stop(self, timeout: float = 2.0) -> None:
        """Publish the retained ``offline`` (a clean disconnect suppresses the last will), then disconnect."""
        self._stopping = True
        if self.connected:
            info = self.client.publish(self.status_topic, b"offline", qos=1, retain=True)
            try:
                info.wait_for_publish(timeout)
            except (RuntimeError, ValueError):
                pass
        self.client.disconnect()
        self.client.loop_stop()
        self._set_connected(False)

    # ------------------------------------------------------------ publishing

    def send_alert(self, topic: str, payload: bytes, state_topic: str | None, t0: float | None = None) -> int:
        """Persist, then publish an alert (QoS 1) and its retained state. Returns the outbox seq."""
        seq = self.outbox.put(topic, payload, state_topic) if self.outbox is not None else None
        self._publish_alert(seq, topic, payload, state_topic, t0)
        self._update_backlog()
        return seq if seq is not None else -1

    def publish(self, topic: str, payload: bytes, qos: int = 0, retain: bool = False) -> None:
        info = self.client.publish(topic, payload, qos=qos, retain=retain)
        # Every mid paho will report in on_publish must be tracked, or _early would keep a stale
        # entry that could later "ack" an alert reusing that mid. QoS 0 is reported only if sent.
        if qos > 0 or info.rc == MQTTErrorCode.MQTT_ERR_SUCCESS:
            self._track(info.mid, None, None)

    def _publish_alert(self, seq: int | None, topic: str, payload: bytes, state_topic: str | None, t0: float | None) -> None:
        # While disconnected paho keeps the message (rc NO_CONN) and sends it after the next CONNACK.
        info = self.client.publish(topic, payload, qos=1)
        if info.rc not in (MQTTErrorCode.MQTT_ERR_SUCCESS, MQTTErrorCode.MQTT_ERR_NO_CONN):
            log.error("alert publish on %s failed (%s); kept in the outbox", topic, mqtt.error_string(info.rc))
        self._track(info.mid, seq, t0)
        if state_topic:
            self.publish(state_topic, payload, qos=1, retain=True)

    def _track(self, mid: int, seq: int | None, t0: float | None) -> None:
        with self._lock:
            ok = self._early.pop(mid, None)
            if ok is None:
                self._inflight[mid] = (seq, t0)
                return
        self._acked(seq, t0, ok)

    def _acked(self, seq: int | None, t0: float | None, ok: bool) -> None:
        if seq is None:
            return
        if not ok:
            self.metrics.publish_failures.inc()
            log.error("broker refused alert (outbox seq %d); kept in the outbox for the next start", seq)
            return
        if self.outbox is not None:
            self.outbox.ack(seq)
            self._update_backlog()
        if t0 is not None:
            self.metrics.latency.labels("published").observe(max(0.0, time.time() - t0))

    def _update_backlog(self) -> None:
        if self.outbox is not None:
            self.metrics.outbox_backlog.set(self.outbox.backlog())

    # ------------------------------------------------------------ paho callbacks (network thread)

    def _set_connected(self, up: bool) -> None:
        (self._connected.set if up else self._connected.clear)()
        self.metrics.connected.set(1 if up else 0)

    def _cb_connect(self, client, userdata, flags, reason_code, properties) -> None:
        if reason_code.is_failure:
            self.last_refusal = str(reason_code)
            log.error("broker refused the connection: %s (will retry)", reason_code)
            self._set_connected(False)
            return
        self.last_refusal = None
        log.info("connected to broker (session present: %s)", flags.session_present)
        subs = list(self._subs.items())
        if subs:
            client.subscribe(subs)
        self.publish(self.status_topic, b"online", qos=1, retain=True)
        self._set_connected(True)

    def _cb_disconnect(self, client, userdata, flags, reason_code, properties) -> None:
        if self._stopping:
            log.info("disconnected from broker (stopping)")
        elif self.connected:
            log.warning("disconnected from broker: %s (reconnecting with backoff)", reason_code)
        self._set_connected(False)

    def _cb_subscribe(self, client, userdata, mid, reason_codes, properties) -> None:
        for rc in reason_codes:
            if rc.is_failure:
                log.error("broker refused a subscription: %s", rc)

    def _cb_message(self, client, userdata, msg) -> None:
        try:
            topic = msg.topic
        except UnicodeDecodeError:
            topic = msg._topic.decode("utf-8", "replace")
        self._on_message(topic, msg.payload, time.time())

    def _cb_publish(self, client, userdata, mid, reason_code, properties) -> None:
        ok = not reason_code.is_failure
        with self._lock:
            entry = self._inflight.pop(mid, None)
            if entry is None:
                self._early[mid] = ok
                return
        self._acked(entry[0], entry[1], ok)


def probe(cfg: AgentConfig, timeout: float = 3.0) -> tuple[bool, str]:
    """Try one connection (for ``edge-agent check``) without touching the agent's session."""
    done = threading.Event()
    result: list[str] = []

    def on_connect(client, userdata, flags, reason_code, properties):
        result.append("" if not reason_code.is_failure else str(reason_code))
        done.set()

    # A throwaway client id: reusing the agent's would kick a running agent off the broker.
    client = make_client(cfg, f"edgewatch-check-{uuid.uuid4().hex[:8]}", persistent=False)
    client.on_connect = on_connect
    client.connect_timeout = timeout
    m = cfg.mqtt
    try:
        client.connect(m.host, m.port, keepalive=10, **_connect_args(cfg, persistent=False))
    except (OSError, ValueError) as e:
        return False, f"cannot reach {m.host}:{m.port}: {e}"
    client.loop_start()
    try:
        if not done.wait(timeout):
            return False, f"no CONNACK from {m.host}:{m.port} within {timeout:g}s"
        if result[0]:
            return False, f"{m.host}:{m.port} refused the connection: {result[0]}"
        return True, f"{m.host}:{m.port} accepted the connection"
    finally:
        client.disconnect()
        client.loop_stop()
