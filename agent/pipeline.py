"""The hot path, broker-free: raw messages → rows → per-device windows → micro-batched
scoring → alert decisions → alert sink.

Windows that fall due on any device are copied into one preallocated (max_batch, W, F)
array and scored with ONE ``Scorer.score`` call when the batch is full or its oldest
window has waited ``max_latency_ms``. Decisions then run per device in arrival order
through ``DeviceStream.decide`` — the same pieces ``score_rows`` uses offline, so the
gateway decides exactly what ``edge-trainer score`` decides for the same stream.

Clocks are injected (``clock`` for batching deadlines, ``now`` for epoch time) so tests
drive time without sleeping.
"""
from __future__ import annotations

import logging
import queue
import threading
import time
from typing import Callable

import numpy as np

from agent.config import AgentConfig
from agent.decode import DecodeError, PayloadDecoder, SensorRowAssembler, TopicMatcher, render
from agent.manifest import Manifest
from agent.messages import Alert, ModelRef, TopSensor, alert_id, iso_utc
from agent.metrics import Metrics
from agent.scoring import DeviceStream, Scorer, top_sensors

log = logging.getLogger(__name__)

# (alert topic, payload, retained state topic, receive time of the triggering message)
AlertSink = Callable[[str, bytes, str, float], object]
DeadLetter = Callable[[str, bytes, str], None]


class _Device:
    __slots__ = ("stream", "last_ts", "score_gauge")

    def __init__(self, stream: DeviceStream, score_gauge):
        self.stream = stream
        self.last_ts = float("-inf")
        self.score_gauge = score_gauge


class Pipeline:
    def __init__(
        self,
        cfg: AgentConfig,
        scorer: Scorer,
        metrics: Metrics,
        sink: AlertSink,
        dead_letter: DeadLetter | None = None,
        clock: Callable[[], float] = time.monotonic,
        now: Callable[[], float] = time.time,
    ):
        m: Manifest = scorer.manifest
        self.cfg = cfg
        self.manifest = m
        self.scorer = scorer
        self.metrics = metrics
        self.sink = sink
        self.dead_letter = dead_letter
        self.clock = clock
        self.now = now
        self.queue: queue.Queue = queue.Queue(cfg.queue.max_messages)
        self.matcher = TopicMatcher(cfg.topics.telemetry)
        self.decoder = PayloadDecoder(m.features, cfg.topics.format, cfg.max_payload_bytes)
        self.per_sensor = cfg.topics.format == "per_sensor"
        self.assembler = SensorRowAssembler(len(m.features))
        self.model = ModelRef(name=m.name, version=m.version)
        self.devices: dict[str, _Device] = {}
        self.max_batch = cfg.batching.max_batch
        self.max_latency = cfg.batching.max_latency_ms / 1000.0
        self._buf = np.empty((self.max_batch, m.window, len(m.features)), np.float32)
        self._meta: list[tuple] = [()] * self.max_batch  # (device, _Device, ts, recv_time)
        self._n = 0
        self._deadline = 0.0
        self.last_tick = clock()
        self._warned: dict[str, float] = {}
        self._ok = metrics.messages.labels("ok")  # cached child: labels() costs on every message
        self._swap: Scorer | None = None

    # ------------------------------------------------------------ intake

    def submit(self, topic: str, payload: bytes, recv_time: float) -> bool:
        """Called on the network thread: enqueue only, never block."""
        try:
            self.queue.put_nowait((topic, payload, recv_time))
            return True
        except queue.Full:
            self.metrics.dropped_message("queue_full")
            self._warn("queue_full", "pipeline queue full (%d); dropping telemetry", self.queue.maxsize)
            return False

    def handle(self, topic: str, payload: bytes, recv_time: float) -> None:
        """Decode one message and push its row; scores when a batch fills."""
        try:
            device, sensor = self.matcher.match(topic)
            if self.per_sensor:
                self._handle_sensor(device, sensor, payload, recv_time)
                return
            d = self.decoder.decode(payload, recv_time)
        except DecodeError as e:
            self._invalid(topic, payload, e.reason, e.detail)
            return
        dev = self._admit(device)
        if dev is None:
            return
        if d.ts <= dev.last_ts:
            self._invalid(topic, payload, "out_of_order", f"{device} ts {d.ts} <= {dev.last_ts}")
            return
        if d.extras:
            self.metrics.unknown_sensors.inc(d.extras)
        self._ok.inc()
        self._push(device, dev, d.ts, d.row, recv_time)

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
        self._ok.inc()
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
        if not dev.stream.push(row):
            return
        i = self._n
        self._buf[i] = dev.stream.window.view()  # copy: the ring's view changes on the next push
        self._meta[i] = (device, dev, ts, recv_time)
        self._n = i + 1
        if i == 0:
            self._deadline = self.clock() + self.max_latency
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
        now = self.now()
        latency = self.metrics.latency.labels("scored")
        for i in range(n):
            device, dev, ts, recv = self._meta[i]
            d = dev.stream.decide(float(scores[i]))
            dev.score_gauge.set(d.score)
            latency.observe(max(0.0, now - recv))
            if d.event is not None:
                self._emit(device, ts, d.event.value, d.score, contrib[i], recv)

    def _emit(self, device: str, ts: float, state: str, score: float, contrib: np.ndarray, recv: float) -> None:
        ts_iso = iso_utc(ts)
        alert = Alert(
            id=alert_id(self.cfg.agent_id, device, state, ts_iso, self.model),
            device=device,
            state=state,
            ts=ts_iso,
            score=round(score, 6),
            threshold=self.manifest.threshold.value,
            model=self.model,
            top_sensors=[TopSensor(**t) for t in top_sensors(contrib, self.manifest.features)],
            fault=None,
            agent=self.cfg.agent_id,
        )
        self.metrics.alerts.labels(state).inc()
        log.warning("alert %s %s score=%.3f threshold=%.3f at %s", device, state, score, alert.threshold, ts_iso)
        t = self.cfg.topics
        self.sink(render(t.alerts, device=device), alert.to_bytes(), render(t.state, device=device), recv)

    # ------------------------------------------------------------ bundle swap (hot reload)

    def request_swap(self, scorer: Scorer) -> None:
        """Serve a new, already verified bundle from the next loop pass (any thread may call this)."""
        self._swap = scorer

    def _apply_swap(self) -> None:
        scorer, self._swap = self._swap, None
        self.flush()  # windows already due are decided by the model they were due under
        old, m = self.manifest, scorer.manifest
        self.scorer, self.manifest = scorer, m
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
                w.buf[:], w.head, w.count, w.last[:] = pw.buf, pw.head, pw.count, pw.last
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
        q = self.queue
        while n < max_items:
            if self._n:
                timeout = self._deadline - self.clock()
                if timeout <= 0:
                    self.flush()
                    continue
            else:
                timeout = idle_wait if n == 0 else 0.0
            try:
                item = q.get(timeout=timeout) if timeout > 0 else q.get_nowait()
            except queue.Empty:
                if self._n:
                    continue  # deadline reached while waiting: flush on the next turn
                break
            self.handle(*item)
            n += 1
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
            try:
                self.handle(*self.queue.get_nowait())
            except queue.Empty:
                break
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
