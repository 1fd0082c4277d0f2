"""Counters shared by the writer, the sync and the tracker, and their snapshot for ``stats()``."""
from __future__ import annotations

import math
from bisect import bisect_left
from collections import deque
from typing import Any, Deque, Dict, Iterable, List, Optional, Tuple

FLUSH_REASONS = ("size", "timeout", "interval", "manual", "close")
# What wrote a committed row: a flush of the writer thread (by its trigger), a caller writing
# synchronously ("fallback"), or a replay of the spill file.
PERSIST_TRIGGERS = FLUSH_REASONS + ("fallback", "replay")
# Upper bounds (seconds) of the time-to-durable histogram; the default batch_timeout is 5 s.
DURABLE_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
# ... and of the sync lag (commit to the receiver's accepting answer), backoffs included.
SYNC_LAG_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0, 900.0, 3600.0)


class Histogram:
    """Counts per upper bound (the last slot: above them all), their count and sum, since the
    start.  One writer at a time; a reader copies the counts without a lock."""

    def __init__(self, bounds: Tuple[float, ...]) -> None:
        self.bounds = bounds
        self.counts: List[int] = [0] * (len(bounds) + 1)
        self.sum = 0.0

    def observe(self, values: Iterable[float]) -> None:
        counts, bounds = self.counts, self.bounds
        values = list(values)
        for v in values:
            counts[bisect_left(bounds, v)] += 1
        self.sum += math.fsum(values)

    def snapshot(self) -> Dict[str, Any]:
        """Cumulative counts per upper bound (labelled as Prometheus labels them), count, sum."""
        total, buckets = 0, {}
        for bound, n in zip([repr(b) for b in self.bounds] + ["+Inf"], list(self.counts)):
            total += n
            buckets[bound] = total
        return {"buckets": buckets, "count": total, "sum": round(self.sum, 6)}


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
    """Plain counters, no lock.  The sink's counts are written under the engine's write lock;
    a few are bumped by producers without it (``fallback_writes``, ``writer_restarts``,
    ``last_error``), so those are best effort when producers race: a count may miss one."""

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
        self.persisted_by: Dict[str, int] = {t: 0 for t in PERSIST_TRIGGERS}
        self.last_error: Optional[str] = None
        self.latencies: Deque[float] = deque(maxlen=50_000)  # seconds, log_signal() -> commit
        self.durable = Histogram(DURABLE_BUCKETS)   # every latency since the start

    def record_durable(self, seconds: Iterable[float]) -> None:
        """Note the log_signal() -> commit times of committed signals (the writer's side)."""
        values = list(seconds)
        self.latencies.extend(values)
        self.durable.observe(values)

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
            "persisted_by": dict(self.persisted_by),
            "last_error": self.last_error,
            "latency_ms": {"p50": None if p50 is None else round(p50 * 1000, 3),
                           "p99": None if p99 is None else round(p99 * 1000, 3)},
            "time_to_durable_s": self.durable.snapshot(),
        }
