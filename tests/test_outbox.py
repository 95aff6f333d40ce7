"""Alert outbox: durable, ordered, acked; survives reopen and corruption."""
from __future__ import annotations

import os
import subprocess
import sys
import threading
from pathlib import Path

from agent.outbox import Outbox


def test_put_pending_ack_in_order(tmp_path):
    ob = Outbox(tmp_path / "o.sqlite")
    seqs = [ob.put(f"a/{i}", f"p{i}".encode(), f"s/{i}") for i in range(5)]
    assert seqs == sorted(seqs)
    ob.ack(seqs[1])
    ob.ack(seqs[3])
    assert [(e.topic, e.payload, e.state_topic) for e in ob.pending()] == [
        ("a/0", b"p0", "s/0"), ("a/2", b"p2", "s/2"), ("a/4", b"p4", "s/4")]
    assert ob.backlog() == 3
    ob.close()


def test_persists_across_reopen_and_seq_keeps_growing(tmp_path):
    path = tmp_path / "state" / "o.sqlite"  # creates the directory
    ob = Outbox(path)
    first = ob.put("t", b"1")
    second = ob.put("t", b"2")
    ob.ack(first)
    ob.close()
    ob = Outbox(path)
    assert [(e.seq, e.payload) for e in ob.pending()] == [(second, b"2")]
    ob.ack(second)
    assert ob.put("t", b"3") > second  # AUTOINCREMENT: an acked seq is never reused
    assert ob.backlog() == 1
    ob.close()


def test_wal_and_normal_sync(tmp_path):
    ob = Outbox(tmp_path / "o.sqlite")
    assert ob._db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert ob._db.execute("PRAGMA synchronous").fetchone()[0] == 1  # NORMAL: durability by sync()
    ob.close()


def test_thread_safe_concurrent_puts_and_acks(tmp_path):
    ob = Outbox(tmp_path / "o.sqlite")

    def worker(k):
        for i in range(50):
            s = ob.put("t", f"{k}-{i}".encode())
            if i % 2:
                ob.ack(s)

    ts = [threading.Thread(target=worker, args=(k,)) for k in range(4)]
    [t.start() for t in ts]
    [t.join() for t in ts]
    assert ob.backlog() == 4 * 25
    ob.close()


def test_corrupt_file_is_moved_aside(tmp_path):
    path = tmp_path / "o.sqlite"
    path.write_bytes(b"this is not a database" * 100)
    ob = Outbox(path)
    assert ob.backlog() == 0
    assert list(tmp_path.glob("o.sqlite.corrupt-*"))
    ob.close()


class _Commits:
    """Counts the transactions a connection commits: an explicit COMMIT, or a write statement
    run outside a transaction (autocommit)."""

    def __init__(self, db):
        self.n, self._in_tx = 0, False
        db.set_trace_callback(self._trace)

    def _trace(self, sql: str) -> None:
        s = sql.lstrip().upper()
        if s.startswith("BEGIN"):
            self._in_tx = True
        elif s.startswith(("COMMIT", "END")):
            self._in_tx, self.n = False, self.n + 1
        elif s.startswith("ROLLBACK"):
            self._in_tx = False
        elif s.startswith(("INSERT", "UPDATE", "DELETE", "REPLACE")) and not self._in_tx:
            self.n += 1


def test_put_many_is_one_commit_and_keeps_order(tmp_path):
    ob = Outbox(tmp_path / "o.sqlite")
    commits = _Commits(ob._db)
    seqs = ob.put_many([(f"a/{i}", f"p{i}".encode(), f"s/{i}") for i in range(10)])
    assert commits.n == 1  # one transaction for the whole batch, not one per alert
    assert seqs == sorted(seqs) and len(set(seqs)) == 10
    assert [(e.seq, e.topic, e.payload, e.state_topic) for e in ob.pending()] == [
        (s, f"a/{i}", f"p{i}".encode(), f"s/{i}") for i, s in enumerate(seqs)]
    commits.n = 0  # pending() wrote too (it marks lingering alerts unacknowledged)
    assert ob.put_many([]) == [] and commits.n == 0
    assert ob.put("t", b"x") > seqs[-1] and commits.n == 1
    ob.close()


def test_put_many_is_all_or_nothing(tmp_path):
    ob = Outbox(tmp_path / "o.sqlite")
    import pytest
    with pytest.raises(Exception):
        ob.put_many([("a", b"1", None), (None, b"2", None)])  # topic NOT NULL: the second insert fails
    assert ob.backlog() == 0
    assert ob.put_many([("a", b"1", None)]) and ob.backlog() == 1  # the connection is usable afterwards
    ob.close()


def fsynced(monkeypatch) -> list[str]:
    """The files os.fsync flushes from now on (the real fsync still runs)."""
    paths, real = [], os.fsync

    def fsync(fd):
        paths.append(os.readlink(f"/proc/self/fd/{fd}"))
        return real(fd)
    monkeypatch.setattr(os, "fsync", fsync)
    return paths


def test_puts_are_flushed_by_sync_and_acks_and_purges_never(tmp_path, monkeypatch):
    """A put commits without a disk flush (publishing never waits for the disk); sync() flushes the
    log once for every put before it, and does nothing when no put came since. Acknowledging or
    purging, which a power cut may undo at the cost of one repeat, is never flushed."""
    ob = Outbox(tmp_path / "o.sqlite")
    flushed = fsynced(monkeypatch)
    commits = _Commits(ob._db)
    a, b = ob.put_many([("t", b"1", None), ("t", b"2", None)])
    ob.put("t", b"3")
    assert flushed == [] and commits.n == 2
    assert ob.sync() is True
    wal = str(tmp_path / "o.sqlite-wal")
    assert flushed[0] == wal and str(tmp_path) in flushed  # the log, and its directory entry the first time
    del flushed[:]
    assert ob.sync() is False and flushed == []  # nothing new
    ob.ack(a)
    ob.ack(b, linger=True)
    ob.purge(acked_before=1e18)
    assert ob.sync() is False and flushed == []
    ob.put("t", b"4")
    assert ob.sync() is True and flushed == [wal, str(tmp_path / "o.sqlite")]
    assert [e.payload for e in ob.pending()] == [b"3", b"4"]
    ob.close()


def test_a_put_survives_the_process_dying_before_any_sync(tmp_path):
    """kill -9 right after a put, no sync: the commit is in the OS's page cache, so the next process
    finds the alert (only a power cut could undo it, and then the telemetry behind it is redelivered:
    agent.outbox)."""
    path = tmp_path / "o.sqlite"
    code = (f"from agent.outbox import Outbox; import os; ob = Outbox({str(path)!r}); "
            "ob.put_many([('a/1', b'p1', 's/1')]); os._exit(0)")  # no close(), no sync()
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).resolve().parent.parent)
    ob = Outbox(path)
    assert [(e.topic, e.payload, e.state_topic) for e in ob.pending()] == [("a/1", b"p1", "s/1")]
    ob.close()
