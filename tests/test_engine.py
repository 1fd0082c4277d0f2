"""The engine alone, with a fake sink: states, triggers, ordering, put-back, bounded waits."""
import threading
import time

import pytest

from argo_signals.config import Config
from argo_signals.batchqueue import EntryQueue, Sealed
from argo_signals.engine import Engine, State
from argo_signals.entry import INSERT, BatchFate
from argo_signals.stats import Stats

from conftest import wait_for


class FakeSink:
    """Records what it is handed; can be told to raise, hold or be slow."""

    def __init__(self):
        self.written = []
        self.raise_once = None        # an exception instance raised on the next write
        self.hold = False             # answer HELD (nothing could take the batch)
        self.delay = 0.0
        self.closed = 0
        self.lock = threading.Lock()

    def write(self, entries, reason, stop_at):
        if self.raise_once is not None:
            exc, self.raise_once = self.raise_once, None
            raise exc
        if self.hold:
            return BatchFate.HELD
        time.sleep(self.delay)
        with self.lock:
            self.written.extend(p for _, p, _ in entries)
        return BatchFate.COMMITTED

    def replay(self, max_wait=None):
        return True

    def spill_pending(self):
        return False

    def salvage(self, entries, max_wait=None):
        self.salvaged = [p for _, p, _ in entries]
        return BatchFate.HELD

    def close(self):
        self.closed += 1

    def after_fork(self):
        pass

    def tick(self):
        pass


def engine(**options):
    cfg = Config(db_path="unused.db", **{"batch_size": 1_000_000, "batch_timeout": 3600,
                                          "flush_interval": 3600, **options})
    sink = FakeSink()
    e = Engine(cfg, sink, Stats(), threading.Event())
    e.start()
    return e, sink


def put(e, i):
    e.put((INSERT, i, time.monotonic()))


def test_queue_counts_claims_and_seals():
    q = EntryQueue(3)
    for i in range(3):
        q.put_nowait((INSERT, i, 0.0))
    assert q.seq == 3 and q.full()
    batch = q.claim(2)                      # claimed, still queued until written
    assert [p for _, p, _ in batch] == [0, 1] and q.seq == 3 and len(q.queue) == 3
    assert [p for _, p, _ in q.take_unclaimed()] == [2]   # close()'s last resort skips the claim
    q.drop(2)
    assert q.seq == 3 and len(q.queue) == 0
    q.seal()
    with pytest.raises(Sealed):
        q.put_nowait((INSERT, 9, 0.0))
    assert q.force_put((INSERT, 10, 0.0)) == 4


def test_states_open_closing_closed_and_writes_after_close():
    e, sink = engine()
    assert e.state is State.OPEN
    for i in range(5):
        put(e, i)
    assert e.close(5) is True
    assert e.state is State.CLOSED and sink.written == [0, 1, 2, 3, 4]
    put(e, 5)                       # after close: the caller writes
    assert sink.written[-1] == 5 and e.pending() == 0


def test_size_trigger_wakes_the_thread():
    e, sink = engine(batch_size=10)
    for i in range(10):
        put(e, i)
    assert wait_for(lambda: len(sink.written) == 10, 3)
    e.close(5)


def test_timeout_trigger_after_an_idle_spell():
    e, sink = engine(batch_timeout=0.1)
    time.sleep(0.2)                 # the thread is idle and armed
    put(e, 1)
    assert wait_for(lambda: sink.written == [1], 2)
    e.close(5)


def test_keyboard_interrupt_inside_a_write_puts_the_batch_back():
    e, sink = engine(max_queue_size=10, queue_full_timeout=0.0)
    for i in range(10):
        put(e, i)
    sink.raise_once = KeyboardInterrupt()
    with pytest.raises(KeyboardInterrupt):
        put(e, 10)                  # queue full: this caller runs the sink, and is interrupted
    assert e.pending() == 11        # everything taken went back, its own entry too
    assert e.flush(5) is True
    assert sink.written == list(range(11))
    e.close(5)


def test_thread_death_degrades_then_restarts_and_loses_nothing():
    e, sink = engine(batch_size=3)
    sink.raise_once = RuntimeError("boom")
    for i in range(3):
        put(e, i)
    assert wait_for(lambda: e.state is State.DEGRADED, 3)
    put(e, 3)                       # restarts the thread
    assert e.state is State.OPEN
    assert e.flush(5) and sink.written == [0, 1, 2, 3]
    e.close(5)


def test_held_batch_stays_queued_and_close_salvages_it_within_its_timeout():
    e, sink = engine()
    for i in range(4):
        put(e, i)
    sink.hold = True
    assert e.flush(0.5) is False
    start = time.monotonic()
    assert e.close(0.5) is False
    assert time.monotonic() - start < 2.0
    assert sink.salvaged == [0, 1, 2, 3] and e.pending() == 0


def test_many_closers_each_return_after_the_work_is_done():
    e, sink = engine()
    sink.delay = 0.0005
    for i in range(5000):
        put(e, i)
    seen = []

    def closer():
        ok = e.close(30)
        seen.append((ok, len(sink.written)))

    threads = [threading.Thread(target=closer) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert seen == [(True, 5000)] * 6


def test_flush_waits_only_for_what_came_before_it():
    e, sink = engine()
    sink.delay = 0.01
    for i in range(100):
        put(e, i)
    stop = threading.Event()

    def keep_logging():
        i = 100
        while not stop.is_set():
            put(e, i)
            i += 1
            time.sleep(0.001)

    t = threading.Thread(target=keep_logging)
    t.start()
    try:
        assert e.flush(10) is True
        assert sink.written[:100] == list(range(100))
    finally:
        stop.set()
        t.join()
    e.close(10)


def test_fork_child_state_is_degraded_and_writes_synchronously():
    e, sink = engine()
    put(e, 1)
    e.after_fork_in_child()         # as os.register_at_fork would in a child
    assert e.state is State.DEGRADED and e.pending() == 0
    put(e, 2)
    assert sink.written[-1] == 2    # written before put() returned


def test_flush_without_a_timeout_when_the_caller_must_write():
    e, sink = engine()
    e.after_fork_in_child()          # no thread: flush() runs the sink itself
    e._q.force_put((INSERT, 1, time.monotonic()))
    assert e.flush(None) is True     # no deadline at all must not mean an invalid one
    assert sink.written == [1]
