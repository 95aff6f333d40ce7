"""Scorer's buffered hot path computes exactly (bit for bit) what the plain numpy expressions do."""
from __future__ import annotations

import numpy as np
import pytest

from agent.backends import open_backend
from agent.manifest import load_manifest
from agent.scoring import CLIP, Scorer
from tiny_bundle import make_tiny_bundle


class Recon:
    """A backend whose reconstruction is a fixed function of its input (so residuals are not trivial)."""

    name = "fake"

    def run(self, x):
        x = np.array(x, np.float32, copy=True)
        return [np.tanh(x[:, ::-1, :] * np.float32(0.7)) + np.float32(0.1)]


def _plain(sc: Scorer, windows: np.ndarray):
    xs = (np.asarray(windows, np.float32) - sc.centre) * sc.inv_scale
    xs = np.clip(xs, -CLIP, CLIP, out=xs)
    recon = sc.backend.run(xs)[0]
    d = recon[:, -sc.tail:, :] - xs[:, -sc.tail:, :]
    return xs, np.mean(d * d, axis=1)


@pytest.mark.parametrize("window,tail", [(8, 8), (8, 3), (5, 1)])
def test_scale_and_channel_errors_are_bit_identical_to_the_plain_expressions(tmp_path, window, tail):
    from agent.manifest import write_manifest

    b = make_tiny_bundle(tmp_path / "b", window=window, features=("a", "b", "c", "d", "e"),
                         centre=[1.0, -2.0, 0.5, 100.0, 0.0], scale=[0.3, 2.0, 1e-3, 50.0, 7.0])
    m = load_manifest(b)
    write_manifest(b, m.model_copy(update={"score": m.score.model_copy(update={"tail": tail})}))
    m = load_manifest(b)
    open_backend("onnxruntime", b, m)  # the bundle is valid
    sc = Scorer(m, Recon())
    rng = np.random.default_rng(window * 10 + tail)
    kept = []
    for n in (1, 2, 7, 64, 65, 200, 3):  # batch sizes below, at and above the buffers' first size
        w = (rng.normal(size=(n, window, 5)) * rng.uniform(0.01, 100, size=5)).astype(np.float32)
        w[0, 0, 0], w[-1, -1, 1] = np.nan, np.inf  # clip keeps NaN, bounds inf
        w[n // 2, 0, 2] = -1e30
        xs, ce = _plain(sc, w)
        got = sc.channel_errors(w)
        assert got.tobytes() == ce.tobytes()
        assert sc.scale(w).tobytes() == xs.tobytes()
        assert sc.scale(w[0]).tobytes() == xs[0].tobytes()  # one window
        assert sc.scale(w.astype(np.float64)).tobytes() == xs.tobytes()  # converted first, as before
        strided = np.repeat(w, 2, axis=0)[::2]  # not contiguous: the plain path
        assert sc.channel_errors(strided).tobytes() == ce.tobytes()
        kept.append((got, ce))
    for got, ce in kept:  # results are fresh arrays, never a buffer the next call overwrites
        assert got.tobytes() == ce.tobytes()
