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
from onnx import TensorProto, helper, numpy_helper

from agent.manifest import (Manifest, ModelEntry, ModelFile, Scaler, ScoreSpec, Threshold, Training, load_manifest,
                            sha256_file, write_manifest)


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


# ------------------------------------------------------------------ fault models (generator, classifier)

LATENT = 4


def _generator_onnx(patterns: np.ndarray) -> onnx.ModelProto:
    """window = reshape(cls @ K + z @ 0, (B, W, F)); K row c = class c's scaled pattern."""
    C, W, F = patterns.shape
    z = helper.make_tensor_value_info("z", TensorProto.FLOAT, ["batch", LATENT])
    cls = helper.make_tensor_value_info("cls", TensorProto.FLOAT, ["batch", C])
    out = helper.make_tensor_value_info("window", TensorProto.FLOAT, ["batch", W, F])
    inits = [numpy_helper.from_array(patterns.reshape(C, W * F).astype(np.float32), "K"),
             numpy_helper.from_array(np.zeros((LATENT, W * F), np.float32), "Z0"),
             numpy_helper.from_array(np.array([-1, W, F], np.int64), "shape")]
    nodes = [helper.make_node("MatMul", ["cls", "K"], ["a"]), helper.make_node("MatMul", ["z", "Z0"], ["b"]),
             helper.make_node("Add", ["a", "b"], ["flat"]), helper.make_node("Reshape", ["flat", "shape"], ["window"])]
    m = helper.make_model(helper.make_graph(nodes, "tiny_gen", [z, cls], [out], inits),
                          opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 9
    onnx.checker.check_model(m)
    return m


def _classifier_onnx(patterns: np.ndarray) -> onnx.ModelProto:
    """probs = softmax(reshape(x, (B, W*F)) @ K^T): the class whose pattern the window most resembles."""
    C, W, F = patterns.shape
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", W, F])
    out = helper.make_tensor_value_info("probs", TensorProto.FLOAT, ["batch", C])
    inits = [numpy_helper.from_array(patterns.reshape(C, W * F).T.copy().astype(np.float32), "KT"),
             numpy_helper.from_array(np.array([-1, W * F], np.int64), "flat_shape")]
    nodes = [helper.make_node("Reshape", ["x", "flat_shape"], ["flat"]), helper.make_node("MatMul", ["flat", "KT"], ["logits"]),
             helper.make_node("Softmax", ["logits"], ["probs"], axis=-1)]
    m = helper.make_model(helper.make_graph(nodes, "tiny_clf", [x], [out], inits),
                          opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 9
    onnx.checker.check_model(m)
    return m


def _entry(d: Path, stem: str, inputs: list[str], outputs: list[str]) -> ModelEntry:
    return ModelEntry(inputs=inputs, outputs=outputs,
                      files={"onnx": [ModelFile(path=f"{stem}.onnx", sha256=sha256_file(d / f"{stem}.onnx"))]},
                      golden=f"{stem}_golden.npz", golden_sha256=sha256_file(d / f"{stem}_golden.npz"), tolerance=1e-5)


def make_fault_bundle(d, faults: dict[str, float], normal: bool = True, threshold: float = 8.0,
                      classifier: bool = False, **kw) -> Path:
    """Tiny bundle + generator: fault ``name`` -> +``size`` (scaled) on sensor b in every row.
    ``classifier``: also a classifier scoring each class by its pattern (softmax of window . pattern)."""
    d = make_tiny_bundle(d, threshold=threshold, **kw)
    m = load_manifest(d)
    W, F = m.window, len(m.features)
    classes = sorted(faults) + (["normal"] if normal else [])
    pats = np.zeros((len(classes), W, F), np.float32)
    for i, c in enumerate(classes):
        pats[i, :, 1] = faults.get(c, 0.0)
    onnx.save(_generator_onnx(pats), d / "generator.onnx")
    cls_in = np.repeat(np.eye(len(classes), dtype=np.float32), 2, axis=0)
    z_in = np.random.default_rng(0).standard_normal((len(cls_in), LATENT)).astype(np.float32)
    np.savez(d / "generator_golden.npz", in_z=z_in, in_cls=cls_in, out_window=pats[np.argmax(cls_in, 1)])
    models = {**m.models, "generator": _entry(d, "generator", ["z", "cls"], ["window"])}
    if classifier:
        onnx.save(_classifier_onnx(pats), d / "classifier.onnx")
        x_in = np.random.default_rng(1).standard_normal((6, W, F)).astype(np.float32)
        logits = x_in.reshape(len(x_in), -1).astype(np.float64) @ pats.reshape(len(classes), -1).T
        e = np.exp(logits - logits.max(1, keepdims=True))
        np.savez(d / "classifier_golden.npz", in_x=x_in, out_probs=(e / e.sum(1, keepdims=True)).astype(np.float32))
        models["classifier"] = _entry(d, "classifier", ["x"], ["probs"])
    write_manifest(d, m.model_copy(update={"models": models, "classes": classes, "latent_dim": LATENT}))
    return d
