"""Buffered reads for paho-mqtt's network thread.

paho reads each MQTT packet with three or more ``recv`` calls on a non-blocking socket: one for
the command byte, one per byte of the remaining length, one for the body. Each is a system call
that releases and retakes the GIL, and with the agent's pipeline thread busy, retaking it waits.
(A bare subscriber, with no other thread, drains no faster with these buffered reads.)

``BufferedSocket`` reads what the kernel has, up to 64 KiB, in one ``recv`` and hands paho its
bytes from memory. It tells paho about bytes held back through ``pending()``, the hook paho
already uses for TLS sockets: with bytes pending, paho's loop does not wait in ``select`` for
the socket to become readable again (it would not: the kernel's copy is already drained).
``BufferedClient.loop_read`` then handles up to ``READ_BURST`` buffered packets per pass of paho's
loop instead of one (one ``select`` and one keepalive check per packet before), and stops as soon
as a write is queued, so an alert or a chunk of acknowledgements goes out before the next packet
is read, as before.

Measured side by side (bench/README.md, "Buffered reads"): drain of a backlog, agent over bare
paho at MQTT 5, 0.88x at 78 us CPU per message with paho's reads, 0.97x at 61 us buffered, 1.07x
at 58 us buffered with bursts; publish-to-alert p99 at 7,700 msg/s, the code before and after in
interleaved runs, 222 / 212 / 392 ms -> 53 / 25 / 18 ms.

Only plain TCP and Unix sockets are wrapped; TLS sockets (their own buffering, ``pending``) and
websockets keep paho's reads.
"""
from __future__ import annotations

import socket

import paho.mqtt.client as mqtt

READ_SIZE = 65536  # bytes per recv: a few hundred telemetry messages
READ_BURST = 64  # packets handled from the buffer per pass of paho's loop, at most


class BufferedSocket:
    """A socket whose ``recv`` is served from one larger read. Everything else is the socket's."""

    __slots__ = ("_sock", "_buf", "_pos")

    def __init__(self, sock: socket.socket) -> None:
        self._sock = sock
        self._buf = b""
        self._pos = 0

    def recv(self, bufsize: int) -> bytes:
        buf, pos = self._buf, self._pos
        if pos >= len(buf):
            buf = self._sock.recv(READ_SIZE)  # raises BlockingIOError when there is nothing: as before
            if not buf:
                return buf  # end of stream
            self._buf, pos = buf, 0
        end = pos + bufsize
        self._pos = end if end < len(buf) else len(buf)
        if pos == 0 and end >= len(buf):
            return buf  # the whole read: no copy
        return buf[pos:end]

    def pending(self) -> int:
        """Bytes read from the kernel and not yet handed out (paho's loop skips select while > 0)."""
        return len(self._buf) - self._pos

    def fileno(self) -> int:
        return self._sock.fileno()

    def __getattr__(self, name: str):
        return getattr(self._sock, name)

    def __repr__(self) -> str:
        return f"BufferedSocket({self._sock!r}, pending={self.pending()})"


class BufferedClient(mqtt.Client):
    """paho's client, reading plain TCP and Unix connections through a ``BufferedSocket``."""

    def _create_socket(self):
        sock = super()._create_socket()
        if type(sock) is socket.socket:  # not TLS (a subclass), not a websocket wrapper
            return BufferedSocket(sock)
        return sock

    def loop_read(self, max_packets: int = 1):
        """paho's ``loop_read``, then more packets while the buffer holds some and nothing waits to
        be written (paho's loop writes after reading). Bounded: paho's housekeeping (keepalive,
        its wake-up socket) runs at least every ``READ_BURST`` packets."""
        rc = super().loop_read(max_packets)
        sock, burst = self._sock, READ_BURST
        while (burst and not rc and type(sock) is BufferedSocket and sock is self._sock and sock.pending()
               and not self.want_write()):
            rc = super().loop_read(max_packets)
            burst -= 1
        return rc


def client_class() -> type[mqtt.Client]:
    """``BufferedClient`` where paho creates its sockets the way this module knows (paho 2.x:
    ``Client._create_socket``); paho's own client otherwise."""
    if callable(getattr(mqtt.Client, "_create_socket", None)):
        return BufferedClient
    return mqtt.Client
