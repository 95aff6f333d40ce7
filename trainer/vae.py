"""A small VAE over sliding windows, sized for a gateway CPU.

An MLP over the flattened window: it exports cleanly to ONNX and TFLite (only Linear and
SiLU), runs in well under a millisecond per window, and with windows of ~16 rows it sees
both the cross-sensor correlation and the short-term dynamics that a fault breaks.
The inference graph is deterministic: ``forward(x) = decoder(mu(x))``.
"""
from __future__ import annotations

import logging
import math
import sys
import time
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

log = logging.getLogger("trainer")


class WindowVAE(nn.Module):
    """(B, W, F) scaled windows -> (B, W, F) reconstruction.

    ``linear_path``: the latent mean and the reconstruction each get a linear term beside the MLP
    (``mu = mlp(x) + A x``, ``x' = mlp(z) + B z``): a probabilistic-PCA core with a nonlinear
    correction. Tried because PCA held unseen normal operating states with fewer false alarms than
    the MLP-only VAE; bench.detection (eight scenario sets) and a second training seed: mean F1
    +0.02, fewer false alarms, but worse on the simulator's machines (noisy 10 s set, bench pumps),
    so off by default (README "Detection quality"). Measured, not explained: on a toy two-channel
    relation the term alone did not extrapolate better.
    """

    def __init__(self, window: int, n_features: int, hidden: int, latent: int, linear_path: bool = False):
        super().__init__()
        self.window, self.n_features, self.latent = window, n_features, latent
        d = window * n_features
        self.encoder = nn.Sequential(nn.Linear(d, hidden), nn.SiLU(), nn.Linear(hidden, hidden // 2), nn.SiLU())
        self.to_stats = nn.Linear(hidden // 2, 2 * latent)
        self.decoder = nn.Sequential(
            nn.Linear(latent, hidden // 2), nn.SiLU(), nn.Linear(hidden // 2, hidden), nn.SiLU(), nn.Linear(hidden, d)
        )
        self.lin_enc = nn.Linear(d, latent, bias=False) if linear_path else None
        self.lin_dec = nn.Linear(latent, d, bias=False) if linear_path else None

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        xf = x.flatten(1)
        stats = self.to_stats(self.encoder(xf))
        mu, logvar = stats[:, : self.latent], stats[:, self.latent:]
        if self.lin_enc is not None:
            mu = mu + self.lin_enc(xf)
        return mu, logvar.clamp(-8.0, 8.0)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        out = self.decoder(z)
        if self.lin_dec is not None:
            out = out + self.lin_dec(z)
        return out.unflatten(1, (self.window, self.n_features))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Exported graph: no sampling, so every runtime gives the same answer.
        return self.decode(self.encode(x)[0])

    def sample_forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        mu, logvar = self.encode(x)
        z = mu + torch.randn_like(mu) * torch.exp(0.5 * logvar)
        return self.decode(z), mu, logvar


class EnsembleVAE(nn.Module):
    """Mean reconstruction of several WindowVAEs trained from different seeds: one graph, one call.

    Each member's reconstruction error on normal data has its own quirks (which normal patterns it
    reproduces a little worse, depending on its seed); their mean depends less on one seed's luck.
    Measured on bench.detection: mean F1 0.709 vs 0.691 for one VAE, most of it on the SKAB-like set
    (README "Detection quality"); three times the training time, one exported graph.
    """

    def __init__(self, members: list[WindowVAE]):
        super().__init__()
        self.members = nn.ModuleList(members)
        self.window, self.n_features = members[0].window, members[0].n_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.members[0](x)
        for m in self.members[1:]:
            out = out + m(x)
        return out * (1.0 / len(self.members))


@dataclass
class TrainConfig:
    epochs: int = 300
    batch_size: int | None = None  # None: about 16 steps per epoch, within [16, 256]
    lr: float = 2e-3
    beta: float = 0.05  # KL weight per latent unit relative to per-element MSE
    warmup_epochs: int = 20  # beta ramps from 0: first learn to reconstruct, then regularise
    patience: int = 30  # early stopping on held-out normal windows
    time_budget_s: float = 60.0
    noise: float = 0.05  # denoising: small input noise (scaled units) against memorising the train windows
    seed: int = 0
    threads: int | None = None
    progress: bool = True
    desc: str = "fit vae"  # progress bar label


@dataclass
class TrainResult:
    epochs: int
    best_epoch: int
    train_loss: float
    val_recon: float
    seconds: float
    stopped: str  # "early_stopping" | "time_budget" | "epochs"


def default_threads() -> int:
    # One thread: these matmuls are too small to gain from a second core, and when the other
    # core is busy (the agent, a broker, a second fit) torch's spinning worker threads made an
    # epoch ~18x slower in a measurement on the 2-core gateway class machine (1.43 s vs 0.08 s).
    return 1


def _recon_mse(model: WindowVAE, x: torch.Tensor, batch: int = 1024) -> float:
    model.eval()
    with torch.no_grad():
        tot = 0.0
        for a in range(0, len(x), batch):
            xb = x[a:a + batch]
            tot += float(((model(xb) - xb) ** 2).mean(dim=(1, 2)).sum())
    return tot / max(1, len(x))


def train_vae(model: WindowVAE, train: np.ndarray, val: np.ndarray, cfg: TrainConfig) -> TrainResult:
    """Adam on ELBO (MSE + beta*KL with warm-up); keeps the weights with the best validation reconstruction."""
    from tqdm import tqdm

    torch.manual_seed(cfg.seed)
    torch.set_num_threads(cfg.threads or default_threads())
    gen = torch.Generator().manual_seed(cfg.seed)
    xt = torch.from_numpy(np.ascontiguousarray(train, dtype=np.float32))
    xv = torch.from_numpy(np.ascontiguousarray(val, dtype=np.float32)) if len(val) else xt
    n = len(xt)
    bs = cfg.batch_size or int(min(256, max(16, 2 ** round(math.log2(max(1, n / 16))))))
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr)
    sched = torch.optim.lr_scheduler.ReduceLROnPlateau(opt, factor=0.5, patience=max(3, cfg.patience // 3))
    d = model.window * model.n_features
    best, best_state, best_epoch = math.inf, None, 0
    start = time.monotonic()
    stopped, loss_avg, epoch = "epochs", math.nan, 0
    # disable=None: a bar on a terminal only, not in logs or pipes.
    bar = tqdm(range(cfg.epochs), desc=cfg.desc, unit="ep", file=sys.stderr, disable=None if cfg.progress else True,
               leave=False, mininterval=0.5)
    for epoch in bar:
        model.train()
        beta = cfg.beta * min(1.0, epoch / max(1, cfg.warmup_epochs))
        perm = torch.randperm(n, generator=gen)
        tot = 0.0
        for a in range(0, n, bs):
            xb = xt[perm[a:a + bs]]
            inp = xb + cfg.noise * torch.randn(xb.shape, generator=gen) if cfg.noise > 0 else xb
            recon, mu, logvar = model.sample_forward(inp)
            rec = ((recon - xb) ** 2).mean()
            kl = (-0.5 * (1 + logvar - mu * mu - logvar.exp())).sum(dim=1).mean() / d
            loss = rec + beta * kl
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            tot += loss.item() * len(xb)
        loss_avg = tot / n
        v = _recon_mse(model, xv)
        sched.step(v)
        # Only models trained with the full KL weight compete: a warm-up model reconstructs
        # too well (anomalies included).
        if epoch >= cfg.warmup_epochs and v < best * (1 - 1e-4):
            best, best_epoch = v, epoch
            best_state = {k: t.detach().clone() for k, t in model.state_dict().items()}
        bar.set_postfix(loss=f"{loss_avg:.4f}", val=f"{v:.4f}", refresh=False)
        if epoch - best_epoch >= cfg.patience and epoch > cfg.warmup_epochs:
            stopped = "early_stopping"
            break
        if time.monotonic() - start > cfg.time_budget_s:
            stopped = "time_budget"
            log.info("training stopped by the time budget after %d epochs", epoch + 1)
            break
    bar.close()
    if best_state is not None:
        model.load_state_dict(best_state)
    else:  # stopped during warm-up (tiny time budget): keep the last weights
        best, best_epoch = _recon_mse(model, xv), epoch
    model.eval()
    return TrainResult(epoch + 1, best_epoch + 1, loss_avg, best, time.monotonic() - start, stopped)


def reconstruct(model: WindowVAE, x: np.ndarray, batch: int = 1024) -> np.ndarray:
    """PyTorch reference reconstruction (float32), for golden vectors and parity tests."""
    model.eval()
    out = []
    with torch.no_grad():
        for a in range(0, len(x), batch):
            out.append(model(torch.from_numpy(np.ascontiguousarray(x[a:a + batch], dtype=np.float32))).numpy())
    return np.concatenate(out) if out else np.zeros_like(x, dtype=np.float32)


class TorchBackend:
    """A PyTorch model behind the agent's Backend protocol (float32, same maths as the exported graphs):
    fit calibrates its first-stage model through it without exporting that model, and the parity
    tests use it as the reference."""

    name = "torch"

    def __init__(self, model: nn.Module):
        self.model = model

    def run(self, x: np.ndarray) -> list[np.ndarray]:
        return [reconstruct(self.model, x)]
