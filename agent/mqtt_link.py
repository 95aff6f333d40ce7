"""The agent's one MQTT connection (paho-mqtt 2.x, callback API v2).

- Persistent session (MQTT 5 ``clean_start=False`` + session expiry, or 3.1.1
  ``clean_session=False``) so the broker queues QoS 1 telemetry while the agent restarts.
- Subscriptions live in a registry, not in the connection: every accepted CONNACK
  re-subscribes everything, then publishes the retained ``online`` birth message. A refused
  CONNACK is not "connected".
- The network thread only hands messages off (``on_message`` callback → bounded queue).
- Manual acks (``manual_ack=True``, what the agent uses): telemetry is acknowledged only once
  a state checkpoint holds it (``ack_through``, see agent.checkpoint), so after a crash the
  broker redelivers what the agent had not yet made durable. MQTT 5 announces a receive
  maximum, so the broker holds back (keeps queued) what the pipeline cannot take yet.
- Alerts: outbox first, then QoS 1 publish; the outbox row is deleted on PUBACK. The alerts of
  one micro-batch are persisted in one transaction (``send_alerts``; flushed to disk before the
  telemetry behind them is acknowledged: agent.outbox), then published. paho keeps
  unacknowledged and not-yet-sent QoS 1 messages in its ordered queue across reconnects,
  so alerts raised while disconnected go out, in order, after the reconnect; alerts left
  in the outbox by a previous process are queued again at start. An alert the broker
  refuses (a PUBACK failure code) is published again with backoff while we run. An
  acknowledged alert lingers in the outbox for ``mqtt.alert_linger_s`` and is published
  again after a reconnect within that time (the broker may have died before saving it);
  consumers de-duplicate on the alert id.
"""
from __future__ import annotations

import collections
import logging
import socket
import ssl
import struct
import sys
import threading
import time
from typing import Callable

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion, MQTTErrorCode
from paho.mqtt.matcher import MQTTMatcher
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from agent.buffered_socket import client_class
from agent.config import AgentConfig, ConfigError
from agent.metrics import Metrics
from agent.mqtt_security import describe_connect_error, describe_early_close, describe_refusal
from agent.outbox import Outbox

log = logging.getLogger(__name__)

PUBACK = 0x40  # MQTT control packet type (3.1.1 and 5): fixed header of a PUBACK
_PUBACK = struct.Struct("!BBH")  # type, remaining length 2, packet id: success, no properties (valid in MQTT 5)
ACK_CHUNK = 128  # paced acknowledgements (ack_through(pace=True)): this many at a time,
ACK_PACE_S = 0.001  # this far apart
ACK_LOCK_CHUNK = 256  # unpaced: this many per hold of the ack lock (a reconnect waits for one chunk)

# (topic, payload, receive epoch seconds[, token with manual acks]) -> False if not queued
OnMessage = Callable[..., object]


class LinkError(Exception):
    pass


def make_client(cfg: AgentConfig, client_id: str, persistent: bool) -> mqtt.Client:
    m = cfg.mqtt
    v5 = m.protocol == "5"
    client = client_class()(  # paho's client, reading through a buffer (agent.buffered_socket)
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
    client.on_socket_open = _no_delay
    if type(getattr(client, "_on_message_filtered", None)) is MQTTMatcher:
        client._on_message_filtered = _Filters()
    return client


class _Filters(MQTTMatcher):
    """paho's per-filter callback registry (``message_callback_add``), which paho consults for
    every message it receives. Its ``iter_match`` builds a recursive generator closure per call
    (a reference cycle: one function, three cells, a tuple and a list of garbage per message)
    that only the cyclic collector frees: at 7,300 msg/s it ran ~50 collections a second and a
    full one every ~2 s (4-22 ms of CPU each, every thread stopped). With no filters registered
    (the agent registers none) there is nothing to match: no closure, no garbage. With filters,
    paho's own matching."""

    def iter_match(self, topic):
        if not self._root._children:
            return iter(())
        return super().iter_match(topic)


def _no_delay(client, userdata, sock) -> None:
    """TCP_NODELAY on each new connection (paho leaves Nagle's algorithm on). Alerts and chunks of
    PUBACKs are small writes: with Nagle, one waited for the broker's delayed ACK of the previous
    one (bench: most of a 10 ms median publish-to-alert time at 1,000 msg/s)."""
    try:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    except (AttributeError, OSError):  # not a TCP socket (a websocket wrapper, a unix socket)
        pass


def _connect_args(cfg: AgentConfig, persistent: bool, receive_maximum: int | None = None) -> dict:
    m = cfg.mqtt
    if m.protocol != "5":
        return {}
    props = Properties(PacketTypes.CONNECT)
    props.SessionExpiryInterval = m.session_expiry_s if persistent else 0
    if receive_maximum is not None:
        props.ReceiveMaximum = receive_maximum
    return {"clean_start": not persistent, "properties": props}


def receive_maximum(cfg: AgentConfig) -> int:
    """How many telemetry messages the broker may have sent us unacknowledged (see MqttConfig.receive_maximum)."""
    if cfg.mqtt.receive_maximum is not None:
        return cfg.mqtt.receive_maximum
    return min(cfg.queue.max_messages, 65535) if cfg.mqtt.protocol == "5" else 20


class MqttLink:
    def __init__(self, cfg: AgentConfig, on_message: OnMessage, metrics: Metrics, outbox: Outbox | None = None,
                 manual_ack: bool = False):
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
        self.last_refusal: str | None = None  # why the last attempt failed (CONNACK, TLS, network), for /readyz
        self._got_connack = False
        self._sub_mid: int | None = None  # SUBACK that completes a (re)connect
        self._stopping = False
        # Manual acks: received QoS 1 messages of this connection, in arrival order, as
        # [token, mid, qos, not_queued, connection]; the token is what on_message got (pipeline
        # progress). A mid means nothing on another connection: acking it there could acknowledge
        # a message we never saw, so entries of a lost connection are never acknowledged (the
        # broker sends those messages again, and the timestamp order drops what we already have).
        self.manual_ack = manual_ack
        self._conn = 0  # connection generation: +1 on every loss
        self._acks: collections.deque[list] = collections.deque()
        self._ack_lock = threading.Lock()
        self._token = 0
        self._retries: dict[int, int] = {}  # outbox seq -> attempts refused by the broker
        self.linger = cfg.mqtt.alert_linger_s if outbox is not None else 0.0
        self._last_rx = 0.0  # when the broker last sent us anything: it was alive then
        self._last_purge = 0.0
        self._timers: set[threading.Timer] = set()
        # Outbox seqs the broker acknowledged: applied to the outbox by the "outbox" thread, so the
        # network thread never waits for the outbox (whose lock the pipeline holds through its commits).
        self._done: collections.deque[int] = collections.deque()
        self._done_evt = threading.Event()
        self._outbox_thread: threading.Thread | None = None
        c = self.client = make_client(cfg, cfg.client_id, persistent=True)
        c.manual_ack_set(manual_ack)
        c.suppress_exceptions = True  # a bug in a callback must not kill the network thread
        c.enable_logger(logging.getLogger("paho"))
        c.will_set(self.status_topic, b"offline", qos=1, retain=True)
        c.reconnect_delay_set(cfg.mqtt.reconnect_min_s, cfg.mqtt.reconnect_max_s)
        c.max_queued_messages_set(0)  # unbounded: alerts are never dropped by paho while offline
        c.on_connect = self._cb_connect
        c.on_connect_fail = self._cb_connect_fail
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
            self._outbox_thread = threading.Thread(target=self._outbox_loop, name="outbox", daemon=True)
            self._outbox_thread.start()
        m = self.cfg.mqtt
        log.info("connecting to mqtt://%s:%d as %s (MQTT %s)", m.host, m.port, self.cfg.client_id, m.protocol)
        rmax = receive_maximum(self.cfg) if self.manual_ack else None
        self.client.connect_async(m.host, m.port, m.keepalive, **_connect_args(self.cfg, persistent=True, receive_maximum=rmax))
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
        for t in list(self._timers):
            t.cancel()
        if self.linger:  # the connection stayed up since these were acknowledged: the broker has saved them
            self._purge()
        if self.connected:
            info = self.client.publish(self.status_topic, b"offline", qos=1, retain=True)
            try:
                info.wait_for_publish(timeout)
            except (RuntimeError, ValueError):
                pass
        self.client.disconnect()
        self.client.loop_stop()
        self._set_connected(False)
        if self._outbox_thread is not None:
            self._done_evt.set()
            self._outbox_thread.join(timeout)
        self._apply_acks()  # whatever the broker acknowledged last

    # ------------------------------------------------------------ publishing

    def send_alert(self, topic: str, payload: bytes, state_topic: str | None, t0: float | None = None) -> int:
        """Persist, then publish an alert (QoS 1) and its retained state. Returns the outbox seq."""
        return self.send_alerts([(topic, payload, state_topic, t0)])[0]

    def send_alerts(self, alerts: list[tuple[str, bytes, str | None, float | None]]) -> list[int]:
        """:meth:`send_alert` for several alerts (one micro-batch's): persisted in ONE outbox
        transaction, then published in order. Returns the outbox seqs (-1: not persisted)."""
        seqs: list[int | None] = [None] * len(alerts)
        if self.outbox is not None and alerts:
            try:
                seqs = self.outbox.put_many([(topic, payload, st) for topic, payload, st, _ in alerts])
            except Exception:  # disk full, I/O error: still publish (paho keeps it while we run)
                log.exception("cannot persist %d alert(s) in the outbox; publishing without", len(alerts))
        for seq, (topic, payload, state_topic, t0) in zip(seqs, alerts):
            self._publish_alert(seq, topic, payload, state_topic, t0)
        if alerts:
            self._update_backlog()
        return [s if s is not None else -1 for s in seqs]

    def publish(self, topic: str, payload: bytes, qos: int = 0, retain: bool = False) -> None:
        info = self.client.publish(topic, payload, qos=qos, retain=retain)
        # Every mid paho will report in on_publish must be tracked, or _early would keep a stale
        # entry that could later "ack" an alert reusing that mid. QoS 0 is reported only if sent.
        if qos > 0 or info.rc == MQTTErrorCode.MQTT_ERR_SUCCESS:
            self._track(info.mid, None, None)

    def _publish_alert(self, seq: int | None, topic: str, payload: bytes, state_topic: str | None, t0: float | None) -> None:
        # While disconnected paho keeps the message (rc NO_CONN) and sends it after the next CONNACK.
        try:
            info = self.client.publish(topic, payload, qos=1)
        except ValueError as e:  # a topic MQTT cannot carry: it never will, so do not keep it
            log.error("alert on %r cannot be published (%s); dropped from the outbox", topic[:200], e)
            self.metrics.publish_failures.inc()
            if seq is not None and self.outbox is not None:
                self.outbox.ack(seq)
            return
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
            self._retry_later(seq)
            return
        self._retries.pop(seq, None)
        if self.outbox is not None:
            self._done.append(seq)
            if self._outbox_thread is not None:
                self._done_evt.set()
            else:  # not started (tests driving the link directly): apply at once
                self._apply_acks()
        if t0 is not None:
            self.metrics.latency.labels("published").observe(max(0.0, time.time() - t0))

    def _outbox_loop(self) -> None:
        while not self._stopping:
            self._done_evt.wait(1.0)
            self._done_evt.clear()
            try:
                self._apply_acks()
            except Exception:  # the outbox is closed (stopping) or the disk failed: the alert is sent again later
                log.exception("cannot record acknowledged alerts in the outbox")

    def _apply_acks(self) -> None:
        """Record what the broker acknowledged (one transaction), then housekeeping and the metric."""
        done = self._done
        seqs = [done.popleft() for _ in range(len(done))]
        if not seqs or self.outbox is None:
            return
        self.outbox.ack_many(seqs, linger=self.linger > 0)
        if self.linger:
            self._purge()
        self._update_backlog()

    def _purge(self) -> None:
        # An alert stops lingering once the broker was heard from ``linger`` seconds after its
        # (latest) PUBACK: that broker lived past its autosave. And, so that a connection flapping
        # faster than that cannot re-send old alerts for ever, 10 x linger after it was raised.
        self.outbox.purge(self._last_rx - self.linger, time.time() - 10 * self.linger)

    def _retry_later(self, seq: int) -> None:
        """The broker refused the alert (PUBACK failure code): publish it again with backoff."""
        n = self._retries[seq] = self._retries.get(seq, 0) + 1
        m = self.cfg.mqtt
        delay = min(float(m.reconnect_max_s), m.reconnect_min_s * 2.0 ** (n - 1))
        log.error("broker refused alert (outbox seq %d, attempt %d); kept in the outbox, retrying in %gs", seq, n, delay)
        if self._stopping:
            return
        t = threading.Timer(delay, self._retry, (seq,))
        t.daemon = True
        self._timers.add(t)
        t.start()

    def _retry(self, seq: int) -> None:
        self._timers.discard(threading.current_thread())
        e = self.outbox.get(seq) if self.outbox is not None and not self._stopping else None
        if e is not None:  # else acknowledged meanwhile
            self._publish_alert(e.seq, e.topic, e.payload, e.state_topic, None)

    # ------------------------------------------------------------ manual acks

    def ack_through(self, token: int, pace: bool = False) -> None:
        """PUBACK every received message up to ``token`` (the pipeline progress a checkpoint
        holds), in arrival order, and the ones not queued (dropped, counted) right behind them.

        ``pace`` (the checkpoint writer: thousands at once): ``ACK_CHUNK`` acknowledgements at a
        time, ``ACK_PACE_S`` apart. An alert shares the connection with them, and mosquitto reads
        one packet per socket per pass of its event loop: behind 5,000 acknowledgements written at
        once, an alert reached its subscribers 30-80 ms late (bench, 7,300 msg/s). Paced, at most
        one chunk is ahead of it; the acknowledgements still go out far faster than the agent can
        take telemetry (128 per ms), so the broker's in-flight window is never held back."""
        acks, more = self._acks, True
        chunk = ACK_CHUNK if pace else ACK_LOCK_CHUNK
        while more:  # in chunks: the network thread needs the lock on a reconnect, not for long
            with self._ack_lock:  # held while calling paho: a reconnect cannot slip a stale mid in
                mids = []
                for _ in range(chunk):
                    if not (acks and (acks[0][0] <= token or acks[0][3])):
                        more = False
                        break
                    _, mid, qos, _, conn = acks.popleft()
                    if conn == self._conn:
                        mids.append((mid, qos))
                if mids:
                    self._send_acks(mids)
            if more and pace:
                time.sleep(ACK_PACE_S)
        now = time.monotonic()
        if self.linger and now - self._last_purge >= 1.0:  # called every loop pass: housekeeping too
            self._last_purge = now
            self._purge()

    def _send_acks(self, mids: list[tuple[int, int]]) -> None:
        """Acknowledge received messages, in order. The PUBACKs of a chunk (QoS 1: what telemetry
        is) go to paho as ONE queued write, the very bytes ``client.ack(mid, 1)`` would queue one
        by one: paho sends each queued packet with its own send() and wakes its network thread
        for each, so thousands of acknowledgements after a checkpoint held that thread (and the
        telemetry behind it) for tens of ms. Anything else goes through ``client.ack``."""
        queue = getattr(self.client, "_packet_queue", None)
        if queue is None or any(qos != 1 for _, qos in mids):
            for mid, qos in mids:
                self.client.ack(mid, qos)
            return
        queue(PUBACK, b"".join([_PUBACK.pack(PUBACK, 2, mid) for mid, _ in mids]), 0, 0)

    def _update_backlog(self) -> None:
        if self.outbox is not None:
            self.metrics.outbox_backlog.set(self.outbox.backlog())

    # ------------------------------------------------------------ paho callbacks (network thread)

    def _set_connected(self, up: bool) -> None:
        (self._connected.set if up else self._connected.clear)()
        self.metrics.connected.set(1 if up else 0)

    def _failed(self, why: str, level: int) -> None:
        # Retries repeat the same failure every few seconds: log it when it changes, not each time.
        if why != self.last_refusal:
            log.log(level, "%s (will retry)", why)
        else:
            log.debug("%s (will retry)", why)
        self.last_refusal = why

    def _cb_connect_fail(self, client, userdata) -> None:
        # paho calls this inside its `except OSError:` block, so the exception is still current.
        e = sys.exc_info()[1]
        why = describe_connect_error(e, self.cfg) if e is not None else "connection to the broker failed"
        self._failed(why, logging.ERROR if isinstance(e, ssl.SSLError) else logging.WARNING)

    def _cb_connect(self, client, userdata, flags, reason_code, properties) -> None:
        self._got_connack = True
        if reason_code.is_failure:
            self._failed(f"broker refused the connection: {describe_refusal(str(reason_code), self.cfg)}", logging.ERROR)
            self._set_connected(False)
            return
        self.last_refusal = None
        with self._ack_lock:  # mids of the previous connection are void: the broker redelivers those messages
            self._acks.clear()
        log.info("connected to broker (session present: %s)", flags.session_present)
        subs = list(self._subs.items())
        self._sub_mid = client.subscribe(subs)[1] if subs else None
        self.publish(self.status_topic, b"online", qos=1, retain=True)
        if self.linger:
            again = self.outbox.lingering()
            if again:
                log.warning("publishing %d recently acknowledged alert(s) again: the broker may have lost them "
                            "with the connection (consumers de-duplicate on the id)", len(again))
            for e in again:
                self._publish_alert(e.seq, e.topic, e.payload, e.state_topic, None)
            self._update_backlog()
        if self._sub_mid is None:
            self._set_connected(True)
        # else once the SUBACK is in (_cb_subscribe): telemetry published right after we report
        # "connected" (READY=1, /readyz) must not reach a new session before our subscriptions do


    def _cb_disconnect(self, client, userdata, flags, reason_code, properties) -> None:
        self._conn += 1  # before paho reconnects: no PUBACK of this connection's mids goes out on the next
        if self.linger and not self._stopping:  # acknowledged long enough before the loss: saved by the broker
            self._purge()
        if self._stopping:
            log.info("disconnected from broker (stopping)")
        elif self.connected:
            log.warning("disconnected from broker: %s (reconnecting with backoff)", reason_code)
        elif not self._got_connack:
            self._failed(describe_early_close(str(reason_code), self.cfg), logging.ERROR)
        self._got_connack = False
        self._set_connected(False)

    def _cb_subscribe(self, client, userdata, mid, reason_codes, properties) -> None:
        for rc in reason_codes:
            if rc.is_failure:
                log.error("broker refused a subscription: %s", rc)
        if mid == self._sub_mid:
            self._sub_mid = None
            self._set_connected(True)

    def _cb_message(self, client, userdata, msg) -> None:
        now = self._last_rx = time.time()  # one clock read: when it arrived is when the broker was last heard
        try:
            topic = msg.topic
        except UnicodeDecodeError:
            topic = msg._topic.decode("utf-8", "replace")
        if not self.manual_ack:
            self._on_message(topic, msg.payload, now)
            return
        token = self._token = self._token + 1
        entry = [token, msg.mid, msg.qos, False, self._conn]
        if msg.qos:
            self._acks.append(entry)  # no lock: deque.append is atomic, and clear() runs on this thread
        if self._on_message(topic, msg.payload, now, token) is False:
            entry[3] = True  # not queued (counted as dropped or invalid): acknowledge it in turn

    def _cb_publish(self, client, userdata, mid, reason_code, properties) -> None:
        self._last_rx = time.time()
        ok = not reason_code.is_failure
        with self._lock:
            entry = self._inflight.pop(mid, None)
            if entry is None:
                self._early[mid] = ok
                return
        self._acked(entry[0], entry[1], ok)

