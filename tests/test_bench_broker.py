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
