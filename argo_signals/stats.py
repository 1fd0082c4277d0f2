"""Counters shared by the writer, the sync and the tracker, and their snapshot for ``stats()``."""
from __future__ import annotations

from collections import deque
from typing import Any, Deque, Dict, Optional

FLUSH_REASONS = ("size", "timeout", "interval", "manual", "close")


def percentile(sorted_values: list, q: float) -> Optional[float]:
    """The nearest-rank ``q`` quantile (0-1) of an already sorted list; None when it is empty."""
    if not sorted_values:
        return None
    i = min(len(sorted_values) - 1, max(0, int(round(q * (len(sorted_values) - 1)))))
    return sorted_values[i]


class Stats:
    """Plain counters; each is written by one party at a time (the writer holds its lock)."""

    def __init__(self) -> None:
        self.persisted = 0
        self.duplicates = 0
        self.rejected = 0
        self.fallback_writes = 0
        self.unknown_updates = 0
        self.write_retries = 0
        self.transactions = 0
        self.writer_restarts = 0
        self.spilled = 0
        self.replayed = 0
        self.spill_bad = 0          # spill lines set aside to <spill>.bad
        self.unsaved = 0            # printed to stderr: neither database nor spill could be written
        self.flushes: Dict[str, int] = {r: 0 for r in FLUSH_REASONS}
        self.last_error: Optional[str] = None
        self.latencies: Deque[float] = deque(maxlen=50_000)  # seconds, log_signal() -> commit

    def snapshot(self) -> Dict[str, Any]:
        lat = sorted(self.latencies)
        p50, p99 = percentile(lat, 0.50), percentile(lat, 0.99)
        return {
            "persisted": self.persisted,
            "duplicates": self.duplicates,
            "rejected": self.rejected,
            "fallback_writes": self.fallback_writes,
            "unknown_updates": self.unknown_updates,
            "write_retries": self.write_retries,
            "transactions": self.transactions,
            "writer_restarts": self.writer_restarts,
            "spilled": self.spilled,
            "replayed": self.replayed,
            "spill_bad": self.spill_bad,
            "unsaved": self.unsaved,
            "flushes": dict(self.flushes),
            "last_error": self.last_error,
            "latency_ms": {"p50": None if p50 is None else round(p50 * 1000, 3),
                           "p99": None if p99 is None else round(p99 * 1000, 3)},
        }
