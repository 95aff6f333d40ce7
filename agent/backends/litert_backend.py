"""LiteRT (ai-edge-litert) backend, with tflite-runtime as a fallback import.

TFLite graphs exported from PyTorch have a fixed batch. The bundle ships several
batch sizes; a call is split into chunks of the largest size that fits and the
tail is zero-padded, so any batch size works with one interpreter per size.
"""
from __future__ import annotations

import re
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
        ins, outs = _ordered_details(self.it)
        if len(ins) != n_inputs or len(outs) != n_outputs:
            raise BundleError(f"{path}: {len(ins)} inputs/{len(outs)} outputs, manifest expects {n_inputs}/{n_outputs}")
        self.inputs, self.outputs = ins, outs
        self.batch = int(self.inputs[0]["shape"][0])
        self.in_idx = [int(d["index"]) for d in ins]
        self.out_idx = [int(d["index"]) for d in outs]

    def run(self, inputs: list[np.ndarray]) -> list[np.ndarray]:
        it = self.it
        for i, x in zip(self.in_idx, inputs):
            it.set_tensor(i, x)
        it.invoke()
        return [it.get_tensor(i) for i in self.out_idx]  # copies: nothing aliases the interpreter


def _key_pos(key: str) -> tuple[int, str]:
    """'args_10' -> (10, 'args_10'): numeric, so args_2 sorts before args_10."""
    m = re.search(r"(\d+)(?!.*\d)", key)
    return (int(m.group(1)) if m else 0, key)


def _ordered_details(it) -> tuple[list[dict], list[dict]]:
    """Input and output tensor details in the model's positional order.

    litert-torch exports one signature whose keys are ``args_<i>`` / ``output_<i>`` (the
    tensor names are ``serving_default_args_0`` and ``serving_default_output_0_output``;
    an output that merely forwards an input even carries the input's tensor name), so the
    signature keys are the reliable order. Without signatures, fall back to the digits in
    the tensor name, then to the tensor order of the file.
    """
    try:
        sigs = it.get_signature_list()
    except Exception:  # old tflite-runtime
        sigs = {}
    if len(sigs) == 1:
        key = next(iter(sigs))
        runner = it.get_signature_runner(key)
        ins, outs = runner.get_input_details(), runner.get_output_details()
        return ([ins[k] for k in sorted(ins, key=_key_pos)], [outs[k] for k in sorted(outs, key=_key_pos)])
    ins, outs = it.get_input_details(), it.get_output_details()
    return (sorted(ins, key=lambda d: _key_pos(d["name"].removesuffix("_output"))),
            sorted(outs, key=lambda d: _key_pos(d["name"].removesuffix("_output"))))


class LiteRTBackend:
    name = "litert"

    def __init__(self, bundle_dir: Path, entry: ModelEntry, files: list[ModelFile], threads: int = 1):
        fixed = [_Fixed(bundle_dir / f.path, threads, len(entry.inputs), len(entry.outputs)) for f in files]
        self._by_batch = sorted(fixed, key=lambda f: f.batch)
        self._exact = {f.batch: f for f in self._by_batch}

    def _pick(self, n: int) -> _Fixed:
        for f in self._by_batch:
            if f.batch >= n:
                return f
        return self._by_batch[-1]

    def run(self, *inputs: np.ndarray) -> list[np.ndarray]:
        n = inputs[0].shape[0]
        f = self._exact.get(n)
        if f is not None:  # a batch of exactly one interpreter's size: no chunking, padding or copies
            return f.run([np.ascontiguousarray(x, dtype=np.float32) for x in inputs])
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
            outs.append(res if take == f.batch else [r[:take].copy() for r in res])
            start += take
        if len(outs) == 1:
            return outs[0]
        return [np.concatenate([o[i] for o in outs]) for i in range(len(outs[0]))]
