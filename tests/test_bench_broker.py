"""bench.broker.stop_process: the one way the tests and benches stop a private mosquitto."""
from __future__ import annotations

import subprocess
import sys
import time

from bench.broker import stop_process

IGNORES_SIGTERM = "import signal, sys, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); print('ready', flush=True); time.sleep(60)"


def test_stop_process_terminates_a_child_that_honours_sigterm():
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    t0 = time.monotonic()
    stop_process(proc)
    assert proc.returncode is not None and proc.returncode < 0  # died of SIGTERM, reaped
    assert time.monotonic() - t0 < 5


def test_stop_process_kills_a_child_that_ignores_sigterm_after_the_timeout():
    proc = subprocess.Popen([sys.executable, "-c", IGNORES_SIGTERM], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "ready"  # the handler is in place before we signal
    t0 = time.monotonic()
    stop_process(proc, timeout=0.5)
    assert proc.returncode == -9
    assert 0.5 <= time.monotonic() - t0 < 5
    proc.stdout.close()


def test_stop_process_leaves_a_finished_or_missing_process_alone():
    stop_process(None)
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    stop_process(proc)
    assert proc.returncode == 0


def test_the_latency_benchs_alert_watcher_records_arrivals_from_its_own_process(broker):
    """bench.steady.AlertWatch: a subscriber process of its own (not the publisher's GIL) reports
    each alert's (device, ts) and arrival on the bench's perf_counter clock."""
    import json

    import paho.mqtt.client as mqtt
    from paho.mqtt.enums import CallbackAPIVersion

    from bench.steady import AlertWatch

    watch = AlertWatch(broker, topic="bench-watch-test/alerts/#")
    pub = mqtt.Client(CallbackAPIVersion.VERSION2)
    pub.connect(broker.host, broker.port)
    pub.loop_start()
    try:
        t0 = time.perf_counter()
        pub.publish("bench-watch-test/alerts/p1", json.dumps({"device": "p1", "ts": "2026-01-01T00:00:00.000Z"}), qos=1)
        deadline = time.monotonic() + 10
        while ("p1", "2026-01-01T00:00:00.000Z") not in watch.got and time.monotonic() < deadline:
            time.sleep(0.01)
        arrived = watch.got[("p1", "2026-01-01T00:00:00.000Z")]
        assert t0 - 0.01 <= arrived <= time.perf_counter() + 0.01
        assert watch.proc.pid != __import__("os").getpid()
    finally:
        pub.loop_stop()
        watch.close()
    assert watch.proc.returncode is not None
