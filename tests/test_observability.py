"""Operations view of the agent: log formats (text, journald, JSON), /healthz and /readyz,
bundle metrics, and `edge-agent check` as a commissioning table with per-backend parity."""
from __future__ import annotations

import json
import logging
import os
import re
import threading
import time

import pytest

import agent.app as app_mod
from agent.app import App
from agent.cli import main
from agent.config import ConfigError, load_config
from agent.logging_setup import setup_logging, under_journald
from ops_helpers import http_get, metric, wait_until
from tiny_bundle import make_tiny_bundle
from tiny_tflite import add_tflite


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch):
    for k in list(os.environ):
        if k.startswith("EDGEWATCH_"):
            monkeypatch.delenv(k)
    monkeypatch.delenv("JOURNAL_STREAM", raising=False)


@pytest.fixture
def restore_logging():
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    yield
    root.handlers[:] = handlers
    root.setLevel(level)


@pytest.fixture(scope="module")
def two_backend_bundle(tmp_path_factory):
    return add_tflite(make_tiny_bundle(tmp_path_factory.mktemp("tiny2")))


def _emit(tmp_path, fmt: str, **kw) -> list[str]:
    path = tmp_path / "log.txt"
    with open(path, "w+") as stream:
        if "journal_of" in kw:
            st = os.fstat(stream.fileno()) if kw.pop("journal_of") == "self" else os.stat(os.devnull)
            os.environ["JOURNAL_STREAM"] = f"{st.st_dev}:{st.st_ino}"
        setup_logging(fmt, "DEBUG", stream=stream, static=kw.get("static"))
        log = logging.getLogger("t.obs")
        log.debug("dbg")
        log.info("hello %s", "world")
        log.warning("careful", extra={"device": "pump-1", "score": 12.5})
        try:
            raise ValueError("boom")
        except ValueError:
            log.exception("it broke")
    return path.read_text().splitlines()


# ------------------------------------------------------------------ logs

def test_text_logs_carry_timestamps_outside_journald(tmp_path, restore_logging):
    lines = _emit(tmp_path, "text")
    assert re.fullmatch(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} INFO t\.obs: hello world", lines[1]), lines[1]


def test_text_logs_under_journald_have_priority_and_no_timestamp(tmp_path, restore_logging, monkeypatch):
    monkeypatch.setenv("JOURNAL_STREAM", "0:0")  # restored after the test; _emit sets the real value
    lines = _emit(tmp_path, "text", journal_of="self")
    assert lines[:3] == ["<7>DEBUG t.obs: dbg", "<6>INFO t.obs: hello world", "<4>WARNING t.obs: careful"]
    assert lines[3] == "<3>ERROR t.obs: it broke" and "ValueError: boom" in lines[-1]


def test_inherited_journal_stream_of_another_file_is_ignored(tmp_path, restore_logging, monkeypatch):
    monkeypatch.setenv("JOURNAL_STREAM", "0:0")
    lines = _emit(tmp_path, "text", journal_of="other")
    assert re.match(r"\d{4}-\d\d-\d\d ", lines[0]) and not lines[0].startswith("<")
    with open(tmp_path / "x", "w") as f:
        assert not under_journald(f)


def test_json_logs_are_one_object_per_record(tmp_path, restore_logging):
    recs = [json.loads(line) for line in _emit(tmp_path, "json", static={"agent": "gw-7"})]
    assert len(recs) == 4  # the traceback stays inside its record
    info, warn, err = recs[1], recs[2], recs[3]
    assert info["msg"] == "hello world" and info["level"] == "INFO" and info["logger"] == "t.obs"
    assert info["agent"] == "gw-7" and re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", info["ts"])
    assert warn["device"] == "pump-1" and warn["score"] == 12.5
    assert err["level"] == "ERROR" and "ValueError: boom" in err["exc"]


# ------------------------------------------------------------------ probes and metrics

def _cfg(tmp_path, bundle, host, port, **kw):
    return load_config(agent_id="gw-obs", bundle=str(bundle), state_dir=str(tmp_path / "state"),
                       mqtt={"host": host, "port": port, "reconnect_min_s": 1, "reconnect_max_s": 1, **kw.pop("mqtt", {})},
                       topics={"telemetry": ["obs/+/{device}/telemetry"], "status": "obs/status/{agent_id}",
                               "model": "obs/status/{agent_id}/model"},
                       metrics={"port": 0}, **kw)


def test_healthz_readyz_and_bundle_metrics(tmp_path, broker, two_backend_bundle, monkeypatch):
    app = App(_cfg(tmp_path, two_backend_bundle, broker.host, broker.port)).start()
    wedge = threading.Event()
    try:
        assert app.link.wait_connected(10)
        wait_until(lambda: http_get(app.http.port, "/readyz")[0] == 200, what="ready")
        code, body = http_get(app.http.port, "/readyz")
        assert body.strip() == "ok: bundle tiny 1.0.0, broker connected"
        code, body = http_get(app.http.port, "/healthz")
        assert code == 200 and body.startswith("ok: pipeline loop ticked")
        _, text = http_get(app.http.port, "/metrics")
        assert 'edgewatch_bundle_info{backend="onnxruntime",name="tiny",version="1.0.0"} 1.0' in text
        assert abs(metric(text, "edgewatch_bundle_loaded_timestamp_seconds") - time.time()) < 60
        assert metric(text, 'edgewatch_bundle_reloads_total{result="ok"}') == 0
        assert metric(text, 'edgewatch_bundle_reloads_total{result="refused"}') == 0

        # A wedged pipeline loop turns /healthz red (systemd's watchdog does the same).
        monkeypatch.setattr(app_mod, "STALE_LOOP_S", 0.3)
        real_step = app.pipeline.step
        app.pipeline.step = lambda *a, **k: (wedge.wait(10), real_step(*a, **k))[1]
        wait_until(lambda: http_get(app.http.port, "/healthz")[0] == 503, what="healthz 503")
        assert "pipeline loop ticked" in http_get(app.http.port, "/healthz")[1]
        wedge.set()
        wait_until(lambda: http_get(app.http.port, "/healthz")[0] == 200, what="healthz back")
    finally:
        wedge.set()
        app.stop()


def test_readyz_names_the_reason_while_the_broker_is_unreachable(tmp_path, two_backend_bundle):
    app = App(_cfg(tmp_path, two_backend_bundle, "127.0.0.1", 1)).start()
    try:
        wait_until(lambda: app.link.last_refusal is not None, what="connect failure")
        code, body = http_get(app.http.port, "/readyz")
        assert code == 503 and "cannot connect to 127.0.0.1:1: Connection refused" in body
        assert http_get(app.http.port, "/healthz")[0] == 200  # alive, just not ready
    finally:
        app.stop()


def test_anonymous_connection_to_a_remote_broker_is_refused_before_start(tmp_path, two_backend_bundle):
    with pytest.raises(ConfigError) as e:
        App(_cfg(tmp_path, two_backend_bundle, "192.0.2.10", 1883))
    assert "refusing to connect anonymously to 192.0.2.10" in str(e.value) and "\n" not in str(e.value)
    cfg = _cfg(tmp_path, two_backend_bundle, "192.0.2.10", 1883, mqtt={"allow_anonymous": True})
    from agent.mqtt_security import check_policy

    check_policy(cfg)  # explicitly allowed
    check_policy(_cfg(tmp_path, two_backend_bundle, "localhost", 1883))  # loopback: the demo's default


# ------------------------------------------------------------------ edge-agent check

def _check(capsys, *argv) -> tuple[int, dict[str, tuple[str, str]], str]:
    rc = main(["check", *argv])
    out = capsys.readouterr().out
    rows = {}
    for line in out.splitlines()[:-1]:
        item, rest = re.split(r"\s{2,}", line, maxsplit=1)
        status, _, detail = rest.partition("  ")
        rows[item] = (status.strip(), detail.strip())
    return rc, rows, out


def _write_cfg(tmp_path, bundle, host="127.0.0.1", port=1, extra=""):
    p = tmp_path / "agent.yaml"
    p.write_text(f"agent_id: gw-chk\nbundle: {bundle}\nstate_dir: {tmp_path / 'state'}\n"
                 f"mqtt:\n  host: {host}\n  port: {port}\n{extra}")
    return p


def test_check_proves_parity_on_every_backend_and_reaches_the_broker(capsys, tmp_path, broker, two_backend_bundle):
    rc, rows, out = _check(capsys, "--config", str(_write_cfg(tmp_path, two_backend_bundle, broker.host, broker.port)))
    assert rc == 0, out
    assert out.strip().endswith("check passed")
    for name in ("backend onnxruntime (configured)", "backend litert"):
        status, detail = rows[name]
        assert status == "ok" and "golden vectors max diff 0" in detail and "one window in" in detail, (name, detail)
    assert rows["bundle"][0] == "ok" and "tiny 1.0.0" in rows["bundle"][1]
    assert rows["broker"] == ("ok", f"{broker.host}:{broker.port} accepted the connection")
    assert rows["mqtt auth"][0] == "skip" and "loopback" in rows["mqtt auth"][1]
    assert rows["mqtt tls"][0] == "skip"


def test_check_fails_when_one_backend_disagrees_with_the_golden_vectors(capsys, tmp_path):
    bad = add_tflite(make_tiny_bundle(tmp_path / "b"), k=0.5)  # hashes right, numbers wrong
    rc, rows, out = _check(capsys, "--config", str(_write_cfg(tmp_path, bad)), "--no-broker")
    assert rc == 1 and out.strip().endswith("check FAILED")
    assert rows["backend onnxruntime (configured)"][0] == "ok"
    assert rows["backend litert"][0] == "FAIL" and "differs from golden vectors" in rows["backend litert"][1]


def test_check_fails_on_an_anonymous_remote_broker_config(capsys, tmp_path, two_backend_bundle):
    rc, rows, out = _check(capsys, "--config", str(_write_cfg(tmp_path, two_backend_bundle, "192.0.2.10", 1883)),
                           "--no-broker")
    assert rc == 1
    assert rows["mqtt auth"][0] == "FAIL" and "refusing to connect anonymously" in rows["mqtt auth"][1]
    # A password in clear text over the network is flagged, not failed.
    (tmp_path / "pw").write_text("x\n")
    extra = f"  username: agent\n  password_file: {tmp_path / 'pw'}\n"
    rc, rows, out = _check(capsys, "--config", str(_write_cfg(tmp_path, two_backend_bundle, "192.0.2.10", 1883, extra)),
                           "--no-broker")
    assert rc == 0, out
    assert rows["mqtt tls"][0] == "warn" and "clear text" in rows["mqtt tls"][1]


def test_fast_metric_methods_update_what_the_public_methods_do():
    """pipeline.fast_method: a labelled child's inc/set through its value lands in the same
    sample; a parent with labels (not observable) gets the public method and its error."""
    from agent.metrics import Metrics
    from agent.pipeline import fast_method

    m = Metrics()
    inc = fast_method(m.messages.labels("ok"), "inc")
    inc(1)
    inc(1)
    m.messages.labels("ok").inc()
    assert m.registry.get_sample_value("edgewatch_messages_total", {"result": "ok"}) == 3.0
    set_score = fast_method(m.score.labels("d0"), "set")
    set_score(0.25)
    assert m.registry.get_sample_value("edgewatch_score", {"device": "d0"}) == 0.25
    set_score(1.5)
    assert m.registry.get_sample_value("edgewatch_score", {"device": "d0"}) == 1.5
    with pytest.raises(ValueError):  # "No label names were set": the public method's own check
        fast_method(m.score, "set")(1.0)
    fast_method(m.windows, "inc")(2)  # no labels at all: observable
    assert m.registry.get_sample_value("edgewatch_windows_scored_total") == 2.0
