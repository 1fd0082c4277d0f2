"""Quantiles, histograms and the counters' snapshot (argo_signals/stats.py), on their own."""
import random

import pytest

from argo_signals.stats import (DURABLE_BUCKETS, FLUSH_REASONS, PERSIST_TRIGGERS, SYNC_LAG_BUCKETS, Histogram,
                                Stats, nearest_rank, percentile, percentiles_of_counts)


# -- nearest rank -----------------------------------------------------------------------------
@pytest.mark.parametrize("q,n,index", [
    (0.5, 4, 2),      # 1.5: a half goes up
    (0.5, 2, 1),      # 0.5: up as well
    (0.25, 3, 1),     # 0.5: up
    (0.2, 3, 0),      # 0.4: down
    (0.99, 10, 9),    # 8.91
    (0.0, 7, 0), (1.0, 7, 6), (0.5, 1, 0),
])
def test_nearest_rank_rounds_halves_up(q, n, index):
    assert nearest_rank(q, n) == index


def test_percentile_takes_the_value_at_the_nearest_rank():
    values = [10.0, 20.0, 30.0, 40.0]
    assert [percentile(values, q) for q in (0.0, 0.16, 0.17, 0.5, 0.83, 0.84, 1.0)] == \
        [10.0, 10.0, 20.0, 30.0, 30.0, 40.0, 40.0]


def test_percentile_beyond_zero_and_one_stays_at_the_ends():
    values = [1, 2, 3]
    assert percentile(values, -0.5) == 1 and percentile(values, 1.5) == 3


# -- quantiles of (value, how many) pairs -----------------------------------------------------
QUANTILES = {"p0": 0.0, "p10": 0.1, "p25": 0.25, "p50": 0.5, "p90": 0.9, "p99": 0.99, "p100": 1.0}


def test_quantiles_of_counts_agree_with_the_quantiles_of_every_value():
    rng = random.Random(20)
    for _ in range(300):
        pairs = sorted((v, rng.choice([0, 1, 1, 2, 5, 40])) for v in rng.sample(range(-500, 500), rng.randint(1, 30)))
        every = [v for v, c in pairs for _ in range(c)]
        got = percentiles_of_counts(pairs, len(every), QUANTILES)
        assert got == {name: percentile(every, q) for name, q in QUANTILES.items()}, pairs


def test_quantiles_of_counts_read_the_pairs_once():
    pairs = iter([(1, 3), (7, 1), (9, 4)])     # e.g. a cursor over GROUP BY value
    assert percentiles_of_counts(pairs, 8, {"p50": 0.5, "p99": 0.99}) == {"p50": 9, "p99": 9}


def test_quantiles_of_nothing_are_none():
    assert percentiles_of_counts([], 0, {"p50": 0.5, "p99": 0.99}) == {"p50": None, "p99": None}
    assert percentiles_of_counts([(5, 0)], 0, {"p50": 0.5}) == {"p50": None}
    assert percentiles_of_counts([(5, 2)], 2, {}) == {}


# -- histogram --------------------------------------------------------------------------------
def test_the_bucket_bounds_ascend():
    for bounds in (DURABLE_BUCKETS, SYNC_LAG_BUCKETS):
        assert list(bounds) == sorted(set(bounds))


def test_a_value_on_a_bound_counts_in_that_bound():
    h = Histogram((0.1, 1.0, 10.0))
    h.observe([0.1, 1.0, 10.0])
    assert h.counts == [1, 1, 1, 0]
    assert h.snapshot()["buckets"] == {"0.1": 1, "1.0": 2, "10.0": 3, "+Inf": 3}


def test_values_fall_in_the_first_bound_at_or_above_them_and_the_rest_above_all():
    h = Histogram((0.1, 1.0, 10.0))
    h.observe([-1.0, 0.0, 0.05, 0.100001, 0.5, 9.99, 10.000001, 1e9])
    assert h.counts == [3, 2, 1, 2]


def test_the_snapshot_is_cumulative_labelled_counted_and_summed():
    h = Histogram(DURABLE_BUCKETS)
    h.observe([0.001, 0.003, 0.04, 0.3, 7.0, 100.0])
    snap = h.snapshot()
    assert list(snap["buckets"]) == ["0.005", "0.01", "0.025", "0.05", "0.1", "0.25", "0.5", "1.0", "2.5",
                                     "5.0", "10.0", "30.0", "60.0", "+Inf"]
    assert list(snap["buckets"].values()) == [2, 2, 2, 3, 3, 3, 4, 4, 4, 4, 5, 5, 5, 6]
    assert snap["count"] == 6 and snap["sum"] == 107.344


def test_the_sum_is_exact_over_many_small_values_and_rounded_to_a_microsecond():
    h = Histogram((1.0,))
    h.observe([0.1] * 10)          # plain float addition gives 0.9999999999999999
    assert h.sum == 1.0
    h.observe(x / 1e7 for x in (1, 2, 3))   # (a generator is read once)
    snap = h.snapshot()
    assert snap["count"] == 13 and snap["sum"] == 1.000001
    assert h.counts == [13, 0]


def test_an_empty_histogram():
    snap = Histogram(SYNC_LAG_BUCKETS).snapshot()
    assert snap["count"] == 0 and snap["sum"] == 0.0
    assert set(snap["buckets"].values()) == {0} and len(snap["buckets"]) == len(SYNC_LAG_BUCKETS) + 1


def test_a_snapshot_does_not_change_with_later_observations():
    h = Histogram((1.0,))
    h.observe([0.5])
    snap = h.snapshot()
    h.observe([0.5, 2.0])
    assert snap == {"buckets": {"1.0": 1, "+Inf": 1}, "count": 1, "sum": 0.5}


# -- the counters' snapshot -------------------------------------------------------------------
def test_a_fresh_snapshot_names_every_counter_at_zero():
    snap = Stats().snapshot()
    assert snap["flushes"] == {r: 0 for r in FLUSH_REASONS}
    assert snap["persisted_by"] == {t: 0 for t in PERSIST_TRIGGERS}
    assert set(PERSIST_TRIGGERS) == set(FLUSH_REASONS) | {"fallback", "replay"}
    assert snap["last_error"] is None and snap["latency_ms"] == {"p50": None, "p99": None}
    assert snap["time_to_durable_s"]["count"] == 0
    counters = {k: v for k, v in snap.items() if isinstance(v, int)}
    assert set(counters) == {"persisted", "duplicates", "rejected", "fallback_writes", "unknown_updates",
                             "waiting_updates_overdue", "write_retries", "transactions", "writer_restarts",
                             "spilled", "replayed", "spill_bad", "unsaved"}
    assert set(counters.values()) == {0}


def test_latencies_are_shown_in_milliseconds_at_the_nearest_rank():
    s = Stats()
    s.record_durable(v / 1000 for v in [4.0, 1.0, 3.0, 2.0, 1000.1234567])   # unsorted; a generator
    snap = s.snapshot()
    assert snap["latency_ms"] == {"p50": 3.0, "p99": 1000.123}
    assert snap["time_to_durable_s"]["count"] == 5
    assert snap["time_to_durable_s"]["buckets"]["0.005"] == 4 and snap["time_to_durable_s"]["buckets"]["1.0"] == 4
    assert snap["time_to_durable_s"]["buckets"]["2.5"] == 5


def test_the_latency_window_forgets_old_values_the_histogram_keeps_them():
    s = Stats()
    s.record_durable([10.0] * 50_000)
    s.record_durable([0.002] * 50_000)     # the window holds the last 50 000
    snap = s.snapshot()
    assert snap["latency_ms"] == {"p50": 2.0, "p99": 2.0}
    assert snap["time_to_durable_s"]["count"] == 100_000
    assert snap["time_to_durable_s"]["sum"] == 500_100.0
    assert snap["time_to_durable_s"]["buckets"]["0.005"] == 50_000


def test_the_snapshot_is_a_copy_of_the_counters():
    s = Stats()
    s.persisted, s.flushes["size"], s.persisted_by["replay"], s.last_error = 3, 2, 1, "disk full"
    snap = s.snapshot()
    assert (snap["persisted"], snap["flushes"]["size"], snap["persisted_by"]["replay"], snap["last_error"]) == \
        (3, 2, 1, "disk full")
    snap["flushes"]["size"] = 99
    snap["persisted_by"]["replay"] = 99
    assert s.flushes["size"] == 2 and s.persisted_by["replay"] == 1
    s.flushes["close"] += 1
    assert snap["flushes"]["close"] == 0
