"""batchqueue.py alone: queue order, taking from the head (claim, then drop), a claim given
back after an interrupted write, the seal, and the bounds.  Real threads; every wait is bounded."""
import queue
import threading
import time

import pytest

from argo_signals.batchqueue import EntryQueue, Sealed
from argo_signals.entry import INSERT, UPDATE


def e(i):
    return (INSERT, i, float(i))


def payloads(entries):
    return [p for _, p, _ in entries]


def in_thread(fn):
    """Start fn in a thread; returns (thread, result dict filled with 'value' or 'error')."""
    out = {}

    def run():
        start = time.monotonic()
        try:
            out["value"] = fn()
        except BaseException as exc:
            out["error"] = exc
        out["took"] = time.monotonic() - start

    t = threading.Thread(target=run, daemon=True)
    t.start()
    return t, out


def test_every_way_in_keeps_queue_order_and_seq_counts_them():
    q = EntryQueue(10)
    q.put_nowait(e(0))
    assert q.offer(e(1)) is True
    q.put(e(2), timeout=0.1)
    assert q.force_put(e(3)) == 4            # its position
    q.queue.append(e(4))                     # the engine's hot path appends to the deque
    q.put_nowait((UPDATE, 5, 5.0))
    assert q.seq == 6 and q.taken == 0
    assert payloads(q.claim(10)) == [0, 1, 2, 3, 4, 5]


def test_a_writer_takes_from_the_head_and_drop_removes_only_what_it_claimed():
    q = EntryQueue(10)
    for i in range(5):
        q.put_nowait(e(i))
    assert payloads(q.claim(2)) == [0, 1]
    assert q.claimed == 2 and len(q.queue) == 5        # claimed, still queued until written
    assert payloads(q.snapshot_claimed()) == [0, 1]
    q.put_nowait(e(5))                                 # a producer appends meanwhile
    q.drop(2)
    assert q.claimed == 0 and q.taken == 2 and q.seq == 6
    assert payloads(q.claim(10)) == [2, 3, 4, 5]


def test_an_interrupted_write_leaves_its_batch_at_the_head():
    q = EntryQueue(10)
    for i in range(4):
        q.put_nowait(e(i))
    batch = q.claim(3)
    q.put_nowait(e(4))
    q.unclaim()                                        # the write raised: nothing dropped
    assert q.claimed == 0 and q.seq == 5 and q.taken == 0
    assert q.claim(3) == batch                         # the same entries, first again
    q.drop(3)
    assert payloads(q.claim(10)) == [3, 4]


def test_take_unclaimed_leaves_the_claimed_head_to_its_writer():
    q = EntryQueue(10)
    for i in range(5):
        q.put_nowait(e(i))
    q.claim(2)
    assert payloads(q.take_unclaimed()) == [2, 3, 4]
    assert q.taken == 3 and payloads(q.snapshot_claimed()) == [0, 1] and len(q.queue) == 2
    q.drop(2)
    assert q.seq == 5 and len(q.queue) == 0


def test_claim_and_drop_under_concurrent_producers_lose_nothing_and_keep_each_producers_order():
    q = EntryQueue(100_000)
    producers, per = 4, 3000
    written = []

    def produce(k):
        for i in range(per):
            if i % 3 == 0:
                q.queue.append((INSERT, (k, i), 0.0))   # hot path: no mutex
            elif i % 3 == 1:
                assert q.offer((INSERT, (k, i), 0.0))
            else:
                q.put((INSERT, (k, i), 0.0), timeout=1)

    threads = [threading.Thread(target=produce, args=(k,)) for k in range(producers)]
    for t in threads:
        t.start()
    give_up = time.monotonic() + 20
    while (any(t.is_alive() for t in threads) or q.queue) and time.monotonic() < give_up:
        batch = q.claim(50)
        written.extend(p for _, p, _ in batch)
        q.drop(len(batch))
    for t in threads:
        t.join(5)
    assert len(written) == producers * per and q.taken == q.seq == producers * per
    for k in range(producers):
        assert [i for kk, i in written if kk == k] == list(range(per))


def test_offer_and_put_respect_the_bound():
    q = EntryQueue(2)
    assert q.offer(e(0)) and q.offer(e(1))
    assert q.offer(e(2)) is False and q.full()
    with pytest.raises(queue.Full):
        q.put_nowait(e(2))
    start = time.monotonic()
    with pytest.raises(queue.Full):
        q.put(e(2), timeout=0.1)
    assert 0.05 <= time.monotonic() - start < 1.0
    assert q.force_put(e(9)) == 3                      # past the bound: the caller writes it
    assert q.seq == 3


@pytest.mark.parametrize("free", ["drop", "take_unclaimed"])
def test_a_producer_waiting_for_room_gets_in_as_soon_as_the_head_leaves(free):
    q = EntryQueue(2)
    q.put_nowait(e(0))
    q.put_nowait(e(1))
    t, out = in_thread(lambda: q.put(e(2), timeout=3))
    time.sleep(0.1)
    assert t.is_alive()                                # waiting for room
    if free == "drop":
        q.claim(1)
        q.drop(1)
    else:
        q.take_unclaimed()
    t.join(3)
    assert not t.is_alive() and "error" not in out and out["took"] < 1.0
    assert payloads(q.queue)[-1] == 2


def test_seal_refuses_put_and_offer_but_not_force_put():
    q = EntryQueue(5)
    q.put_nowait(e(0))
    q.seal()
    assert q.sealed
    with pytest.raises(Sealed):
        q.put_nowait(e(1))
    with pytest.raises(Sealed):
        q.put(e(1), timeout=0.1)
    assert q.offer(e(1)) is False
    assert q.force_put(e(2)) == 2                      # the caller writes it synchronously
    assert payloads(q.queue) == [0, 2]


def test_seal_wakes_a_producer_waiting_for_room_with_sealed():
    q = EntryQueue(1)
    q.put_nowait(e(0))
    t, out = in_thread(lambda: q.put(e(1), timeout=3))
    time.sleep(0.1)
    assert t.is_alive()
    q.seal()
    t.join(3)
    assert not t.is_alive() and isinstance(out.get("error"), Sealed) and out["took"] < 1.0
    assert payloads(q.queue) == [0]
