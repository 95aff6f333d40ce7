"""Non-generative oversampling baseline: SMOTE-style interpolation between same-class windows.

The GAN must beat this to earn its keep. Each synthetic window is
``a + lam * (b - a)`` with ``a`` a real window of the class, ``b`` one of its ``k`` nearest
same-class neighbours (Euclidean on the flattened window) and ``lam ~ U(0, 1)``, so every
sample is a convex combination of two real windows of its own class.
"""
from __future__ import annotations

import numpy as np


def smote(windows: np.ndarray, n: int, k: int = 5, rng: np.random.Generator | None = None) -> np.ndarray:
    """``n`` synthetic windows interpolated between windows of ONE class: (n, W, F) float32."""
    rng = rng if rng is not None else np.random.default_rng(0)
    x = np.asarray(windows, np.float32)
    m = len(x)
    if m == 0:
        raise ValueError("smote needs at least one window")
    if m == 1 or n == 0:
        return np.repeat(x[:1], n, axis=0)  # nothing to interpolate with
    flat = x.reshape(m, -1).astype(np.float64)
    sq = (flat * flat).sum(1)
    d2 = sq[:, None] + sq[None, :] - 2.0 * flat @ flat.T
    np.fill_diagonal(d2, np.inf)
    kk = min(k, m - 1)
    nbrs = np.argsort(d2, axis=1)[:, :kk]
    a = rng.integers(0, m, n)
    b = nbrs[a, rng.integers(0, kk, n)]
    lam = rng.random(n).astype(np.float32)[:, None, None]
    return x[a] + lam * (x[b] - x[a])


def oversample(windows: np.ndarray, labels: np.ndarray, target: int, k: int = 5,
               seed: int = 0, skip: tuple[str, ...] = ()) -> tuple[np.ndarray, np.ndarray]:
    """Synthetic windows that bring every class (except ``skip``) up to ``target`` windows.

    Returns only the new windows and their labels; callers concatenate them with the real ones.
    """
    rng = np.random.default_rng(seed)
    labels = np.asarray(labels)
    xs, ys = [], []
    for c in sorted(set(labels.tolist()) - set(skip)):
        real = windows[labels == c]
        need = target - len(real)
        if need > 0:
            xs.append(smote(real, need, k, rng))
            ys.append(np.full(need, c, dtype=labels.dtype))
    if not xs:
        return np.zeros((0,) + windows.shape[1:], np.float32), labels[:0]
    return np.concatenate(xs), np.concatenate(ys)
