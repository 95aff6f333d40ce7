"""Shared fixtures: a private mosquitto per test session, simulated data, a trained bundle.

Integration tests talk to a real broker over TCP. CI must use mosquitto; only where the
binary is absent (and EDGEWATCH_ALLOW_EMBEDDED_BROKER=1) do they fall back to the
embedded Python broker.
"""
from __future__ import annotations

import logging
import os
import shutil
import socket
import subprocess
import time
from pathlib import Path

import pytest

from bench.broker import free_port, stop_process


def wait_port(port: int, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"broker did not open port {port}")


class Broker:
    """A private mosquitto on a free loopback port; restartable for fault tests."""

    def __init__(self, workdir: Path, extra_conf: str = ""):
        self.port = free_port()
        self.host = "127.0.0.1"
        self.workdir = workdir
        self.conf = workdir / "mosquitto.conf"
        self.conf.write_text(
            f"listener {self.port} 127.0.0.1\nallow_anonymous true\npersistence true\n"
            f"persistence_location {workdir}/\nmax_queued_messages 100000\n"
            f"log_dest file {workdir}/mosquitto.log\n{extra_conf}"
        )
        if os.geteuid() == 0:  # else mosquitto drops to its own user and cannot write pytest's tmp dirs
            self.conf.write_text(self.conf.read_text() + "user root\n")
        self.proc: subprocess.Popen | None = None

    def start(self) -> "Broker":
        self.proc = subprocess.Popen(["mosquitto", "-c", str(self.conf)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_port(self.port)
        return self

    def kill(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()

    def stop(self) -> None:
        stop_process(self.proc)


def mosquitto_available() -> bool:
    return shutil.which("mosquitto") is not None


@pytest.fixture(scope="session")
def broker(tmp_path_factory):
    """A private mosquitto for the whole session (fails loudly if mosquitto is missing in CI)."""
    if not mosquitto_available():
        if os.environ.get("CI"):
            pytest.fail("mosquitto is not installed; CI must test against a real mosquitto")
        from agent.broker import EmbeddedBroker  # fallback for developer machines only

        b = EmbeddedBroker(host="127.0.0.1", port=0)
        b.start()
        yield b
        b.stop()
        return
    b = Broker(tmp_path_factory.mktemp("mosquitto")).start()
    yield b
    b.stop()


@pytest.fixture
def fresh_broker(tmp_path):
    """A private mosquitto for one test (for tests that kill or reconfigure it)."""
    if not mosquitto_available():
        pytest.fail("mosquitto is required for this test")
    (tmp_path / "broker").mkdir(exist_ok=True)
    b = Broker(tmp_path / "broker").start()
    yield b
    b.stop()


@pytest.fixture(autouse=True)
def _root_logging_restored():
    """Tests that run the CLIs call agent.logging_setup.setup_logging, which points the root
    logger at that test's captured stderr. Left in place, a later thread's log record (the
    embedded broker's) went to the closed capture file: "--- Logging error --- ValueError: I/O
    operation on closed file" in the CI log. Each test gets the root logger back as it was."""
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    yield
    root.handlers[:] = handlers
    root.setLevel(level)
