"""Synthetic-fault self-test: can this gateway's detector see the faults the bundle knows?

The bundle's conditional generator draws windows of each fault type (z ~ N(0, 1) of size
``latent_dim``, the class one-hot), in scaled units; they are unscaled (``x * scale + centre``)
into raw sensor rows and streamed through the LIVE scoring pieces — ``DeviceStream`` (window
buffer, smoothing, ``AlertState`` with the bundle's threshold and debounce) and ``Scorer`` on
the configured backend — each on its own synthetic device, after a lead-in of a synthetic
NORMAL window so smoothing and debounce start from a normal state, exactly like a real
device whose fault begins. When a synthetic device raises, the classifier names the fault
from ``Scorer.scale(window)``, as the pipeline does for a real alert.

Nothing here touches the pipeline's devices or the alert topic: synthetic devices live in
this module only, and results go to stdout (``edge-agent selftest``) or to metrics and a
retained status topic (the canary in ``edge-agent run``).

Pass criterion: every fault type is detected (an alert is active during its synthetic rows)
in at least ``min_detected`` of its windows, default 0.5. The detector is judged, not the
generator or the classifier: GAN windows are imperfect (a classifier trained on them reaches
only ~0.6 accuracy on real windows), so requiring every synthetic window to alarm would fail
good detectors on the generator's misses, while a detector that has gone blind (a wrong
threshold, a broken scaler, a stale bundle) drops to ~0. The classifier's agreement with the
requested type is reported but never fails the test.
"""
from __future__ import annotations

import contextlib
import json
import logging
import os
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from agent.alerts import Event
from agent.backends import Backend, open_backend
from agent.classify import NORMAL, FaultClassifier, open_classifier
from agent.manifest import BundleError, Manifest, load_manifest
from agent.messages import iso_utc
from agent.scoring import DeviceStream, Scorer, open_scorer

log = logging.getLogger(__name__)

MIN_DETECTED = 0.5
NO_GENERATOR = "bundle has no generator: train with --fault-col"


@dataclass
class FaultResult:
    fault: str
    windows: int
    detected: int = 0
    lead_in_alarms: int = 0  # alerts raised during the normal lead-in (false alarms on synthetic normal)
    agreed: int = 0  # detected windows whose raise window the classifier named this fault
    named: dict[str, int] = field(default_factory=dict)  # classifier verdicts on the raise windows
    agreed_whole: int | None = None  # synthetic windows (all fault rows) the classifier named this fault

    @property
    def detected_fraction(self) -> float:
        return self.detected / max(1, self.windows)

    @property
    def agreement(self) -> float | None:
        """Classifier agreement at the raise, as an alert would report it."""
        return self.agreed / self.detected if self.detected and self.named else None

    @property
    def agreement_whole(self) -> float | None:
        """Classifier agreement on the whole synthetic fault windows (generator vs classifier)."""
        return None if self.agreed_whole is None else self.agreed_whole / max(1, self.windows)


@dataclass
class SelftestResult:
    bundle: str
    version: str
    backend: str
    min_detected: float
    faults: list[FaultResult]
    threshold: float = 0.0
    seconds: float = 0.0

    @property
    def failed(self) -> list[str]:
        return [f.fault for f in self.faults if f.detected_fraction < self.min_detected]

    @property
    def passed(self) -> bool:
        return bool(self.faults) and not self.failed

    def to_dict(self) -> dict:
        return {"bundle": self.bundle, "version": self.version, "backend": self.backend, "passed": self.passed,
                "min_detected": self.min_detected, "seconds": round(self.seconds, 3),
                "faults": [{**asdict(f), "detected_fraction": round(f.detected_fraction, 4),
                            "agreement": None if f.agreement is None else round(f.agreement, 4),
                            "agreement_whole": None if f.agreement_whole is None else round(f.agreement_whole, 4)}
                           for f in self.faults]}

    def table(self) -> str:
        rows = [("fault", "detected", "classifier agrees: window", "at raise", "classifier said at raise")]
        pct = lambda v: "-" if v is None else f"{v:.0%}"  # noqa: E731
        for f in self.faults:
            said = ", ".join(f"{k} {v}" for k, v in sorted(f.named.items(), key=lambda kv: -kv[1])) or "-"
            rows.append((f.fault, f"{f.detected}/{f.windows} ({f.detected_fraction:.0%})", pct(f.agreement_whole),
                         pct(f.agreement), said))
        widths = [max(len(r[i]) for r in rows) for i in range(4)]
        return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths)) + "  " + r[4] for r in rows)

    def summary(self) -> str:
        if self.passed:
            return (f"selftest passed: every fault type detected in >= {self.min_detected:.0%} of its synthetic "
                    f"windows ({self.bundle} {self.version}, {self.backend})")
        worst = ", ".join(f"{f.fault} {f.detected_fraction:.0%}" for f in self.faults if f.fault in self.failed)
        return (f"selftest FAILED: detector missed synthetic faults (detected {worst}; need >= "
                f"{self.min_detected:.0%}) with threshold {self.threshold:.4g}")


@contextlib.contextmanager
def quiet_runtime_banners():
    """Drop the runtimes' C-level ``INFO: ...`` lines (LiteRT announces its XNNPACK delegate on
    stderr) so a failing command still ends in exactly one error line; other output passes through."""
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as tmp:
        os.dup2(tmp.fileno(), 2)
        try:
            yield
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            tmp.seek(0)
            for line in tmp.read().decode("utf-8", "replace").splitlines():
                if not line.startswith("INFO: "):
                    sys.stderr.write(line + "\n")


def synthesise(manifest: Manifest, generator: Backend, cls: int, n: int, rng: np.random.Generator) -> np.ndarray:
    """``n`` raw (unscaled) windows (n, W, F) of class index ``cls`` from the generator."""
    if manifest.latent_dim is None:
        raise BundleError("bundle has a generator but no latent_dim")
    z = rng.standard_normal((n, manifest.latent_dim)).astype(np.float32)
    onehot = np.zeros((n, len(manifest.classes)), np.float32)
    onehot[:, cls] = 1.0
    scaled = generator.run(z, onehot)[0]
    scale = np.asarray(manifest.scaler.scale, np.float32)
    centre = np.asarray(manifest.scaler.centre, np.float32)
    return (scaled * scale + centre).astype(np.float32)


def _stream(manifest: Manifest, rows: np.ndarray) -> tuple[DeviceStream, list[int], np.ndarray]:
    """Push rows through a fresh DeviceStream; return it, the row index and window of every due window."""
    st = DeviceStream(manifest)
    due, wins = [], []
    for i, row in enumerate(rows):
        if st.push(row):
            due.append(i)
            wins.append(st.window.view().copy())
    return st, due, np.stack(wins)


def run_selftest(manifest: Manifest, scorer: Scorer, generator: Backend, classifier: FaultClassifier | None = None,
                 per_class: int = 20, min_detected: float = MIN_DETECTED, seed: int = 0,
                 backend_name: str = "") -> SelftestResult:
    """Stream ``per_class`` synthetic windows of every fault type through the live scoring pieces."""
    t0 = time.perf_counter()
    rng = np.random.default_rng(seed)
    W, F = manifest.window, len(manifest.features)
    classes = list(manifest.classes)
    if not [c for c in classes if c != NORMAL]:
        raise BundleError("bundle classes name no fault type: nothing to self-test")
    if NORMAL in classes:
        lead = synthesise(manifest, generator, classes.index(NORMAL), per_class * (len(classes) - 1), rng)
    else:  # no normal class: start from the scaler's centre
        lead = np.broadcast_to(np.asarray(manifest.scaler.centre, np.float32), (per_class * len(classes), W, F))
    results = []
    k = 0
    for ci, name in enumerate(classes):
        if name == NORMAL:
            continue
        res = FaultResult(name, per_class)
        fault = synthesise(manifest, generator, ci, per_class, rng)
        raised_windows = []
        for j in range(per_class):
            rows = np.concatenate([lead[k], fault[j]])  # W normal rows, then W fault rows
            k += 1
            st, due, wins = _stream(manifest, rows)
            scores, _ = scorer.score(wins)  # one batch, as the pipeline scores a micro-batch
            hit = None
            for n, (i, s) in enumerate(zip(due, scores.tolist())):
                d = st.decide(s)  # the stream's own smoothing + AlertState, as for a live device
                if i < W:
                    if d.event is Event.RAISED:
                        res.lead_in_alarms += 1
                elif d.anomaly:
                    hit = wins[n]
                    break
            if hit is not None:
                res.detected += 1
                raised_windows.append(hit)
        if classifier is not None:
            # The raise window mixes lead-in and fault rows, as a real alert's does; the whole
            # synthetic window shows whether generator and classifier agree at all.
            whole = classifier.classify(scorer.scale(fault))
            res.agreed_whole = sum(f.type == name for f in whole)
            if raised_windows:
                for f in classifier.classify(scorer.scale(np.stack(raised_windows))):
                    res.named[f.type] = res.named.get(f.type, 0) + 1
                    res.agreed += f.type == name
        results.append(res)
    return SelftestResult(manifest.name, manifest.version, backend_name, min_detected, results,
                          manifest.threshold.value, time.perf_counter() - t0)


def selftest_bundle(bundle: str | Path, backend: str = "onnxruntime", per_class: int = 20,
                    min_detected: float = MIN_DETECTED, threads: int = 1, seed: int = 0) -> SelftestResult:
    """Open the bundle's models (hashes and golden vectors checked) and run :func:`run_selftest`."""
    path = Path(bundle).resolve()
    m = load_manifest(path)
    if "generator" not in m.models:
        raise BundleError(NO_GENERATOR)
    scorer = open_scorer(backend, path, m, threads=threads)
    generator = open_backend(backend, path, m, model="generator", threads=threads)
    classifier = open_classifier(backend, path, m, threads=threads)
    return run_selftest(m, scorer, generator, classifier, per_class, min_detected, seed, backend)


class Canary:
    """The self-test as a periodic canary inside ``edge-agent run``.

    Runs on its own thread with its own backend instances (LiteRT interpreters are not
    thread-safe, and the pipeline's must not wait for it), reopened from the bundle in service
    on every run so it always tests what is deployed. Results: the gauges
    ``edgewatch_selftest_detected{fault}`` and ``edgewatch_selftest_last_success_timestamp_seconds``
    and a retained JSON on ``selftest.topic``. Never publishes an alert.
    """

    def __init__(self, cfg, bundle_path, metrics, publish):
        self.cfg = cfg
        self.bundle_path = bundle_path  # callable: the resolved bundle directory in service
        self.metrics = metrics
        self.publish = publish  # (topic, payload, qos, retain)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.runs = 0
        self.last: SelftestResult | None = None

    def start(self) -> "Canary":
        self._thread = threading.Thread(target=self._run, name="selftest", daemon=True)
        self._thread.start()
        return self

    def stop(self, timeout: float = 5.0) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)

    def run_once(self) -> SelftestResult | None:
        st = self.cfg.selftest
        body: dict
        try:
            res = selftest_bundle(self.bundle_path(), self.cfg.backend, st.per_class, st.min_detected,
                                  self.cfg.threads, seed=self.runs)
        except Exception as e:  # a canary failure is reported, never fatal
            msg = str(e).splitlines()[0] if str(e) else type(e).__name__
            log.error("selftest could not run: %s", msg)
            res, body = None, {"passed": False, "error": msg}
        else:
            for f in res.faults:
                self.metrics.selftest_detected.labels(f.fault).set(f.detected_fraction)
            if res.passed:
                self.metrics.selftest_success.set(time.time())
                log.info("%s", res.summary())
            else:
                log.error("%s", res.summary())
            body = res.to_dict()
        self.runs += 1
        self.last = res
        body.update({"agent": self.cfg.agent_id, "ts": iso_utc(time.time())})
        self.publish(self.cfg.selftest_topic, json.dumps(body).encode(), qos=1, retain=True)
        return res

    def _run(self) -> None:
        interval = self.cfg.selftest.interval_s
        while not self._stop.is_set():
            self.run_once()
            self._stop.wait(interval)
