"""PyTorch vs onnxruntime vs LiteRT: same reconstructions, same scores, same decisions.

Tolerances: reconstructions agree within 1e-4 absolute (measured ~1e-6: float32 kernels
differ only in summation order); final smoothed scores within 1e-4 relative; alert decisions
on a stream identical. The bundle refuses tampered files.
"""
from __future__ import annotations

import json

import numpy as np
import pytest

from agent.backends import open_backend
from agent.manifest import BundleError, load_manifest, sha256_file
from agent.scoring import Scorer, open_scorer, score_rows
from bundle_factory import make, simulated
from trainer.fit import scale_windows
from trainer.vae import TorchBackend
from agent.windowing import sliding_windows

RECON_ATOL = 1e-4
SCORE_RTOL = 1e-4


@pytest.fixture(scope="module")
def made(tmp_path_factory):
    return make(tmp_path_factory.mktemp("bundle"))


@pytest.fixture(scope="module")
def manifest(made):
    return load_manifest(made.bundle)


@pytest.fixture(scope="module")
def backends(made, manifest):
    return {
        "torch": TorchBackend(made.model),
        "onnxruntime": open_backend("onnxruntime", made.bundle, manifest),
        "litert": open_backend("litert", made.bundle, manifest),
    }


@pytest.fixture(scope="module")
def stream():
    _, values, _ = simulated(900, seed=0, fault=(600, 850))
    return values


@pytest.mark.parametrize("batch", [1, 5, 64, 100])
def test_reconstructions_agree(backends, manifest, stream, batch):
    wins = sliding_windows(stream, manifest.window)[200:200 + batch]
    x = scale_windows(wins, np.array(manifest.scaler.centre), np.array(manifest.scaler.scale))
    ref = backends["torch"].run(x)[0]
    assert ref.shape == (batch, manifest.window, len(manifest.features))
    for name in ("onnxruntime", "litert"):
        got = backends[name].run(x)[0]
        assert got.shape == ref.shape, name
        np.testing.assert_allclose(got, ref, rtol=0, atol=RECON_ATOL, err_msg=name)


def test_scores_and_decisions_agree_on_a_stream(backends, manifest, stream):
    out = {name: score_rows(Scorer(manifest, be), stream) for name, be in backends.items()}
    ref = out["torch"]
    for name in ("onnxruntime", "litert"):
        np.testing.assert_allclose(out[name]["score"], ref["score"], rtol=SCORE_RTOL, atol=1e-7, err_msg=name)
    np.testing.assert_array_equal(out["onnxruntime"]["anomaly"], out["litert"]["anomaly"])
    np.testing.assert_array_equal(out["onnxruntime"]["anomaly"], ref["anomaly"])
    assert ref["anomaly"].any()  # the stream has a fault: the comparison covers both states


@pytest.mark.parametrize("runtime", ["onnxruntime", "litert"])
def test_the_fused_scorer_graph_scores_and_decides_as_the_numpy_score_does(made, manifest, backends, stream, runtime):
    """The bundle's fused graph (scaling, VAE, whitened score, contributions in one runtime call:
    what the agent and `edge-trainer score` run) against the numpy score around the PyTorch VAE
    (the reference calibration is made with): same scores, contributions and decisions."""
    assert "scorer" in manifest.models
    fused = open_scorer(runtime, made.bundle, manifest)
    assert fused.head is not None
    ref = score_rows(Scorer(manifest, backends["torch"]), stream)
    got = score_rows(fused, stream)
    np.testing.assert_allclose(got["score"], ref["score"], rtol=SCORE_RTOL, atol=1e-7)
    np.testing.assert_allclose(got["contrib"], ref["contrib"], rtol=1e-3, atol=1e-4 * float(ref["contrib"].max()))
    np.testing.assert_array_equal(got["anomaly"], ref["anomaly"])
    assert ref["anomaly"].any()
    wins = np.ascontiguousarray(sliding_windows(stream, manifest.window)[:3])
    for n in (0, 1, 3):  # any batch size, the empty one included
        s, c = fused.score(wins[:n])
        assert s.shape == (n,) and s.dtype == np.float64 and c.shape == (n, len(manifest.features))


def test_the_int8_variant_keeps_the_numpy_score(made, manifest):
    sc = open_scorer("litert", made.bundle, manifest, quantization="dynamic_int8")
    assert sc.head is None  # the whitening matrix is not quantised: int8 VAE, float score


def test_int8_scores_close_to_float(made, manifest, stream):
    if not any(f.quantization == "dynamic_int8" for f in manifest.models["vae"].files["tflite"]):
        pytest.skip("no int8 variant in this bundle")
    q = open_backend("litert", made.bundle, manifest, quantization="dynamic_int8")
    f = open_backend("onnxruntime", made.bundle, manifest)
    sq = score_rows(Scorer(manifest, q), stream)["score"]
    sf = score_rows(Scorer(manifest, f), stream)["score"]
    assert np.median(np.abs(sq - sf) / np.abs(sf)) < 0.05


# ---------------------------------------------------------------- tampering
def _copy(made, tmp_path):
    import shutil

    dst = tmp_path / "bundle"
    shutil.copytree(made.bundle, dst)
    return dst


def _rehash(bundle, rel):
    """Update the manifest's hash for ``rel`` so only the content check can catch the change."""
    path = bundle / "manifest.json"
    m = json.loads(path.read_text())
    digest = sha256_file(bundle / rel)
    for entry in m["models"].values():
        for files in entry["files"].values():
            for f in files:
                if f["path"] == rel:
                    f["sha256"] = digest
        if entry.get("golden") == rel:
            entry["golden_sha256"] = digest
    path.write_text(json.dumps(m))


def test_corrupted_tflite_is_refused(made, tmp_path):
    b = _copy(made, tmp_path)
    data = bytearray((b / "vae_b8.tflite").read_bytes())
    data[len(data) // 2] ^= 0xFF
    (b / "vae_b8.tflite").write_bytes(bytes(data))
    with pytest.raises(BundleError, match="corrupt"):
        load_manifest(b)
    (b / "vae_b8.tflite").write_bytes(b"not a flatbuffer")
    _rehash(b, "vae_b8.tflite")
    m = load_manifest(b)
    with pytest.raises(BundleError, match="LiteRT cannot load"):
        open_backend("litert", b, m)


def test_tampered_golden_is_refused(made, tmp_path):
    b = _copy(made, tmp_path)
    with np.load(b / "vae_golden.npz") as g:
        x, y = g["in_x"], g["out_recon"]
    np.savez(b / "vae_golden.npz", in_x=x, out_recon=y + 0.01)
    with pytest.raises(BundleError, match="corrupt"):
        load_manifest(b)
    _rehash(b, "vae_golden.npz")
    m = load_manifest(b)
    for name in ("onnxruntime", "litert"):
        with pytest.raises(BundleError, match="differs from golden"):
            open_backend(name, b, m)


def test_missing_model_file_is_refused(made, tmp_path):
    b = _copy(made, tmp_path)
    (b / "vae.onnx").unlink()
    with pytest.raises(BundleError, match="missing"):
        load_manifest(b)
