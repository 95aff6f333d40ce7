"""Crash-consistent pipeline state: a restarted agent (kill -9, OOM kill, watchdog restart)
continues every device's stream where it stopped.

What a device's next decision depends on (window rows, carried-forward values, stride
position, score smoothing, alert debounce and state, newest timestamp, a half-assembled
per-sensor row) is saved to SQLite, ``state.sqlite`` beside the outbox. Telemetry is
acknowledged to the broker (manual MQTT PUBACKs) only once a checkpoint holds it. After a
crash the broker redelivers everything after the last checkpoint (persistent session), and
what the checkpoint already holds is rejected by the per-device timestamp order
(out_of_order). The restarted agent sees each device's stream with no gap and no repeat, so
it decides what an uninterrupted agent, and offline ``score_rows``, decides.

Checkpoints are taken on the pipeline thread between batches: at least every ``INTERVAL_S``
while messages wait for their acknowledgement, and as soon as half of the broker's in-flight
window (receive maximum) waits, so the broker is never held back. Only changed devices are
copied there (a consistent snapshot: plain values and the window's bytes, ~2 us per device);
encoding them (JSON), writing them and then acknowledging the messages they hold happen on a
writer thread, one checkpoint at a time, so the pipeline neither serialises nor stalls on the
disk. Before acknowledging, the writer flushes the alert outbox to disk (``durable``: the
alerts decided from that telemetry are then safe from a power cut; agent.outbox).
``synchronous=NORMAL`` (WAL): a checkpoint survives
the agent process dying with no fsync; a power cut may lose the newest ones, as the broker's
autosave loses its newest messages. A failed write is logged and counted, the next
checkpoint rewrites every device, and the messages are acknowledged anyway: monitoring must
go on, at the cost of crash consistency until the next good checkpoint.

The state is read through the pipeline's own objects (as a hot reload does); the
round-trip is tested, so a change to those classes that this module misses fails there.
A checkpoint written under another bundle is carried over like a hot reload: windows when
features and window length match, the alert state always (so the new model can clear it).
"""
from __future__ import annotations

import json
import logging
import queue
import sqlite3
import threading
import time
from pathlib import Path
from typing import Callable

import numpy as np

from agent.pipeline import Pipeline, _Device
from agent.scoring import DeviceStream

try:
    from orjson import dumps as _fast_dumps
except ImportError:  # pragma: no cover - orjson is a dependency, but the agent must not need it
    _fast_dumps = None

log = logging.getLogger(__name__)

INTERVAL_S = 1.0

# A device row is rewritten in place (an upsert): half the CPU of INSERT OR REPLACE, which deletes
# the row and inserts it anew (~2 vs ~4 ms per 1,000 devices). Upserts need SQLite 3.24 (2018).
_PUT_DEVICE = ("INSERT INTO device VALUES (?, ?, ?) ON CONFLICT(name) DO UPDATE SET state = excluded.state, buf = excluded.buf"
               if sqlite3.sqlite_version_info >= (3, 24) else "INSERT OR REPLACE INTO device VALUES (?, ?, ?)")

_SCHEMA = (
    "CREATE TABLE IF NOT EXISTS meta (k TEXT PRIMARY KEY, v TEXT NOT NULL)",
    "CREATE TABLE IF NOT EXISTS device (name TEXT PRIMARY KEY, state TEXT NOT NULL, buf BLOB NOT NULL)",
)


class StateStore:
    """The SQLite file. An unreadable one is moved aside (kept for forensics) and the agent starts fresh."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        try:
            self._db = self._open()
        except sqlite3.DatabaseError as e:
            stamp = int(time.time())
            log.error("state %s is unreadable (%s); moved aside, devices start fresh", self.path, e)
            for suffix in ("", "-wal", "-shm"):
                f = Path(f"{self.path}{suffix}")
                if f.exists():
                    f.replace(f.with_name(f"{f.name}.corrupt-{stamp}"))
            self._db = self._open()

    def _open(self) -> sqlite3.Connection:
        db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None)
        db.execute("PRAGMA journal_mode=WAL")
        db.execute("PRAGMA synchronous=NORMAL")
        for q in _SCHEMA:
            db.execute(q)
        db.execute("SELECT count(*) FROM device").fetchone()  # surfaces corruption now
        return db

    def load(self) -> tuple[dict, dict[str, tuple[dict, bytes]]]:
        with self._lock:
            meta = {k: json.loads(v) for k, v in self._db.execute("SELECT k, v FROM meta")}
            rows = self._db.execute("SELECT name, state, buf FROM device").fetchall()
        return meta, {name: (json.loads(state), bytes(buf)) for name, state, buf in rows}

    def save(self, meta: dict | None, devices: list[tuple[str, str, bytes]], replace_all: bool = False) -> None:
        with self._lock:
            db = self._db
            db.execute("BEGIN")
            try:
                if replace_all:
                    db.execute("DELETE FROM device")
                if meta is not None:
                    db.executemany("INSERT OR REPLACE INTO meta VALUES (?, ?)", [(k, json.dumps(v)) for k, v in meta.items()])
                db.executemany(_PUT_DEVICE, devices)
                db.execute("COMMIT")
            except BaseException:
                db.execute("ROLLBACK")
                raise

    def close(self) -> None:
        with self._lock:
            self._db.close()


# ---------------------------------------------------------------- one device

def snapshot_device(name: str, dev: _Device, pending: list | None) -> tuple:
    """A consistent copy of one device's state, as cheap as possible (it runs on the pipeline
    thread): plain values, the window as bytes, nothing encoded. :func:`encode_snapshot` makes
    the stored row of it, on the writer thread."""
    s, w, a = dev.stream, dev.stream.window, dev.stream.alert
    if pending is not None:  # [ts, row, seen mask, ts given] of SensorRowAssembler: copied, it changes in place
        pending = (pending[0], pending[1].copy(), pending[2].copy(), pending[3])
    return (name, dev.last_ts, w.head, w.count, s.rows, s.since_scored, tuple(s.smoother._q), a.active, a._above,
            a._below, w.buf.tobytes(), pending)


def encode_snapshot(snap: tuple) -> tuple[str, str, bytes]:
    """(name, state JSON, window bytes): the ``device`` row of a :func:`snapshot_device`.

    orjson when it can say the same thing (~5x faster than json.dumps: with 1,000 devices this
    ran for ~3 us of every message of a drain); json.dumps for what orjson would write otherwise
    or not at all: NaN and infinities (orjson writes null; a device with no row yet has ts -inf,
    a half-assembled row has NaN) and anything that is not a plain Python value."""
    name, ts, head, count, rows, since, smooth, active, above, below, buf, pending = snap
    st = {"ts": ts, "head": head, "count": count, "rows": rows, "since": since, "smooth": list(smooth),
          "active": active, "above": above, "below": below}
    if pending is not None:
        st["pending"] = [pending[0], pending[1].tolist(), pending[2].tolist(), pending[3]]
    elif _fast_dumps is not None:
        try:
            finite = ts - ts == 0.0 and (x := sum(st["smooth"])) - x == 0.0  # no NaN, no inf (nor an overflow)
        except TypeError:
            finite = False
        if finite:
            try:
                return name, _fast_dumps(st).decode(), buf
            except TypeError:  # not a plain value (a numpy scalar, say): json.dumps decides
                pass
    return name, json.dumps(st), buf


def _load_device(p: Pipeline, st: dict, buf: bytes, same_shape: bool, same_bundle: bool) -> _Device:
    stream = DeviceStream(p.manifest)
    w = stream.window
    if same_shape:
        w.buf[:] = np.frombuffer(buf, np.float32).reshape(w.buf.shape)
        w.head, w.count = int(st["head"]), int(st["count"])  # the newest row is the fill source
        stream.rows, stream.since_scored = int(st["rows"]), int(st["since"])
    if same_bundle:
        stream.smoother._q.extend(float(x) for x in st["smooth"])
        stream.alert._above, stream.alert._below = int(st["above"]), int(st["below"])
    stream.alert.active = bool(st["active"])
    return _Device(stream, None)


# ---------------------------------------------------------------- the pipeline's checkpoints

class Checkpointer:
    """Saves the pipeline's state and acknowledges the telemetry it holds. Called from the
    pipeline thread (``restore`` before the loop starts, ``checkpoint(wait=True)`` after it ended);
    the writes and acknowledgements run on its own writer thread."""

    def __init__(self, pipeline: Pipeline, store: StateStore, ack: Callable[[int], None] | None = None,
                 receive_maximum: int = 20, interval_s: float = INTERVAL_S, clock: Callable[[], float] = time.monotonic,
                 durable: Callable[[], object] | None = None, writer_ack: Callable[[int], None] | None = None):
        self.p = pipeline
        self.store = store
        self.ack = ack
        # What the writer thread acknowledges a checkpoint's telemetry with (None: ``ack``): the
        # agent paces these thousands of PUBACKs (MqttLink.ack_through(pace=True)); ``tick`` on the
        # pipeline thread never waits for that.
        self.writer_ack = writer_ack
        # Called on the writer thread before each acknowledgement: the alert outbox's sync(), so the
        # alerts decided from the acknowledged telemetry are on disk first (agent.outbox).
        self.durable = durable
        self.batch = max(1, receive_maximum // 2)
        self.interval = interval_s
        self.clock = clock
        self.failures = 0
        self._saved_manifest = None  # manifest whose devices are all on disk (or on their way)
        self._rewrite = False  # a write failed: the next checkpoint writes every device
        self._saved_progress = 0  # the progress the last finished write holds
        self._unacked = 0
        self._last = clock()
        self._last_error = -1e18
        self._jobs: queue.Queue = queue.Queue(maxsize=1)  # one write in flight, one waiting at most
        self._writer: threading.Thread | None = None

    def restore(self) -> int:
        """Load the saved devices into the (fresh) pipeline; returns how many."""
        p = self.p
        meta, devices = self.store.load()
        saved = meta.get("manifest")
        if saved is None or not devices:
            return 0
        m = p.manifest
        same_bundle = saved == m.model_dump(mode="json")
        same_shape = saved.get("features") == m.features and saved.get("window") == m.window
        n = 0
        for name, (st, buf) in devices.items():
            if len(p.devices) >= p.cfg.max_devices:
                log.warning("state holds more devices than max_devices (%d); the rest start fresh", p.cfg.max_devices)
                break
            try:
                dev = _load_device(p, st, buf, same_shape, same_bundle)
                dev.last_ts = float(st["ts"])
                if same_shape and "pending" in st:
                    ts, row, seen, given = st["pending"]
                    p.assembler._pending[name] = [float(ts), np.array(row, np.float32), np.array(seen, bool), bool(given)]
            except (KeyError, TypeError, ValueError) as e:
                log.error("saved state of device %s is unusable (%s); it starts fresh", name, e)
                continue
            dev.report_to(p.metrics.score.labels(name))
            p.devices[name] = dev
            n += 1
        p.metrics.devices.set(len(p.devices))
        if same_bundle:
            self._saved_manifest = m
        log.info("restored the state of %d device(s) from %s%s", n, self.store.path,
                 "" if same_bundle else f" (saved under bundle {saved.get('name')} {saved.get('version')}"
                 + ("" if same_shape else "; features or window changed, windows restart") + ")")
        return n

    def tick(self, handled: int) -> None:
        """After each loop pass: checkpoint when due, else acknowledge what waits behind the saved progress."""
        self._unacked += handled
        if self._unacked >= self.batch or (self._unacked and self.clock() - self._last >= self.interval):
            self.checkpoint()
        elif self.ack is not None and not self._jobs.unfinished_tasks:
            # messages dropped at intake after the last checkpoint; while a write is under way its
            # own acknowledgements will take them (no contention for the link's ack lock here)
            self.ack(self._saved_progress)

    def checkpoint(self, wait: bool = False) -> None:
        """Snapshot the changed devices now; write and acknowledge on the writer thread (``wait``: and
        return once that is done)."""
        p = self.p
        p.flush()  # windows already due are decided (and their alerts in the outbox) before we save
        full = p.manifest is not self._saved_manifest or self._rewrite
        self._rewrite = False
        names = list(p.devices) if full else list(p.dirty)
        p.dirty = set()
        pending, devices = p.assembler._pending, p.devices
        # Only a copy here (~2 us per device); encoding (JSON) and writing happen on the writer thread.
        snaps = [snapshot_device(name, devices[name], pending.get(name)) for name in names if name in devices]
        meta = {"manifest": p.manifest.model_dump(mode="json")} if full else None
        self._saved_manifest = p.manifest
        self._unacked = 0
        self._last = self.clock()
        if self._writer is None:
            self._writer = threading.Thread(target=self._write_loop, name="checkpoint", daemon=True)
            self._writer.start()
        self._jobs.put((meta, snaps, full, p.progress))  # blocks only if the disk is two checkpoints behind
        if wait:
            self._jobs.join()

    def wait(self) -> None:
        """Return once every checkpoint taken so far is written and acknowledged."""
        self._jobs.join()

    def _failed(self, fmt: str, e: Exception) -> None:
        self.failures += 1
        self.p.metrics.checkpoint_failures.inc()
        now = self.clock()
        if now - self._last_error >= 60.0:
            self._last_error = now
            log.error(fmt, e)

    def _write_loop(self) -> None:
        while True:
            meta, snaps, full, progress = self._jobs.get()
            try:
                rows = []
                for i, snap in enumerate(snaps):
                    rows.append(encode_snapshot(snap))
                    if i % 64 == 63:
                        time.sleep(0)  # let the pipeline thread have the GIL between slices of this work
                self.store.save(meta, rows, replace_all=full)
            except Exception as e:  # sqlite3.Error mostly; whatever it is, this thread must go on
                self._rewrite = True
                self._failed("cannot write the state checkpoint (%s); acknowledging telemetry anyway", e)
            try:  # even when the state could not be saved: the alerts still must be on disk first
                if self.durable is not None:
                    self.durable()
            except Exception as e:  # OSError: a disk error
                self._failed("cannot flush the alert outbox to disk (%s); acknowledging telemetry anyway", e)
            try:
                ack = self.writer_ack or self.ack
                if ack is not None:
                    ack(progress)
            except Exception:  # the link is gone (stopping): the broker redelivers, nothing is lost
                log.debug("acknowledging after a checkpoint failed", exc_info=True)
            finally:
                # Only now: tick() on the pipeline thread acknowledges up to this progress too, and
                # must not take a share of these thousands of acknowledgements off this thread.
                self._saved_progress = progress
                self._jobs.task_done()
