"""``edge-agent check``: prove a gateway is ready to run before (re)starting the service.

One row per item (config, bundle, every backend's golden-vector parity on every model in the
bundle, state dir, credentials, TLS, broker, broker authentication); exit 0 when no row is FAIL.
``warn`` rows do not fail.
"""
from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from agent.backends import FORMAT, REGISTRY, BackendUnavailable, open_backend, verify_golden
from agent.config import AgentConfig, ConfigError
from agent.bundle_store import BundleStore
from agent.manifest import BundleError, load_manifest
from agent.mqtt_security import anonymous_broker_check, anonymous_policy_error, try_connect
from agent.scoring import Scorer


@dataclass
class Row:
    item: str
    status: str  # ok | warn | FAIL | skip
    detail: str


def run_checks(cfg: AgentConfig, broker: bool = True, timeout: float = 3.0) -> list[Row]:
    rows = [Row("config", "ok", f"agent {cfg.agent_id}, backend {cfg.backend}, broker {cfg.mqtt.host}:{cfg.mqtt.port}")]
    try:
        m = load_manifest(cfg.bundle)
        rows.append(Row("bundle", "ok", f"{m.name} {m.version}: {len(m.features)} features, window {m.window}, "
                                       f"threshold {m.threshold.value:.4g}, hashes verified{_layout(cfg.bundle)}"))
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
    rows.append(_tls_row(cfg))
    if broker:
        try:
            outcome, why = try_connect(cfg, timeout)
        except ConfigError as e:
            outcome, why = "refused", str(e)
        rows.append(Row("broker", "ok" if outcome == "accepted" else "FAIL", why))
    else:
        rows.append(Row("broker", "skip", "--no-broker"))
    rows.append(_auth_row(cfg, broker, timeout))
    return rows


def _layout(bundle) -> str:
    """Where the bundle symlink points, and the rollback target, when the bundles/ layout is used."""
    store = BundleStore(bundle)
    cur, prev = store.current(), store.previous()
    if cur is None:
        return ""
    return f" ({store.link.name} -> {cur.name}" + (f", rollback to {prev.name})" if prev else ", no previous bundle)")


def _tls_row(cfg: AgentConfig) -> Row:
    m = cfg.mqtt
    if not m.tls.enabled:
        if m.username and not m.loopback:
            return Row("mqtt tls", "warn", f"off: the password crosses the network to {m.host} in clear text")
        return Row("mqtt tls", "skip", "off" + (" (loopback broker)" if m.loopback else ""))
    parts = [f"CA {m.tls.ca_file}" if m.tls.ca_file else "system CAs"]
    if m.tls.cert_file:
        parts.append(f"client certificate {m.tls.cert_file}")
    if m.tls.insecure:
        return Row("mqtt tls", "warn", ", ".join(parts) + "; hostname verification OFF (tls.insecure: testing only)")
    return Row("mqtt tls", "ok", ", ".join(parts) + "; hostname verified")


def _auth_row(cfg: AgentConfig, broker: bool, timeout: float) -> Row:
    why = anonymous_policy_error(cfg)
    if why:
        return Row("mqtt auth", "FAIL", why)
    if not broker:
        return Row("mqtt auth", "skip", "--no-broker")
    try:
        status, detail = anonymous_broker_check(cfg, timeout)
    except ConfigError as e:
        return Row("mqtt auth", "FAIL", str(e))
    who = f"user {cfg.mqtt.username}" if cfg.mqtt.username else "anonymous"
    return Row("mqtt auth", "warn" if status == "unknown" else status, f"{who}; {detail}")


def _backend_row(cfg: AgentConfig, m, name: str) -> Row:
    """Golden vectors of every model in the bundle (vae, then generator/classifier when present), then one window."""
    label = f"backend {name}" + (" (configured)" if name == cfg.backend else "")
    if m is None:
        return Row(label, "skip", "no valid bundle")
    models = ["vae"] + [k for k in m.models if k != "vae"]
    for model in models:
        if not m.models[model].files.get(FORMAT[name]):
            st = "FAIL" if name == cfg.backend else "skip"
            return Row(label, st, f"bundle has no {FORMAT[name]} model" + ("" if model == "vae" else f" for {model!r}"))
    try:
        worst, opened = 0.0, {}
        for model in models:
            opened[model] = open_backend(name, cfg.bundle, m, model=model, threads=cfg.threads, check_golden=False)
            worst = max(worst, verify_golden(opened[model], Path(cfg.bundle), m.models[model], model))
        scorer = Scorer(m, opened["vae"], opened.get("scorer"))
        win = np.tile(np.asarray(m.scaler.centre, np.float32), (1, m.window, 1))
        scorer.score(win)  # warm-up
        t = time.perf_counter()
        scorer.score(win)
        ms = (time.perf_counter() - t) * 1e3
        return Row(label, "ok", f"golden vectors max diff {worst:.2g} ({', '.join(models)}); one window in {ms:.2f} ms")
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
