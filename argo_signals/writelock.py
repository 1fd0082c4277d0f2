"""The engine's write lock: one writer at a time, and no lock lost to an interrupted acquire.

A Ctrl-C (or SIGTERM turned into ``SystemExit``) on the main thread can land between a
successful ``Lock.acquire()`` and the ``try`` that would release it, leaving the lock held by
nobody at work.  ``WriteLock`` records its owner, and the holder marks ``busy`` as the first
thing inside its ``try``.  A lock held by this thread but not busy was leaked, and is taken
back when this thread comes to write again; a lock held for a second with no owner recorded
is taken back by anyone.  A lock held by this thread *and* busy belongs to a write that a
signal handler interrupted on this same thread: a nested ``acquire()`` then fails at once
(the nested caller must not write under it).

"Held for a second with no owner" means: seen ownerless at every look for a second, within one
generation of the lock (each successful acquire starts a new one).  A glimpse of a holder in
the few bytecodes between its acquire and its owner assignment (or between clearing the owner
and releasing) must never add up with a later glimpse of another holder: taking the lock from a
live holder would put two writers on one connection.
"""
from __future__ import annotations

import logging
import threading
import time
from typing import Callable, Optional, Tuple, TypeVar

log = logging.getLogger("argo_signals")

__all__ = ["WriteLock", "seconds_until"]

T = TypeVar("T")

OWNERLESS_GRACE = 1.0


def seconds_until(deadline: float) -> float:
    """A timeout for ``Lock.acquire``: never negative, never past ``threading.TIMEOUT_MAX``."""
    return min(max(0.0, deadline - time.monotonic()), threading.TIMEOUT_MAX)


class WriteLock:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._owner: Optional[int] = None
        self._reserved: Optional[Tuple[int, float]] = None   # (thread, until): see reserve()
        self._generation = 0                                  # successful acquires so far
        self._suspect: Optional[Tuple[int, float]] = None     # (generation, since): seen ownerless
        self._take_back_guard = threading.Lock()               # one waiter takes a lock back
        self.busy = False

    def reserve(self, deadline: float) -> bool:
        """``acquire()`` ahead of everyone else: until ``deadline``, other threads wait for this
        one instead of taking the lock as soon as it is free (a lock is not fair: a writer
        releasing and taking it again in a loop would keep a fork waiting)."""
        self._reserved = (threading.get_ident(), deadline)
        try:
            return self.acquire(deadline)
        finally:
            self._reserved = None

    def acquire(self, deadline: float) -> bool:
        """Take the lock by ``deadline`` (monotonic seconds; ``inf`` waits as long as it takes)."""
        me = threading.get_ident()
        if self._owner == me:
            if self.busy:
                return False   # nested in a write of this thread (a signal handler)
            self.release()
        while True:
            reserved = self._reserved
            if reserved is not None and reserved[0] != me and time.monotonic() < reserved[1]:
                if time.monotonic() >= deadline:
                    return False
                time.sleep(0.0005)   # someone reserved the lock: let it go first
                continue
            if self._lock.acquire(timeout=min(0.25, seconds_until(deadline))):
                self._owner = me
                self._generation += 1
                return True
            self._look_for_a_leak()
            if time.monotonic() >= deadline:
                return False

    def _look_for_a_leak(self) -> None:
        """Take the lock back when it has been seen held by nobody, in one generation, at every
        look for ``OWNERLESS_GRACE`` seconds."""
        if not self._take_back_guard.acquire(blocking=False):
            return   # another waiter is looking
        try:
            now, generation = time.monotonic(), self._generation
            if self._owner is not None or not self._lock.locked():
                self._suspect = None
            elif self._suspect is None or self._suspect[0] != generation:
                self._suspect = (generation, now)
            elif now - self._suspect[1] > OWNERLESS_GRACE:
                log.error("the write lock was left held by an interrupted write; taking it back")
                self._suspect = None
                self._generation += 1
                self._lock.release()
        finally:
            self._take_back_guard.release()

    def nested_here(self) -> bool:
        """True inside a signal handler that interrupted this thread's own write."""
        return self.busy and self._owner == threading.get_ident()

    def release(self) -> None:
        self.busy = False
        self._owner = None
        self._lock.release()

    def call(self, deadline: float, work: Callable[[], T]) -> Tuple[bool, Optional[T]]:
        """The one way the engine runs under this lock: ``(True, work())`` once the lock is
        taken by ``deadline``, ``(False, None)`` when it is not (the deadline passed first, or
        this is a signal handler nested in a write of its own thread, ``nested_here()``).

        ``busy`` is marked as the first statement inside the ``try`` whose ``finally`` releases:
        a Ctrl-C can then only land inside ``acquire()`` (a lock left held by nobody, taken back
        by generation) or inside the ``try`` (released on the way out).  A context manager
        would mark it in ``__enter__``, before the ``with`` body is entered, and Python 3.9
        also runs signal handlers after an attribute store: a Ctrl-C there left the lock held
        and busy for good, and every later write of that thread counted as nested."""
        if not self.acquire(deadline):
            return False, None
        try:
            self.busy = True
            return True, work()
        finally:
            self.release()
