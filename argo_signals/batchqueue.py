"""The engine's queue: a ``queue.Queue`` that counts, seals, and is drained in bulk.

Producers append (the engine's hot path appends to ``queue`` directly, see ``Engine.put``;
the blocking ``put(timeout=)`` gives back-pressure); whoever runs the sink takes batches
from the head under ``mutex`` and puts them back there if the write is interrupted.
"""
from __future__ import annotations

import queue
from typing import List

from .sink import Entry

__all__ = ["EntryQueue", "Sealed"]


class Sealed(Exception):
    """put() on a queue that close() has sealed: the caller writes synchronously."""


class EntryQueue(queue.Queue):  # type: ignore[type-arg]
    """``queue.Queue`` with a running count, a seal, and bulk take/put-back under its mutex.

    ``seq`` (entries ever queued, in queue order) is ``taken + len(queue)``, so appending
    costs no counter.  Producers append under ``mutex`` while ``len(queue) < limit``;
    ``seal()`` sets ``limit`` to 0, and the stdlib's blocking ``put()`` then meets ``Sealed``.
    """

    def __init__(self, maxsize: int) -> None:
        super().__init__(maxsize)
        self.taken = 0
        self.limit = maxsize
        self.sealed = False

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

    def force_put(self, item: Entry) -> int:
        """Queue past the bound and the seal; returns the entry's position (its ``seq``)."""
        with self.mutex:
            self.queue.append(item)
            return self.taken + len(self.queue)

    def take(self, n: int) -> List[Entry]:
        with self.mutex:
            q = self.queue
            out = [q.popleft() for _ in range(min(n, len(q)))]
            if out:
                self.taken += len(out)
                self.not_full.notify_all()
            return out

    def put_back(self, items: List[Entry]) -> None:
        with self.mutex:
            self.queue.extendleft(reversed(items))
            self.taken -= len(items)

    def seal(self) -> None:
        with self.mutex:
            self.sealed = True
            self.limit = 0
            self.not_full.notify_all()
