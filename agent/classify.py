"""Fault classification of a raised alert: which known fault does the window look like?

Run only on the window that raised an alert (a handful per day), never per scored window, so
the hot path stays as cheap as without a classifier. The classifier is a bundle model like the
VAE, opened through the same backend registry and proven on its golden vectors at load; it
takes the window scaled exactly as the scorer scales it (``Scorer.scale``).

Its last class may be ``normal`` (see trainer.fault_models): the threshold is a quantile of
normal scores, so some raised windows are normal-looking. When ``normal`` wins the alert says
``{"type": "unknown", "confidence": p}`` with ``p`` the probability of "normal", i.e. how sure
the classifier is that this is none of the faults it knows (a new fault, or a false alarm).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from agent.backends import Backend, open_backend
from agent.manifest import Manifest
from agent.messages import Fault

NORMAL = "normal"
UNKNOWN = "unknown"


class FaultClassifier:
    """Scaled windows in, :class:`Fault` out. ``calls`` counts backend runs (tests, metrics)."""

    def __init__(self, manifest: Manifest, backend: Backend):
        self.classes = list(manifest.classes)
        self.backend = backend
        self.calls = 0

    def probs(self, scaled: np.ndarray) -> np.ndarray:
        """(B, W, F) scaled windows → (B, C) class probabilities."""
        self.calls += 1
        return self.backend.run(np.ascontiguousarray(scaled, np.float32))[0]

    def classify(self, scaled: np.ndarray) -> list[Fault]:
        return [self._fault(p) for p in self.probs(scaled)]

    def classify_one(self, scaled_window: np.ndarray) -> Fault:
        return self.classify(scaled_window[None])[0]

    def _fault(self, p: np.ndarray) -> Fault:
        i = int(np.argmax(p))
        name = self.classes[i]
        return Fault(type=UNKNOWN if name == NORMAL else name, confidence=round(float(p[i]), 4))


def open_classifier(backend: str, bundle_dir: str | Path, manifest: Manifest, threads: int = 1) -> FaultClassifier | None:
    """The bundle's classifier on ``backend`` (golden-checked), or None when it has none."""
    if "classifier" not in manifest.models:
        return None
    return FaultClassifier(manifest, open_backend(backend, bundle_dir, manifest, model="classifier", threads=threads))
