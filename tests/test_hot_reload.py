"""Model updates without downtime: bundles side by side behind a symlink, verified before every
switch, hot-reloaded by the running agent (watcher or SIGHUP), refused when corrupt, rolled back.
The end-to-end test runs the real agent process against mosquitto while telemetry streams."""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from agent.bundle_store import BundleStore, verify_bundle
from agent.bundle_watch import BundleWatcher, fingerprint
from agent.cli import main
from agent.manifest import BundleError
from conftest import free_port
from ops_helpers import Subscriber, http_get, metric, wait_until
from tiny_bundle import make_tiny_bundle

T0 = 1_700_000_000.0


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch):
    for k in list(os.environ):
        if k.startswith("EDGEWATCH_"):
            monkeypatch.delenv(k)


def verify(path: Path):
    return verify_bundle(path, "onnxruntime")


def corrupt_copy(src: Path, dest: Path, version: str) -> Path:
    make_tiny_bundle(dest, version=version)
    (dest / "vae.onnx").write_bytes(b"not a model")  # the manifest's sha256 no longer matches
    return dest


def switch_by_hand(link: Path, target: str) -> None:
    """What an operator's `ln -sfn ... && mv -T` does; does not touch bundle.previous."""
    tmp = link.with_name(".by-hand")
    os.symlink(target, tmp)
    os.replace(tmp, link)


# ------------------------------------------------------------------ the store (no agent)

def test_install_switch_and_rollback_are_symlink_renames(tmp_path):
    etc = tmp_path / "etc"
    etc.mkdir()
    store = BundleStore(etc / "bundle")
    v1, v2 = make_tiny_bundle(tmp_path / "src1", version="1.0.0"), make_tiny_bundle(tmp_path / "src2", version="2.0.0")

    dest, m, switched = store.install(v1, verify)
    assert switched and dest == etc / "bundles" / "tiny-1.0.0" and m.version == "1.0.0"
    assert os.readlink(etc / "bundle") == "bundles/tiny-1.0.0" and store.previous() is None

    dest, _, switched = store.install(v2, verify)
    assert switched and os.readlink(etc / "bundle") == "bundles/tiny-2.0.0"
    assert os.readlink(etc / "bundle.previous") == "bundles/tiny-1.0.0"
    assert not store.install(v2, verify)[2]  # same bundle again: nothing to switch

    to, frm = store.rollback(verify)
    assert (to.name, frm.name) == ("tiny-1.0.0", "tiny-2.0.0")
    assert os.readlink(etc / "bundle") == "bundles/tiny-1.0.0"
    assert os.readlink(etc / "bundle.previous") == "bundles/tiny-2.0.0"
    store.rollback(verify)  # a second rollback undoes the first
    assert os.readlink(etc / "bundle") == "bundles/tiny-2.0.0"
    assert sorted(p.name for p in (etc / "bundles").iterdir()) == ["tiny-1.0.0", "tiny-2.0.0"]  # no temp left


def test_store_refuses_what_the_agent_would_refuse(tmp_path):
    etc = tmp_path / "etc"
    etc.mkdir()
    store = BundleStore(etc / "bundle")
    with pytest.raises(BundleError, match="no previous bundle"):
        store.rollback(verify)
    store.install(make_tiny_bundle(tmp_path / "src1", version="1.0.0"), verify)

    with pytest.raises(BundleError, match="bundle file corrupt"):
        store.install(corrupt_copy(tmp_path / "bad", tmp_path / "bad", "3.0.0"), verify)
    assert not (etc / "bundles" / "tiny-3.0.0").exists() and os.readlink(etc / "bundle") == "bundles/tiny-1.0.0"

    other = make_tiny_bundle(tmp_path / "other", version="1.0.0", threshold=5.0)  # same name-version, other content
    with pytest.raises(BundleError, match="already holds a different tiny 1.0.0"):
        store.install(other, verify)

    (etc / "bundle").unlink()
    (etc / "bundle").mkdir()
    with pytest.raises(BundleError, match="is a directory, not a symlink"):
        store.install(make_tiny_bundle(tmp_path / "src2", version="2.0.0"), verify)


def test_watcher_waits_for_the_bundle_to_settle_and_tries_a_version_once(tmp_path):
    live = make_tiny_bundle(tmp_path / "b")
    calls = []
    w = BundleWatcher(lambda: live, 60, lambda: calls.append(fingerprint(live)))
    w.rebase(fingerprint(live))
    assert not w.poll()
    (live / "vae.onnx").write_bytes(b"half-written")
    assert not w.poll() and calls == []  # changed: wait one interval in case a copy is in progress
    assert w.poll() and len(calls) == 1  # unchanged since: try it
    assert not w.poll() and not w.poll() and len(calls) == 1  # refused or not, not retried until it changes
    (live / "vae.onnx").write_bytes(b"fixed?")
    assert not w.poll() and w.poll() and len(calls) == 2


# ------------------------------------------------------------------ the real agent

class Telemetry(threading.Thread):
    """Streams rows for two devices; sensor b steps +10 sigma for 10 of every 20 rows."""

    def __init__(self, host: str, port: int, prefix: str):
        super().__init__(daemon=True)
        self.c = mqtt.Client(CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5)
        self.c.connect(host, port)
        self.c.loop_start()
        self.prefix, self.stop, self.rng = prefix, threading.Event(), np.random.default_rng(0)

    def run(self):
        t = 0
        while not self.stop.is_set():
            for dev in ("pump-1", "pump-2"):
                v = self.rng.normal(size=3) * 0.5
                v[1] += 10.0 if t % 20 >= 10 else 0.0
                body = json.dumps({"ts": T0 + t, "values": dict(zip("abc", map(float, v)))})
                self.c.publish(f"{self.prefix}/l1/{dev}/telemetry", body, qos=1)
            t += 1
            time.sleep(0.004)

    def close(self):
        self.stop.set()
        self.join(5)
        self.c.disconnect()
        self.c.loop_stop()


def test_hot_reload_swaps_refuses_and_rolls_back_while_alerts_keep_flowing(tmp_path, broker, capsys):
    etc = tmp_path / "etc"
    etc.mkdir()
    prefix = f"hot-{os.getpid()}-{int(time.monotonic() * 1000) % 100000}"
    port = free_port()
    cfg = tmp_path / "agent.yaml"
    cfg.write_text(
        f"agent_id: gw-hot\nbundle: {etc / 'bundle'}\nbundle_watch_s: 0.2\nstate_dir: {tmp_path / 'state'}\n"
        f"mqtt: {{host: {broker.host}, port: {broker.port}, reconnect_min_s: 1, reconnect_max_s: 1}}\n"
        f"topics:\n  telemetry: ['{prefix}/+/{{device}}/telemetry']\n  alerts: '{prefix}/alerts/{{device}}'\n"
        f"  state: '{prefix}/state/{{device}}'\n  status: '{prefix}/status/{{agent_id}}'\n"
        f"  model: '{prefix}/status/{{agent_id}}/model'\n"
        f"metrics: {{port: {port}}}\nbatching: {{max_batch: 16, max_latency_ms: 2}}\nlog: {{format: json}}\n"
    )
    assert main(["install-bundle", str(make_tiny_bundle(tmp_path / "src1", version="1.0.0")), "--config", str(cfg)]) == 0
    capsys.readouterr()

    sub = Subscriber(broker.host, broker.port, f"{prefix}/#")
    env = {k: v for k, v in os.environ.items() if not k.startswith("EDGEWATCH_")}
    proc = subprocess.Popen([sys.executable, "-m", "agent.cli", "run", "--config", str(cfg)],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env, text=True)
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(proc.stdout), daemon=True)
    reader.start()
    feed = None
    model_topic = f"{prefix}/status/gw-hot/model"
    served = lambda: [m["version"] for m in sub.json_on(model_topic)]  # noqa: E731
    versions_since = lambda t: {a["model"]["version"] for _, a in sub.alerts(prefix, since=t)}  # noqa: E731

    def alerts_under(version: str) -> float:
        """Wait until the agent says it serves `version` and alerts carry it; returns when it said so."""
        wait_until(lambda: served()[-1:] == [version], timeout=15, what=f"model topic {version}")
        t = time.monotonic()
        wait_until(lambda: version in versions_since(t), timeout=10, what=f"alerts from {version}")
        return t

    try:
        wait_until(lambda: http_get(port, "/readyz")[0] == 200 if proc.poll() is None else True, timeout=20,
                   what="agent ready", step=0.1)
        assert proc.poll() is None, "".join(lines)
        feed = Telemetry(broker.host, broker.port, prefix)
        feed.start()
        alerts_under("1.0.0")
        first = sub.json_on(model_topic)[0]
        assert first["name"] == "tiny" and first["backend"] == "onnxruntime" and first["loaded_at"].endswith("Z")

        # 1. A good bundle, installed next to the old one: verified, switched, picked up by the watcher.
        assert main(["install-bundle", str(make_tiny_bundle(tmp_path / "src2", version="2.0.0", threshold=9.0)),
                     "--config", str(cfg)]) == 0
        out = capsys.readouterr().out
        assert "bundle -> tiny-2.0.0 (previous: tiny-1.0.0)" in out
        alerts_under("2.0.0")
        _, text = http_get(port, "/metrics")
        assert 'edgewatch_bundle_info{backend="onnxruntime",name="tiny",version="2.0.0"} 1.0' in text
        assert metric(text, "edgewatch_threshold") == 9.0

        # 2. A corrupt bundle: install-bundle refuses it; switched in by hand, the agent refuses it.
        bad = corrupt_copy(tmp_path / "src3", tmp_path / "src3", "3.0.0")
        assert main(["install-bundle", str(bad), "--config", str(cfg)]) == 1
        assert "bundle file corrupt" in capsys.readouterr().err
        shutil.copytree(bad, etc / "bundles" / "tiny-3.0.0")
        switch_by_hand(etc / "bundle", "bundles/tiny-3.0.0")
        wait_until(lambda: metric(http_get(port, "/metrics")[1], 'edgewatch_bundle_reloads_total{result="refused"}') == 1,
                   timeout=10, what="refusal", step=0.05)
        t = time.monotonic()
        wait_until(lambda: len(sub.alerts(prefix, since=t)) >= 6, what="alerts after the refusal")
        assert versions_since(t) == {"2.0.0"} and served()[-1] == "2.0.0"
        assert http_get(port, "/readyz")[0] == 200

        # 3. Roll back to the bundle before the last install.
        assert main(["rollback", "--config", str(cfg)]) == 0
        assert "bundle -> tiny-1.0.0" in capsys.readouterr().out
        alerts_under("1.0.0")
        _, text = http_get(port, "/metrics")
        assert metric(text, 'edgewatch_bundle_reloads_total{result="ok"}') == 2
        assert metric(text, 'edgewatch_bundle_reloads_total{result="refused"}') == 1
    finally:
        if feed is not None:
            feed.close()
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(15)
        finally:
            if proc.poll() is None:
                proc.kill()
            reader.join(5)
            sub.close()

    assert proc.returncode == 0, "".join(lines[-20:])
    # Alerts never paused: per device raised/cleared alternate across every swap, with no long gap.
    alerts = sub.alerts(prefix)
    for dev in ("pump-1", "pump-2"):
        states = [a["state"] for _, a in alerts if a["device"] == dev]
        assert len(states) > 20 and all(x != y for x, y in zip(states, states[1:])), states
    times = [ts for ts, _ in alerts]
    assert max(b - a for a, b in zip(times, times[1:])) < 1.5
    # Logs: JSON, one object per line; the refusal is one line saying why.
    recs = [json.loads(line) for line in lines if line.strip()]
    refusals = [r["msg"] for r in recs if "refused" in r["msg"]]
    assert len(refusals) == 1 and refusals[0].startswith("new bundle refused, still serving tiny 2.0.0: bundle file corrupt")
    assert all(r["agent"] == "gw-hot" for r in recs)
    serving = [r["msg"].split(" (")[0] for r in recs if r["msg"].startswith("now serving bundle")]
    assert serving == ["now serving bundle tiny 2.0.0", "now serving bundle tiny 1.0.0"]


def test_sighup_refuses_a_corrupted_active_bundle_and_keeps_scoring(tmp_path, broker):
    """SIGHUP path (systemctl reload), in process: the bundle in service was damaged on disk."""
    from agent.app import App
    from agent.config import load_config

    etc = tmp_path / "etc"
    etc.mkdir()
    store = BundleStore(etc / "bundle")
    store.install(make_tiny_bundle(tmp_path / "src1"), verify)
    path = tmp_path / "agent.yaml"
    path.write_text(f"agent_id: gw-hup\nbundle: {etc / 'bundle'}\nbundle_watch_s: 0\nstate_dir: {tmp_path / 's'}\n"
                    f"mqtt: {{host: {broker.host}, port: {broker.port}}}\nmetrics: {{enabled: false}}\n"
                    f"topics: {{telemetry: ['hup/+/{{device}}/telemetry'], status: 'hup/status/{{agent_id}}'}}\n")
    app = App(load_config(path), str(path)).start()
    try:
        (etc / "bundles" / "tiny-1.0.0" / "vae_golden.npz").write_bytes(b"damaged")
        assert not app.reload()
        assert app.metrics.registry.get_sample_value("edgewatch_bundle_reloads_total", {"result": "refused"}) == 1
        app.pipeline.submit("hup/l/p/telemetry", json.dumps({"ts": T0, "values": {"a": 0, "b": 0, "c": 0}}).encode(),
                            time.time())
        wait_until(lambda: app.metrics.registry.get_sample_value("edgewatch_windows_scored_total") == 1, what="scored")
    finally:
        app.stop()
