"""Which fault is this? Summary features of a scaled window, and the classifiers compared on them.

``window_features`` is the one definition of the features, written in torch: the sklearn
models get it as numpy, and the shipped MLP computes it INSIDE its graph, so the agent
feeds the scaled window it already has and no feature code has to exist on the gateway.
Per channel: mean, std, min, max, least-squares slope, last value, mean |step| (roughness:
a stuck sensor has none, a worn bearing has a lot) and last - first; then a few pooled over
channels (see ``window_features``).
"""
from __future__ import annotations

import numpy as np
import torch
from torch import nn

FEATURES_PER_CHANNEL = ("mean", "std", "min", "max", "slope", "last", "roughness", "delta")
SKLEARN_MODELS = ("tree", "svm", "gboost")
MODELS = SKLEARN_MODELS + ("mlp",)


def _per_channel(x: torch.Tensor) -> list[torch.Tensor]:
    W = x.shape[1]
    mean = x.mean(dim=1)
    centred = x - mean[:, None, :]
    # No "+ eps" under the sqrt: torch.onnx's graph optimiser drops a tiny added constant, so the
    # ONNX graph would disagree with PyTorch on a stuck channel (std 0). Features carry no gradient.
    std = torch.sqrt((centred * centred).mean(dim=1))
    t = torch.arange(W, dtype=x.dtype) - (W - 1) / 2.0
    ss = max(W * (W * W - 1) / 12.0, 1e-8)  # sum of t^2, in Python: export must not read tensor values
    slope = (centred * (t * (W / ss))[None, :, None]).sum(dim=1)  # least-squares change over the window
    rough = (x[:, 1:, :] - x[:, :-1, :]).abs().mean(dim=1) if W > 1 else torch.zeros_like(mean)
    last, first = x[:, -1, :], x[:, 0, :]
    return [mean, std, x.amin(dim=1), x.amax(dim=1), slope, last, rough, last - first]


def window_features(x: torch.Tensor, ref: dict[str, torch.Tensor] | None = None) -> torch.Tensor:
    """(B, W, F) scaled windows → (B, 8*F [+ 8]) features, grouped feature-major (all means, all stds...).

    With ``ref`` (see ``reference``) eight channel-pooled features follow. Sensor faults hit a
    different channel on every machine; "some channel went quiet" (stuck) or "some channel
    disagrees with the others" (drift) must not have to be learnt once per channel from a
    handful of examples. So: min and max over channels of log(std, roughness, |slope| / the
    channel's typical value), and the largest and mean error of predicting each channel's level
    from the other channels' levels (a linear model of normal operation, fitted on normal windows).
    """
    f = _per_channel(x)
    if ref is None:
        return torch.cat(f, dim=1)
    r = torch.log(torch.stack([f[1], f[6], f[4].abs()], dim=1) / ref["typical"] + 0.05)  # +0.05: stuck → finite
    resid = (f[0] - (f[0] @ ref["coef"] + ref["bias"])).abs() / ref["resid_sd"]
    cross = torch.log1p(torch.stack([resid.amax(dim=1), resid.mean(dim=1)], dim=1))
    return torch.cat(f + [r.amin(dim=2), r.amax(dim=2), cross], dim=1)


def reference(windows: np.ndarray, normal: np.ndarray | None = None) -> dict[str, np.ndarray]:
    """What "usual" looks like, from training windows (``normal``: mask of the normal ones; None = all).

    ``typical`` (3, F): per-channel median std, roughness, |slope| over all windows (any one fault
    moves few channels, so the median is the normal value). ``coef``/``bias``/``resid_sd``: ridge
    regression of each channel's level on the others' levels, over normal windows."""
    x = np.ascontiguousarray(windows, np.float32)
    with torch.no_grad():
        f = [t.numpy().astype(np.float64) for t in _per_channel(torch.from_numpy(x))]
    typical = np.maximum(np.stack([np.median(f[1], 0), np.median(f[6], 0), np.median(np.abs(f[4]), 0)]), 1e-4)
    m = f[0] if normal is None or not np.any(normal) else f[0][normal]
    F = m.shape[1]
    coef, bias, sd = np.zeros((F, F)), np.zeros(F), np.ones(F)
    for c in range(F):
        o = [j for j in range(F) if j != c]
        X = np.c_[m[:, o], np.ones(len(m))]
        w = np.linalg.solve(X.T @ X + 1e-2 * np.eye(F), X.T @ m[:, c])
        coef[o, c], bias[c] = w[:-1], w[-1]
        sd[c] = max(float(np.std(m[:, c] - X @ w)), 1e-3)
    return {k: v.astype(np.float32) for k, v in
            {"typical": typical, "coef": coef, "bias": bias, "resid_sd": sd}.items()}


def features_np(windows: np.ndarray, ref: dict[str, np.ndarray] | None = None) -> np.ndarray:
    with torch.no_grad():
        r = None if ref is None else {k: torch.from_numpy(v) for k, v in ref.items()}
        return window_features(torch.from_numpy(np.ascontiguousarray(windows, np.float32)), r).numpy()


def class_weights(y: np.ndarray, n_classes: int) -> np.ndarray:
    """Per-sample weights that give every present class the same total weight.

    Every option (real only, +SMOTE, +GAN) is trained balanced, so augmentation is compared
    against re-weighting rather than against an imbalanced strawman.
    """
    counts = np.bincount(y, minlength=n_classes).astype(np.float64)
    w = np.where(counts > 0, len(y) / (np.maximum(counts, 1) * max((counts > 0).sum(), 1)), 0.0)
    return w[y]


def _normal_mask(y: np.ndarray, normal_id: int | None) -> np.ndarray | None:
    return None if normal_id is None else np.asarray(y) == normal_id


def fit_sklearn(name: str, x: np.ndarray, y: np.ndarray, n_classes: int, seed: int = 0, normal_id: int | None = None):
    """Fit one sklearn model on (windows, int labels). Returns an object with predict(windows)."""
    from sklearn.ensemble import HistGradientBoostingClassifier
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler
    from sklearn.svm import SVC
    from sklearn.tree import DecisionTreeClassifier

    ref = reference(x, _normal_mask(y, normal_id))
    f = features_np(x, ref)
    sw = class_weights(y, n_classes)
    if name == "tree":
        model = DecisionTreeClassifier(random_state=seed, min_samples_leaf=2)
        model.fit(f, y, sample_weight=sw)
    elif name == "svm":
        model = make_pipeline(StandardScaler(), SVC(C=10.0, gamma="scale", random_state=seed))
        model.fit(f, y, svc__sample_weight=sw)
    elif name == "gboost":
        # min_samples_leaf small: with five windows per class the default (20) learns nothing.
        # max_bins 32: binning with sample weights is sklearn's slow path (5x the fit at 255 bins).
        model = HistGradientBoostingClassifier(max_iter=60, learning_rate=0.2, max_leaf_nodes=15, max_bins=32,
                                               min_samples_leaf=2, early_stopping=False, random_state=seed)
        model.fit(f, y, sample_weight=sw)
    else:
        raise ValueError(f"unknown model {name!r}")
    return _Featurised(model, ref)


class _Featurised:
    def __init__(self, model, ref: dict[str, np.ndarray]):
        self.model, self.ref = model, ref

    def predict(self, windows: np.ndarray) -> np.ndarray:
        return self.model.predict(features_np(windows, self.ref))


class FaultMLP(nn.Module):
    """Scaled window (B, W, F) → class probabilities (B, C); features computed in-graph."""

    def __init__(self, n_in: int, n_classes: int, ref: dict[str, np.ndarray], hidden: int = 64,
                 mu: np.ndarray | None = None, sigma: np.ndarray | None = None):
        super().__init__()
        self.ref_names = sorted(ref)
        for k in self.ref_names:
            self.register_buffer(f"ref_{k}", torch.as_tensor(ref[k], dtype=torch.float32))
        self.register_buffer("mu", torch.as_tensor(np.zeros(n_in) if mu is None else mu, dtype=torch.float32))
        self.register_buffer("sigma", torch.as_tensor(np.ones(n_in) if sigma is None else sigma, dtype=torch.float32))
        self.head = nn.Sequential(
            nn.Linear(n_in, hidden), nn.ReLU(), nn.Dropout(0.1),
            nn.Linear(hidden, hidden), nn.ReLU(),
            nn.Linear(hidden, n_classes),
        )

    def logits_from_features(self, f: torch.Tensor) -> torch.Tensor:
        return self.head((f - self.mu) / self.sigma)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        ref = {k: getattr(self, f"ref_{k}") for k in self.ref_names}
        return torch.softmax(self.logits_from_features(window_features(x, ref)), dim=1)

    def predict(self, windows: np.ndarray) -> np.ndarray:
        self.eval()
        with torch.no_grad():
            return self(torch.from_numpy(np.ascontiguousarray(windows, np.float32))).argmax(1).numpy()


def fit_mlp(x: np.ndarray, y: np.ndarray, n_classes: int, seed: int = 0, normal_id: int | None = None,
            epochs: int = 300, lr: float = 3e-3, weight_decay: float = 1e-3) -> FaultMLP:
    """Full-batch Adam on precomputed features (they are fixed, so computed once), balanced loss."""
    ref = reference(x, _normal_mask(y, normal_id))
    f = features_np(x, ref)
    mu = f.mean(0)
    sigma = np.maximum(f.std(0), 1e-3)  # a constant feature (e.g. stuck channel) must not blow up
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = FaultMLP(f.shape[1], n_classes, ref, mu=mu, sigma=sigma)
        ft = torch.from_numpy(f)
        yt = torch.from_numpy(np.asarray(y, np.int64))
        w = torch.from_numpy(class_weights(np.asarray(y), n_classes)).float()
        opt = torch.optim.Adam(model.parameters(), lr=lr, weight_decay=weight_decay)
        model.train()
        for _ in range(epochs):
            loss = (nn.functional.cross_entropy(model.logits_from_features(ft), yt, reduction="none") * w).mean()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    return model.eval()


def fit_model(name: str, x: np.ndarray, y: np.ndarray, n_classes: int, seed: int = 0, normal_id: int | None = None):
    """``normal_id``: the normal class, whose windows define "usual" for the pooled features."""
    fit = fit_mlp if name == "mlp" else lambda *a: fit_sklearn(name, *a)
    return fit(x, y, n_classes, seed, normal_id)
