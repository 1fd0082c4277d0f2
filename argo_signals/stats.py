"""Counters shared by the writer, the sync and the tracker, and their snapshot for ``stats()``."""
from __future__ import annotations

import math
from collections import deque
from typing import Any, Deque, Dict, Iterable, Optional, Tuple

FLUSH_REASONS = ("size", "timeout", "interval", "manual", "close")


def nearest_rank(q: float, n: int) -> int:
    """The index of the nearest-rank ``q`` quantile (0-1) among ``n`` sorted values:
    round(q * (n - 1)), halves up."""
    return int(math.floor(q * (n - 1) + 0.5))


def percentile(sorted_values: list, q: float) -> Optional[float]:
    """The nearest-rank ``q`` quantile of an already sorted list; None when it is empty."""
    if not sorted_values:
        return None
    return sorted_values[min(len(sorted_values) - 1, max(0, nearest_rank(q, len(sorted_values))))]


def percentiles_of_counts(pairs: Iterable[Tuple[Any, int]], n: int,
                          quantiles: Dict[str, float]) -> Dict[str, Any]:
    """Nearest-rank quantiles of ``n`` values given as sorted (value, how many) pairs, so that
    a caller (e.g. SQL ``GROUP BY value``) need not hold every value."""
    out: Dict[str, Any] = {name: None for name in quantiles}
    wanted = {name: nearest_rank(q, n) for name, q in quantiles.items()}
    seen = 0
    for value, count in pairs:
        for name, idx in wanted.items():
            if out[name] is None and seen <= idx < seen + count:
                out[name] = value
        seen += count
    return out


class Stats:
    """Plain counters; each is written by one party at a time (the writer holds its lock)."""

    def __init__(self) -> None:
        self.persisted = 0
        self.duplicates = 0
        self.rejected = 0
        self.fallback_writes = 0
        self.unknown_updates = 0     # updates whose signal was not stored yet (kept waiting)
        self.waiting_updates_overdue = 0   # waiting past waiting_update_max_age (reported once each)
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
            "waiting_updates_overdue": self.waiting_updates_overdue,
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
