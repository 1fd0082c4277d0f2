"""The engine's queue: a ``queue.Queue`` that counts, seals, and is drained in bulk.

Producers append (the engine's hot path appends to ``queue`` directly, see ``Engine.put``;
the blocking ``put(timeout=)`` gives back-pressure); whoever runs the sink claims a batch
at the head under ``mutex`` and drops it only once written, so an interrupted write leaves it
queued (``claim``, ``drop``, ``unclaim``).
"""
from __future__ import annotations

import itertools
import queue
from typing import List

from .entry import Entry

__all__ = ["EntryQueue", "Sealed"]


class Sealed(Exception):
    """put() on a queue that close() has sealed: the caller writes synchronously."""


class EntryQueue(queue.Queue):  # type: ignore[type-arg]
    """``queue.Queue`` with a running count, a seal, and a claim on its head.

    ``seq`` (entries ever queued, in queue order) is ``taken + len(queue)``, so appending
    costs no counter.  ``seal()`` sets ``limit`` to 0, and the stdlib's blocking ``put()``
    then meets ``Sealed``.  A writer *claims* the head (``claim``), writes it, and only then
    ``drop``s it: an exception or a Ctrl-C at any point of a write leaves the entries queued
    (writing them twice is harmless: a re-logged signal with the same content is a no-op).
    """

    def __init__(self, maxsize: int) -> None:
        super().__init__(maxsize)
        self.taken = 0
        self.limit = maxsize
        self.sealed = False
        self.claimed = 0      # head entries a writer is writing now

    @property
    def seq(self) -> int:
        with self.mutex:
            return self.taken + len(self.queue)

    def _qsize(self) -> int:  # sealed: waiting producers wake and meet Sealed in _put
        return 0 if self.sealed else len(self.queue)

    def _put(self, item: Entry) -> None:
        if self.sealed:
            raise Sealed
        self.queue.append(item)

    def offer(self, item: Entry) -> bool:
        """Append if there is room and no seal, without waiting.  Unlike ``put(block=False)``
        it takes only the C-level mutex (no ``Condition`` Python code), so a Ctrl-C on the main
        thread cannot leave the mutex held."""
        with self.mutex:
            if len(self.queue) >= self.limit:
                return False
            self.queue.append(item)
            return True

    def force_put(self, item: Entry) -> int:
        """Queue past the bound and the seal; returns the entry's position (its ``seq``)."""
        with self.mutex:
            self.queue.append(item)
            return self.taken + len(self.queue)

    def claim(self, n: int) -> List[Entry]:
        """Claim up to ``n`` entries at the head (the caller holds the engine's write lock)."""
        with self.mutex:
            out = list(itertools.islice(self.queue, n))
            self.claimed = len(out)
            return out

    def drop(self, n: int) -> None:
        """The claimed head is written: remove it."""
        with self.mutex:
            self.taken += n          # first: an interruption below can only over-count
            q = self.queue
            for _ in range(n):
                q.popleft()
            self.claimed = 0
            self.not_full.notify_all()

    def unclaim(self) -> None:
        with self.mutex:
            self.claimed = 0

    def take_unclaimed(self) -> List[Entry]:
        """Remove and return every entry that no writer has claimed (close()'s last resort);
        the claimed head stays for its writer."""
        with self.mutex:
            q = self.queue
            out = []
            while len(q) > self.claimed:  # one pop at a time: a producer's append is never lost
                out.append(q.pop())
                self.taken += 1
            out.reverse()
            self.not_full.notify_all()
            return out

    def snapshot_claimed(self) -> List[Entry]:
        with self.mutex:
            return list(itertools.islice(self.queue, self.claimed))

    def seal(self) -> None:
        with self.mutex:
            self.sealed = True
            self.limit = 0
            self.not_full.notify_all()
