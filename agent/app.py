"""Composition root: builds the agent's parts, starts them in order, stops them in reverse.

config → bundle (hashes) → backend (golden vectors) → metrics/HTTP → outbox → MQTT link →
pipeline thread. READY=1 goes to systemd only once the bundle is loaded AND the broker
accepted us; WATCHDOG=1 comes from the pipeline loop itself, so a wedged loop gets the
service restarted. SIGHUP re-reads the config and bundle: a refused bundle is logged and
the one in service stays.
"""
from __future__ import annotations

import json
import logging
import signal
import threading
import time

from agent import sdnotify
from agent.backends import open_backend
from agent.config import AgentConfig, ConfigError, load_config
from agent.decode import render
from agent.http_server import HttpServer
from agent.manifest import BundleError, Manifest, load_manifest
from agent.metrics import Metrics
from agent.mqtt_link import MqttLink
from agent.outbox import Outbox
from agent.pipeline import Pipeline
from agent.scoring import Scorer

log = logging.getLogger(__name__)

STALE_LOOP_S = 10.0  # /healthz fails when the pipeline loop has not ticked for this long


# Settings a reload applies; the others need a restart (connection, topics, sizes).
RELOADABLE = {"bundle", "backend", "threads"}


class App:
    def __init__(self, cfg: AgentConfig, config_path: str | None = None):
        self.cfg = cfg
        self.config_path = config_path
        self.metrics = Metrics()
        self._stop = threading.Event()
        self._reload = threading.Event()
        self._thread: threading.Thread | None = None
        self.http: HttpServer | None = None
        self._notified_ready = False
        self._wd_interval = sdnotify.watchdog_interval()
        self._wd_last = 0.0

        # Bundle first: a bad bundle stops start-up before anything touches the network.
        scorer = self._load_bundle(cfg)
        self.manifest = scorer.manifest

        self.outbox = Outbox(cfg.state_dir / "outbox.sqlite")
        self.pipeline = Pipeline(
            cfg, scorer, self.metrics,
            sink=lambda *a: self.link.send_alert(*a),
            dead_letter=self._dead_letter if cfg.topics.dead_letter else None,
        )
        self.link = MqttLink(cfg, self.pipeline.submit, self.metrics, self.outbox)
        for f in self.pipeline.matcher.subscriptions():
            self.link.subscribe(f, qos=1)
        if cfg.metrics.enabled:
            self.http = HttpServer(cfg.metrics.host, cfg.metrics.port, self.metrics.exposition, self.healthy, self.ready)

    def _load_bundle(self, cfg: AgentConfig) -> Scorer:
        m: Manifest = load_manifest(cfg.bundle)
        backend = open_backend(cfg.backend, cfg.bundle, m, threads=cfg.threads)
        log.info("bundle %s %s verified (%s, %d features, window %d, threshold %.4g)", m.name, m.version,
                 cfg.backend, len(m.features), m.window, m.threshold.value)
        return Scorer(m, backend)

    def _publish_bundle_metrics(self, backend: str) -> None:
        self.metrics.threshold.set(self.manifest.threshold.value)
        self.metrics.bundle.info({"name": self.manifest.name, "version": self.manifest.version, "backend": backend})

    def reload(self) -> bool:
        """Re-read config and bundle; swap the bundle in only if it passes every check."""
        try:
            cfg = load_config(self.config_path)
            scorer = self._load_bundle(cfg)
        except (ConfigError, BundleError) as e:
            log.error("reload refused, still serving %s %s: %s", self.manifest.name, self.manifest.version, e)
            return False
        changed = sorted(k for k in AgentConfig.model_fields if k not in RELOADABLE | {"log"}
                         and getattr(cfg, k) != getattr(self.cfg, k))
        if changed:
            log.warning("reload: %s changed; restart the service to apply", ", ".join(changed))
        self.pipeline.request_swap(scorer)
        self.manifest = scorer.manifest
        self.cfg = self.cfg.model_copy(update={k: getattr(cfg, k) for k in RELOADABLE})
        self._publish_bundle_metrics(cfg.backend)
        sdnotify.status(f"scoring with {self.manifest.name} {self.manifest.version}")
        return True

    # ------------------------------------------------------------ probes

    def healthy(self) -> tuple[bool, str]:
        if self._thread is None or not self._thread.is_alive():
            return False, "pipeline thread not running"
        age = time.monotonic() - self.pipeline.last_tick
        return (age < STALE_LOOP_S), f"pipeline loop ticked {age:.1f}s ago"

    def ready(self) -> tuple[bool, str]:
        if not self.link.connected:
            return False, "not connected to the broker" + (f" ({self.link.last_refusal})" if self.link.last_refusal else "")
        return True, f"bundle {self.manifest.name} {self.manifest.version}, broker connected"

    # ------------------------------------------------------------ lifecycle

    def start(self) -> "App":
        self._publish_bundle_metrics(self.cfg.backend)
        if self.http is not None:
            self.http.start()
            log.info("metrics on http://%s:%d/metrics", self.cfg.metrics.host, self.http.port)
        self.link.start()
        self._thread = threading.Thread(target=self.pipeline.run, args=(self._stop, self._tick), name="pipeline", daemon=True)
        self._thread.start()
        return self

    def _tick(self, handled: int) -> None:
        # Called by the pipeline loop after each pass: it made progress, or was idle with an empty queue.
        if not self._notified_ready and self.link.connected:
            self._notified_ready = True
            sdnotify.ready(f"scoring with {self.manifest.name} {self.manifest.version}")
            log.info("ready")
        if self._wd_interval and (handled > 0 or self.pipeline.queue.empty()):
            now = time.monotonic()
            if now - self._wd_last >= self._wd_interval:
                self._wd_last = now
                sdnotify.watchdog()

    def run(self) -> None:
        """Run until SIGTERM/SIGINT; SIGHUP reloads (main thread only)."""
        wake = threading.Event()

        def on_signal(signum, frame):
            if signum == signal.SIGHUP:
                log.info("received SIGHUP; reloading config and bundle")
                self._reload.set()
            else:
                log.info("received %s; stopping", signal.Signals(signum).name)
                self._stop.set()
            wake.set()

        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            signal.signal(sig, on_signal)
        self.start()
        while True:
            wake.wait(1.0)
            wake.clear()
            if self._stop.is_set():
                break
            if self._reload.is_set():
                self._reload.clear()
                self.reload()  # on the main thread: the pipeline keeps scoring while the bundle is verified
            if self._thread is not None and not self._thread.is_alive():
                log.error("pipeline thread died; stopping so the supervisor restarts us")
                break
        self.stop()

    def stop(self, drain_timeout: float = 5.0) -> None:
        sdnotify.stopping()
        self._stop.set()
        if self._thread is not None:
            self._thread.join(drain_timeout)  # the loop drains its queue and scores the last batch
        if not self.link.drain(drain_timeout):
            log.warning("%d alert(s) not acknowledged yet; they stay in the outbox", self.outbox.backlog())
        self.link.stop()
        if self.http is not None:
            self.http.stop()
        self.outbox.close()
        log.info("stopped")

    def _dead_letter(self, topic: str, payload: bytes, reason: str) -> None:
        if not self.link.connected:  # debugging aid only: never queue it while offline
            return
        body = json.dumps({"topic": topic, "reason": reason, "payload": payload[:4096].decode("utf-8", "replace")})
        self.link.publish(render(self.cfg.topics.dead_letter, agent_id=self.cfg.agent_id), body.encode(), qos=0)
