"""The bundle manifest: the contract between the trainer and every gateway.

The trainer writes it through these models and the agent reads it through them, so
there is one definition of what a bundle is. A bundle is a directory holding
``manifest.json`` and the model files it names, each with its sha256.
"""
from __future__ import annotations

import hashlib
import json
import math
from datetime import datetime, timezone
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

SCHEMA_VERSION = 1
MANIFEST_FILE = "manifest.json"


class BundleError(Exception):
    """A bundle is missing, corrupt or inconsistent. The message is one line for the user."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Scaler(_Strict):
    """Robust per-feature scaling: ``(x - centre) / scale``."""

    centre: list[float] = Field(description="Per-feature centre (median of normal history).")
    scale: list[float] = Field(description="Per-feature scale (IQR-based, never zero).")

    @model_validator(mode="after")
    def _check(self) -> "Scaler":
        if len(self.centre) != len(self.scale):
            raise ValueError("scaler centre and scale differ in length")
        if any(not (s > 0) for s in self.scale):
            raise ValueError("scaler scale must be positive")
        return self


class ScoreSpec(_Strict):
    """How a window's reconstruction becomes one anomaly score."""

    kind: Literal["vae_recon_mse", "vae_recon_norm", "vae_recon_mahal"] = Field(
        "vae_recon_norm",
        description="vae_recon_mse: mean squared error over the window; vae_recon_norm: per-channel "
        "squared error divided by that channel's typical error on normal data, then averaged, "
        "so one noisy channel cannot dominate; vae_recon_mahal: each row's residual vector r "
        "whitened, r' P r / F, averaged over the tail rows (P: `precision`), so correlated "
        "(redundant) channels count once and a broken correlation between channels counts too.",
    )
    channel_scale: list[float] | None = Field(
        None, description="Per-channel typical squared error on normal data (vae_recon_norm)."
    )
    precision: list[list[float]] | None = Field(
        None, description="F x F symmetric whitening matrix of the residuals on held-out normal data "
        "(vae_recon_mahal).",
    )
    tail: int = Field(
        1, ge=1, description="Error is taken over the last `tail` timesteps of the window "
        "(1 = newest row only: causal and sharp; window length = whole window).",
    )
    smoothing: int = Field(1, ge=1, description="Causal moving average over this many consecutive scores.")
    transform: Literal["none", "log"] = Field(
        "log", description="Score transform applied before smoothing (log1p compresses heavy tails)."
    )


class Threshold(_Strict):
    """The decision rule. Kept out of the graph so it can be retuned without re-export."""

    value: float = Field(description="Scores above this are anomalous.")
    method: str = Field(description="How the value was calibrated, e.g. 'quantile(0.995)*1.1 on held-out normal'.")
    clear_ratio: float = Field(
        0.9, gt=0, le=1, description="Hysteresis: an alert clears only once the score is below value*clear_ratio."
    )
    raise_after: int = Field(1, ge=1, description="Consecutive scores above threshold before raising.")
    clear_after: int = Field(3, ge=1, description="Consecutive scores below the clear level before clearing.")
    clear_smoothing: int | None = Field(
        None, ge=1, description="An active alert clears on the moving average of only the newest this-many scores "
        "(at most the score's smoothing) being below the clear level: the end of an anomaly is seen without the "
        "whole smoothing lag; raising then needs both that average and the smoothed score above the threshold (the "
        "lagging smoothed score alone would raise a just-cleared alert again). None = the smoothed score alone "
        "(bundles before this field).",
    )

    @model_validator(mode="after")
    def _finite(self) -> "Threshold":
        if not (self.value == self.value) or self.value in (float("inf"), float("-inf")):
            raise ValueError("threshold value must be finite")
        return self


class ModelFile(_Strict):
    path: str = Field(description="File name inside the bundle directory.")
    sha256: str = Field(description="Hex sha256 of the file.")
    batch: int | None = Field(None, description="Fixed batch size (TFLite); None = dynamic.")
    quantization: Literal["float32", "dynamic_int8"] = "float32"


class ModelEntry(_Strict):
    """One model in every format it was exported to, plus golden vectors for parity."""

    inputs: list[str] = Field(description="Input tensor names, in order.")
    outputs: list[str] = Field(description="Output tensor names, in order.")
    files: dict[str, list[ModelFile]] = Field(
        description="Format ('onnx', 'tflite') -> files (several batch sizes or quantisations)."
    )
    golden: str | None = Field(None, description="npz file with golden inputs and outputs.")
    golden_sha256: str | None = None
    tolerance: float = Field(1e-3, description="Max abs difference allowed against golden outputs.")


class Training(_Strict):
    data_sha256: str
    rows: int
    normal_rows: int
    seconds: float
    metrics: dict[str, float] = Field(default_factory=dict)


class Manifest(_Strict):
    schema_version: int = SCHEMA_VERSION
    name: str
    version: str
    created: str = Field(default_factory=lambda: datetime.now(timezone.utc).isoformat(timespec="seconds"))
    trainer_version: str
    features: list[str] = Field(min_length=1, description="Ordered sensor names the model expects.")
    window: int = Field(ge=1, description="Rows per window.")
    stride: int = Field(1, ge=1, description="Rows between scored windows on the gateway.")
    sample_period_s: float | None = Field(None, description="Median sampling period of the training data.")
    scaler: Scaler
    score: ScoreSpec
    threshold: Threshold
    models: dict[str, ModelEntry] = Field(description="'vae' (required), 'scorer' (the fused scaling + VAE + score "
                                          "graph, agent.scoring.open_scorer), 'generator', 'classifier'.")
    classes: list[str] = Field(default_factory=list, description="Fault class names of the classifier.")
    latent_dim: int | None = Field(None, description="Generator noise size (when a generator is present).")
    training: Training

    @model_validator(mode="after")
    def _consistent(self) -> "Manifest":
        n = len(self.features)
        if len(self.scaler.centre) != n:
            raise ValueError(f"scaler has {len(self.scaler.centre)} features, manifest lists {n}")
        if self.score.kind == "vae_recon_norm" and (self.score.channel_scale is None or len(self.score.channel_scale) != n):
            raise ValueError("score kind vae_recon_norm needs channel_scale with one value per feature")
        if self.score.kind == "vae_recon_mahal":
            p = self.score.precision
            if p is None or len(p) != n or any(len(r) != n for r in p):
                raise ValueError(f"score kind vae_recon_mahal needs a {n} x {n} precision matrix")
            if not all(math.isfinite(v) for r in p for v in r):
                raise ValueError("score precision matrix has non-finite values")
        if self.score.tail > self.window:
            raise ValueError("score tail cannot exceed the window")
        if "vae" not in self.models:
            raise ValueError("bundle has no 'vae' model")
        if "classifier" in self.models and not self.classes:
            raise ValueError("bundle has a classifier but no classes")
        return self


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def write_manifest(bundle_dir: Path, manifest: Manifest) -> Path:
    path = Path(bundle_dir) / MANIFEST_FILE
    tmp = path.with_suffix(".tmp")
    tmp.write_text(manifest.model_dump_json(indent=2) + "\n")
    tmp.replace(path)
    return path


def load_manifest(bundle_dir: str | Path, verify: bool = True) -> Manifest:
    """Read and validate a bundle's manifest; with ``verify``, check every file's sha256.

    Raises BundleError with a one-line message naming the problem.
    """
    bundle_dir = Path(bundle_dir)
    path = bundle_dir / MANIFEST_FILE
    if not bundle_dir.is_dir():
        raise BundleError(f"bundle directory not found: {bundle_dir}")
    if not path.is_file():
        raise BundleError(f"bundle has no {MANIFEST_FILE}: {bundle_dir}")
    try:
        raw = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise BundleError(f"unreadable {path}: {e}") from None
    if not isinstance(raw, dict):
        raise BundleError(f"{path}: manifest must be a JSON object")
    sv = raw.get("schema_version")
    if sv != SCHEMA_VERSION:
        raise BundleError(f"{path}: schema_version {sv!r} is not supported (expected {SCHEMA_VERSION})")
    try:
        manifest = Manifest.model_validate(raw)
    except ValidationError as e:
        err = e.errors()[0]
        loc = ".".join(str(p) for p in err["loc"]) or "manifest"
        raise BundleError(f"{path}: {loc}: {err['msg']}") from None
    if verify:
        verify_files(bundle_dir, manifest)
    return manifest


def verify_files(bundle_dir: Path, manifest: Manifest) -> None:
    for name, entry in manifest.models.items():
        checks = [(f.path, f.sha256) for files in entry.files.values() for f in files]
        if entry.golden:
            checks.append((entry.golden, entry.golden_sha256 or ""))
        for rel, want in checks:
            p = bundle_dir / rel
            if not p.is_file():
                raise BundleError(f"bundle file missing: {p} (model {name})")
            got = sha256_file(p)
            if got != want:
                raise BundleError(f"bundle file corrupt: {p} (sha256 {got[:12]}… != manifest {want[:12]}…)")
