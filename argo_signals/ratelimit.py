"""The receiver's rate limit, held for the whole sync (every worker, the pump and the probe).

A 429 (or a 503 with ``Retry-After``) says *the sender* must wait, not one signal: ``hold()``
pauses every request until then.  When the pause is over, one request goes out alone as a
test; the others wait until it is answered (a receiver still limiting gets one request per
pause, not one per worker).  Thread-safe; the clock is injectable for tests.
"""
from __future__ import annotations

import enum
import threading
import time
from typing import Callable

__all__ = ["Gate", "GateState"]


class GateState(str, enum.Enum):
    FREE = "free"          # requests go out
    PAUSED = "paused"      # nothing goes out until the pause ends
    TESTING = "testing"    # the pause ended: one request is out, the rest wait for its answer


class Gate:
    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self.clock = clock
        self._lock = threading.Lock()
        self.state = GateState.FREE
        self.until = 0.0

    def hold(self, seconds: float) -> None:
        """Pause every request for ``seconds`` (a longer pause already set stays)."""
        with self._lock:
            until = self.clock() + max(0.0, seconds)
            self.until = max(until, self.until) if self.state is GateState.PAUSED else until
            self.state = GateState.PAUSED

    def remaining(self) -> float:
        """Seconds until the pause ends (0 when free or when the pause is over)."""
        with self._lock:
            if self.state is not GateState.PAUSED:
                return 0.0
            return max(0.0, self.until - self.clock())

    @property
    def closed(self) -> bool:
        """Nothing may be claimed now: paused, or the one test request is out."""
        with self._lock:
            return self.state is GateState.TESTING or (
                self.state is GateState.PAUSED and self.clock() < self.until)

    @property
    def testing_next(self) -> bool:
        """The pause is over and its test request has not gone yet: claim one row only."""
        with self._lock:
            return self.state is GateState.PAUSED and self.clock() >= self.until

    def admit(self) -> bool:
        """May a request go out now?  After a pause, True for exactly one caller (the test)."""
        with self._lock:
            if self.state is GateState.FREE:
                return True
            if self.state is GateState.PAUSED and self.clock() >= self.until:
                self.state = GateState.TESTING
                return True
            return False

    def answered(self) -> None:
        """An answer that is not a rate limit came: requests go out freely again."""
        with self._lock:
            if self.state is not GateState.PAUSED:
                self.state = GateState.FREE

    def no_answer(self) -> None:
        """The test request got no answer (the breaker takes over): free the gate."""
        with self._lock:
            if self.state is GateState.TESTING:
                self.state = GateState.FREE
