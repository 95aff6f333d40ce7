"""Alert outbox: durable, ordered, acked; survives reopen and corruption."""
from __future__ import annotations

import threading

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


def test_wal_and_full_sync(tmp_path):
    ob = Outbox(tmp_path / "o.sqlite")
    assert ob._db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert ob._db.execute("PRAGMA synchronous").fetchone()[0] == 2  # FULL
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
