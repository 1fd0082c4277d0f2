"""The receiver's rate limit as the Gate holds it (argo_signals/ratelimit.py), on its own.

The clock is injected, so every pause is exact and no test sleeps; the one test that races
real threads only checks how many of them are let through.
"""
import threading
import time

import pytest

from argo_signals.alpine import Kind
from argo_signals.ratelimit import Gate, GateState


class Clock:
    def __init__(self, now=1000.0):
        self.now = now

    def __call__(self):
        return self.now


@pytest.fixture
def clock():
    return Clock()


@pytest.fixture
def gate(clock):
    return Gate(clock=clock)


def test_a_new_gate_lets_every_request_out(gate):
    assert gate.state is GateState.FREE
    assert not gate.closed and not gate.testing_next and gate.remaining() == 0.0
    assert all(gate.admit() for _ in range(5))
    assert gate.state is GateState.FREE


def test_hold_pauses_every_request_for_exactly_that_long(gate, clock):
    gate.hold(10.0)
    assert gate.closed and gate.remaining() == 10.0 and not gate.testing_next
    assert [gate.admit() for _ in range(3)] == [False, False, False]
    clock.now += 9.5
    assert gate.closed and gate.remaining() == pytest.approx(0.5) and not gate.admit()
    clock.now += 0.5   # the pause ends at its very instant
    assert not gate.closed and gate.remaining() == 0.0 and gate.testing_next


def test_a_negative_wait_is_clamped_to_no_wait_but_still_a_pause(gate, clock):
    gate.hold(-30.0)
    assert gate.until == clock.now          # not in the past: the pause ends now
    assert gate.remaining() == 0.0 and not gate.closed
    assert gate.testing_next                # "retry now" still sends only one request
    assert gate.admit() and not gate.admit()


def test_a_longer_pause_already_set_stays(gate, clock):
    gate.hold(30.0)
    clock.now += 5.0
    gate.hold(2.0)                          # a shorter Retry-After from another worker
    assert gate.remaining() == 25.0
    gate.hold(40.0)                         # a longer one extends the pause
    assert gate.remaining() == 40.0


def test_a_pause_that_ended_is_replaced_not_kept(gate, clock):
    gate.hold(5.0)
    clock.now += 10.0                       # over, and its test request has not gone yet
    gate.hold(3.0)
    assert gate.remaining() == 3.0 and gate.closed


def test_after_the_pause_exactly_one_request_goes_out_as_the_test(gate, clock):
    gate.hold(1.0)
    clock.now += 1.0
    assert gate.admit() is True
    assert gate.state is GateState.TESTING
    assert gate.closed and not gate.testing_next and gate.remaining() == 0.0
    clock.now += 3600.0                     # however long its answer takes, the rest wait
    assert [gate.admit() for _ in range(4)] == [False] * 4


def test_an_answer_to_the_test_frees_the_gate(gate, clock):
    gate.hold(1.0)
    clock.now += 1.0
    assert gate.admit()
    gate.answered()
    assert gate.state is GateState.FREE and not gate.closed
    assert all(gate.admit() for _ in range(3))


def test_a_test_answered_by_another_rate_limit_pauses_again(gate, clock):
    gate.hold(1.0)
    clock.now += 1.0
    assert gate.admit()
    gate.hold(7.0)                          # the test request got a 429 again
    assert gate.state is GateState.PAUSED and gate.remaining() == 7.0 and not gate.admit()
    clock.now += 7.0
    assert gate.admit() and not gate.admit()   # one request per pause, not one per worker


def test_an_answer_during_the_pause_does_not_end_it(gate, clock):
    # (a request sent before the 429 came back with a 200 while the pause runs)
    gate.hold(10.0)
    gate.answered()
    assert gate.state is GateState.PAUSED and gate.remaining() == 10.0 and not gate.admit()
    gate.no_answer()
    assert gate.state is GateState.PAUSED and gate.remaining() == 10.0


def test_a_test_without_an_answer_frees_the_gate_for_the_breaker(gate, clock):
    gate.hold(1.0)
    clock.now += 1.0
    assert gate.admit()
    gate.no_answer()
    assert gate.state is GateState.FREE and gate.admit()


def test_no_answer_when_free_changes_nothing(gate):
    gate.no_answer()
    gate.answered()
    assert gate.state is GateState.FREE and gate.admit()


def test_remaining_never_goes_negative(gate, clock):
    gate.hold(2.0)
    clock.now += 50.0
    assert gate.remaining() == 0.0


def test_threads_racing_after_a_pause_send_one_test_request(clock):
    gate = Gate(clock=clock)
    for _ in range(20):
        gate.hold(1.0)
        clock.now += 1.0
        start = threading.Barrier(8)
        admitted = []

        def worker(start, admitted):
            start.wait(5)
            admitted.append(gate.admit())

        threads = [threading.Thread(target=worker, args=(start, admitted)) for _ in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(5)
        assert not any(t.is_alive() for t in threads)
        assert sorted(admitted) == [False] * 7 + [True]
        gate.answered()


def test_the_default_clock_is_the_monotonic_one():
    gate = Gate()
    assert gate.clock is time.monotonic
    gate.hold(0.05)
    assert gate.closed and 0.0 < gate.remaining() <= 0.05
    time.sleep(0.06)
    assert not gate.closed and gate.admit() and not gate.admit()


# -- what a receiver's answer holds the gate for (the Retry-After clamp), over real HTTP --------
KEY = "rate-limit-test-key-0123456789"


@pytest.fixture
def receiver():
    from argo_signals.testing import AlpineServer
    server = AlpineServer(KEY).start()
    yield server
    server.stop()


def delivery_to(server, gate, **cfg):
    from argo_signals.breaker import Breaker
    from argo_signals.delivery import Delivery, Redactor
    from argo_signals.sync import SyncConfig
    config = SyncConfig(server.url, KEY, timeout=(1.0, 1.0), **cfg)
    return Delivery(config, Breaker(100), threading.Event(), Redactor([KEY]), gate=gate)


@pytest.mark.parametrize("status,retry_after,held", [
    (429, "7", 7.0),
    (429, "3600", 30.0),                            # clamped to max_retry_after
    (429, "0", 1.0),                                # "retry now" still pauses the shortest pause
    (429, "Thu, 01 Jan 1970 00:00:00 GMT", 1.0),    # a date already past, likewise
    (429, None, 5.0),                               # no Retry-After: max_backoff
    (429, "soon", 5.0),                             # an unusable one, likewise
    (503, "12", 12.0),                              # a proxy's 503 that says when
])
def test_a_rate_limit_answer_holds_the_gate_for_its_clamped_wait(receiver, clock, status, retry_after, held):
    gate = Gate(clock=clock)
    receiver.fail(status, headers=None if retry_after is None else {"Retry-After": retry_after})
    answer = delivery_to(receiver, gate).post(b"{}")
    assert answer.retry_after is None or answer.retry_after >= 0
    assert gate.state is GateState.PAUSED and gate.remaining() == held


@pytest.mark.parametrize("status", [200, 422, 500, 503])
def test_an_answer_that_is_not_a_rate_limit_does_not_hold_the_gate(receiver, clock, status):
    gate = Gate(clock=clock)
    receiver.fail(status, body={"status": "success"} if status == 200 else None)
    delivery_to(receiver, gate).post(b"{}")
    assert gate.state is GateState.FREE and gate.remaining() == 0.0 and not gate.closed


def test_during_the_pause_nothing_is_sent_then_one_test_goes_while_the_rest_wait(receiver, clock):
    gate = Gate(clock=clock)
    delivery = delivery_to(receiver, gate, max_retry_after=2.0)
    receiver.fail(429, headers={"Retry-After": "60"})
    delivery.post(b"{}")
    assert len(receiver.requests) == 1 and gate.remaining() == 2.0
    held = delivery.post(b"{}")                    # refused here, not sent
    assert held.kind is Kind.RATE_LIMITED and held.retry_after == 2.0
    assert len(receiver.requests) == 1

    clock.now += 2.0
    receiver.delay = 0.2                            # the test request takes a while to answer
    receiver.fail(200, body={"status": "success"})
    test = threading.Thread(target=delivery.post, args=(b"{}",))
    test.start()
    try:
        assert wait_until(lambda: gate.state is GateState.TESTING)
        other = delivery.post(b"{}")                # another worker meanwhile: waits
        assert other.kind is Kind.RATE_LIMITED
    finally:
        test.join(5)
    assert not test.is_alive()
    assert len(receiver.requests) == 2 and gate.state is GateState.FREE
    receiver.delay = 0.0
    receiver.fail(200, body={"status": "success"})
    assert delivery.post(b"{}").kind is Kind.SYNCED and len(receiver.requests) == 3


def wait_until(pred, timeout=5.0):
    deadline = time.monotonic() + timeout
    while not pred():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.002)
    return True
