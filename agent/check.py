"""``edge-agent check``: prove a gateway is ready to run before (re)starting the service."""
from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from agent.backends import FORMAT, REGISTRY, BackendUnavailable, open_backend, verify_golden
from agent.config import AgentConfig, ConfigError
from agent.manifest import BundleError, load_manifest
from agent.mqtt_link import probe
from agent.scoring import Scorer


@dataclass
class Row:
    item: str
    status: str  # ok | FAIL | skip
    detail: str


def run_checks(cfg: AgentConfig, broker: bool = True, timeout: float = 3.0) -> list[Row]:
    rows = [Row("config", "ok", f"agent {cfg.agent_id}, backend {cfg.backend}, broker {cfg.mqtt.host}:{cfg.mqtt.port}")]
    try:
        m = load_manifest(cfg.bundle)
        rows.append(Row("bundle", "ok", f"{m.name} {m.version}: {len(m.features)} features, window {m.window}, "
                                       f"threshold {m.threshold.value:.4g}, hashes verified"))
    except BundleError as e:
        rows.append(Row("bundle", "FAIL", str(e)))
        m = None
    for name in REGISTRY:
        rows.append(_backend_row(cfg, m, name))
    rows.append(_state_dir_row(cfg.state_dir))
    if cfg.mqtt.password_file is not None:
        try:
            cfg.mqtt.password()
            rows.append(Row("mqtt password", "ok", str(cfg.mqtt.password_file)))
        except ConfigError as e:
            rows.append(Row("mqtt password", "FAIL", str(e)))
    if broker:
        try:
            ok, why = probe(cfg, timeout)
        except ConfigError as e:
            ok, why = False, str(e)
        rows.append(Row("broker", "ok" if ok else "FAIL", why))
    else:
        rows.append(Row("broker", "skip", "--no-broker"))
    return rows


def _backend_row(cfg: AgentConfig, m, name: str) -> Row:
    label = f"backend {name}" + (" (configured)" if name == cfg.backend else "")
    if m is None:
        return Row(label, "skip", "no valid bundle")
    entry = m.models["vae"]
    if not entry.files.get(FORMAT[name]):
        st = "FAIL" if name == cfg.backend else "skip"
        return Row(label, st, f"bundle has no {FORMAT[name]} model")
    try:
        backend = open_backend(name, cfg.bundle, m, threads=cfg.threads, check_golden=False)
        worst = verify_golden(backend, Path(cfg.bundle), entry, "vae")
        scorer = Scorer(m, backend)
        win = np.tile(np.asarray(m.scaler.centre, np.float32), (1, m.window, 1))
        scorer.score(win)  # warm-up
        t = time.perf_counter()
        scorer.score(win)
        ms = (time.perf_counter() - t) * 1e3
        return Row(label, "ok", f"golden vectors max diff {worst:.2g}; one window in {ms:.2f} ms")
    except BackendUnavailable as e:
        return Row(label, "FAIL" if name == cfg.backend else "skip", str(e))
    except BundleError as e:
        return Row(label, "FAIL", str(e))


def _state_dir_row(path: Path) -> Row:
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        return Row("state dir", "FAIL", f"cannot create {path}: {e.strerror}")
    if not os.access(path, os.W_OK):
        return Row("state dir", "FAIL", f"{path} is not writable")
    return Row("state dir", "ok", f"{path} (alert outbox)")


def format_table(rows: list[Row]) -> str:
    w = max(len(r.item) for r in rows)
    return "\n".join(f"{r.item:<{w}}  {r.status:<4}  {r.detail}" for r in rows)


def passed(rows: list[Row]) -> bool:
    return all(r.status != "FAIL" for r in rows)
