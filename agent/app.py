"""Composition root: builds the agent's parts, starts them in order, stops them in reverse.

config → bundle (hashes) → backend (golden vectors) → metrics/HTTP → outbox → MQTT link →
pipeline thread → bundle watcher. READY=1 goes to systemd only once the bundle is loaded AND
the broker accepted us (and, where the policy asks for it, refused a stranger); WATCHDOG=1
comes from the pipeline loop itself, so a wedged loop gets the service restarted. SIGHUP
re-reads the config and bundle, the watcher re-reads the bundle when it changes on disk: a
refused bundle is logged in one line and the one in service stays.
"""
from __future__ import annotations

import gc
import json
import logging
import os
import signal
import threading
import time
from pathlib import Path

from agent import sdnotify
from agent.checkpoint import Checkpointer, StateStore
from agent.classify import FaultClassifier, open_classifier
from agent.bundle_watch import BundleWatcher, fingerprint
from agent.config import AgentConfig, ConfigError, load_config
from agent.decode import render
from agent.http_server import HttpServer
from agent.manifest import BundleError, Manifest, load_manifest
from agent.messages import iso_utc
from agent.metrics import Metrics
from agent.mqtt_link import MqttLink, receive_maximum
from agent.mqtt_security import anonymous_broker_check, check_policy, must_refuse_anonymous_broker
from agent.outbox import Outbox
from agent.pipeline import Pipeline
from agent.scoring import Scorer, open_scorer
from agent.selftest import Canary

log = logging.getLogger(__name__)

STALE_LOOP_S = 10.0  # /healthz fails when the pipeline loop has not ticked for this long


# Settings a reload applies; the others need a restart (connection, topics, sizes).
RELOADABLE = {"bundle", "backend", "threads"}


def freeze_startup_objects() -> None:
    """Move everything allocated so far (runtimes, bundle, config, metrics, restored devices: it
    lives as long as the process) out of the garbage collector's sight. A full collection then
    walks only what was allocated since, instead of pausing every thread, the pipeline's
    included, for 25-75 ms (measured under the latency bench) to walk the whole heap again."""
    gc.collect()
    gc.freeze()


class App:
    def __init__(self, cfg: AgentConfig, config_path: str | None = None):
        self.cfg = cfg
        self.config_path = config_path
        self.metrics = Metrics()
        self._stop = threading.Event()
        self._reload = threading.Event()
        self._wake = threading.Event()
        self._reload_lock = threading.Lock()  # SIGHUP (main thread) and the watcher never load at once
        self._thread: threading.Thread | None = None
        self.http: HttpServer | None = None
        self._notified_ready = False
        self._wd_interval = sdnotify.watchdog_interval()
        self._wd_last = 0.0
        # None until the broker has been shown to refuse anonymous clients, where the policy asks for it.
        self._auth_ok: bool | None = None if must_refuse_anonymous_broker(cfg) else True
        self.fatal: str | None = None  # set when the agent must stop and say why (run() raises it)

        check_policy(cfg)  # never connect anonymously to a remote broker, unless allowed
        # Bundle first: a bad bundle stops start-up before anything touches the network.
        fp = fingerprint(cfg.bundle)
        scorer, classifier = self._load_bundle(cfg)
        self.manifest = scorer.manifest
        self.loaded_at = time.time()
        self.watcher = (BundleWatcher(lambda: self.cfg.bundle, cfg.bundle_watch_s, self.reload_bundle)
                        if cfg.bundle_watch_s > 0 else None)
        if self.watcher is not None:
            self.watcher.rebase(fp)

        self.outbox = Outbox(cfg.state_dir / "outbox.sqlite")
        self.pipeline = Pipeline(
            cfg, scorer, self.metrics,
            sink=lambda *a: self.link.send_alert(*a),
            sink_many=lambda alerts: self.link.send_alerts(alerts),  # one outbox commit per batch
            dead_letter=self._dead_letter if cfg.topics.dead_letter else None,
            classifier=classifier,
        )
        # Telemetry is acknowledged once a state checkpoint holds it: a crash loses neither.
        self.link = MqttLink(cfg, self.pipeline.submit, self.metrics, self.outbox, manual_ack=True)
        self.state = StateStore(cfg.state_dir / "state.sqlite")
        self.checkpoints = Checkpointer(self.pipeline, self.state, self.link.ack_through, receive_maximum(cfg),
                                        durable=self.outbox.sync,
                                        writer_ack=lambda token: self.link.ack_through(token, pace=True))
        self.checkpoints.restore()
        for f in self.pipeline.matcher.subscriptions():
            self.link.subscribe(f, qos=1)
        # Synthetic-fault canary (agent.selftest): its own thread and backends, never the alert topic.
        self.canary = (Canary(cfg, lambda: self.bundle_path, self.metrics, self.link.publish)
                       if cfg.selftest.interval_s > 0 else None)
        if cfg.metrics.enabled:
            self.http = HttpServer(cfg.metrics.host, cfg.metrics.port, self.metrics.exposition, self.healthy, self.ready)

    def _load_bundle(self, cfg: AgentConfig) -> tuple[Scorer, FaultClassifier | None]:
        # The symlink's target, resolved once: a switch while we verify cannot mix two bundles.
        path = Path(os.path.realpath(cfg.bundle))
        m: Manifest = load_manifest(path)
        scorer = open_scorer(cfg.backend, path, m, threads=cfg.threads)
        log.info("bundle %s %s verified (%s%s, %d features, window %d, threshold %.4g, %s)", m.name, m.version,
                 cfg.backend, ", fused scorer graph" if scorer.head is not None else "", len(m.features), m.window,
                 m.threshold.value, path)
        classifier = open_classifier(cfg.backend, path, m, threads=cfg.threads)
        if classifier is not None:
            log.info("fault classifier verified: %s", ", ".join(m.classes))
        self.bundle_path = path
        return scorer, classifier

    def _publish_bundle(self, backend: str) -> None:
        """Metrics and the retained model topic: what is in service, since when."""
        m = self.manifest
        self.metrics.threshold.set(m.threshold.value)
        self.metrics.bundle.info({"name": m.name, "version": m.version, "backend": backend})
        self.metrics.bundle_loaded.set(self.loaded_at)
        body = {"name": m.name, "version": m.version, "backend": backend, "loaded_at": iso_utc(self.loaded_at),
                "created": m.created, "path": str(self.bundle_path), "agent": self.cfg.agent_id}
        self.link.publish(self.cfg.model_topic, json.dumps(body).encode(), qos=1, retain=True)

    def reload(self) -> bool:
        """SIGHUP: re-read config and bundle; swap the bundle in only if it passes every check."""
        with self._reload_lock:
            try:
                cfg = load_config(self.config_path)
                fp = fingerprint(cfg.bundle)
                if self.watcher is not None:
                    self.watcher.rebase(fp)  # tried now, good or bad: the watcher need not try it again
                scorer, classifier = self._load_bundle(cfg)
            except (ConfigError, BundleError) as e:
                return self._refused("reload", e)
            changed = sorted(k for k in AgentConfig.model_fields if k not in RELOADABLE | {"log"}
                             and getattr(cfg, k) != getattr(self.cfg, k))
            if changed:
                log.warning("reload: %s changed; restart the service to apply", ", ".join(changed))
            self.cfg = self.cfg.model_copy(update={k: getattr(cfg, k) for k in RELOADABLE})
            self._swap(scorer, classifier)
            return True

    def reload_bundle(self) -> bool:
        """The watcher saw the bundle change on disk: verify it, then swap it in or keep the old one."""
        with self._reload_lock:
            if self.watcher is not None:
                self.watcher.rebase(fingerprint(self.cfg.bundle))
            log.info("bundle %s changed on disk; verifying it", self.cfg.bundle)
            try:
                scorer, classifier = self._load_bundle(self.cfg)
            except BundleError as e:
                return self._refused("new bundle", e)
            self._swap(scorer, classifier)
            return True

    def _swap(self, scorer: Scorer, classifier: FaultClassifier | None = None) -> None:
        self.pipeline.request_swap(scorer, classifier)
        self.manifest = scorer.manifest
        self.loaded_at = time.time()
        self.metrics.bundle_reloads.labels("ok").inc()
        self._publish_bundle(self.cfg.backend)
        sdnotify.status(f"scoring with {self.manifest.name} {self.manifest.version}")

    def _refused(self, what: str, e: Exception) -> bool:
        self.metrics.bundle_reloads.labels("refused").inc()
        log.error("%s refused, still serving %s %s: %s", what, self.manifest.name, self.manifest.version, e)
        return False

    # ------------------------------------------------------------ probes

    def healthy(self) -> tuple[bool, str]:
        if self._thread is None or not self._thread.is_alive():
            return False, "pipeline thread not running"
        age = time.monotonic() - self.pipeline.last_tick
        return (age < STALE_LOOP_S), f"pipeline loop ticked {age:.1f}s ago"

    def ready(self) -> tuple[bool, str]:
        if self.fatal:
            return False, self.fatal
        if not self.link.connected:
            return False, "not connected to the broker" + (f" ({self.link.last_refusal})" if self.link.last_refusal else "")
        if not self._auth_ok:
            return False, "checking that the broker refuses clients without credentials"
        return True, f"bundle {self.manifest.name} {self.manifest.version}, broker connected"

    # ------------------------------------------------------------ lifecycle

    def start(self) -> "App":
        self._publish_bundle(self.cfg.backend)
        freeze_startup_objects()
        if self.http is not None:
            self.http.start()
            log.info("metrics on http://%s:%d/metrics", self.cfg.metrics.host, self.http.port)
        self.link.start()
        self._thread = threading.Thread(target=self.pipeline.run, args=(self._stop, self._tick), name="pipeline", daemon=True)
        self._thread.start()
        if self._auth_ok is None:
            threading.Thread(target=self._check_broker_auth, name="auth-check", daemon=True).start()
        if self.watcher is not None:
            self.watcher.start()
        if self.canary is not None:
            self.canary.start()
        return self

    def _check_broker_auth(self) -> None:
        """Once connected: does the broker let a stranger in? Then stop (see agent.mqtt_security)."""
        while not self._stop.is_set() and not self.link.wait_connected(1.0):
            pass
        if self._stop.is_set():
            return
        status, why = anonymous_broker_check(self.cfg)
        if status == "FAIL":
            self.fatal = f"mqtt: {why}; refusing to run"
            log.error("%s", self.fatal)
            self._stop.set()
            self._wake.set()
            return
        if status == "unknown":
            log.warning("%s; carrying on", why)
        self._auth_ok = True

    def _tick(self, handled: int) -> None:
        # Called by the pipeline loop after each pass: it made progress, or was idle with an empty queue.
        self.checkpoints.tick(handled)
        if not self._notified_ready and self.link.connected and self._auth_ok:
            self._notified_ready = True
            sdnotify.ready(f"scoring with {self.manifest.name} {self.manifest.version}")
            log.info("ready")
        if self._wd_interval and (handled > 0 or self.pipeline.queue.empty()):
            now = time.monotonic()
            if now - self._wd_last >= self._wd_interval:
                self._wd_last = now
                sdnotify.watchdog()

    def run(self) -> None:
        """Run until SIGTERM/SIGINT; SIGHUP reloads (main thread only). Raises ConfigError if the
        agent had to stop itself for a reason the operator must fix (an anonymous broker)."""
        wake = self._wake

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
        if self.fatal:
            raise ConfigError(self.fatal)

    def stop(self, drain_timeout: float = 5.0) -> None:
        sdnotify.stopping()
        self._stop.set()
        if self.watcher is not None:
            self.watcher.stop()
        if self.canary is not None:
            self.canary.stop()
        if self._thread is not None:
            self._thread.join(drain_timeout)  # the loop drains its queue and scores the last batch
        if self._thread is None or not self._thread.is_alive():
            self.checkpoints.checkpoint(wait=True)  # and acknowledges what it handled
        if not self.link.drain(drain_timeout):
            log.warning("%d alert(s) not acknowledged yet; they stay in the outbox", self.outbox.backlog())
        self.link.stop()
        if self.http is not None:
            self.http.stop()
        self.outbox.close()
        self.state.close()
        log.info("stopped")

    def _dead_letter(self, topic: str, payload: bytes, reason: str) -> None:
        if not self.link.connected:  # debugging aid only: never queue it while offline
            return
        body = json.dumps({"topic": topic, "reason": reason, "payload": payload[:4096].decode("utf-8", "replace")})
        self.link.publish(render(self.cfg.topics.dead_letter, agent_id=self.cfg.agent_id), body.encode(), qos=0)
