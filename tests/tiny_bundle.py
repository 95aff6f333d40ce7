"""A real, minimal bundle built without torch: for agent tests that need a bundle in milliseconds.

The "VAE" is an ONNX graph ``recon = x * 0`` run by the real onnxruntime backend, so the
score is the scaled energy of the newest row: mean over features of ((x - centre) / scale)^2.
N(centre, scale) data scores ~1 (chi-square / F); a +10 sigma step on one of F=3 sensors
scores ~34. The threshold (8, raise after 2, clear below 4 three times) keeps healthy
streams quiet and makes faults unmistakable.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper

from agent.manifest import Manifest, ModelEntry, ModelFile, Scaler, ScoreSpec, Threshold, Training, sha256_file, write_manifest


def _onnx_zero_recon(window: int, n_features: int) -> onnx.ModelProto:
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", window, n_features])
    y = helper.make_tensor_value_info("recon", TensorProto.FLOAT, ["batch", window, n_features])
    zero = helper.make_tensor("zero", TensorProto.FLOAT, [1], [0.0])
    graph = helper.make_graph([helper.make_node("Mul", ["x", "zero"], ["recon"])], "tiny_vae", [x], [y], [zero])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], producer_name="edgewatch-tests")
    model.ir_version = 9  # readable by every onnxruntime we support
    onnx.checker.check_model(model)
    return model


def make_tiny_bundle(
    bundle_dir: str | Path,
    features: list[str] | tuple[str, ...] = ("a", "b", "c"),
    window: int = 8,
    centre: list[float] | None = None,
    scale: list[float] | None = None,
    threshold: float = 8.0,
    raise_after: int = 2,
    clear_after: int = 3,
    clear_ratio: float = 0.5,
    stride: int = 1,
    name: str = "tiny",
    version: str = "1.0.0",
) -> Path:
    d = Path(bundle_dir)
    d.mkdir(parents=True, exist_ok=True)
    f = len(features)
    onnx.save(_onnx_zero_recon(window, f), d / "vae.onnx")
    rng = np.random.default_rng(0)
    golden_in = rng.normal(size=(4, window, f)).astype(np.float32)
    np.savez(d / "vae_golden.npz", in_x=golden_in, out_recon=np.zeros_like(golden_in))
    manifest = Manifest(
        name=name,
        version=version,
        trainer_version="tests",
        features=list(features),
        window=window,
        stride=stride,
        sample_period_s=1.0,
        scaler=Scaler(centre=centre or [0.0] * f, scale=scale or [1.0] * f),
        score=ScoreSpec(kind="vae_recon_mse", tail=1, smoothing=1, transform="none"),
        threshold=Threshold(
            value=threshold, method="fixed (tiny test bundle)", clear_ratio=clear_ratio,
            raise_after=raise_after, clear_after=clear_after,
        ),
        models={
            "vae": ModelEntry(
                inputs=["x"],
                outputs=["recon"],
                files={"onnx": [ModelFile(path="vae.onnx", sha256=sha256_file(d / "vae.onnx"))]},
                golden="vae_golden.npz",
                golden_sha256=sha256_file(d / "vae_golden.npz"),
                tolerance=1e-5,
            )
        },
        training=Training(data_sha256="0" * 64, rows=0, normal_rows=0, seconds=0.0),
    )
    write_manifest(d, manifest)
    return d
