"""Export the VAE to ONNX (dynamic batch) and TFLite (fixed batches), with golden vectors;
and the fused scorer graph (scaling, VAE, score, contributions: :func:`scoring_head`) the same way.

ONNX: one self-contained file (no external data), opset 18, input ``x``, output ``recon``.
TFLite via litert-torch: graphs have a fixed batch, so batches 1, 8 and 64 are separate
files (the agent's LiteRT backend chunks and pads any batch onto them), plus dynamic-range
int8 variants made with ai-edge-quantizer, kept only if they pass their golden check.
litert-torch names the tensors ``serving_default_args_0`` / ``serving_default_output_0_output``
(signature keys ``args_0`` / ``output_0``); the LiteRT backend orders them by signature key.
"""
from __future__ import annotations

import contextlib
import io
import logging
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from agent.manifest import ModelEntry, ModelFile, sha256_file

log = logging.getLogger("trainer")

OPSET = 18
TFLITE_BATCHES = (1, 8, 64)
INPUTS, OUTPUTS = ["x"], ["recon"]
# Max abs difference from the PyTorch golden outputs (scaled units, |recon| mostly < 10).
# Float runtimes measure ~1e-6 (summation order only); the agent allows quantised files 50x
# this, and dynamic-range int8 (activations quantised on the fly) measured 0.02-0.06, so 2e-3.
# Any real mismatch (wrong file, wrong tensor order) is off by far more than either bound.
TOLERANCE = 2e-3


def _quiet_env() -> None:
    # The converters print progress and oneDNN/absl banners to stdout; keep the CLI's output ours.
    os.environ.setdefault("LITERT_TORCH_SHOW_PROGRESS", "n")
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")


@contextlib.contextmanager
def silenced():
    """Send stdout/stderr (Python and C level) to a scratch file while a converter runs.

    torch.onnx, onnxscript, litert-torch, TF/absl and XNNPACK print banners and progress from
    C++ as well as Python; the CLI's own output stays readable. Exceptions still propagate.
    """
    sys.stdout.flush()
    sys.stderr.flush()
    saved = [os.dup(1), os.dup(2)]
    with tempfile.TemporaryFile() as scratch, contextlib.redirect_stdout(io.StringIO()), \
            contextlib.redirect_stderr(io.StringIO()):
        try:
            os.dup2(scratch.fileno(), 1)
            os.dup2(scratch.fileno(), 2)
            yield
        finally:
            os.dup2(saved[0], 1)
            os.dup2(saved[1], 2)
            for fd in saved:
                os.close(fd)


def model_file(bundle_dir: Path, name: str, batch: int | None = None, quant: str = "float32") -> ModelFile:
    """The manifest record (name, sha256, batch, quantisation) of a file just written into the bundle."""
    return ModelFile(path=name, sha256=sha256_file(bundle_dir / name), batch=batch, quantization=quant)


def _zeros(batch: int, shapes) -> tuple:
    import torch

    return tuple(torch.zeros((batch, *s)) for s in shapes)


def export_onnx(model, path: Path, shapes: list[tuple[int, ...]], inputs: list[str] = INPUTS,
                outputs: list[str] = OUTPUTS) -> None:
    """One self-contained ONNX file with a dynamic batch on every input; ``shapes`` are the
    per-sample input shapes (without the batch), in ``inputs`` order."""
    import torch

    batch = torch.export.Dim("batch", min=1)
    sample = _zeros(2, shapes)  # batch 2: a batch of 1 would be specialised away
    with silenced(), torch.no_grad():
        torch.onnx.export(
            model.eval(), sample, str(path), input_names=list(inputs), output_names=list(outputs),
            dynamic_shapes=tuple({0: batch} for _ in shapes), opset_version=OPSET,
            external_data=False, verbose=False,
        )
    import onnx

    onnx.checker.check_model(str(path))


def export_tflite(model, path: Path, batch: int, shapes: list[tuple[int, ...]]) -> None:
    """One TFLite file for a fixed ``batch``; ``shapes`` as for :func:`export_onnx`. Tensor names
    are litert-torch's (``args_0``...), ordered like the model's arguments."""
    _quiet_env()
    with silenced():
        import litert_torch  # its import chain (torchao, TF, JAX) prints banners

        litert_torch.convert(model.eval(), _zeros(batch, shapes)).export(str(path))


def quantize_dynamic_int8(src: Path, dst: Path) -> None:
    """int8 weights, float activations (no calibration data needed)."""
    from ai_edge_quantizer import quantizer, recipe

    with silenced():
        result = quantizer.Quantizer(str(src), recipe.dynamic_wi8_afp32()).quantize()
        result.export_model(str(dst), overwrite=True)


def _run_tflite(path: Path, x: np.ndarray) -> np.ndarray:
    from agent.backends.litert_backend import LiteRTBackend

    entry = ModelEntry(inputs=INPUTS, outputs=OUTPUTS, files={})
    f = ModelFile(path=path.name, sha256="", batch=None)
    with silenced():
        return LiteRTBackend(path.parent, entry, [f]).run(x)[0]


def export_vae(model, bundle_dir: Path, golden_x: np.ndarray, int8: bool = True) -> tuple[ModelEntry, dict[str, float]]:
    """Write vae.onnx, vae_b{1,8,64}.tflite (+ int8 variants) and vae_golden.npz; return the entry and timings."""
    from trainer.vae import reconstruct

    _quiet_env()
    bundle_dir = Path(bundle_dir)
    W, F = model.window, model.n_features
    times: dict[str, float] = {}
    t = time.monotonic()
    export_onnx(model, bundle_dir / "vae.onnx", [(W, F)])
    times["export_onnx_s"] = time.monotonic() - t

    t = time.monotonic()
    tfl: list[ModelFile] = []
    for b in TFLITE_BATCHES:
        name = f"vae_b{b}.tflite"
        export_tflite(model, bundle_dir / name, b, [(W, F)])
        tfl.append(model_file(bundle_dir, name, b))
    times["export_tflite_s"] = time.monotonic() - t

    golden_x = np.ascontiguousarray(golden_x, dtype=np.float32)
    golden_y = reconstruct(model, golden_x)
    np.savez(bundle_dir / "vae_golden.npz", in_x=golden_x, out_recon=golden_y)

    if int8:
        t = time.monotonic()
        q_files: list[ModelFile] = []
        try:
            worst = 0.0
            for b in TFLITE_BATCHES:
                name = f"vae_b{b}_int8.tflite"
                quantize_dynamic_int8(bundle_dir / f"vae_b{b}.tflite", bundle_dir / name)
                worst = max(worst, float(np.max(np.abs(_run_tflite(bundle_dir / name, golden_x) - golden_y))))
                q_files.append(model_file(bundle_dir, name, b, "dynamic_int8"))
            # The agent accepts quantised files within 50x the float tolerance of the golden outputs.
            if worst > 50 * TOLERANCE:
                raise ValueError(f"int8 model differs from float by {worst:.3g}")
            times["int8_max_abs_err"] = worst
            tfl.extend(q_files)
        except Exception as e:  # optional variant: never fail a fit over it
            log.warning("skipping the int8 TFLite variant: %s", str(e).splitlines()[0] if str(e) else type(e).__name__)
            for f in q_files:
                (bundle_dir / f.path).unlink(missing_ok=True)
            for b in TFLITE_BATCHES:
                (bundle_dir / f"vae_b{b}_int8.tflite").unlink(missing_ok=True)
        times["export_int8_s"] = time.monotonic() - t

    entry = ModelEntry(
        inputs=INPUTS,
        outputs=OUTPUTS,
        files={"onnx": [model_file(bundle_dir, "vae.onnx")], "tflite": tfl},
        golden="vae_golden.npz",
        golden_sha256=sha256_file(bundle_dir / "vae_golden.npz"),
        tolerance=TOLERANCE,
    )
    return entry, times


# ---------------------------------------------------------------- the fused scorer graph

SCORER_INPUTS, SCORER_OUTPUTS = ["raw"], ["score", "contrib"]


def scoring_head(model, manifest):
    """The VAE wrapped with the agent's scaling and the manifest's score (agent.scoring.Scorer's
    numpy path, op for op): raw windows (B, W, F) -> (score (B,), contributions (B, F)). One
    runtime call instead of a dozen numpy calls around one (the model is ~1 us per window, so
    those calls cost as much as the model). None for a score kind it does not cover."""
    import torch
    from torch import nn

    from agent.scoring import CLIP

    spec = manifest.score
    if spec.kind not in ("vae_recon_mahal", "vae_recon_norm"):
        return None

    def const(v):
        return torch.tensor(np.asarray(v, np.float64).astype(np.float32))

    class ScoringHead(nn.Module):
        def __init__(self):
            super().__init__()
            self.vae = model
            self.register_buffer("centre", const(manifest.scaler.centre))
            self.register_buffer("inv_scale", const(1.0 / np.asarray(manifest.scaler.scale, np.float64)))
            if spec.kind == "vae_recon_mahal":
                self.register_buffer("weight", const(spec.precision))
            else:
                self.register_buffer("weight", const(1.0 / np.maximum(np.asarray(spec.channel_scale, np.float64), 1e-12)))
            self.tail, self.mahal, self.log = spec.tail, spec.kind == "vae_recon_mahal", spec.transform == "log"

        def forward(self, raw):
            xs = torch.clamp((raw - self.centre) * self.inv_scale, -CLIP, CLIP)
            d = self.vae(xs)[:, -self.tail:, :] - xs[:, -self.tail:, :]
            if self.mahal:
                terms = torch.mean(torch.matmul(d, self.weight) * d, dim=1)
                score = torch.mean(terms, dim=1)
                contrib = torch.relu(terms)
            else:
                contrib = torch.mean(d * d, dim=1) * self.weight
                score = torch.mean(contrib, dim=1)
            if self.log:
                score = torch.log1p(torch.relu(score))
            return score, contrib

    return ScoringHead().eval()


def export_scorer(head, bundle_dir: Path, golden_raw: np.ndarray, reference) -> ModelEntry:
    """Write scorer.onnx, scorer_b{1,8,64}.tflite and scorer_golden.npz. The golden outputs are
    ``reference(golden_raw)``: the agent's numpy path on the exported VAE, so the gateway proves
    the fused graph computes what calibration computed. float32 only: the int8 variants keep the
    numpy score around the int8 VAE (quantising the whitening matrix would bend the score)."""
    _quiet_env()
    bundle_dir = Path(bundle_dir)
    shape = [tuple(golden_raw.shape[1:])]
    export_onnx(head, bundle_dir / "scorer.onnx", shape, SCORER_INPUTS, SCORER_OUTPUTS)
    files = [model_file(bundle_dir, "scorer.onnx")]
    tfl = []
    for b in TFLITE_BATCHES:
        name = f"scorer_b{b}.tflite"
        export_tflite(head, bundle_dir / name, b, shape)
        tfl.append(model_file(bundle_dir, name, b))
    raw = np.ascontiguousarray(golden_raw, dtype=np.float32)
    score, contrib = reference(raw)
    score, contrib = np.asarray(score, np.float32), np.asarray(contrib, np.float32)
    np.savez(bundle_dir / "scorer_golden.npz", in_raw=raw, out_score=score, out_contrib=contrib)
    # Absolute bound, like the VAE's, scaled to these outputs (scores of anomalous windows reach
    # 1e3 and more; float32 kernels that differ in summation order agree to ~1e-6 relative).
    tol = max(TOLERANCE, 1e-4 * float(max(np.abs(score).max(), np.abs(contrib).max())))
    return ModelEntry(inputs=SCORER_INPUTS, outputs=SCORER_OUTPUTS, files={"onnx": files, "tflite": tfl},
                      golden="scorer_golden.npz", golden_sha256=sha256_file(bundle_dir / "scorer_golden.npz"),
                      tolerance=tol)
