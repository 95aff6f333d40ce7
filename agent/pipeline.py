"""The hot path, broker-free: raw messages → rows → per-device windows → micro-batched
scoring → alert decisions → alert sink.

Windows that fall due on any device are copied into one preallocated (max_batch, W, F)
array and scored with ONE ``Scorer.score`` call when the batch is full or the message
behind its oldest window arrived ``max_latency_ms`` ago (time spent queued counts: messages
that arrive while a batch waits for its deadline join it and are scored at that deadline).
Decisions then run per device in arrival order through ``DeviceStream.decide`` — the same
pieces ``score_rows`` uses offline, so the gateway decides exactly what ``edge-trainer score``
decides for the same stream.

Intake is a bounded deque the pipeline thread empties in chunks (see :class:`Handoff`):
when it is full the network thread waits for room instead of dropping, so the broker keeps
the backlog (QoS 1) rather than the agent losing it.

Clocks are injected (``clock`` for batching deadlines, ``now`` for epoch time) so tests
drive time without sleeping.
"""
from __future__ import annotations

import logging
import threading
import time
from collections import deque
from typing import Callable

import numpy as np

from agent.classify import FaultClassifier
from agent.config import AgentConfig
from agent.decode import DecodeError, PayloadDecoder, SensorRowAssembler, TopicMatcher, partition_of, render
from agent.manifest import Manifest
from agent.messages import Alert, ModelRef, TopSensor, alert_id, iso_utc
from agent.metrics import Metrics
from agent.scoring import DeviceStream, Scorer, top_sensors

log = logging.getLogger(__name__)

# (alert topic, payload, retained state topic, receive time of the triggering message)
AlertSink = Callable[[str, bytes, str, float], object]
# The alerts decided in one micro-batch, in order, handed over at once (one outbox commit for all).
AlertBatchSink = Callable[[list[tuple[str, bytes, str, float]]], object]
DeadLetter = Callable[[str, bytes, str], None]


TOPIC_CACHE = 65_536  # topic -> device lookups remembered (a regex match costs ~1 us per message)
CHUNK = 64  # messages taken from the hand-off at once (a batch deadline is checked after each chunk)


class Handoff:
    """Bounded hand-off from the network thread to the pipeline thread.

    A deque (append and popleft are atomic) and two events: no lock per message, and the
    consumer takes what is queued in one go. The producer wakes the consumer only when as
    many items wait as the consumer asked for (``wait(..., wake_at)``): one when idle, a
    batch's worth while a micro-batch waits for its deadline anyway, so a busy stream costs
    a wake-up per batch, not per message. When full, the producer waits for room — the
    network thread stops reading, its acks stop, and the broker keeps the rest queued — and
    drops (returns False) only if the pipeline makes no room within ``full_wait`` seconds: a
    wedged pipeline must not wedge the connection.
    """

    def __init__(self, maxsize: int, max_bytes: int = 1 << 62, full_wait: float = 1.0,
                 clock: Callable[[], float] = time.monotonic):
        self.maxsize = maxsize
        self.max_bytes = max_bytes
        self.full_wait = full_wait
        self._clock = clock
        # When the oldest queued item arrived (stamped as the queue turns non-empty), and for the
        # items the last take() returned: the consumer's batch deadlines count from arrival, not
        # from when it got round to the items.
        self.since = clock()
        self.taken_since = self.since
        self._q: deque = deque()  # (topic, payload, recv_time, token)
        self._ready = threading.Event()  # set once wake_at items wait (cleared only by the waiting consumer)
        self._wake_at = 1
        self._room = threading.Event()
        # Payload bytes queued = in - out; each side written by one thread only.
        self.bytes_in = 0
        self.bytes_out = 0

    def _full(self) -> bool:
        return len(self._q) >= self.maxsize or self.bytes_in - self.bytes_out >= self.max_bytes

    def put(self, item) -> bool:
        q = self._q
        if len(q) >= self.maxsize or self.bytes_in - self.bytes_out >= self.max_bytes:  # = _full(), inline
            while self._full():
                if not self._ready.is_set():
                    self._ready.set()  # full: the consumer must not sleep until its deadline
                self._room.clear()
                if not self._full():
                    break
                if not self._room.wait(self.full_wait) and self._full():
                    return False
        self.bytes_in += len(item[1])
        q.append(item)
        k = len(q)
        if k == 1:
            self.since = self._clock()
        if k >= self._wake_at and not self._ready.is_set():
            self._ready.set()
        return True

    def take(self, limit: int) -> list:
        q = self._q
        n = min(len(q), limit)
        if not n:
            return []
        self.taken_since = self.since
        out = [q.popleft() for _ in range(n)]
        if q:  # the rest arrived after taken_since, but when is not known: counted from now
            self.since = self._clock()
        self.bytes_out += sum(len(item[1]) for item in out)
        if not self._room.is_set():
            self._room.set()
        return out

    def wait(self, timeout: float, wake_at: int = 1) -> bool:
        """Wait up to ``timeout`` seconds for ``wake_at`` items; True if any are queued."""
        q = self._q
        self._wake_at = max(1, wake_at)
        self._ready.clear()
        if len(q) < self._wake_at:  # else appended before the clear, by a producer that saw the flag set
            self._ready.wait(timeout)
        return bool(q)

    def qsize(self) -> int:
        return len(self._q)

    def empty(self) -> bool:
        return not self._q


def observe_many(hist, values: np.ndarray) -> None:
    """``hist.observe(v)`` for every v, with one lock per bucket touched instead of a Python
    bucket search per value. Relies on prometheus_client's Histogram internals, checked here."""
    try:
        bounds, buckets, total = hist._upper_bounds, hist._buckets, hist._sum
    except AttributeError:  # another prometheus_client layout: the slow, documented way
        for v in values.tolist():
            hist.observe(v)
        return
    counts = np.bincount(np.searchsorted(bounds, values, side="left"), minlength=len(bounds))
    for i in np.flatnonzero(counts).tolist():  # observe(): first bucket with value <= bound
        buckets[i].inc(int(counts[i]))
    total.inc(float(values.sum()))


def fast_method(metric, name: str):
    """``metric.<name>`` (a labelled child's ``inc`` or ``set``) without prometheus_client's
    per-call checks (is it a parent with labels? a negative increment?), which cost as much as
    the locked update itself: its value's own method, what ``inc(n)`` / ``set(float(v))`` end
    in. The public method where the internals differ (another prometheus_client layout)."""
    f = getattr(getattr(metric, "_value", None), name, None)
    observable = getattr(metric, "_is_observable", None)
    # (a multiprocess "mostrecent" gauge also stamps the time on set: the public method does that)
    if callable(f) and callable(observable) and observable() and not getattr(metric, "_is_most_recent", False):
        return f
    return getattr(metric, name)


class _Device:
    __slots__ = ("stream", "last_ts", "set_score")

    def __init__(self, stream: DeviceStream, score_gauge):
        self.stream = stream
        self.last_ts = float("-inf")
        self.report_to(score_gauge)

    def report_to(self, gauge) -> None:
        """Set this device's smoothed score on ``gauge`` (a labelled child; None: nowhere yet)."""
        self.set_score = fast_method(gauge, "set") if gauge is not None else None  # takes a float


class Pipeline:
    def __init__(
        self,
        cfg: AgentConfig,
        scorer: Scorer,
        metrics: Metrics,
        sink: AlertSink | None,
        dead_letter: DeadLetter | None = None,
        clock: Callable[[], float] = time.monotonic,
        now: Callable[[], float] = time.time,
        classifier: FaultClassifier | None = None,
        sink_many: AlertBatchSink | None = None,
    ):
        m: Manifest = scorer.manifest
        self.cfg = cfg
        self.manifest = m
        self.scorer = scorer
        self.metrics = metrics
        self.sink = sink
        self.sink_many = sink_many  # preferred over ``sink``: a batch's alerts in one call
        self._alerts: list[tuple[str, bytes, str, float]] = []  # decided in the current flush
        self.dead_letter = dead_letter
        self.clock = clock
        self.now = now
        self.max_payload_bytes = cfg.max_payload_bytes  # (a restart setting: not reloaded)
        self.queue = Handoff(cfg.queue.max_messages, cfg.queue.max_bytes, cfg.queue.full_wait_ms / 1000.0, clock)
        part = cfg.topics.partition
        self.partition = (part.index, part.count) if part is not None else None
        # {partition} becomes our index, so we subscribe to (and match) our own partition only.
        self.matcher = TopicMatcher([render(p, partition=str(part.index)) if part else p for p in cfg.topics.telemetry])
        self._topics: dict[str, tuple[str, str | None]] = {}
        self.decoder = PayloadDecoder(m.features, cfg.topics.format, cfg.max_payload_bytes)
        self.per_sensor = cfg.topics.format == "per_sensor"
        self.assembler = SensorRowAssembler(len(m.features))
        self.model = ModelRef(name=m.name, version=m.version)
        self.devices: dict[str, _Device] = {}
        self.max_batch = cfg.batching.max_batch
        self.max_latency = cfg.batching.max_latency_ms / 1000.0
        self._buf = np.empty((self.max_batch, m.window, len(m.features)), np.float32)
        self._meta: list[tuple] = [()] * self.max_batch  # (device, _Device, ts, recv_time)
        self._recv = np.zeros(self.max_batch)  # receive time of each window's message (latency metric)
        self._n = 0
        self._deadline = 0.0
        self._arrived: float | None = None  # while step() handles a chunk: when its oldest message arrived
        self.last_tick = clock()
        self._warned: dict[str, float] = {}
        self._ok = fast_method(metrics.messages.labels("ok"), "inc")  # cached child: labels() costs on every message
        self._swap: Scorer | None = None
        # Names the fault of a RAISED alert only (agent.classify): never on the per-window path.
        self.classifier = classifier
        self._swap_classifier: FaultClassifier | None = None
        # Crash consistency (agent.checkpoint): the token of the last message handled, and the
        # devices whose state changed since the last checkpoint.
        self.progress = 0
        self.dirty: set[str] = set()

    # ------------------------------------------------------------ intake

    def submit(self, topic: str, payload: bytes, recv_time: float, token: int | None = None) -> bool:
        """Called on the network thread: enqueue; when full, wait for room (backpressure), then drop.
        False if not queued (counted). ``token`` becomes ``progress`` once the message is handled
        (manual MQTT acks, see agent.checkpoint)."""
        if len(payload) > self.max_payload_bytes:  # never queued: a flood of huge payloads must not fill memory
            self._invalid(topic, payload, "too_large", f"{len(payload)} bytes")
            return False
        if self.queue.put((topic, payload, recv_time, token)):
            return True
        self.metrics.dropped_message("queue_full")
        self._warn("queue_full", "pipeline queue full (%d) and not draining; dropping telemetry", self.queue.maxsize)
        return False

    def handle(self, topic: str, payload: bytes, recv_time: float, token: int | None = None) -> None:
        """Decode one message and push its row; scores when a batch fills."""
        if token is not None:
            self.progress = token
        try:
            hit = self._topics.get(topic)
            if hit is None:
                hit = self._match(topic)
            device, sensor = hit
            if device is None:  # another agent's device (partitioned scale-out)
                self.metrics.dropped_message("other_partition")
                return
            if self.per_sensor:
                self._handle_sensor(device, sensor, payload, recv_time)
                return
            ts, vals, extras, complete = self.decoder.decode_values(payload, recv_time)
        except DecodeError as e:
            self._invalid(topic, payload, e.reason, e.detail)
            return
        dev = self.devices.get(device) or self._admit(device)
        if dev is None:
            return
        if ts <= dev.last_ts:
            self._invalid(topic, payload, "out_of_order", f"{device} ts {ts} <= {dev.last_ts}")
            return
        if extras:
            self.metrics.unknown_sensors.inc(extras)
        self._ok(1)
        dev.last_ts = ts
        self.dirty.add(device)
        if dev.stream.push_values(vals, complete):
            self._due(device, dev, ts, recv_time)

    def _match(self, topic: str) -> tuple[str | None, str | None]:
        hit = self.matcher.match(topic)  # DecodeError for a foreign topic: not remembered
        if self.partition is not None and partition_of(hit[0], self.partition[1]) != self.partition[0]:
            self._warn("other_partition", "device %s belongs to partition %d, not ours (%d of %d); not scored",
                       hit[0], partition_of(hit[0], self.partition[1]), *self.partition)
            hit = (None, None)
        if len(self._topics) >= TOPIC_CACHE:
            self._topics.clear()
        self._topics[topic] = hit
        return hit

    def _handle_sensor(self, device: str, sensor: str, payload: bytes, recv_time: float) -> None:
        idx = self.decoder.index.get(sensor)
        if idx is None:
            raise DecodeError("no_known_sensors", sensor)
        ts, value, given = self.decoder.decode_value(payload, recv_time)
        dev = self._admit(device)
        if dev is None:
            return
        if given and ts <= dev.last_ts:
            raise DecodeError("out_of_order", f"{device} ts {ts} <= {dev.last_ts}")
        self._ok(1)
        self.dirty.add(device)  # the half-assembled row is state too
        for row_ts, row in self.assembler.add(device, ts, idx, value, given):
            if row_ts > dev.last_ts:  # a receive-time stamp need not be newer than the last row: skip it
                self._push(device, dev, row_ts, row, recv_time)

    def _admit(self, device: str) -> _Device | None:
        dev = self.devices.get(device)
        if dev is not None:
            return dev
        if len(self.devices) >= self.cfg.max_devices:
            self.metrics.dropped_message("unknown_device_cap")
            self._warn("device_cap", "max_devices (%d) reached; ignoring new device %s", self.cfg.max_devices, device)
            return None
        dev = self.devices[device] = _Device(DeviceStream(self.manifest), self.metrics.score.labels(device))
        self.metrics.devices.set(len(self.devices))
        log.info("new device %s", device)
        return dev

    def _push(self, device: str, dev: _Device, ts: float, row: np.ndarray, recv_time: float) -> None:
        dev.last_ts = ts
        self.dirty.add(device)
        if dev.stream.push(row):
            self._due(device, dev, ts, recv_time)

    def _due(self, device: str, dev: _Device, ts: float, recv_time: float) -> None:
        i = self._n
        self._buf[i] = dev.stream.window.view()  # copy: the ring's view changes on the next push
        self._meta[i] = (device, dev, ts)
        self._recv[i] = recv_time
        self._n = i + 1
        if i == 0:  # the batch's oldest window: its wait counts from its message's arrival in the queue
            t = self.clock()
            if self._arrived is not None and self._arrived < t:
                t = self._arrived
            self._deadline = t + self.max_latency
        if self._n >= self.max_batch:
            self.flush()

    # ------------------------------------------------------------ scoring

    def poll(self) -> None:
        """Flush the pending batch if its oldest window has waited long enough."""
        if self._n and self.clock() >= self._deadline:
            self.flush()

    def flush(self) -> None:
        n = self._n
        if not n:
            return
        self._n = 0
        t = time.perf_counter()
        try:
            scores, contrib = self.scorer.score(self._buf[:n])
        except Exception:  # a runtime failure must cost one batch, not the service
            self.metrics.inference_errors.inc()
            log.exception("inference failed on a batch of %d windows; skipped", n)
            return
        self.metrics.inference.observe(time.perf_counter() - t)
        self.metrics.batches.inc()
        self.metrics.batch_size.observe(n)
        self.metrics.windows.inc(n)
        recv = self._recv[:n]
        observe_many(self.metrics.latency.labels("scored"), np.maximum(self.now() - recv, 0.0))
        meta = self._meta
        for i, raw in enumerate(scores.tolist()):
            device, dev, ts = meta[i]
            s, event = dev.stream.advance(raw)  # = decide(raw)
            dev.set_score(s)
            if event is not None:
                self._emit(device, ts, event.value, dev.stream.event_score(s, event), contrib[i], float(recv[i]),
                           self._buf[i])
        if self._alerts:
            self._deliver()

    def _deliver(self) -> None:
        """Hand the batch's alerts over, in decision order: all at once to ``sink_many`` (the
        agent persists them in one outbox transaction, then publishes them), else one by one."""
        alerts, self._alerts = self._alerts, []
        if self.sink_many is not None:
            self.sink_many(alerts)
        else:
            for a in alerts:
                self.sink(*a)

    def _emit(self, device: str, ts: float, state: str, score: float, contrib: np.ndarray, recv: float,
              window: np.ndarray | None = None) -> None:
        ts_iso = iso_utc(ts)
        fault = None
        if state == "raised" and self.classifier is not None and window is not None:
            try:
                fault = self.classifier.classify_one(self.scorer.scale(window))
            except Exception:  # the alert matters more than its fault name
                log.exception("fault classifier failed; alert sent without a fault type")
        alert = Alert(
            id=alert_id(self.cfg.agent_id, device, state, ts_iso, self.model),
            device=device,
            state=state,
            ts=ts_iso,
            score=round(score, 6),
            threshold=self.manifest.threshold.value,
            model=self.model,
            top_sensors=[TopSensor(**t) for t in top_sensors(contrib, self.manifest.features)],
            fault=fault,
            agent=self.cfg.agent_id,
        )
        self.metrics.alerts.labels(state).inc()
        log.warning("alert %s %s score=%.3f threshold=%.3f at %s", device, state, score, alert.threshold, ts_iso)
        t = self.cfg.topics
        self._alerts.append((render(t.alerts, device=device), alert.to_bytes(), render(t.state, device=device), recv))

    # ------------------------------------------------------------ bundle swap (hot reload)

    def request_swap(self, scorer: Scorer, classifier: FaultClassifier | None = None) -> None:
        """Serve a new, already verified bundle from the next loop pass (any thread may call this)."""
        self._swap_classifier = classifier
        self._swap = scorer

    def _apply_swap(self) -> None:
        scorer, self._swap = self._swap, None
        self.classifier = self._swap_classifier
        self.flush()  # windows already due are decided by the model they were due under
        old, m = self.manifest, scorer.manifest
        if m == old:  # the same bundle verified again (SIGHUP, a re-installed copy): every device keeps its state
            self.scorer = scorer
            log.info("now serving bundle %s %s (unchanged; %d devices keep their state)", m.name, m.version,
                     len(self.devices))
            return
        self.scorer, self.manifest = scorer, m
        self.dirty.update(self.devices)
        self.model = ModelRef(name=m.name, version=m.version)
        self.decoder = PayloadDecoder(m.features, self.cfg.topics.format, self.cfg.max_payload_bytes)
        if m.features != old.features:
            self.assembler = SensorRowAssembler(len(m.features))
        self._buf = np.empty((self.max_batch, m.window, len(m.features)), np.float32)
        # Windows hold raw values (scaling is the scorer's), so they carry over when the shape is
        # unchanged. Smoothing restarts; an active alert stays active so the new model can clear it.
        same_shape = m.features == old.features and m.window == old.window
        for dev in self.devices.values():
            st = DeviceStream(m)
            prev = dev.stream
            if same_shape:
                w, pw = st.window, prev.window
                w.buf[:], w.head, w.count = pw.buf, pw.head, pw.count  # the newest row is the fill source
                st.rows, st.since_scored = prev.rows, prev.since_scored
            st.alert.active = prev.alert.active
            dev.stream = st
        log.info("now serving bundle %s %s (%d devices carried over%s)", m.name, m.version, len(self.devices),
                 "" if same_shape else "; features or window changed, windows restart")

    # ------------------------------------------------------------ loop

    def step(self, idle_wait: float = 0.2, max_items: int = 4096) -> int:
        """Process queued messages until the queue is empty (or ``max_items``), honouring
        the batch deadline. Returns the number of messages handled."""
        if self._swap is not None:
            self._apply_swap()
        n = 0
        q, clock, handle = self.queue, self.clock, self.handle
        while n < max_items:
            items = q.take(min(CHUNK, max_items - n))
            if items:
                # What is in hand joins the pending batch (a full batch is scored on the spot); the
                # deadline is checked after the chunk. Items that queued up while we waited for a
                # batch's deadline are thus scored with it, at that deadline, not one deadline later.
                self._arrived = q.taken_since
                try:
                    for item in items:
                        handle(*item)
                finally:
                    self._arrived = None
                n += len(items)
                if self._n and clock() >= self._deadline:
                    self.flush()
                continue
            if self._n:
                timeout = self._deadline - clock()
                if timeout <= 0:
                    self.flush()
                else:  # more messages may join the batch until its deadline: wake early only to fill it
                    q.wait(timeout, self.max_batch - self._n)
                continue
            if n or not q.wait(idle_wait):
                break
        self.poll()
        self.metrics.queue_depth.set(q.qsize())
        return n

    def run(self, stop: threading.Event, on_tick: Callable[[int], None] | None = None) -> None:
        """Loop until ``stop``; then process what is queued and score the last batch."""
        while not stop.is_set():
            n = self.step()
            self.last_tick = self.clock()
            if on_tick is not None:
                on_tick(n)
        self.drain()

    def drain(self) -> None:
        while True:
            items = self.queue.take(CHUNK)
            if not items:
                break
            for item in items:
                self.handle(*item)
        self.flush()
        self.metrics.queue_depth.set(0)

    # ------------------------------------------------------------ bad input

    def _invalid(self, topic: str, payload: bytes, reason: str, detail: str) -> None:
        self.metrics.invalid_message(reason)
        self._warn(reason, "invalid message on %s: %s (%s)", topic, reason, detail)
        if self.dead_letter is not None:
            self.dead_letter(topic, payload, reason)

    def _warn(self, key: str, fmt: str, *args) -> None:
        # One warning per kind per minute: a misconfigured fleet must not flood the journal.
        t = self.clock()
        if t - self._warned.get(key, -1e18) >= 60.0:
            self._warned[key] = t
            log.warning(fmt + " (further ones this minute only counted)", *args)
        else:
            log.debug(fmt, *args)
