"""LiteRT (ai-edge-litert) backend, with tflite-runtime as a fallback import.

TFLite graphs exported from PyTorch have a fixed batch. The bundle ships several
batch sizes; a call is split into chunks of the largest size that fits and the
tail is zero-padded, so any batch size works with one interpreter per size.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

try:
    from ai_edge_litert.interpreter import Interpreter
except ImportError:  # pragma: no cover - exercised only where tflite-runtime is the runtime
    from tflite_runtime.interpreter import Interpreter  # type: ignore[no-redef]

from agent.manifest import BundleError, ModelEntry, ModelFile


class _Fixed:
    """One interpreter for one fixed batch size."""

    def __init__(self, path: Path, threads: int, n_inputs: int, n_outputs: int):
        try:
            self.it = Interpreter(model_path=str(path), num_threads=threads)
            self.it.allocate_tensors()
        except Exception as e:
            raise BundleError(f"LiteRT cannot load {path}: {str(e).splitlines()[0]}") from None
        ins = self.it.get_input_details()
        outs = self.it.get_output_details()
        if len(ins) != n_inputs or len(outs) != n_outputs:
            raise BundleError(f"{path}: {len(ins)} inputs/{len(outs)} outputs, manifest expects {n_inputs}/{n_outputs}")
        # litert-torch names tensors by position (args_0..., output_0...); order by that suffix.
        self.inputs = sorted(ins, key=lambda d: _pos(d["name"]))
        self.outputs = sorted(outs, key=lambda d: _pos(d["name"]))
        self.batch = int(self.inputs[0]["shape"][0])

    def run(self, inputs: list[np.ndarray]) -> list[np.ndarray]:
        for d, x in zip(self.inputs, inputs):
            self.it.set_tensor(d["index"], x)
        self.it.invoke()
        return [self.it.get_tensor(d["index"]) for d in self.outputs]


def _pos(name: str) -> tuple[int, str]:
    digits = "".join(c for c in name.rsplit("_", 1)[-1] if c.isdigit())
    return (int(digits) if digits else 0, name)


class LiteRTBackend:
    name = "litert"

    def __init__(self, bundle_dir: Path, entry: ModelEntry, files: list[ModelFile], threads: int = 1):
        fixed = [_Fixed(bundle_dir / f.path, threads, len(entry.inputs), len(entry.outputs)) for f in files]
        self._by_batch = sorted(fixed, key=lambda f: f.batch)

    def _pick(self, n: int) -> _Fixed:
        for f in self._by_batch:
            if f.batch >= n:
                return f
        return self._by_batch[-1]

    def run(self, *inputs: np.ndarray) -> list[np.ndarray]:
        n = inputs[0].shape[0]
        outs: list[list[np.ndarray]] = []
        start = 0
        while start < n:
            f = self._pick(n - start)
            take = min(f.batch, n - start)
            chunk = []
            for x in inputs:
                part = np.asarray(x[start:start + take], dtype=np.float32)
                if take < f.batch:
                    pad = np.zeros((f.batch - take,) + part.shape[1:], np.float32)
                    part = np.concatenate([part, pad])
                chunk.append(np.ascontiguousarray(part))
            res = f.run(chunk)
            outs.append([r[:take].copy() for r in res])
            start += take
        if len(outs) == 1:
            return outs[0]
        return [np.concatenate([o[i] for o in outs]) for i in range(len(outs[0]))]
