"""Classic baselines in the same protocol as the VAE: fitted on the same normal history, threshold
calibrated label-free on the same held-out tail, same causal smoothing and alert state machine.

* PCA control chart: Hotelling T^2 on the retained components + Q (squared prediction error),
  each divided by its training 99th percentile, combined as the max (either chart alarms).
* Isolation Forest on robustly scaled rows.
"""
from __future__ import annotations

import numpy as np

from trainer.fit import robust_scaler


class PcaT2Q:
    name = "pca_t2q"

    def fit(self, x: np.ndarray) -> "PcaT2Q":
        self.centre, self.scale = robust_scaler(x)
        z = (x - self.centre) / self.scale
        self.mu = z.mean(axis=0)
        u, s, vt = np.linalg.svd(z - self.mu, full_matrices=False)
        var = s ** 2 / max(1, len(z) - 1)
        k = int(np.searchsorted(np.cumsum(var) / var.sum(), 0.9) + 1)
        self.p, self.var = vt[:k].T, np.maximum(var[:k], 1e-9)
        t2, q = self._parts(x)
        self.t2_ref, self.q_ref = np.quantile(t2, 0.99) + 1e-9, np.quantile(q, 0.99) + 1e-9
        return self

    def _parts(self, x):
        z = (x - self.centre) / self.scale - self.mu
        t = z @ self.p
        t2 = (t * t / self.var).sum(axis=1)
        r = z - t @ self.p.T
        return t2, (r * r).sum(axis=1)

    def score(self, x: np.ndarray) -> np.ndarray:
        t2, q = self._parts(x)
        return np.maximum(t2 / self.t2_ref, q / self.q_ref)


class IForest:
    name = "iforest"

    def __init__(self, seed: int = 0):
        self.seed = seed

    def fit(self, x: np.ndarray) -> "IForest":
        from sklearn.ensemble import IsolationForest

        self.centre, self.scale = robust_scaler(x)
        self.model = IsolationForest(n_estimators=200, random_state=self.seed).fit((x - self.centre) / self.scale)
        return self

    def score(self, x: np.ndarray) -> np.ndarray:
        return -self.model.score_samples((x - self.centre) / self.scale)


BASELINES = {"pca_t2q": PcaT2Q, "iforest": IForest}
