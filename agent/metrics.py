"""Prometheus metrics on a registry owned by the agent instance (no globals), so tests and
several agents in one process never share counters. Names follow DESIGN.md."""
from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Info
from prometheus_client.exposition import generate_latest

from agent.decode import REASONS

# Inference on a small VAE batch takes 0.1-10 ms on a gateway core.
INFERENCE_BUCKETS = (0.0002, 0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 1.0)
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)

INVALID_REASONS = REASONS + ("out_of_order",)
DROP_REASONS = ("queue_full", "unknown_device_cap", "other_partition")


class Metrics:
    def __init__(self) -> None:
        r = self.registry = CollectorRegistry()
        self.messages = Counter("edgewatch_messages", "Telemetry messages by result.", ["result"], registry=r)
        self.invalid = Counter("edgewatch_invalid_messages", "Invalid telemetry messages by reason.", ["reason"], registry=r)
        self.dropped = Counter("edgewatch_dropped_messages", "Valid messages not processed, by reason.", ["reason"], registry=r)
        self.unknown_sensors = Counter(
            "edgewatch_unknown_sensor_values", "Sensor values ignored because the bundle has no such feature.", registry=r
        )
        self.windows = Counter("edgewatch_windows_scored", "Windows scored.", registry=r)
        self.inference_errors = Counter("edgewatch_inference_errors", "Micro-batches whose inference failed (skipped).", registry=r)
        self.batches = Counter("edgewatch_inference_batches", "Inference calls (one per micro-batch).", registry=r)
        self.alerts = Counter("edgewatch_alerts", "Alerts emitted by state.", ["state"], registry=r)
        self.publish_failures = Counter(
            "edgewatch_alert_publish_failures", "Alerts the broker refused (kept in the outbox).", registry=r
        )
        self.checkpoint_failures = Counter(
            "edgewatch_checkpoint_failures", "State checkpoints that could not be written (telemetry acknowledged anyway).",
            registry=r,
        )
        self.inference = Histogram(
            "edgewatch_inference_seconds", "Backend time per micro-batch.", buckets=INFERENCE_BUCKETS, registry=r
        )
        self.latency = Histogram(
            "edgewatch_latency_seconds",
            "End-to-end latency from message receipt: stage=scored (decision made) or published (alert acked by broker).",
            ["stage"], buckets=LATENCY_BUCKETS, registry=r,
        )
        self.batch_size = Histogram(
            "edgewatch_batch_windows", "Windows per inference call.", buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256), registry=r
        )
        self.queue_depth = Gauge("edgewatch_queue_depth", "Messages waiting for the pipeline.", registry=r)
        self.outbox_backlog = Gauge("edgewatch_outbox_backlog", "Alerts not yet acknowledged by the broker.", registry=r)
        self.connected = Gauge("edgewatch_mqtt_connected", "1 while connected to the broker (CONNACK accepted).", registry=r)
        self.score = Gauge("edgewatch_score", "Last smoothed score per device.", ["device"], registry=r)
        self.threshold = Gauge("edgewatch_threshold", "Alert threshold of the loaded bundle.", registry=r)
        self.devices = Gauge("edgewatch_devices", "Devices tracked.", registry=r)
        self.bundle = Info("edgewatch_bundle", "Loaded bundle and backend.", registry=r)
        self.bundle_loaded = Gauge(
            "edgewatch_bundle_loaded_timestamp_seconds", "When the bundle in service was loaded (Unix time).", registry=r
        )
        self.bundle_reloads = Counter(
            "edgewatch_bundle_reloads", "Bundle hot-reload attempts by result (ok, refused: the old bundle stays).",
            ["result"], registry=r,
        )
        self.selftest_detected = Gauge(
            "edgewatch_selftest_detected", "Synthetic-fault canary: fraction of synthetic windows of each fault type "
            "the detector raised an alert on (last run).", ["fault"], registry=r,
        )
        self.selftest_success = Gauge(
            "edgewatch_selftest_last_success_timestamp_seconds", "When the synthetic-fault canary last passed (Unix time).",
            registry=r,
        )
        # Pre-create label children so dashboards see zeros, not gaps.
        for res in ("ok", "invalid", "dropped"):
            self.messages.labels(res)
        for reason in INVALID_REASONS:
            self.invalid.labels(reason)
        for reason in DROP_REASONS:
            self.dropped.labels(reason)
        for state in ("raised", "cleared"):
            self.alerts.labels(state)
        for result in ("ok", "refused"):
            self.bundle_reloads.labels(result)

    def invalid_message(self, reason: str) -> None:
        self.messages.labels("invalid").inc()
        self.invalid.labels(reason).inc()

    def dropped_message(self, reason: str) -> None:
        self.messages.labels("dropped").inc()
        self.dropped.labels(reason).inc()

    def exposition(self) -> bytes:
        return generate_latest(self.registry)
