"""The writer: triggers, ordering, fallback, duplicates, restarts (real SQLite files, real threads)."""
import json
import sqlite3
import threading
import time

import pytest

from argo_signals import SignalTracker, SignalValidationError
from argo_signals.record import finish, normalise
from argo_signals.store import connect, ensure_schema, write_batch

from conftest import count, make_signal, produce_in_threads, rows, seqs_of, wait_for

QUIET = dict(batch_size=10_000, batch_timeout=3600, flush_interval=3600, register_atexit=False)


def test_size_trigger(db):
    with SignalTracker(db, **{**QUIET, "batch_size": 5}) as t:
        for i in range(5):
            t.log_signal(make_signal(i))
        assert wait_for(lambda: count(db) == 5, 3)
        assert wait_for(lambda: t.stats()["flushes"]["size"] >= 1, 3)  # counted just after the commit
        assert t.stats()["flushes"]["timeout"] == t.stats()["flushes"]["interval"] == 0


def test_timeout_trigger(db):
    with SignalTracker(db, **{**QUIET, "batch_timeout": 0.2}) as t:
        t.log_signal(make_signal())
        start = time.monotonic()
        assert wait_for(lambda: count(db) == 1, 3)
        assert 0.1 <= time.monotonic() - start < 1.5
        assert wait_for(lambda: t.stats()["flushes"]["timeout"] == 1, 3)  # counted just after the commit


def test_interval_trigger_on_fixed_tick(db):
    with SignalTracker(db, **{**QUIET, "flush_interval": 0.3}) as t:
        t.log_signal(make_signal())
        assert wait_for(lambda: count(db) == 1, 3)
        t.log_signal(make_signal(1))
        assert wait_for(lambda: count(db) == 2, 3)
        s = t.stats()["flushes"]
        assert s["interval"] == 2 and s["timeout"] == 0 and s["size"] == 0


def test_manual_flush_and_close_triggers(db):
    t = SignalTracker(db, **QUIET)
    t.log_signal(make_signal())
    assert t.flush(5) is True
    assert count(db) == 1 and t.stats()["flushes"]["manual"] == 1
    t.log_signal(make_signal(1))
    assert t.close(5) is True
    assert count(db) == 2 and t.stats()["flushes"]["close"] == 1
    assert t.close() is True  # idempotent


def test_eight_threads_forty_thousand_rows_in_order(db):
    with SignalTracker(db, register_atexit=False) as t:
        produce_in_threads(t, 8, 5000, "p")
        assert t.flush(30)
    all_rows = rows(db)
    assert len(all_rows) == 40_000
    assert len({r["signal_id"] for r in all_rows}) == 40_000
    for k in range(8):
        assert seqs_of(all_rows, f"p{k}") == list(range(5000))


def test_flush_from_several_threads(db):
    with SignalTracker(db, **QUIET) as t:
        results, errors = [], []

        def work(k):
            try:
                for i in range(200):
                    t.log_signal(make_signal(i, strategy=f"f{k}"))
                    if i % 50 == 0:
                        results.append(t.flush(10))
                results.append(t.flush(10))
                results.append(count(db, "signals") >= 200)
            except Exception as exc:  # pragma: no cover - reported below
                errors.append(exc)
        threads = [threading.Thread(target=work, args=(k,)) for k in range(6)]
        for th in threads:
            th.start()
        for th in threads:
            th.join()
        assert not errors and all(results) and len(results) == 6 * 6
    assert count(db) == 1200


def test_order_kept_when_queue_overflows_into_fallback(db):
    with SignalTracker(db, register_atexit=False, max_queue_size=8, batch_size=4,
                       queue_full_timeout=0.0) as t:
        produce_in_threads(t, 4, 1500, "q")
        assert t.flush(30)
        assert t.stats()["fallback_writes"] > 0
    all_rows = rows(db)
    assert len(all_rows) == 6000
    for k in range(4):
        assert seqs_of(all_rows, f"q{k}") == list(range(1500))


def test_update_right_after_insert_lands(db):
    with SignalTracker(db, **QUIET) as t:
        sid = t.log_signal(make_signal())
        t.update_signal(sid, order_id="X-1", outcome="win", exit_price=195, profit_loss_pct="1.9")
        t.update_signal("no-such-id", outcome="loss")
        assert t.flush(5)
        assert t.stats()["unknown_updates"] == 1
    (r,) = rows(db)
    assert (r["order_id"], r["outcome"], r["exit_price"], r["profit_loss_pct"]) == ("X-1", "win", 195.0, 1.9)


def test_neutral_and_none_prices_persist(db):
    with SignalTracker(db, **QUIET) as t:
        t.log_signal({"symbol": "SPY", "action": None, "entry_price": 500, "confidence": 10,
                      "target_price": None, "stop_price": None})
        t.log_signal({"symbol": "QQQ", "action": "neutral", "entry_price": "400", "confidence": 0})
    got = rows(db)
    assert [r["action"] for r in got] == ["NEUTRAL", "NEUTRAL"]
    assert got[0]["target_price"] is None and got[0]["stop_price"] is None
    assert all(r["sync_status"] == "pending" for r in got)


def test_bad_inputs_raise_while_good_ones_around_them_persist(db):
    from test_record import BAD
    with SignalTracker(db, **QUIET) as t:
        good = []
        for i, (override, field) in enumerate(BAD):
            good.append(t.log_signal(make_signal(i)))
            with pytest.raises(SignalValidationError, match=field):
                t.log_signal({"symbol": "AAPL", "action": "BUY", "entry_price": 1, "confidence": 1,
                              **override})
        assert t.stats()["logged"] == len(BAD)
    assert [r["signal_id"] for r in rows(db)] == good


def test_stored_hash_matches_independent_computation(db):
    from test_record import independent_hash
    with SignalTracker(db, **QUIET) as t:
        for i, price in enumerate([1, 2.5, "3.25", 4]):
            t.log_signal(make_signal(i, entry_price=price, target_price=None if i % 2 else 9))
    for r in rows(db):
        assert r["sha256"] == independent_hash(r)


def test_same_id_same_content_is_a_noop_other_content_is_rejected(db):
    with SignalTracker(db, **QUIET) as t:
        sig = make_signal(signal_id="fixed-1", timestamp="2026-01-01T00:00:00Z")
        t.log_signal(sig)
        t.flush(5)
        t.log_signal(sig)
        t.log_signal({**sig, "entry_price": 999})
        t.flush(5)
        s = t.stats()
        assert (s["persisted"], s["duplicates"], s["rejected"]) == (1, 1, 1)
    assert count(db) == 1 and count(db, "rejected_signals") == 1
    conn = sqlite3.connect(db)
    payload, reason = conn.execute("SELECT payload, reason FROM rejected_signals").fetchone()
    assert json.loads(payload)["entry_price"] == 999 and "different content" in reason


def test_row_the_database_refuses_does_not_sink_its_batch(db):
    conn = connect(str(db))
    ensure_schema(conn)
    good = [finish(normalise(make_signal(i))) for i in range(9)]
    bad = list(finish(normalise(make_signal(99))))
    bad[1] = object()  # sqlite3 cannot bind this
    result = write_batch(conn, good[:4] + [tuple(bad)] + good[4:])
    assert result.inserted == 9 and len(result.rejected_rows) == 1
    assert "refused by the database" in result.rejected_rows[0][1]
    assert count(db) == 9 and count(db, "rejected_signals") == 1


def test_writer_killed_by_injected_error_restarts_and_loses_nothing(db, caplog):
    t = SignalTracker(db, **{**QUIET, "batch_size": 10})
    t.log_signal(make_signal(0))
    assert wait_for(lambda: t.stats()["state"] == "open", 2)
    real = t._sink.write
    calls = []

    def broken(entries, reason, stop_at):
        if not calls:
            calls.append(1)
            raise RuntimeError("injected writer failure")
        return real(entries, reason, stop_at)
    t._sink.write = broken
    ids = [t.log_signal(make_signal(i)) for i in range(1, 10)]  # 10 queued: size trigger -> dies
    assert wait_for(lambda: t.stats()["state"] == "degraded", 3)
    assert "injected writer failure" in caplog.text
    ids.append(t.log_signal(make_signal(10)))  # restarts the writer
    assert t.flush(5)
    s = t.stats()
    assert s["writer_restarts"] == 1 and s["persisted"] == 11
    assert count(db) == 11
    t.close()


def test_log_after_close_still_persists(db):
    t = SignalTracker(db, **QUIET)
    t.log_signal(make_signal(0))
    assert t.close(5)
    t.log_signal(make_signal(1))
    assert count(db) == 2
    assert t.stats()["fallback_writes"] == 1


def test_stats_on_empty_database(db):
    t = SignalTracker(db, **QUIET)
    s = t.stats()
    assert s["logged"] == 0 and s["persisted"] == 0 and s["pending"] == 0
    assert s["latency_ms"] == {"p50": None, "p99": None}
    assert s["synced"] == 0 and s["sync_lag_s"] is None
    t.close()
    conn = connect(str(db))
    ensure_schema(conn)
    assert SignalTracker(db, **QUIET).stats()["sync_pending"] == 0


def test_two_trackers_on_one_file(db):
    a = SignalTracker(db, **{**QUIET, "batch_size": 7})
    b = SignalTracker(db, **{**QUIET, "batch_size": 3})
    for i in range(500):
        (a if i % 2 else b).log_signal(make_signal(i))
    assert a.flush(10) and b.flush(10)
    assert a.stats()["persisted"] == 250 and b.stats()["persisted"] == 250
    a.close()
    b.close()
    assert count(db) == 500


def test_busy_python_thread_does_not_starve_the_writer(db):
    """A CPU-bound strategy thread holds the GIL for whole switch intervals; a writer that
    released it once per row (executemany) would then wait ~5 ms per row."""
    stop = threading.Event()

    def spin():
        x = 0
        while not stop.is_set():
            x += 1
    spinner = threading.Thread(target=spin)
    spinner.start()
    try:
        with SignalTracker(db, **QUIET) as t:
            for i in range(2000):
                t.log_signal(make_signal(i))
            assert t.flush(8), "2000 signals not committed within 8 s next to a busy thread"
    finally:
        stop.set()
        spinner.join()
    assert count(db) == 2000


def test_manual_flush_does_not_move_the_interval_tick(db):
    with SignalTracker(db, **{**QUIET, "flush_interval": 1.0}) as t:
        start = time.monotonic()
        t.log_signal(make_signal(0))        # starts the writer: ticks at +1.0, +2.0, ...
        time.sleep(0.5)
        assert t.flush(5)                   # a manual flush at +0.5 ...
        t.log_signal(make_signal(1))
        assert wait_for(lambda: count(db) == 2, 3, 0.005)
        committed = time.monotonic() - start
        # ... leaves the tick at +1.0 (a moved tick would fire at +1.5)
        assert committed < 1.4, f"committed at +{committed:.2f}s"
        assert t.stats()["flushes"]["interval"] == 1


def test_writer_dying_again_right_after_restart_makes_callers_write(db, caplog):
    t = SignalTracker(db, **{**QUIET, "batch_size": 5})
    real = t._sink.write

    def broken_in_writer_thread(entries, reason, stop_at):
        if threading.current_thread().name == "argo-signals-writer":
            raise RuntimeError("injected: the writer thread always fails")
        return real(entries, reason, stop_at)
    t._sink.write = broken_in_writer_thread
    for i in range(5):
        t.log_signal(make_signal(i))          # size trigger: the writer dies
    assert wait_for(lambda: t.stats()["state"] == "degraded", 3)
    for i in range(5, 10):
        t.log_signal(make_signal(i))          # first death: restarted, and it dies again at once
    assert wait_for(lambda: t.stats()["state"] == "degraded", 3)
    t.log_signal(make_signal(10))             # died right after a restart: this caller writes
    assert t.stats()["writer_restarts"] == 1
    assert t.stats()["fallback_writes"] >= 1
    assert count(db) == 11                    # nothing the dead writers held was lost
    assert "keeps dying" in caplog.text or "died again" in caplog.text
    t.close()
