"""The pipeline's intake hand-off: backpressure instead of loss, order kept, bounded when wedged."""
from __future__ import annotations

import threading
import time

from agent.pipeline import Handoff


def _item(i: int, size: int = 10):
    return ("t", b"x" * size, float(i), i)


def test_full_queue_holds_the_producer_until_the_consumer_makes_room():
    h = Handoff(maxsize=3, full_wait=5.0)
    results = []
    producer = threading.Thread(target=lambda: results.extend(h.put(_item(i)) for i in range(10)))
    producer.start()
    got = []
    deadline = time.monotonic() + 10
    while len(got) < 10 and time.monotonic() < deadline:
        time.sleep(0.02)  # a slow consumer: the producer must wait, not drop
        got += h.take(2)
    producer.join(5)
    assert results == [True] * 10
    assert [it[3] for it in got] == list(range(10))
    assert h.bytes_in - h.bytes_out == 0


def test_wedged_consumer_costs_full_wait_then_a_drop():
    h = Handoff(maxsize=2, full_wait=0.05)
    assert h.put(_item(0)) and h.put(_item(1))
    t = time.monotonic()
    assert h.put(_item(2)) is False
    assert 0.04 <= time.monotonic() - t < 2
    assert h.qsize() == 2


def test_byte_bound_and_batched_wake_up():
    h = Handoff(maxsize=100, max_bytes=25, full_wait=0.01)
    assert h.put(_item(0, 20)) and h.put(_item(1, 10))  # 30 bytes queued: now full by bytes
    assert h.put(_item(2, 1)) is False
    assert [it[3] for it in h.take(10)] == [0, 1]
    # A consumer waiting for 3 items is not woken by 1 (it sleeps to its deadline), and is by 3.
    woke = []
    waiter = threading.Thread(target=lambda: woke.append(h.wait(2.0, wake_at=3)))
    t = time.monotonic()
    waiter.start()
    time.sleep(0.05)
    h.put(_item(3, 1))
    time.sleep(0.05)
    assert not woke
    h.put(_item(4, 1))
    h.put(_item(5, 1))
    waiter.join(2)
    assert woke == [True] and time.monotonic() - t < 1.0
