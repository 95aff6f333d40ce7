"""The window score kinds, on a real onnxruntime backend (the tiny bundle's recon = 0 graph,
so the residual is minus the scaled window and every number can be checked by hand)."""
from __future__ import annotations

import numpy as np
import pytest

from agent.backends import open_backend
from agent.manifest import Manifest, ScoreSpec, load_manifest
from agent.scoring import Scorer
from tests.tiny_bundle import make_tiny_bundle
from trainer.fit import residual_precision, scale_windows

F, W = 3, 4


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    d = make_tiny_bundle(tmp_path_factory.mktemp("tiny"), features=("a", "b", "c"), window=W)
    m = load_manifest(d)
    return m, open_backend("onnxruntime", d, m)


def _with(m: Manifest, **score) -> Manifest:
    return m.model_copy(update={"score": ScoreSpec(**{"tail": W, "smoothing": 1, "transform": "none", **score})})


def test_mahal_score_is_the_mean_quadratic_form_and_contributions_sum_to_it(tiny):
    m, backend = tiny
    p = np.array([[2.0, -0.5, 0.0], [-0.5, 1.0, 0.2], [0.0, 0.2, 0.5]])
    x = np.random.default_rng(1).normal(size=(5, W, F)).astype(np.float32)
    s, contrib = Scorer(_with(m, kind="vae_recon_mahal", precision=p.tolist()), backend).score(x)
    want = np.einsum("bwi,ij,bwj->b", x.astype(np.float64), p, x.astype(np.float64)) / (W * F)
    np.testing.assert_allclose(s, want, rtol=1e-5)
    assert contrib.shape == (5, F) and (contrib >= 0).all()
    terms = np.einsum("bwi,ij,bwj->bi", x.astype(np.float64), p, x.astype(np.float64)) / W
    np.testing.assert_allclose(contrib, np.maximum(terms, 0), rtol=1e-4, atol=1e-6)


def test_mahal_with_identity_precision_equals_plain_mse(tiny):
    m, backend = tiny
    x = np.random.default_rng(2).normal(size=(7, W, F)).astype(np.float32)
    a, _ = Scorer(_with(m, kind="vae_recon_mahal", precision=np.eye(F).tolist()), backend).score(x)
    b, _ = Scorer(_with(m, kind="vae_recon_mse"), backend).score(x)
    np.testing.assert_allclose(a, b, rtol=1e-6)


def test_manifest_refuses_a_missing_or_misshapen_precision(tiny):
    m, _ = tiny
    data = m.model_dump()
    for bad in (None, [[1.0, 0.0], [0.0, 1.0]], [[float("nan")] * F] * F):
        data["score"] = {"kind": "vae_recon_mahal", "precision": bad, "tail": 1}
        with pytest.raises(ValueError, match="precision"):
            Manifest.model_validate(data)


def test_broken_correlation_between_redundant_sensors_stands_out_only_when_whitened(tiny):
    """Two transmitters of one quantity (a, b) and an independent sensor c. A fault where a and b
    disagree -- each still inside its normal range -- is what the whitened score is for."""
    m, backend = tiny
    rng = np.random.default_rng(3)
    q = rng.normal(size=(400, 1))
    normal = np.concatenate([q, q + 0.05 * rng.normal(size=(400, 1)), rng.normal(size=(400, 1))], axis=1)
    wins = np.lib.stride_tricks.sliding_window_view(normal, W, axis=0).transpose(0, 2, 1).astype(np.float32)
    p = residual_precision(backend, scale_windows(wins, np.zeros(F), np.ones(F)), W)
    assert np.allclose(p, p.T) and np.all(np.linalg.eigvalsh(p) > 0)
    fault = np.tile(np.array([[0.8, -0.8, 0.0]], np.float32), (1, W, 1))  # a and b split, within 1 sd

    def ratio(manifest):
        sc = Scorer(manifest, backend)
        return float(sc.score(fault)[0][0] / np.quantile(sc.score(wins)[0], 0.99))

    whitened = ratio(_with(m, kind="vae_recon_mahal", precision=p.tolist()))
    per_channel = ratio(_with(m, kind="vae_recon_norm", channel_scale=[1.0] * F))
    assert per_channel < 1.0 < 2.0 < whitened, (per_channel, whitened)


def test_mahal_fast_path_and_plain_path_agree_and_buffers_do_not_leak_between_calls(tiny):
    m, backend = tiny
    p = np.array([[1.5, 0.3, 0.0], [0.3, 1.0, -0.2], [0.0, -0.2, 0.7]])
    sc = Scorer(_with(m, kind="vae_recon_mahal", precision=p.tolist(), transform="log"), backend)
    rng = np.random.default_rng(4)
    big = rng.normal(size=(70, W, F)).astype(np.float32)
    small = rng.normal(size=(3, W, F)).astype(np.float32)
    s_big, c_big = sc.score(big)  # contiguous float32: the buffered path
    s_small, c_small = sc.score(small)
    wide = np.zeros((70, W, 2 * F), np.float32)
    wide[:, :, ::2] = big
    view = wide[:, :, ::2]  # same values, not contiguous: the plain (allocating) path
    assert not view.flags.c_contiguous
    s_plain, c_plain = sc.score(view)
    np.testing.assert_allclose(s_big, s_plain, rtol=1e-6)
    np.testing.assert_allclose(c_big, c_plain, rtol=1e-5, atol=1e-6)
    again, _ = sc.score(big)
    np.testing.assert_array_equal(s_big, again)  # results are fresh arrays, not views of a reused buffer
    assert s_small.shape == (3,) and c_small.shape == (3, F) and not np.shares_memory(c_small, c_big)


def test_one_scorer_serves_score_and_channel_errors_in_any_order(tiny):
    m, backend = tiny
    sc = Scorer(_with(m, kind="vae_recon_mahal", precision=np.eye(F).tolist()), backend)
    x = np.random.default_rng(5).normal(size=(9, W, F)).astype(np.float32)
    s1, _ = sc.score(x)
    e = sc.channel_errors(x)  # shared buffers once broke this order
    s2, _ = sc.score(x[:4])
    np.testing.assert_allclose(e.mean(axis=1), s1, rtol=1e-6)
    np.testing.assert_allclose(s2, s1[:4], rtol=1e-6)


def _decisions(m: Manifest, scores: list[float]) -> list[bool]:
    from agent.scoring import DeviceStream

    st = DeviceStream(m)
    return [st.decide(s).anomaly for s in scores]


def test_clear_smoothing_ends_an_alert_without_the_whole_smoothing_lag(tiny):
    from agent.manifest import Threshold

    m, _ = tiny
    base = m.model_copy(update={"score": ScoreSpec(kind="vae_recon_mse", tail=W, smoothing=10, transform="none"),
                                "threshold": Threshold(value=1.0, method="test", clear_ratio=0.9, raise_after=1,
                                                       clear_after=3)})
    fast = base.model_copy(update={"threshold": base.threshold.model_copy(update={"clear_smoothing": 2})})
    scores = [0.0] * 5 + [5.0] * 20 + [0.0] * 20
    slow_d, fast_d = _decisions(base, scores), _decisions(fast, scores)
    # Raising is the smoothed score's alone: identical (the mean of 6 scores is 5/6, of 7 above 1).
    assert slow_d.index(True) == fast_d.index(True) == 6
    # Clearing (3 scores in a row at or below 0.9): the 10-score mean gets there at the 9th zero, so the alert
    # clears at the 11th; the mean of the newest 2 at the 2nd zero, cleared at the 4th.
    assert slow_d[25:].index(False) == 10
    assert fast_d[25:].index(False) == 3
    # A bundle without the field (older trainer) or with clear_smoothing >= smoothing decides as before.
    assert base.threshold.clear_smoothing is None
    same = base.model_copy(update={"threshold": base.threshold.model_copy(update={"clear_smoothing": 10})})
    assert _decisions(same, scores) == slow_d
    old = Manifest.model_validate({**base.model_dump(), "threshold": {k: v for k, v in base.threshold.model_dump().items()
                                                                      if k != "clear_smoothing"}})
    assert _decisions(old, scores) == slow_d


def test_an_alert_cleared_on_the_short_mean_is_not_raised_again_by_the_lagging_long_one(tiny):
    """Regression: the alert cleared on the newest scores' mean while the long mean still stood above
    the threshold, and the next score raised it again (a raised/cleared pair one row apart, seen on a
    simulated cavitation). With clear_smoothing, raising needs both means above the threshold."""
    from agent.manifest import Threshold

    m, _ = tiny
    m = m.model_copy(update={"score": ScoreSpec(kind="vae_recon_mse", tail=W, smoothing=10, transform="none"),
                             "threshold": Threshold(value=1.0, method="test", clear_ratio=0.9, raise_after=1,
                                                    clear_after=3, clear_smoothing=2)})
    scores = [0.0] * 5 + [5.0] * 20 + [0.0] * 20  # the 10-mean stays above 1 for 8 zeros
    d = _decisions(m, scores)
    edges = [i for i in range(1, len(d)) if d[i] != d[i - 1]]
    assert edges == [6, 28]  # one raise, one clear: no second raise while the long mean lags
    # a rise is seen as soon as before: the short mean rises first, the long mean decides
    assert _decisions(m, [0.0] * 5 + [5.0] * 3)[5:] == [False, True, True]
