"""Inference backends: one small protocol, one file per runtime, imported lazily.

A backend only runs tensors (float32 in, arrays out). Scaling, scoring and thresholds
live in :mod:`agent.scoring`. Adding a runtime is one new module plus a registry line.
"""
from __future__ import annotations

import importlib
import logging
from pathlib import Path
from typing import Protocol, runtime_checkable

import numpy as np

from agent.manifest import BundleError, Manifest, ModelEntry

log = logging.getLogger(__name__)

# name -> "module:Class"; modules import their runtime only when chosen.
REGISTRY: dict[str, str] = {
    "onnxruntime": "agent.backends.onnx_backend:OnnxBackend",
    "litert": "agent.backends.litert_backend:LiteRTBackend",
}
# Bundle format each backend reads.
FORMAT = {"onnxruntime": "onnx", "litert": "tflite"}


@runtime_checkable
class Backend(Protocol):
    name: str

    def run(self, *inputs: np.ndarray) -> list[np.ndarray]:
        """Run the model on a batch; returns outputs in the manifest's order."""
        ...


class BackendUnavailable(BundleError):
    """The runtime for a backend is not installed."""


def available() -> list[str]:
    """Backends whose runtime imports on this machine."""
    out = []
    for name in REGISTRY:
        try:
            _load_class(name)
            out.append(name)
        except BackendUnavailable:
            pass
    return out


def _load_class(name: str):
    if name not in REGISTRY:
        raise BundleError(f"unknown backend {name!r} (known: {', '.join(REGISTRY)})")
    mod, cls = REGISTRY[name].split(":")
    try:
        return getattr(importlib.import_module(mod), cls)
    except ImportError as e:
        raise BackendUnavailable(f"backend {name!r} is not installed ({e})") from None


def open_backend(
    name: str,
    bundle_dir: str | Path,
    manifest: Manifest,
    model: str = "vae",
    threads: int = 1,
    quantization: str = "float32",
    check_golden: bool = True,
) -> Backend:
    """Load ``model`` from the bundle with the named backend and prove it on the golden vectors."""
    entry = manifest.models.get(model)
    if entry is None:
        raise BundleError(f"bundle has no model {model!r}")
    fmt = FORMAT[name]
    files = [f for f in entry.files.get(fmt, []) if f.quantization == quantization]
    if not files:
        raise BundleError(f"bundle has no {quantization} {fmt} file for model {model!r}")
    cls = _load_class(name)
    backend = cls(Path(bundle_dir), entry, files, threads=threads)
    if check_golden:
        verify_golden(backend, Path(bundle_dir), entry, model, quantization)
    return backend


def verify_golden(backend: Backend, bundle_dir: Path, entry: ModelEntry, model: str, quantization: str = "float32") -> float:
    """Run the golden inputs and compare to the trainer's outputs; raise BundleError on mismatch."""
    if not entry.golden:
        raise BundleError(f"model {model!r} has no golden vectors; refusing an unverifiable model")
    with np.load(bundle_dir / entry.golden) as g:
        inputs = [g[f"in_{n}"] for n in entry.inputs]
        want = [g[f"out_{n}"] for n in entry.outputs]
    got = backend.run(*inputs)
    # Quantised models are checked against float outputs with a looser bound.
    tol = entry.tolerance * (50 if quantization != "float32" else 1)
    worst = 0.0
    for name, w, o in zip(entry.outputs, want, got):
        if w.shape != o.shape:
            raise BundleError(f"{backend.name}: {model}.{name} shape {o.shape} != golden {w.shape}")
        diff = float(np.max(np.abs(w.astype(np.float64) - o.astype(np.float64)))) if w.size else 0.0
        worst = max(worst, diff)
        if not diff <= tol:
            raise BundleError(
                f"{backend.name}: {model}.{name} differs from golden vectors by {diff:.3g} (> {tol:.3g}); refusing bundle"
            )
    return worst
