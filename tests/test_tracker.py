"""Lifecycle in real processes: atexit, exceptions in `with`, the durability window, module API."""
import time

import argo_signals
from argo_signals import SignalTracker

from conftest import LineReader, count, make_signal, rows, run_script, spawn_script, wait_for


def test_script_that_logs_and_simply_ends_persists_everything(db):
    out = run_script("""
        import sys
        from argo_signals import SignalTracker
        t = SignalTracker(sys.argv[1], batch_size=1000, batch_timeout=60, flush_interval=60)
        for i in range(777):
            t.log_signal({"symbol": "AAPL", "action": "BUY", "entry_price": 1 + i, "confidence": 50})
        print("done")
    """, db)
    assert out.returncode == 0, out.stderr
    assert count(db) == 777


def test_module_level_api_in_a_script_persists_at_exit(db):
    out = run_script("""
        import argo_signals
        for i in range(123):
            argo_signals.log_signal({"symbol": "MSFT", "action": "SELL", "entry_price": 10, "confidence": 5})
    """, env={"ARGO_SIGNALS_DB": str(db)})
    assert out.returncode == 0, out.stderr
    assert count(db) == 123


def test_exception_inside_with_still_persists(db):
    out = run_script("""
        import sys
        from argo_signals import SignalTracker
        with SignalTracker(sys.argv[1], batch_size=1000, batch_timeout=60, register_atexit=False) as t:
            for i in range(50):
                t.log_signal({"symbol": "AAPL", "action": "BUY", "entry_price": 1, "confidence": 50})
            raise RuntimeError("strategy crashed")
    """, db)
    assert out.returncode == 1 and "strategy crashed" in out.stderr
    assert count(db) == 50


def test_slow_producer_signals_durable_within_batch_timeout(db):
    batch_timeout = 0.5
    proc = spawn_script("""
        import sys, time
        from argo_signals import SignalTracker
        t = SignalTracker(sys.argv[1], batch_timeout=float(sys.argv[2]), flush_interval=60)
        for i in range(15):
            sid = t.log_signal({"symbol": "AAPL", "action": "BUY", "entry_price": 1, "confidence": 50})
            print(sid, time.time(), flush=True)
            time.sleep(0.1)
        time.sleep(30)
    """, db, batch_timeout)
    out = LineReader(proc.stdout)
    try:
        worst = 0.0
        for _ in range(15):
            sid, logged_at = out.readline().split()
            ok = wait_for(lambda sid=sid: bool(rows(db, "signal_id = ?", (sid,))), batch_timeout + 0.5, 0.005)
            assert ok, f"{sid} not durable within {batch_timeout + 0.5}s"
            worst = max(worst, time.time() - float(logged_at))
        assert worst <= batch_timeout + 0.5
    finally:
        proc.kill()
        proc.wait()


def test_module_level_flush_close(db, monkeypatch):
    monkeypatch.setenv("ARGO_SIGNALS_DB", str(db))
    assert argo_signals.flush() is True  # no tracker yet
    sid = argo_signals.log_signal(make_signal())
    argo_signals.update_signal(sid, outcome="win")
    assert argo_signals.flush(5)
    assert argo_signals.stats()["persisted"] == 1
    assert argo_signals.close(5)
    assert rows(db)[0]["outcome"] == "win"


def test_repr_and_default_path(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    t = SignalTracker(register_atexit=False)
    assert t.db_path == "argo_signals.db" and "argo_signals.db" in repr(t)
    t.close()
