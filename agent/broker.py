"""Embedded MQTT 3.1.1 / 5.0 broker (stdlib asyncio) for the demo and for developer machines
without mosquitto. Not a production broker: no TLS, no auth (credentials are accepted and
ignored), no persistence across restarts. CI tests run against mosquitto.

Supported: QoS 0/1 (inbound QoS 2 is completed with PUBREC/PUBREL/PUBCOMP, delivery is
downgraded to QoS 1), `+`/`#` wildcards, retained messages, last will (incl. v5 will delay),
keepalive (1.5x), persistent sessions (v3 clean_session=0, v5 session expiry) with bounded
offline queues and DUP redelivery of unacked QoS 1 messages, `$share/<group>/<filter>`,
v5 no-local / retain-as-published / retain-handling, subscription identifiers, message expiry.
Not supported: topic aliases (we advertise none), enhanced auth (AUTH), QoS 2 delivery.
Overlapping subscriptions of one client get one copy at the highest QoS (mosquitto sends one
per subscription; both are allowed by the spec).

API: EmbeddedBroker(host, port=0).start() / .stop() runs it on a daemon thread (.port is the
real port); `await serve(host, port)` runs it in your event loop; MQTTBroker is the core.

    python -m agent.broker --port 1883
"""
from __future__ import annotations

import argparse
import asyncio
import logging
import math
import struct
import threading
import time
import uuid
from collections import OrderedDict, deque

log = logging.getLogger("edgewatch.broker")

(CONNECT, CONNACK, PUBLISH, PUBACK, PUBREC, PUBREL, PUBCOMP, SUBSCRIBE, SUBACK, UNSUBSCRIBE,
 UNSUBACK, PINGREQ, PINGRESP, DISCONNECT, AUTH) = range(1, 16)
# Required fixed-header flags per client->server packet type (PUBLISH and CONNECT handled apart).
_FLAGS = {PUBACK: 0, PUBREC: 0, PUBREL: 2, PUBCOMP: 0, SUBSCRIBE: 2, UNSUBSCRIBE: 2, PINGREQ: 0, DISCONNECT: 0}

# MQTT 5 property id -> wire type. Needed to *skip* properties we don't use: each type has its own length rule.
_BYTE, _U16, _U32, _VARINT, _STR, _BIN, _PAIR = range(7)
_PROP_TYPES = {
    0x01: _BYTE, 0x02: _U32, 0x03: _STR, 0x08: _STR, 0x09: _BIN, 0x0B: _VARINT, 0x11: _U32, 0x12: _STR,
    0x13: _U16, 0x15: _STR, 0x16: _BIN, 0x17: _BYTE, 0x18: _U32, 0x19: _BYTE, 0x1A: _STR, 0x1C: _STR,
    0x1F: _STR, 0x21: _U16, 0x22: _U16, 0x23: _U16, 0x24: _BYTE, 0x25: _BYTE, 0x26: _PAIR, 0x27: _U32,
    0x28: _BYTE, 0x29: _BYTE, 0x2A: _BYTE,
}
_MULTI = (0x0B, 0x26)  # may repeat: subscription identifier, user property
_NOT_FORWARDED = (0x02, 0x0B, 0x23)  # expiry is recomputed, sub ids are per subscriber, aliases per connection
_NEVER = math.inf
_PINGRESP = b"\xd0\x00"


class ProtocolError(Exception):
    reason = 0x82  # v5 reason code sent in DISCONNECT before closing

    def __init__(self, msg: str, reason: int | None = None):
        super().__init__(msg)
        if reason is not None:
            self.reason = reason


class Malformed(ProtocolError):
    reason = 0x81


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        n, b = n >> 7, n & 0x7F
        out.append(b | 0x80 if n else b)
        if not n:
            return bytes(out)


def _str(s: str | bytes) -> bytes:
    b = s.encode() if isinstance(s, str) else s
    return len(b).to_bytes(2, "big") + b


def _packet(first: int, body: bytes = b"") -> bytes:
    return bytes((first,)) + _varint(len(body)) + body


class _Buf:
    """Bounds-checked cursor over one packet body; every overrun is a Malformed packet."""

    __slots__ = ("data", "pos")

    def __init__(self, data: bytes):
        self.data, self.pos = data, 0

    def more(self) -> bool:
        return self.pos < len(self.data)

    def take(self, n: int) -> bytes:
        end = self.pos + n
        if end > len(self.data):
            raise Malformed("truncated packet")
        b, self.pos = self.data[self.pos:end], end
        return b

    def u8(self) -> int:
        return self.take(1)[0]

    def u16(self) -> int:
        return int.from_bytes(self.take(2), "big")

    def u32(self) -> int:
        return int.from_bytes(self.take(4), "big")

    def varint(self) -> int:
        value = 0
        for shift in (0, 7, 14, 21):
            b = self.u8()
            value |= (b & 0x7F) << shift
            if not b & 0x80:
                return value
        raise Malformed("variable byte integer longer than 4 bytes")

    def binary(self) -> bytes:
        return self.take(self.u16())

    def string(self) -> str:
        try:
            s = self.binary().decode("utf-8")
        except UnicodeDecodeError:
            raise Malformed("invalid UTF-8 string") from None
        if "\x00" in s:
            raise Malformed("NUL in UTF-8 string")
        return s

    def rest(self) -> bytes:
        b, self.pos = self.data[self.pos:], len(self.data)
        return b

    def props(self, keep_raw: bool = False) -> tuple[dict, list]:
        """Parse a v5 property block -> ({id: value}, [(id, raw bytes)] if keep_raw)."""
        end = self.varint() + self.pos
        if end > len(self.data):
            raise Malformed("property length exceeds packet")
        vals: dict = {}
        raw: list = []
        while self.pos < end:
            start, pid = self.pos, self.varint()
            kind = _PROP_TYPES.get(pid)
            if kind is None:
                raise Malformed(f"unknown property 0x{pid:02x}")
            v = (self.u8() if kind == _BYTE else self.u16() if kind == _U16 else self.u32() if kind == _U32
                 else self.varint() if kind == _VARINT else self.string() if kind == _STR
                 else self.binary() if kind == _BIN else (self.string(), self.string()))
            if pid in _MULTI:
                vals.setdefault(pid, []).append(v)
            else:
                vals[pid] = v
            if keep_raw:
                raw.append((pid, self.data[start:self.pos]))
        if self.pos != end:
            raise Malformed("property overruns its block")
        return vals, raw


def _parse_filter(flt: str) -> tuple[str | None, str] | None:
    """-> (share group or None, filter), or None if the filter is invalid."""
    group = None
    if flt.startswith("$share/"):
        parts = flt.split("/", 2)
        if len(parts) < 3 or not parts[1] or "+" in parts[1] or "#" in parts[1]:
            return None
        group, flt = parts[1], parts[2]
    if not flt:
        return None
    levels = flt.split("/")
    for i, lvl in enumerate(levels):
        if ("#" in lvl and (lvl != "#" or i != len(levels) - 1)) or ("+" in lvl and lvl != "+"):
            return None
    return group, flt


def _filter_matches(flt: str, topic: str) -> bool:
    """Used only for retained messages on SUBSCRIBE; live routing goes through the trie."""
    f, t = flt.split("/"), topic.split("/")
    if topic.startswith("$") and f[0] in ("+", "#"):
        return False  # $-topics are invisible to top-level wildcards
    for i, lvl in enumerate(f):
        if lvl == "#":
            return True
        if i >= len(t) or (lvl != "+" and lvl != t[i]):
            return False
    return len(f) == len(t)


class Message:
    __slots__ = ("topic", "topic_enc", "payload", "qos", "retain", "props", "expiry", "expires_at", "sender")

    def __init__(self, topic, payload, qos=0, retain=False, props=b"", expiry=None, sender=""):
        self.topic, self.topic_enc, self.payload = topic, _str(topic), payload
        self.qos, self.retain, self.props, self.sender = qos, retain, props, sender
        self.expiry, self.expires_at = expiry, None  # expires_at is set when published

    def expired(self, now: float) -> bool:
        return self.expires_at is not None and now >= self.expires_at

    def encode(self, qos: int, retain: bool, dup: bool, pid: int, v5: bool, sub_ids=()) -> bytes:
        parts = [self.topic_enc, pid.to_bytes(2, "big")] if qos else [self.topic_enc]
        if v5:
            props = self.props
            if self.expires_at is not None:
                props += b"\x02" + struct.pack("!I", max(1, math.ceil(self.expires_at - time.monotonic())))
            for sid in sub_ids:
                props += b"\x0b" + _varint(sid)
            parts.append(_varint(len(props)) + props)
        parts.append(self.payload)
        body = b"".join(parts)
        return bytes(((PUBLISH << 4) | (dup << 3) | (qos << 1) | retain,)) + _varint(len(body)) + body


class _Sub:
    __slots__ = ("qos", "no_local", "rap", "handling", "sub_id")

    def __init__(self, qos, no_local=False, rap=False, handling=0, sub_id=0):
        self.qos, self.no_local, self.rap, self.handling, self.sub_id = qos, no_local, rap, handling, sub_id


class _Node:
    """Topic-filter trie node. `shared` maps group -> [members {client_id: _Sub}, round-robin cursor]."""

    __slots__ = ("children", "subs", "shared")

    def __init__(self):
        self.children: dict[str, _Node] = {}
        self.subs: dict[str, _Sub] = {}
        self.shared: dict[str, list] = {}


class _Session:
    __slots__ = ("client_id", "conn", "subs", "inflight", "queue", "dropped", "next_pid", "qos2_in",
                 "expiry", "expiry_timer", "will_timer", "pending_will")

    def __init__(self, client_id: str):
        self.client_id, self.conn = client_id, None
        self.subs: dict[str, _Sub] = {}  # full filter string (incl. $share/...) -> options
        self.inflight: OrderedDict[int, tuple] = OrderedDict()  # pid -> (msg, retain, sub_ids), awaiting PUBACK
        self.queue: deque = deque()  # QoS 1 messages waiting for the client / for an inflight slot
        self.dropped = 0
        self.next_pid = 1
        self.qos2_in: set[int] = set()  # inbound QoS 2 ids between PUBREC and PUBREL
        self.expiry = 0.0  # seconds the session outlives its connection
        self.expiry_timer = self.will_timer = self.pending_will = None

    def alloc_pid(self) -> int:
        while True:
            pid = self.next_pid
            self.next_pid = pid % 65535 + 1
            if pid not in self.inflight:
                return pid


class _Conn:
    __slots__ = ("transport", "peer", "v5", "session", "keepalive", "last_rx", "will",
                 "receive_max", "max_out", "closed")

    def __init__(self, writer: asyncio.StreamWriter):
        self.transport = writer.transport
        self.peer = writer.get_extra_info("peername")
        self.v5, self.session, self.keepalive = False, None, 0
        self.last_rx = time.monotonic()
        self.will = None  # (Message, delay seconds)
        self.receive_max, self.max_out, self.closed = 65535, 0, False

    def send(self, data: bytes) -> None:
        if not (self.closed or self.transport.is_closing()):
            self.transport.write(data)


class MQTTBroker:
    """The asyncio broker core. Use EmbeddedBroker (thread) or serve() (asyncio) to run it."""

    def __init__(self, max_packet_size: int = 1 << 20, max_queued: int = 10_000, max_inflight: int = 65535,
                 connect_timeout: float = 10.0, max_write_buffer: int = 8 << 20):
        # max_inflight caps what a client may hold unacknowledged; by default the client's own v5 Receive
        # Maximum rules, as on mosquitto (an agent that acks only at checkpoints needs a wide window).
        self.max_packet_size, self.max_queued, self.max_inflight = max_packet_size, max_queued, max_inflight
        self.connect_timeout, self.max_write_buffer = connect_timeout, max_write_buffer
        self.sessions: dict[str, _Session] = {}
        self.retained: dict[str, Message] = {}
        self.dropped = 0  # messages dropped for full offline queues / slow QoS 0 consumers
        self.port = 0
        self._root = _Node()
        self._match_cache: dict[str, list[_Node]] = {}
        self._conns: set[_Conn] = set()
        self._tasks: set[asyncio.Task] = set()
        self._server: asyncio.base_events.Server | None = None
        self._watchdog: asyncio.Task | None = None

    # ----- lifecycle
    async def start(self, host: str = "127.0.0.1", port: int = 1883) -> int:
        self._server = await asyncio.start_server(self._handle, host, port)
        self.port = self._server.sockets[0].getsockname()[1]
        self._watchdog = asyncio.create_task(self._keepalive_watchdog())
        return self.port

    async def close(self) -> None:
        if self._server:
            self._server.close()
        for conn in list(self._conns):
            self._close(conn, False, "broker shutdown", abort=True)
        if self._watchdog:
            self._watchdog.cancel()
        if self._tasks:  # let handlers see EOF and finish; cancelling them instead trips a 3.11 streams bug
            await asyncio.wait(list(self._tasks), timeout=5)
        if self._server:
            await self._server.wait_closed()

    async def _keepalive_watchdog(self) -> None:
        # One periodic scan instead of a timeout per read: keeps the per-packet path cheap.
        while True:
            await asyncio.sleep(0.25)
            now = time.monotonic()
            for conn in list(self._conns):
                if conn.keepalive and now - conn.last_rx > 1.5 * conn.keepalive:
                    self._close(conn, True, "keepalive timeout", abort=True)

    # ----- connection handling
    async def _read(self, reader: asyncio.StreamReader) -> tuple[int, int, bytes]:
        hdr = await reader.readexactly(2)
        first, b = hdr[0], hdr[1]
        length, shift = b & 0x7F, 7
        while b & 0x80:
            if shift > 21:
                raise Malformed("remaining length longer than 4 bytes")
            b = (await reader.readexactly(1))[0]
            length |= (b & 0x7F) << shift
            shift += 7
        if length > self.max_packet_size:
            raise ProtocolError(f"packet of {length} bytes exceeds limit", 0x95)
        return first >> 4, first & 0x0F, (await reader.readexactly(length) if length else b"")

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        conn, task = _Conn(writer), asyncio.current_task()
        self._conns.add(conn)
        self._tasks.add(task)
        will, reason = True, "connection lost"
        try:
            ptype, flags, body = await asyncio.wait_for(self._read(reader), self.connect_timeout)
            if ptype != CONNECT:
                raise ProtocolError("first packet is not CONNECT")
            if not self._on_connect(conn, flags, body):
                reason = "connect refused"
                return
            while not conn.closed:
                ptype, flags, body = await self._read(reader)
                conn.last_rx = time.monotonic()
                if ptype == PUBLISH:
                    self._on_publish(conn, flags, body)
                elif _FLAGS.get(ptype, -1) != flags:
                    raise Malformed(f"unexpected packet type {ptype} / flags {flags}")
                elif ptype == PUBACK:
                    self._on_puback(conn, body)
                elif ptype == PUBREL:
                    pid = _Buf(body).u16()
                    conn.session.qos2_in.discard(pid)
                    conn.send(_packet(PUBCOMP << 4, pid.to_bytes(2, "big")))
                elif ptype == SUBSCRIBE:
                    self._on_subscribe(conn, body)
                elif ptype == UNSUBSCRIBE:
                    self._on_unsubscribe(conn, body)
                elif ptype == PINGREQ:
                    conn.send(_PINGRESP)
                elif ptype == DISCONNECT:
                    will, reason = self._on_disconnect(conn, body), "client disconnect"
                    break
                # PUBREC/PUBCOMP: we never send QoS 2, so there is nothing to complete; ignore.
                if writer.transport.get_write_buffer_size() > self.max_write_buffer:
                    await writer.drain()  # a client that doesn't read its acks stops being read too
        except (asyncio.IncompleteReadError, ConnectionError, asyncio.TimeoutError):
            pass
        except ProtocolError as e:
            reason = f"protocol error: {e}"
            if conn.v5 and conn.session is not None:
                conn.send(_packet(DISCONNECT << 4, bytes((e.reason, 0))))
        except Exception:
            log.exception("internal error handling %s", conn.peer)
            reason = "internal error"
        finally:
            self._conns.discard(conn)
            self._tasks.discard(task)
            self._close(conn, will, reason)

    def _close(self, conn: _Conn, send_will: bool, reason: str, abort: bool = False) -> None:
        """Idempotent teardown; called from the reader task, the watchdog, takeover and shutdown."""
        if conn.closed:
            return
        conn.closed = True
        conn.transport.abort() if abort else conn.transport.close()
        s = conn.session
        if s is None or s.conn is not conn:
            return
        s.conn = None
        log.info("client %s disconnected (%s)", s.client_id, reason)
        if send_will and conn.will:
            msg, delay = conn.will
            if delay and s.expiry:
                s.pending_will = msg
                s.will_timer = asyncio.get_running_loop().call_later(min(delay, s.expiry), self._fire_will, s, msg)
            else:
                self.publish(msg)
        if s.expiry == 0:
            self._drop_session(s)
        elif s.expiry != _NEVER:
            s.expiry_timer = asyncio.get_running_loop().call_later(s.expiry, self._expire, s)

    def _fire_will(self, s: _Session, msg: Message) -> None:
        s.will_timer = s.pending_will = None
        self.publish(msg)

    def _expire(self, s: _Session) -> None:
        if s.conn is None and self.sessions.get(s.client_id) is s:
            if s.will_timer:  # a delayed will goes out when the session ends at the latest
                s.will_timer.cancel()
                self._fire_will(s, s.pending_will)
            self._drop_session(s)

    def _drop_session(self, s: _Session) -> None:
        for flt in list(s.subs):
            self._unsubscribe(s, flt)
        for timer in (s.expiry_timer, s.will_timer):
            if timer:
                timer.cancel()
        if self.sessions.get(s.client_id) is s:
            del self.sessions[s.client_id]

    # ----- CONNECT
    def _on_connect(self, conn: _Conn, flags: int, body: bytes) -> bool:
        b = _Buf(body)
        proto, level = b.string(), b.u8()
        if flags:
            raise Malformed("CONNECT with fixed-header flags")
        if (proto, level) not in (("MQTT", 4), ("MQTT", 5), ("MQIsdp", 3)):
            conn.send(b"\x20\x02\x00\x01")  # unacceptable protocol version (v3 encoding, per both specs)
            raise ProtocolError(f"unsupported protocol {proto!r} level {level}")
        conn.v5 = level == 5
        cflags = b.u8()
        clean, will_flag, will_qos, will_retain = bool(cflags & 2), cflags & 4, (cflags >> 3) & 3, bool(cflags & 0x20)
        if cflags & 1 or will_qos == 3 or (not will_flag and (will_qos or will_retain)):
            raise Malformed("invalid connect flags")
        conn.keepalive = b.u16()
        props = b.props()[0] if conn.v5 else {}
        client_id = b.string()
        if will_flag:
            wprops, wraw = b.props(keep_raw=True) if conn.v5 else ({}, [])
            wtopic, wpayload = b.string(), b.binary()
            if not wtopic or "+" in wtopic or "#" in wtopic:
                raise Malformed("invalid will topic")
            fwd = b"".join(r for pid, r in wraw if pid not in _NOT_FORWARDED and pid != 0x18)
            conn.will = (Message(wtopic, wpayload, will_qos, will_retain, fwd, wprops.get(0x02), client_id),
                         wprops.get(0x18, 0))
        if cflags & 0x80:
            b.string()  # username: accepted, not checked
        if cflags & 0x40:
            b.binary()  # password: accepted, not checked
        if 0x15 in props:
            conn.send(_packet(CONNACK << 4, b"\x00\x8c\x00"))  # enhanced auth not supported
            return False
        assigned = None
        if not client_id:
            if not (clean or conn.v5):
                conn.send(b"\x20\x02\x00\x02")  # identifier rejected: a persistent session needs an id
                return False
            client_id = assigned = "auto-" + uuid.uuid4().hex
            if conn.will:
                conn.will[0].sender = client_id
        if props.get(0x21) == 0:
            raise ProtocolError("receive maximum 0")
        conn.receive_max = min(props.get(0x21, 65535), self.max_inflight)
        conn.max_out = props.get(0x27, 0)
        if conn.v5:
            expiry = props.get(0x11, 0)
            expiry = _NEVER if expiry == 0xFFFFFFFF else float(expiry)
        else:
            expiry = 0.0 if clean else _NEVER

        s = self.sessions.get(client_id)
        if s is not None and s.conn is not None:  # session takeover: the old connection goes (with its will)
            if s.conn.v5:
                s.conn.send(_packet(DISCONNECT << 4, b"\x8e\x00"))
            self._close(s.conn, True, "session taken over")
            s = self.sessions.get(client_id)
        if s is not None and clean:
            self._drop_session(s)
            s = None
        present = s is not None
        if s is None:
            s = self.sessions[client_id] = _Session(client_id)
        for timer in (s.expiry_timer, s.will_timer):  # back in time: the session lives, the old will is void
            if timer:
                timer.cancel()
        s.expiry_timer = s.will_timer = s.pending_will = None
        s.expiry, s.conn, conn.session = expiry, conn, s

        if conn.v5:
            cprops = (b"\x12" + _str(assigned)) if assigned else b""
            conn.send(_packet(CONNACK << 4, bytes((present, 0)) + _varint(len(cprops)) + cprops))
        else:
            conn.send(bytes((CONNACK << 4, 2, present, 0)))
        log.info("client %s connected from %s (MQTT %s, clean=%s, keepalive=%ds, session present=%s)",
                 client_id, conn.peer, {3: "3.1", 4: "3.1.1", 5: "5.0"}[level], clean, conn.keepalive, present)
        for pid, (msg, retain, sub_ids) in s.inflight.items():  # unacked QoS 1 from the last connection
            conn.send(msg.encode(1, retain, True, pid, conn.v5, sub_ids))
        self._pump(s)
        return True

    def _on_disconnect(self, conn: _Conn, body: bytes) -> bool:
        """-> whether to publish the will (v5 reason 0x04 'disconnect with will message')."""
        if not (conn.v5 and body):
            return False
        b = _Buf(body)
        reason = b.u8()
        if b.more():
            props = b.props()[0]
            if 0x11 in props:
                conn.session.expiry = _NEVER if props[0x11] == 0xFFFFFFFF else float(props[0x11])
        return reason == 0x04

    # ----- PUBLISH / PUBACK
    def _on_publish(self, conn: _Conn, flags: int, body: bytes) -> None:
        qos, retain = (flags >> 1) & 3, bool(flags & 1)
        if qos == 3:
            raise Malformed("QoS 3")
        b = _Buf(body)
        topic = b.string()
        if not topic or "+" in topic or "#" in topic:
            raise ProtocolError(f"invalid topic name {topic!r}", 0x90)
        pid = b.u16() if qos else 0
        if qos and not pid:
            raise Malformed("packet id 0")
        fwd, expiry = b"", None
        if conn.v5:
            props, raw = b.props(keep_raw=True)
            if 0x23 in props:
                raise ProtocolError("topic alias not allowed (maximum is 0)", 0x94)
            expiry = props.get(0x02)
            fwd = b"".join(r for p, r in raw if p not in _NOT_FORWARDED)
        msg = Message(topic, b.rest(), qos, retain, fwd, expiry, conn.session.client_id)
        if qos == 2:  # exactly-once inbound: deliver on first PUBLISH, remember id until PUBREL
            if pid not in conn.session.qos2_in:
                conn.session.qos2_in.add(pid)
                self.publish(msg)
            conn.send(_packet(PUBREC << 4, pid.to_bytes(2, "big")))
            return
        self.publish(msg)
        if qos == 1:
            conn.send(bytes((PUBACK << 4, 2)) + pid.to_bytes(2, "big"))

    def _on_puback(self, conn: _Conn, body: bytes) -> None:
        s = conn.session
        if s.inflight.pop(_Buf(body).u16(), None) is not None:
            self._pump(s)

    def publish(self, msg: Message) -> None:
        """Route a message to all matching sessions (also usable by in-process callers on the loop)."""
        if msg.expiry is not None:
            msg.expires_at = time.monotonic() + msg.expiry
        if msg.retain:
            if msg.payload:
                self.retained[msg.topic] = msg
            else:
                self.retained.pop(msg.topic, None)  # empty retained payload deletes, but is still delivered
        targets: dict[str, list] = {}  # overlapping subscriptions -> one copy at the highest QoS
        for node in self._match(msg.topic):
            for cid, sub in node.subs.items():
                if sub.no_local and cid == msg.sender:
                    continue
                t = targets.get(cid)
                if t is None:
                    targets[cid] = [sub.qos, sub.rap, [sub.sub_id] if sub.sub_id else []]
                else:
                    t[0], t[1] = max(t[0], sub.qos), t[1] or sub.rap
                    if sub.sub_id:
                        t[2].append(sub.sub_id)
            for group in node.shared.values():
                cid, sub = self._pick(group)
                self._deliver(self.sessions[cid], msg, min(msg.qos, sub.qos), msg.retain and sub.rap,
                              [sub.sub_id] if sub.sub_id else [])
        for cid, (qos, rap, sub_ids) in targets.items():
            self._deliver(self.sessions[cid], msg, min(msg.qos, qos), msg.retain and rap, sub_ids)

    def _pick(self, group: list) -> tuple[str, _Sub]:
        """Round-robin over a share group, preferring members that are connected right now."""
        members = list(group[0].items())
        n = len(members)
        for i in range(n):
            idx = (group[1] + i) % n
            if self.sessions[members[idx][0]].conn is not None:
                group[1] = idx + 1
                return members[idx]
        idx, group[1] = group[1] % n, group[1] + 1
        return members[idx]

    def _deliver(self, s: _Session, msg: Message, qos: int, retain: bool, sub_ids: list) -> None:
        conn = s.conn
        if conn and conn.max_out and len(msg.payload) + len(msg.topic_enc) + len(msg.props) + 16 > conn.max_out:
            return  # over the client's v5 Maximum Packet Size: the spec says discard
        if qos == 0:
            if conn is None or conn.transport.get_write_buffer_size() > self.max_write_buffer:
                self.dropped += 1  # offline or not reading: QoS 0 is best effort
                return
            conn.send(msg.encode(0, retain, False, 0, conn.v5, sub_ids))
        elif conn is not None and not s.queue and len(s.inflight) < conn.receive_max:
            pid = s.alloc_pid()
            s.inflight[pid] = (msg, retain, sub_ids)
            conn.send(msg.encode(1, retain, False, pid, conn.v5, sub_ids))
        else:
            if len(s.queue) >= self.max_queued:
                s.queue.popleft()
                s.dropped += 1
                self.dropped += 1
                if s.dropped & (s.dropped - 1) == 0:  # log at 1, 2, 4, 8, ... drops
                    log.warning("queue for %s full: dropped %d oldest messages so far", s.client_id, s.dropped)
            s.queue.append((msg, retain, sub_ids))

    def _pump(self, s: _Session) -> None:
        conn, now = s.conn, time.monotonic()
        while conn is not None and s.queue and len(s.inflight) < conn.receive_max:
            msg, retain, sub_ids = s.queue.popleft()
            if not msg.expired(now):
                pid = s.alloc_pid()
                s.inflight[pid] = (msg, retain, sub_ids)
                conn.send(msg.encode(1, retain, False, pid, conn.v5, sub_ids))

    # ----- SUBSCRIBE / UNSUBSCRIBE
    def _on_subscribe(self, conn: _Conn, body: bytes) -> None:
        b, s = _Buf(body), conn.session
        pid = b.u16()
        sub_id = 0
        if conn.v5:
            ids = b.props()[0].get(0x0B)
            if ids:
                sub_id = ids[0]
                if not sub_id:
                    raise ProtocolError("subscription identifier 0")
        if not b.more():
            raise ProtocolError("SUBSCRIBE without topic filters")
        codes, retained = bytearray(), []
        while b.more():
            flt, opts = b.string(), b.u8()
            qos = opts & 3
            if qos == 3 or opts & (0xC0 if conn.v5 else 0xFC) or (opts >> 4) & 3 == 3:
                raise Malformed("invalid subscription options")
            parsed = _parse_filter(flt)
            if parsed is None:
                codes.append(0x8F if conn.v5 else 0x80)
                continue
            group, real = parsed
            sub = _Sub(min(qos, 1), bool(opts & 4) and group is None, bool(opts & 8), (opts >> 4) & 3, sub_id)
            existed = self._subscribe(s, flt, sub)
            codes.append(sub.qos)
            if group is None and (sub.handling == 0 or (sub.handling == 1 and not existed)):
                retained.append((real, sub))
        props = b"\x00" if conn.v5 else b""
        conn.send(_packet(SUBACK << 4, pid.to_bytes(2, "big") + props + bytes(codes)))
        now = time.monotonic()
        for real, sub in retained:  # after SUBACK, like mosquitto
            if "+" in real or "#" in real:
                msgs = [m for t, m in self.retained.items() if _filter_matches(real, t)]
            else:
                msgs = [m] if (m := self.retained.get(real)) else []
            for m in msgs:
                if m.expired(now):
                    self.retained.pop(m.topic, None)
                else:
                    self._deliver(s, m, min(m.qos, sub.qos), True, [sub.sub_id] if sub.sub_id else [])

    def _on_unsubscribe(self, conn: _Conn, body: bytes) -> None:
        b = _Buf(body)
        pid = b.u16()
        if conn.v5:
            b.props()
        if not b.more():
            raise ProtocolError("UNSUBSCRIBE without topic filters")
        codes = bytearray()
        while b.more():
            codes.append(0x00 if self._unsubscribe(conn.session, b.string()) else 0x11)
        tail = b"\x00" + bytes(codes) if conn.v5 else b""
        conn.send(_packet(UNSUBACK << 4, pid.to_bytes(2, "big") + tail))

    def _subscribe(self, s: _Session, flt: str, sub: _Sub) -> bool:
        """Add or replace a subscription; -> whether it already existed."""
        group, real = _parse_filter(flt)
        node = self._root
        for lvl in real.split("/"):
            nxt = node.children.get(lvl)
            if nxt is None:
                nxt = node.children[lvl] = _Node()
                self._match_cache.clear()  # only new nodes change which nodes a topic matches
            node = nxt
        if group is None:
            node.subs[s.client_id] = sub
        else:
            node.shared.setdefault(group, [{}, 0])[0][s.client_id] = sub
        existed = flt in s.subs
        s.subs[flt] = sub
        return existed

    def _unsubscribe(self, s: _Session, flt: str) -> bool:
        if s.subs.pop(flt, None) is None:
            return False
        group, real = _parse_filter(flt)
        path = [self._root]
        for lvl in real.split("/"):
            path.append(path[-1].children[lvl])
        node = path[-1]
        if group is None:
            node.subs.pop(s.client_id, None)
        else:
            members = node.shared[group][0]
            members.pop(s.client_id, None)
            if not members:
                del node.shared[group]
        levels = real.split("/")
        for i in range(len(levels), 0, -1):  # prune empty branches; cached lists may keep them, harmlessly empty
            n = path[i]
            if n.subs or n.shared or n.children:
                break
            del path[i - 1].children[levels[i - 1]]
        return True

    def _match(self, topic: str) -> list[_Node]:
        nodes = self._match_cache.get(topic)
        if nodes is not None:
            return nodes
        levels, nodes, n = topic.split("/"), [], topic.count("/") + 1
        dollar = topic.startswith("$")
        stack = [(self._root, 0)]
        while stack:
            node, i = stack.pop()
            if i == n:
                nodes.append(node)
                if (h := node.children.get("#")) is not None:
                    nodes.append(h)  # "a/#" also matches "a"
                continue
            if not (i == 0 and dollar):
                if (h := node.children.get("#")) is not None:
                    nodes.append(h)
                if (p := node.children.get("+")) is not None:
                    stack.append((p, i + 1))
            if (c := node.children.get(levels[i])) is not None:
                stack.append((c, i + 1))
        if len(self._match_cache) > 50_000:
            self._match_cache.clear()
        self._match_cache[topic] = nodes
        return nodes


class EmbeddedBroker:
    """MQTTBroker on a daemon thread with its own event loop. port=0 picks a free port."""

    def __init__(self, host: str = "127.0.0.1", port: int = 1883, **options):
        self.host, self.port = host, port
        self.broker = MQTTBroker(**options)
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self._ready = threading.Event()
        self._error: BaseException | None = None

    def start(self) -> "EmbeddedBroker":
        self._thread = threading.Thread(target=asyncio.run, args=(self._main(),), name="mqtt-broker", daemon=True)
        self._thread.start()
        if not self._ready.wait(10):
            raise RuntimeError("embedded broker did not start")
        if self._error:
            raise self._error
        return self

    async def _main(self) -> None:
        self._loop, self._stop = asyncio.get_running_loop(), asyncio.Event()
        try:
            self.port = await self.broker.start(self.host, self.port)
        except BaseException as e:  # e.g. port in use: report to start() instead of dying silently
            self._error = e
            return
        finally:
            self._ready.set()
        log.info("embedded MQTT broker listening on %s:%d", self.host, self.port)
        try:
            await self._stop.wait()
        finally:
            await self.broker.close()

    def stop(self) -> None:
        if self._thread and self._thread.is_alive() and self._loop:
            self._loop.call_soon_threadsafe(self._stop.set)
            self._thread.join(5)
        self._thread = None

    def __enter__(self) -> "EmbeddedBroker":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


async def serve(host: str = "127.0.0.1", port: int = 1883, **options) -> None:
    """Run a broker in the current event loop until cancelled."""
    broker = MQTTBroker(**options)
    await broker.start(host, port)
    log.info("MQTT broker listening on %s:%d", host, broker.port)
    try:
        await asyncio.Event().wait()
    finally:
        await broker.close()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m agent.broker", description="Embedded MQTT 3.1.1/5.0 broker (demo/dev)")
    p.add_argument("--host", default="127.0.0.1", help="bind address (no auth: think before using 0.0.0.0)")
    p.add_argument("--port", type=int, default=1883)
    p.add_argument("--max-packet-size", type=int, default=1 << 20, help="remaining-length limit in bytes")
    p.add_argument("--max-queued", type=int, default=10_000, help="offline QoS 1 queue per session")
    p.add_argument("--log-level", default="INFO")
    args = p.parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        asyncio.run(serve(args.host, args.port, max_packet_size=args.max_packet_size, max_queued=args.max_queued))
    except KeyboardInterrupt:
        log.info("stopped")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
