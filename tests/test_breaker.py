"""The circuit breaker (``breaker.py``): when it opens, the probe's capped exponential schedule,
one probe per outage, and the trial row that closes it or opens it again."""
import time

from argo_signals.breaker import Breaker, Prober


def test_breaker_opens_after_the_threshold_and_probes_on_a_capped_exponential_schedule():
    now = [100.0]
    b = Breaker(threshold=3, probe_base=0.5, probe_max=4.0, clock=lambda: now[0])
    assert not b.failure("refused") and not b.failure("refused")
    b.success()                                   # an answer resets the count
    assert not b.failure("refused") and not b.failure("refused") and b.failure("refused")
    assert b.is_open and not b.failure("refused")  # opens once
    assert [b.next_probe_delay() for _ in range(6)] == [0.5, 1.0, 2.0, 4.0, 4.0, 4.0]
    now[0] += 12.0
    assert b.open_for() == 12.0
    assert b.success() and not b.is_open and not b.success()


def test_one_probe_per_outage_until_an_answer():
    import threading
    b = Breaker(threshold=1, probe_base=0.01, probe_max=0.02)
    answers = iter(["refused", "refused", None])
    opened, answered, stopping = [], [], threading.Event()
    p = Prober(b, lambda: next(answers), stopping, opened.append, answered.append,
               on_trial=lambda: b.take_trial() and b.success())   # the trial row gets an answer
    assert b.failure("refused")
    for _ in range(3):
        p.ensure()                     # idempotent while probing
    deadline = time.monotonic() + 5
    while not answered and time.monotonic() < deadline:
        time.sleep(0.01)
    assert opened == ["refused"] and len(answered) == 1 and not b.is_open
    p.ensure()                         # closed: nothing to probe
    time.sleep(0.05)
    assert opened == ["refused"]


def test_a_failed_trial_opens_the_breaker_again_without_a_second_warning():
    """The health check answers but the trial row times out: the same outage goes on (one
    on_open, no on_answer) and the probe's delay keeps growing; the next trial closes it."""
    import threading
    b = Breaker(threshold=1, probe_base=0.01, probe_max=10.0)
    opened, answered, trials, stopping = [], [], [], threading.Event()

    def trial():
        trials.append(b.next_probe_delay())
        assert b.take_trial() and not b.take_trial()   # one trial at a time
        if len(trials) < 3:
            b.failure("timed out")
        else:
            b.success()
    p = Prober(b, lambda: None, stopping, opened.append, answered.append, on_trial=trial)
    assert b.failure("timed out")
    p.ensure()
    deadline = time.monotonic() + 5
    while not answered and time.monotonic() < deadline:
        time.sleep(0.01)
    stopping.set()
    assert opened == ["timed out"] and len(answered) == 1 and not b.is_open
    assert len(trials) == 3 and trials[0] < trials[1] < trials[2]
