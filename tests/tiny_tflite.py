"""A LiteRT twin of tiny_bundle's ONNX "VAE" (``recon = x * k``), written straight to the TFLite
flatbuffer schema that ai-edge-litert ships, so agent tests get a two-backend bundle in
milliseconds without torch or a converter. ``k = 0`` matches the golden vectors; any other
``k`` is a model that loads, hashes right, and fails golden-vector parity.
"""
from __future__ import annotations

import json
from pathlib import Path

import flatbuffers
import numpy as np
from ai_edge_litert import schema_py_generated as s

from agent.manifest import MANIFEST_FILE, Manifest, ModelFile, sha256_file, write_manifest


def tflite_scale(batch: int, window: int, n_features: int, k: float = 0.0) -> bytes:
    m = s.ModelT()
    m.version = 3
    m.description = "edgewatch tests: recon = x * k"
    m.buffers = [s.BufferT(), s.BufferT(), s.BufferT()]  # buffer 0 is the empty sentinel
    m.buffers[2].data = np.array([k], np.float32).tobytes()
    code = s.OperatorCodeT()
    code.builtinCode = code.deprecatedBuiltinCode = s.BuiltinOperator.MUL
    code.version = 1
    m.operatorCodes = [code]

    def tensor(name: str, shape: tuple, buf: int) -> s.TensorT:
        t = s.TensorT()
        t.name, t.shape, t.type, t.buffer = name, list(shape), s.TensorType.FLOAT32, buf
        return t

    g = s.SubGraphT()
    g.name = "main"
    g.tensors = [tensor("x", (batch, window, n_features), 1), tensor("k", (1,), 2),
                 tensor("recon", (batch, window, n_features), 0)]
    g.inputs, g.outputs = [0], [2]
    op = s.OperatorT()
    op.opcodeIndex, op.inputs, op.outputs = 0, [0, 1], [2]
    op.builtinOptionsType, op.builtinOptions = s.BuiltinOptions.MulOptions, s.MulOptionsT()
    g.operators = [op]
    m.subgraphs = [g]
    b = flatbuffers.Builder(1024)
    b.Finish(m.Pack(b), file_identifier=b"TFL3")
    return bytes(b.Output())


def add_tflite(bundle_dir: str | Path, batches: tuple[int, ...] = (1, 4), k: float = 0.0) -> Path:
    """Add ``vae_b<N>.tflite`` files to a tiny bundle and list them (with sha256) in its manifest."""
    d = Path(bundle_dir)
    m = Manifest.model_validate(json.loads((d / MANIFEST_FILE).read_text()))
    files = []
    for b in batches:
        name = f"vae_b{b}.tflite"
        (d / name).write_bytes(tflite_scale(b, m.window, len(m.features), k))
        files.append(ModelFile(path=name, sha256=sha256_file(d / name), batch=b))
    vae = m.models["vae"]
    vae = vae.model_copy(update={"files": {**vae.files, "tflite": files}})
    write_manifest(d, m.model_copy(update={"models": {**m.models, "vae": vae}}))
    return d
