"""onnxruntime backend: one session, dynamic batch, thread count set for small models."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import onnxruntime as ort

from agent.manifest import BundleError, ModelEntry, ModelFile


class OnnxBackend:
    name = "onnxruntime"

    def __init__(self, bundle_dir: Path, entry: ModelEntry, files: list[ModelFile], threads: int = 1):
        opts = ort.SessionOptions()
        # Small models: thread pools cost more than they bring; one gateway core per agent.
        opts.intra_op_num_threads = threads
        opts.inter_op_num_threads = 1
        opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        opts.log_severity_level = 3
        path = bundle_dir / files[0].path
        try:
            self._sess = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
        except Exception as e:  # onnxruntime raises its own exception types
            raise BundleError(f"onnxruntime cannot load {path}: {str(e).splitlines()[0]}") from None
        self._inputs = [i.name for i in self._sess.get_inputs()]
        if self._inputs != list(entry.inputs):
            raise BundleError(f"{path}: inputs {self._inputs} != manifest {entry.inputs}")
        self._outputs = list(entry.outputs)

    def run(self, *inputs: np.ndarray) -> list[np.ndarray]:
        feed = {n: np.ascontiguousarray(x, dtype=np.float32) for n, x in zip(self._inputs, inputs)}
        return self._sess.run(self._outputs, feed)
