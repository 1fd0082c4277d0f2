"""Drain mode (the ``sync`` command): push every pending row now, due or not, each once.

It drives a ``Syncer`` from outside: forced claims in id order, progress per handled row, and
an end when everything taken is handled, when the receiver is misconfigured (a redirect, a
refused key), or when nothing has got through for ``patience`` seconds: *database* when the
rows could not be claimed (locked, unreadable), *unreachable* when nothing answered (or the
breaker is open), *stalled* when answers came but settled no row (their outcomes are
recorded when the syncer stops; a rate limit in force counts as answers).  Rows not handled
stay ``pending``.
"""
from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field
from typing import Callable, Dict, Optional

from .sync import Syncer

__all__ = ["End", "DrainReport", "drain"]


class End(str, enum.Enum):
    DONE = "done"                    # every row taken was handled
    CONFIGURATION = "configuration"  # a redirect or a refused key: fix the URL or the key
    UNREACHABLE = "unreachable"      # no answer for `patience` seconds (or the breaker is open)
    DATABASE = "database"            # the database could not be read or written (locked, unreadable)
    STALLED = "stalled"              # answers, but no row handled for `patience` seconds


@dataclass
class DrainReport:
    end: End
    outcomes: Dict[str, int] = field(default_factory=dict)
    detail: str = ""
    waited: float = 0.0              # seconds without progress when it gave up


def drain(syncer: Syncer, limit: Optional[int] = None, patience: float = 30.0,
          progress: Optional[Callable[[int], None]] = None, poll: float = 0.05) -> DrainReport:
    syncer.forced_after = 0
    syncer.claim_budget = limit
    shown = 0
    last_progress = time.monotonic()

    def advance() -> None:
        nonlocal shown, last_progress
        handled = syncer.outcomes.handled
        if handled > shown:
            if progress is not None:
                progress(handled - shown)
            shown = handled
            last_progress = time.monotonic()

    def stuck() -> Optional[End]:
        if syncer.outcomes.config_error is not None:
            return End.CONFIGURATION
        if time.monotonic() - last_progress >= patience:
            if syncer.db_error is not None:
                return End.DATABASE
            answered = syncer.delivery.answered > 0
            return End.UNREACHABLE if syncer.breaker.is_open or not answered else End.STALLED
        return None

    end: Optional[End] = None
    while end is None:
        before = syncer.forced_after
        syncer.nudge()
        while end is None and (syncer.busy() or syncer.breaker.is_open or syncer.rate_limited):
            time.sleep(poll)
            advance()
            end = stuck()
        if end is not None:
            break
        syncer.wait_idle(poll)
        advance()
        end = stuck()
        if end is None and syncer.db_error is None and (syncer.forced_after == before or syncer.claim_budget == 0):
            end = End.DONE
        elif end is None and syncer.db_error is not None:
            time.sleep(poll)   # the database refused the claim: try again until `patience`
    waited = time.monotonic() - last_progress
    detail = syncer.outcomes.config_error or ((syncer.breaker.reason or "no answer")
                                              if end is End.UNREACHABLE else "") or ""
    if end is End.DATABASE:
        detail = syncer.db_error or ""
    return DrainReport(end, dict(syncer.outcomes.counts), detail, waited)
