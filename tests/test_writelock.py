"""writelock.py alone: one writer at a time, deadlines, reserve(), the nested-write rule, and
taking back a lock left held by an interrupted acquire (by generation), never from a live holder.
Real threads; every wait is bounded."""
import threading
import time

import pytest

from argo_signals import writelock
from argo_signals.writelock import WriteLock, seconds_until


class Holder:
    """A thread that takes the lock through acquire() and keeps it until told to let go."""

    def __init__(self, wl, how="acquire"):
        self.wl, self.how = wl, how
        self.got = threading.Event()
        self.let_go = threading.Event()
        self.error = None
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()
        assert self.got.wait(2)

    def _run(self):
        try:
            if self.how == "call":
                def work():
                    assert self.wl.busy
                    self.got.set()
                    self.let_go.wait(5)
                got, _ = self.wl.call(time.monotonic() + 2, work)
                assert got
            else:
                assert self.wl.acquire(time.monotonic() + 2)
                self.got.set()
                self.let_go.wait(5)
                self.wl.release()
        except BaseException as exc:  # seen by the test through .error
            self.error = exc

    def stop(self):
        self.let_go.set()
        self.thread.join(5)
        assert not self.thread.is_alive()


def in_thread(fn):
    """Run fn in a thread; return (its result, seconds it took)."""
    out = {}

    def run():
        start = time.monotonic()
        out["value"] = fn()
        out["took"] = time.monotonic() - start

    t = threading.Thread(target=run, daemon=True)
    t.start()
    t.join(10)
    assert not t.is_alive()
    return out["value"], out["took"]


def test_acquire_waits_until_its_deadline_then_gets_the_lock_once_it_is_free():
    wl = WriteLock()
    h = Holder(wl)
    got, took = in_thread(lambda: wl.acquire(time.monotonic() + 0.2))
    assert got is False and 0.15 <= took < 1.0
    got, took = in_thread(lambda: wl.acquire(time.monotonic() + 0.05))
    assert got is False and took < 0.2      # its last wait is cut to the deadline
    h.stop()
    assert h.error is None
    got, took = in_thread(lambda: wl.acquire(time.monotonic() + 0.5) and (wl.release() or True))
    assert got is True and took < 0.2


def test_a_passed_deadline_does_not_wait():
    wl = WriteLock()
    h = Holder(wl)
    got, took = in_thread(lambda: wl.acquire(time.monotonic() - 1.0))
    assert got is False and took < 0.1
    h.stop()


def test_call_marks_busy_returns_the_result_and_releases_even_on_an_exception():
    wl = WriteLock()
    assert wl.call(time.monotonic() + 1, lambda: (wl.busy, wl.nested_here())) == (True, (True, True))
    assert not wl.busy and not wl.nested_here()

    def interrupted():
        assert wl.busy and wl.nested_here()
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        wl.call(time.monotonic() + 1, interrupted)
    assert not wl.busy and not wl.nested_here()
    got, took = in_thread(lambda: wl.acquire(time.monotonic() + 0.3) and (wl.release() or True))
    assert got is True and took < 0.2   # released: another thread gets it at once


def test_call_that_times_out_neither_runs_nor_releases_the_holders_lock():
    wl = WriteLock()
    h = Holder(wl, how="call")
    ran = []
    got, _ = in_thread(lambda: wl.call(time.monotonic() + 0.1, lambda: ran.append(1)))
    assert got == (False, None) and ran == []
    got, _ = in_thread(lambda: wl.acquire(time.monotonic() + 0.1))
    assert got is False          # the holder still holds it
    h.stop()
    assert h.error is None       # its own release found the lock still held


def test_nested_acquire_inside_a_write_of_the_same_thread_fails_at_once_and_keeps_the_outer_lock():
    wl = WriteLock()
    seen = {}

    def outer():
        start = time.monotonic()
        ran = []
        # as a signal handler would, on this thread
        seen["inner"] = wl.call(time.monotonic() + 1, lambda: ran.append(1))
        seen["ran"] = ran
        seen["acquire"] = wl.acquire(time.monotonic() + 1)
        seen["fast"] = time.monotonic() - start < 0.1
        seen["still"] = wl.nested_here() and wl.busy   # the outer write still holds it
        seen["other"], _ = in_thread(lambda: wl.acquire(time.monotonic() + 0.1))

    assert wl.call(time.monotonic() + 1, outer)[0]
    assert seen == {"inner": (False, None), "ran": [], "acquire": False, "fast": True, "still": True,
                    "other": False}
    assert not wl.nested_here()


def test_a_lock_this_thread_left_held_without_busy_is_taken_back_by_this_thread():
    wl = WriteLock()
    assert wl.acquire(float("inf"))    # as if a Ctrl-C landed before busy was set: never released
    assert not wl.nested_here()
    start = time.monotonic()
    assert wl.acquire(time.monotonic() + 1) is True
    assert time.monotonic() - start < 0.1
    wl.release()
    got, _ = in_thread(lambda: wl.acquire(time.monotonic() + 0.3) and (wl.release() or True))
    assert got is True


def test_a_lock_left_ownerless_is_taken_back_after_the_grace_but_not_before():
    wl = WriteLock()
    wl._lock.acquire()   # an acquire interrupted after Lock.acquire(), before its owner was set
    got, took = in_thread(lambda: wl.acquire(time.monotonic() + 0.6))
    assert got is False                      # not within the grace
    got, took = in_thread(lambda: wl.acquire(time.monotonic() + writelock.OWNERLESS_GRACE + 1.5))
    assert got is True and took < writelock.OWNERLESS_GRACE + 1.5
    assert wl.nested_here() is False
    wl.release()


def test_a_live_holder_is_never_taken_from_however_long_it_holds():
    wl = WriteLock()
    h = Holder(wl)
    got, took = in_thread(lambda: wl.acquire(time.monotonic() + writelock.OWNERLESS_GRACE + 0.5))
    assert got is False and took >= writelock.OWNERLESS_GRACE + 0.4
    h.stop()
    assert h.error is None


def test_ownerless_glimpses_in_two_generations_do_not_add_up():
    """Seen ownerless for 0.7 s, then (a new acquire later) ownerless again: more than the grace
    in all, less within either generation, so the lock is not taken back."""
    wl = WriteLock()
    wl._lock.acquire()                       # ownerless, generation g
    result = {}
    t = threading.Thread(target=lambda: result.setdefault(
        "got", wl.acquire(time.monotonic() + writelock.OWNERLESS_GRACE + 0.6)), daemon=True)
    t.start()
    for _ in range(2):                       # 0.7 s ownerless in generation g
        time.sleep(0.35)
    wl._generation += 1                      # as a later holder's acquire does; ownerless again
    t.join(5)
    assert not t.is_alive() and result["got"] is False
    got, _ = in_thread(lambda: wl.acquire(time.monotonic() + writelock.OWNERLESS_GRACE + 1.5))
    assert got is True                       # within one generation it is taken back
    wl.release()


def test_a_reservation_goes_ahead_of_the_holder_taking_the_lock_again_at_once():
    wl = WriteLock()
    assert wl.acquire(float("inf"))
    out = {}

    def fork_hook():   # as lifecycle's before-fork hook: reserve, hold a moment, let go
        out["reserved"] = wl.reserve(time.monotonic() + 3)
        time.sleep(0.4)
        wl.release()

    r = threading.Thread(target=fork_hook, daemon=True)
    r.start()
    time.sleep(0.2)                   # the reserver is waiting for the lock
    wl.release()
    again = wl.acquire(time.monotonic() + 0.2)   # at once, as a writer in a loop would
    if again:
        wl.release()
    r.join(5)
    assert not r.is_alive() and out["reserved"] is True
    assert again is False             # it waited for the reserver instead


def test_reserve_goes_ahead_of_a_writer_that_releases_and_takes_the_lock_in_a_loop():
    wl = WriteLock()
    stop = threading.Event()
    rounds = [0]

    def busy_writer():
        while not stop.is_set():
            def work():
                rounds[0] += 1
                t = time.monotonic() + 0.002
                while time.monotonic() < t:   # work under the lock, the GIL passes meanwhile
                    pass

            wl.call(time.monotonic() + 5, work)

    w = threading.Thread(target=busy_writer, daemon=True)
    w.start()
    try:
        for _ in range(3):
            start = time.monotonic()
            assert wl.reserve(time.monotonic() + 0.5) is True
            took = time.monotonic() - start
            before = rounds[0]
            time.sleep(0.05)
            assert rounds[0] == before       # the writer waits while this thread holds it
            wl.release()
            assert took < 0.3
    finally:
        stop.set()
        w.join(5)
    assert not w.is_alive() and rounds[0] > 0


def test_seconds_until_is_never_negative_nor_past_the_timeout_max():
    assert seconds_until(time.monotonic() - 5) == 0.0
    assert seconds_until(float("inf")) == threading.TIMEOUT_MAX
    assert 0.9 < seconds_until(time.monotonic() + 1.0) <= 1.0
