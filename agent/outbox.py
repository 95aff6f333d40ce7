"""Durable alert outbox (SQLite): an alert is written here before it is published and
deleted only when the broker acknowledges it (PUBACK). What is still here after a
disconnect or a restart is published again, oldest first: delivery is at-least-once,
and consumers de-duplicate on the alert's ``id``.

An acknowledged alert can also be kept ("lingering", ``ack(seq, linger=True)``) until the
broker has surely saved it: mosquitto acknowledges what it holds in memory and saves it at
its next autosave, so a broker killed in between forgets alerts it acknowledged. The link
publishes lingering alerts again after a reconnect and ``purge``s them once old enough.

Not bounded by count on purpose: dropping alerts is worse than using disk, and alerts are
rare (one per state change per device). ``backlog()`` is exported as a metric to alarm on.

Durability: WAL, ``synchronous=NORMAL``, and an explicit :meth:`sync` (one fsync of the
log) before the telemetry behind an alert is acknowledged to the broker. A put is committed
with no disk flush, so publishing an alert never waits for the disk (a flush took 1-15 ms on
the bench VM: it was most of the publish-to-alert latency). A committed put survives the
agent process dying (kill -9, OOM) at once: it is in the OS's page cache. A power cut may
undo puts not yet synced, and loses nothing: the agent acknowledges telemetry only after a
state checkpoint that holds it (agent.checkpoint), and :class:`agent.checkpoint.Checkpointer`
calls :meth:`sync` before that acknowledgement. Telemetry behind an alert the power cut
undid is therefore redelivered by the broker, and the restarted agent decides the same
alert again, with the same ``id`` (agent.messages.alert_id). The alerts decided in one
micro-batch are written in one transaction (``put_many``). Acknowledging and purging are
never synced on purpose: a power cut may undo them, which costs a repeat of an alert that
was already delivered (at-least-once), never a loss.
"""
from __future__ import annotations

import contextlib
import logging
import os
import sqlite3
import threading
import time
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)

_SCHEMA = """
CREATE TABLE IF NOT EXISTS outbox (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    topic TEXT NOT NULL,
    payload BLOB NOT NULL,
    state_topic TEXT,
    created REAL NOT NULL,
    acked REAL
)
"""


_INSERT = "INSERT INTO outbox (topic, payload, state_topic, created) VALUES (?, ?, ?, ?)"


class OutboxError(Exception):
    pass


@dataclass(frozen=True, slots=True)
class Entry:
    seq: int
    topic: str
    payload: bytes
    state_topic: str | None  # retained state topic republished with the alert


class Outbox:
    def __init__(self, path: str | Path):
        self.path = Path(path)
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise OutboxError(f"cannot create state directory {self.path.parent}: {e.strerror}") from None
        self._lock = threading.Lock()
        # sync(): puts committed so far / synced so far (each written under the lock, read anywhere).
        self._puts = 0
        self._synced = 0
        self._sync_lock = threading.Lock()  # one fsync at a time; never held with _lock
        try:
            self._db = self._open()
        except sqlite3.DatabaseError as e:
            # Keep monitoring alive: move the unreadable file aside (kept for forensics) and start empty.
            aside = self.path.with_name(f"{self.path.name}.corrupt-{int(time.time())}")
            log.error("outbox %s is unreadable (%s); moved to %s, starting empty", self.path, e, aside)
            self.path.replace(aside)
            self._db = self._open()

    def _open(self) -> sqlite3.Connection:
        try:
            db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None)
        except sqlite3.OperationalError as e:
            raise OutboxError(f"cannot open outbox {self.path}: {e}") from None
        db.execute("PRAGMA journal_mode=WAL")
        db.execute("PRAGMA synchronous=NORMAL")  # durability by sync() (module doc)
        db.execute(_SCHEMA)
        db.execute("SELECT count(*) FROM outbox").fetchone()  # surfaces corruption now
        if "acked" not in {r[1] for r in db.execute("PRAGMA table_info(outbox)")}:  # an outbox from before lingering
            db.execute("ALTER TABLE outbox ADD COLUMN acked REAL")
        return db

    @contextlib.contextmanager
    def _transaction(self):
        """One transaction under the lock: committed (not flushed to disk: see :meth:`sync`), or
        rolled back on any error."""
        with self._lock:
            db = self._db
            db.execute("BEGIN IMMEDIATE")
            try:
                yield db
                db.execute("COMMIT")
            except BaseException:
                db.execute("ROLLBACK")
                raise

    def sync(self) -> bool:
        """Flush every alert put so far to disk (fsync of the write-ahead log; the database file
        itself SQLite flushes whenever it moves the log into it). Takes no lock the pipeline
        waits on, so puts go on meanwhile. Returns True if there was anything to flush."""
        with self._sync_lock:
            target = self._puts
            if target == self._synced:
                return False
            for suffix in ("-wal", ""):  # the log first: it holds the newest commits
                try:
                    fd = os.open(f"{self.path}{suffix}", os.O_RDONLY)
                except FileNotFoundError:  # no log: everything is in the database file
                    continue
                try:
                    os.fsync(fd)
                finally:
                    os.close(fd)
            if self._synced == 0:  # the first time: the log file's directory entry too
                fd = os.open(self.path.parent, os.O_RDONLY)
                try:
                    os.fsync(fd)
                finally:
                    os.close(fd)
            self._synced = target
            return True

    def put(self, topic: str, payload: bytes, state_topic: str | None = None) -> int:
        """Persist one alert; returns its sequence number (used to ack)."""
        return self.put_many([(topic, payload, state_topic)])[0]

    def put_many(self, alerts: list[tuple[str, bytes, str | None]]) -> list[int]:
        """Persist several alerts in ONE transaction, in order; returns their sequence numbers.
        All or nothing: on an error none of them is stored. Committed, not yet flushed to disk:
        :meth:`sync` does that (module doc)."""
        if not alerts:
            return []
        now = time.time()
        with self._transaction() as db:
            seqs = [int(db.execute(_INSERT, (topic, payload, state_topic, now)).lastrowid)
                    for topic, payload, state_topic in alerts]
        with self._lock:  # counted after the commit: a sync() that sees the count flushes the commit
            self._puts += 1
        return seqs

    def ack(self, seq: int, linger: bool = False) -> None:
        """The broker acknowledged it: delete it, or keep it lingering (see the module doc).
        Never synced: losing it costs one repeat after a power cut."""
        self.ack_many([seq], linger)

    def pending(self) -> list[Entry]:
        """Every alert still here (unacknowledged or lingering), oldest first; all count as unacknowledged again."""
        with self._lock:
            self._db.execute("UPDATE outbox SET acked = NULL WHERE acked IS NOT NULL")
            rows = self._db.execute("SELECT seq, topic, payload, state_topic FROM outbox ORDER BY seq").fetchall()
        return [Entry(r[0], r[1], bytes(r[2]), r[3]) for r in rows]

    def lingering(self) -> list[Entry]:
        """Acknowledged alerts still kept, oldest first; they count as unacknowledged again."""
        with self._lock:
            rows = self._db.execute(
                "SELECT seq, topic, payload, state_topic FROM outbox WHERE acked IS NOT NULL ORDER BY seq").fetchall()
            if rows:
                self._db.execute("UPDATE outbox SET acked = NULL WHERE acked IS NOT NULL")
        return [Entry(r[0], r[1], bytes(r[2]), r[3]) for r in rows]

    def ack_many(self, seqs: list[int], linger: bool = False) -> None:
        """:meth:`ack` for several alerts, in one transaction (never synced either)."""
        if not seqs:
            return
        with self._transaction() as db:
            if linger:
                now = time.time()
                db.executemany("UPDATE outbox SET acked = ? WHERE seq = ?", [(now, s) for s in seqs])
            else:
                db.executemany("DELETE FROM outbox WHERE seq = ?", [(s,) for s in seqs])

    def purge(self, acked_before: float, created_before: float = float("-inf")) -> None:
        """Forget acknowledged alerts acknowledged, or raised, before these times (epoch seconds)."""
        with self._transaction() as db:  # never synced either (see ack)
            db.execute("DELETE FROM outbox WHERE acked IS NOT NULL AND (acked < ? OR created < ?)",
                       (acked_before, created_before))

    def get(self, seq: int) -> Entry | None:
        """One unacknowledged alert, or None once it was acknowledged."""
        with self._lock:
            r = self._db.execute("SELECT seq, topic, payload, state_topic FROM outbox WHERE seq = ? AND acked IS NULL",
                                 (seq,)).fetchone()
        return None if r is None else Entry(r[0], r[1], bytes(r[2]), r[3])

    def backlog(self) -> int:
        with self._lock:
            return int(self._db.execute("SELECT count(*) FROM outbox WHERE acked IS NULL").fetchone()[0])

    def close(self) -> None:
        self.sync()
        with self._lock:
            self._db.close()
