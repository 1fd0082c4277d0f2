"""A circuit breaker for an unreachable receiver, and the probe that closes it.

After ``threshold`` consecutive connection failures or timeouts it opens: the sync stops
sending rows and a single probe asks the receiver on an exponential schedule (``probe_base``
doubling up to ``probe_max``).  When the health endpoint answers, the breaker is *half open*:
one row goes out as a trial.  An HTTP answer to that trial closes the breaker; a failure or
timeout opens it again, and the probing goes on where its schedule was (a receiver whose
health check answers but whose posts time out is one outage, not a flapping breaker).  A
rate limit in force (``hold()``: seconds left) delays the next probe until it ends.
Thread-safe; the clock is injectable for tests.
"""
from __future__ import annotations

import enum
import threading
import time
from typing import Callable, Optional

__all__ = ["State", "Breaker", "Prober"]


class State(str, enum.Enum):
    CLOSED = "closed"         # sending normally
    OPEN = "open"             # unreachable: only the probe asks
    HALF_OPEN = "half_open"   # the probe got an answer: one row goes out as a trial


class Breaker:
    def __init__(self, threshold: int = 3, probe_base: float = 0.25, probe_max: float = 30.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.threshold = max(1, threshold)
        self.probe_base = probe_base
        self.probe_max = probe_max
        self.clock = clock
        self._lock = threading.Lock()
        self.state = State.CLOSED
        self.failures = 0               # consecutive, while closed
        self.opened_at: Optional[float] = None
        self.reason = ""
        self._probes = 0
        self._trial_out = False
        self.changed = threading.Event()   # set when a trial settles (closed, or open again)

    @property
    def is_open(self) -> bool:
        """Rows must not be sent (open, or half open with its trial taken or not)."""
        return self.state is not State.CLOSED

    def half_open(self) -> bool:
        """The probe got an answer: let one trial row through.  False unless it was open."""
        with self._lock:
            if self.state is not State.OPEN:
                return False
            self.state = State.HALF_OPEN
            self._trial_out = False
            self.changed.clear()
            return True

    def take_trial(self) -> bool:
        """True for the one caller that may send the trial row while half open."""
        with self._lock:
            if self.state is not State.HALF_OPEN or self._trial_out:
                return False
            self._trial_out = True
            return True

    def return_trial(self) -> None:
        """The trial was taken but nothing was sent (the row needed no request)."""
        with self._lock:
            self._trial_out = False

    @property
    def trial_free(self) -> bool:
        return self.state is State.HALF_OPEN and not self._trial_out

    def failure(self, reason: str) -> bool:
        """Record a connection failure or timeout; True if this one opened the breaker."""
        with self._lock:
            self.reason = reason
            if self.state is State.OPEN:
                return False
            if self.state is State.HALF_OPEN:  # the trial failed: open again, same outage
                self.state = State.OPEN
                self.changed.set()
                return False
            self.failures += 1
            if self.failures < self.threshold:
                return False
            self.state = State.OPEN
            self.opened_at = self.clock()
            self._probes = 0
            return True

    def success(self) -> bool:
        """Record an answer (any HTTP status); True if this one closed the breaker."""
        with self._lock:
            self.failures = 0
            if self.state is State.CLOSED:
                return False
            self.state = State.CLOSED
            self.opened_at = None
            self.changed.set()
            return True

    def next_probe_delay(self) -> float:
        """Seconds until the next probe: base, 2*base, 4*base... capped at ``probe_max``."""
        with self._lock:
            n = self._probes
            self._probes += 1
        return min(self.probe_max, self.probe_base * (2 ** min(n, 30)))

    def open_for(self) -> float:
        """Seconds the breaker has been open (0 when closed)."""
        opened = self.opened_at
        return 0.0 if opened is None else max(0.0, self.clock() - opened)


class Prober:
    """While the breaker is open, one daemon thread asks the receiver on the breaker's schedule.

    ``ask()`` returns None when the receiver answered, else why not.  ``on_open(reason)`` runs
    once per outage when the probing starts; ``on_answer(seconds_down)`` once when it ends.
    """

    def __init__(self, breaker: Breaker, ask: Callable[[], Optional[str]], stopping: threading.Event,
                 on_open: Callable[[str], None], on_answer: Callable[[float], None],
                 on_trial: Callable[[], None] = lambda: None,
                 hold: Callable[[], float] = lambda: 0.0) -> None:
        self.breaker = breaker
        self.hold = hold
        self.ask = ask
        self.stopping = stopping
        self.on_open = on_open
        self.on_answer = on_answer
        self.on_trial = on_trial
        self._lock = threading.Lock()
        self._thread: Optional[threading.Thread] = None

    def ensure(self) -> None:
        """Start probing unless a probe is running already (or the sync stops)."""
        with self._lock:
            if self._thread is not None or self.stopping.is_set() or not self.breaker.is_open:
                return
            self._thread = threading.Thread(target=self._loop, name="argo-signals-probe", daemon=True)
        self.on_open(self.breaker.reason)
        self._thread.start()

    def _wait_trial(self) -> bool:
        """Wait until the trial row settles (the breaker closes or opens again); True when the
        sync stops."""
        while not self.breaker.changed.wait(0.05):
            if self.stopping.is_set():
                return True
        return False

    def _loop(self) -> None:
        started = self.breaker.clock()
        try:
            while not self.stopping.wait(max(self.breaker.next_probe_delay(), self.hold())):
                if self.hold() > 0:   # a rate limit set meanwhile: wait for its end first
                    continue
                if self.breaker.state is State.OPEN:  # (a delivery may have got an answer meanwhile)
                    why = self.ask()
                    if why is not None:
                        self.breaker.reason = why
                        continue
                    if self.breaker.half_open():
                        self.on_trial()
                        if self._wait_trial():
                            return
                if self.breaker.state is State.OPEN:
                    continue  # the trial failed: the same outage, the schedule goes on
                self.on_answer(self.breaker.clock() - started)
                return
        finally:
            with self._lock:
                self._thread = None
            if self.breaker.is_open and not self.stopping.is_set():
                self.ensure()  # a new outage began while this probe was ending
