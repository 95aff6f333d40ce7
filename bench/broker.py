"""A private mosquitto on a loopback port and a cheap raw MQTT publisher for load generation.

The publisher speaks just enough MQTT 3.1.1 (CONNECT, QoS 1 PUBLISH, PUBACK counting) to
push pre-encoded packets with a few syscalls per thousand messages, so load generation
takes as little as possible of the two cores the agent and broker share.
"""
from __future__ import annotations

import os
import shutil
import socket
import struct
import subprocess
import threading
import time
from pathlib import Path


def stop_process(proc: subprocess.Popen | None, timeout: float = 5.0) -> None:
    """Stop a child (a private mosquitto): SIGTERM, wait up to ``timeout`` s, then SIGKILL and reap."""
    if proc is None or proc.poll() is not None:
        return
    proc.terminate()
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Mosquitto:
    """mosquitto with the queue limits a gateway uses (deploy/mosquitto/edgewatch.conf), plain TCP."""

    def __init__(self, workdir: Path, max_inflight: int | None = None):
        exe = shutil.which("mosquitto") or "/usr/sbin/mosquitto"
        if not os.path.exists(exe):
            raise RuntimeError("mosquitto is not installed (apt-get install mosquitto)")
        self.exe, self.host, self.port = exe, "127.0.0.1", free_port()
        workdir.mkdir(parents=True, exist_ok=True)
        self.conf = workdir / "mosquitto.conf"
        lines = [f"listener {self.port} 127.0.0.1", "allow_anonymous true", "persistence false",
                 "max_queued_messages 2000000", "max_queued_bytes 0", "set_tcp_nodelay true",
                 f"log_dest file {workdir}/mosquitto.log"]
        if max_inflight is not None:
            lines.append(f"max_inflight_messages {max_inflight}")
        if os.geteuid() == 0:
            lines.append("user root")
        self.conf.write_text("\n".join(lines) + "\n")
        self.proc: subprocess.Popen | None = None

    def __enter__(self) -> "Mosquitto":
        self.proc = subprocess.Popen([self.exe, "-c", str(self.conf)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                socket.create_connection((self.host, self.port), 0.2).close()
                return self
            except OSError:
                time.sleep(0.05)
        self.__exit__()
        raise RuntimeError("mosquitto did not open its port")

    def __exit__(self, *exc) -> None:
        stop_process(self.proc)

    @property
    def pid(self) -> int:
        return self.proc.pid


_MID = struct.Struct("!H")


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        b, n = n % 128, n // 128
        out.append(b | (0x80 if n else 0))
        if not n:
            return bytes(out)


def _str(s: bytes) -> bytes:
    return struct.pack("!H", len(s)) + s


def publish_packet(topic: str, payload: bytes, mid: int) -> bytes:
    """One QoS 1 PUBLISH packet (MQTT 3.1.1)."""
    body = _str(topic.encode()) + struct.pack("!H", mid) + payload
    return b"\x32" + _varint(len(body)) + body


class RawPublisher:
    """QoS 1 publisher over a plain socket; a reader thread counts PUBACKs (4 bytes each)."""

    def __init__(self, host: str, port: int, client_id: str = "bench-pub"):
        self.sock = socket.create_connection((host, port))
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        body = _str(b"MQTT") + bytes([4, 0x02]) + struct.pack("!H", 60) + _str(client_id.encode())
        self.sock.sendall(b"\x10" + _varint(len(body)) + body)
        ack = self._recv_exact(4)
        if ack[0] != 0x20 or ack[3] != 0:
            raise RuntimeError(f"CONNACK refused: {ack!r}")
        self.acked = 0
        self._cv = threading.Condition()
        self._mid = 0
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _recv_exact(self, n: int) -> bytes:
        buf = b""
        while len(buf) < n:
            chunk = self.sock.recv(n - len(buf))
            if not chunk:
                raise RuntimeError("broker closed the connection")
            buf += chunk
        return buf

    def _read(self) -> None:
        rest = 0
        while True:
            try:
                data = self.sock.recv(65536)
            except OSError:
                return
            if not data:
                return
            rest += len(data)
            with self._cv:
                self.acked += rest // 4
                rest %= 4
                self._cv.notify_all()

    def next_mid(self) -> int:
        self._mid = self._mid % 65535 + 1
        return self._mid

    def packet(self, topic: str, payload: bytes) -> bytes:
        return publish_packet(topic, payload, self.next_mid())

    @staticmethod
    def topic_head(topic: str) -> bytes:
        """A topic's encoded field, for :meth:`packet_to` (encode each topic once, not per message)."""
        return _str(topic.encode())

    def packet_to(self, topic_head: bytes, payload: bytes) -> bytes:
        """:meth:`packet` for a topic encoded by :meth:`topic_head`: the same bytes."""
        self._mid = mid = self._mid % 65535 + 1
        n = len(topic_head) + 2 + len(payload)
        return b"".join((b"\x32", _varint(n), topic_head, _MID.pack(mid), payload))

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def wait_acked(self, n: int, timeout: float = 120.0) -> None:
        with self._cv:
            if not self._cv.wait_for(lambda: self.acked >= n, timeout):
                raise RuntimeError(f"only {self.acked}/{n} PUBACKs within {timeout}s")

    def close(self) -> None:
        try:
            self.sock.sendall(b"\xe0\x00")  # DISCONNECT
            self.sock.close()
        except OSError:
            pass
