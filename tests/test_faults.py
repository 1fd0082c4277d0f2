"""Fault-proofing: full queue, locked / full / unwritable database, spill and replay, fork,
SIGTERM and kill -9 — in real processes against real files."""
import json
import logging
import signal
import threading
import time
from pathlib import Path

import pytest

from argo_signals import SignalTracker

from conftest import LineReader, count, make_signal, rows, run_script, spawn_script, wait_for

QUIET = dict(batch_size=10_000, batch_timeout=3600, flush_interval=3600, register_atexit=False)


def spill_file(db):
    return Path(f"{db}.spill.jsonl")


def test_memory_bounded_under_a_saturated_writer(db):
    out = run_script("""
        import sys, resource
        from argo_signals import SignalTracker
        def rss_kb():
            with open("/proc/self/status") as f:
                return next(int(l.split()[1]) for l in f if l.startswith("VmRSS"))
        # synchronous=FULL and small batches keep the writer saturated; the queue holds 500
        t = SignalTracker(sys.argv[1], max_queue_size=500, batch_size=50, max_batch=50,
                          durability="full", queue_full_timeout=0.001)
        sig = {"symbol": "AAPL", "action": "BUY", "entry_price": 1.5, "confidence": 50}
        for i in range(60_000):          # warm-up: fills the latency window and caches
            t.log_signal(sig)
        base = rss_kb()
        for i in range(140_000):
            t.log_signal(sig)
        grown = rss_kb() - base
        t.close()
        s = t.stats()
        print(grown, s["persisted"], s["fallback_writes"])
    """, db, timeout=150)
    assert out.returncode == 0, out.stderr
    grown_kb, persisted, fallback = map(int, out.stdout.split())
    assert persisted == 200_000 and count(db) == 200_000
    assert fallback > 0                      # the queue did overflow into the caller's thread
    assert grown_kb < 20 * 1024, f"RSS grew by {grown_kb} KiB over 140k signals"


def test_locked_database_delays_writes_loses_nothing_producers_keep_going(db):
    with SignalTracker(db, **{**QUIET, "batch_size": 20, "busy_timeout": 0.5}) as t:
        t.log_signal(make_signal(0))
        assert t.flush(5)
        locker = spawn_script("""
            import sqlite3, sys, time
            c = sqlite3.connect(sys.argv[1], isolation_level=None)
            c.execute("BEGIN EXCLUSIVE")
            print("locked", flush=True)
            time.sleep(float(sys.argv[2]))
            c.execute("COMMIT")
        """, db, 10)
        assert LineReader(locker.stdout).readline().strip() == "locked"
        start = time.monotonic()
        worst = 0.0
        for i in range(1, 2001):
            t0 = time.perf_counter()
            t.log_signal(make_signal(i))
            worst = max(worst, time.perf_counter() - t0)
        assert time.monotonic() - start < 5      # producers were not held by the lock
        assert worst < 0.5
        assert count(db) == 1                    # nothing could be written meanwhile
        assert t.flush(30)
        assert locker.wait(5) == 0
        assert time.monotonic() - start >= 9     # the flush really waited for the lock holder
        assert t.stats()["write_retries"] >= 1
    assert count(db) == 2001


def limited(flag):
    """on_connect hook reproducing SQLITE_FULL with PRAGMA max_page_count while flag is set."""
    def hook(conn):
        if flag.is_set():
            pages = conn.execute("PRAGMA page_count").fetchone()[0]
            conn.execute(f"PRAGMA max_page_count = {max(pages, 1)}")
    return hook


def test_full_disk_spills_then_replays_in_the_same_run(db, caplog):
    full = threading.Event()
    with SignalTracker(db, **{**QUIET, "write_retry_budget": 0.3, "flush_interval": 0.2,
                              "on_connect": limited(full)}) as t:
        t.log_signal(make_signal(0))
        assert t.flush(5)
        full.set()
        t._sink.close()  # the next write reconnects with the limit
        ids = [t.log_signal(make_signal(i, reasoning="x" * 2000)) for i in range(1, 301)]
        assert t.flush(10) is False      # not committed: spilled
        s = t.stats()
        assert s["spilled"] == 300 and s["spill_pending"] == 300
        assert "database or disk is full" in s["last_error"]
        assert any(r.levelno == logging.ERROR and "spilled" in r.getMessage() for r in caplog.records)
        assert count(db) == 1
        full.clear()                     # space again: the next tick replays
        assert wait_for(lambda: count(db) == 301, 10)
        assert wait_for(lambda: not spill_file(db).exists(), 5)
        assert wait_for(lambda: t.stats()["replayed"] == 300, 5)   # counted just after the commit
    assert {r["signal_id"] for r in rows(db)} >= set(ids)


def test_read_only_database_spills_and_next_start_replays(db):
    out = run_script("""
        import sys
        from argo_signals import SignalTracker
        from argo_signals.store import connect, ensure_schema
        def read_only(conn):
            conn.execute("PRAGMA query_only = 1")
        ensure_schema(connect(sys.argv[1]))
        t = SignalTracker(sys.argv[1], write_retry_budget=0.3, on_connect=read_only, atexit_timeout=5)
        for i in range(50):
            t.log_signal({"symbol": "AAPL", "action": "BUY", "entry_price": 1 + i, "confidence": 50})
        # no flush, no close: the atexit hook must spill what it cannot write
    """, db)
    assert out.returncode == 0, out.stderr
    assert "attempt to write a readonly database" in out.stderr
    assert count(db) == 0
    assert len(spill_file(db).read_text().splitlines()) == 50
    with SignalTracker(db, **QUIET) as t:
        t.log_signal(make_signal(1000))   # starting the writer replays the spill first
        assert t.flush(5)
        assert t.stats()["replayed"] == 50
    assert count(db) == 51 and not spill_file(db).exists()


def test_replay_is_idempotent_and_torn_last_line_is_kept_aside(db, caplog):
    with SignalTracker(db, **QUIET) as t:
        first = t.log_signal(make_signal(0, signal_id="already-there"))
    stored = rows(db)[0]
    lines = [json.dumps({k: stored[k] for k in stored if k not in ("id", "created_at") and not k.startswith("sync")})]
    lines += [json.dumps({**{k: stored[k] for k in stored if k not in ("id",) and not k.startswith("sync")},
                          "signal_id": f"spilled-{i}"}) for i in range(3)]
    spill_file(db).write_text("\n".join(lines) + "\n" + '{"signal_id": "torn", "sym')
    with SignalTracker(db, **QUIET) as t:
        t.log_signal(make_signal(1))
        assert t.flush(5)
        s = t.stats()
        assert s["replayed"] == 4 and s["duplicates"] == 1
    ids = [r["signal_id"] for r in rows(db)]
    assert ids.count(first) == 1 and {"spilled-0", "spilled-1", "spilled-2"} <= set(ids)
    assert not spill_file(db).exists()
    torn = list(db.parent.glob("signals.db.spill.jsonl.torn-*"))
    assert len(torn) == 1 and '"torn"' in torn[0].read_text()
    assert "torn last line" in caplog.text


def test_vanished_directory_keeps_signals_until_it_is_back(tmp_path):
    d = tmp_path / "data"
    d.mkdir()
    db = d / "s.db"
    with SignalTracker(db, **{**QUIET, "write_retry_budget": 0.2, "batch_timeout": 0.1}) as t:
        t.log_signal(make_signal(0))
        assert t.flush(5)
        for p in d.iterdir():
            p.unlink()
        d.rmdir()
        for i in range(1, 11):
            t.log_signal(make_signal(i))
        assert t.flush(3) is False            # neither the database nor the spill is writable
        assert t.stats()["pending"] == 10     # ...so they are held in memory
        d.mkdir()
        assert wait_for(lambda: count(db) == 10, 10)
    assert count(db) == 10


def test_fork_parent_and_child_each_persist_their_own_exactly_once(db):
    out = run_script("""
        import os, sys
        from argo_signals import SignalTracker
        t = SignalTracker(sys.argv[1], batch_size=10_000, batch_timeout=3600, flush_interval=3600)
        for i in range(100):
            t.log_signal({"symbol": "PARENT", "action": "BUY", "entry_price": 1, "confidence": 1})
        pid = os.fork()                       # 100 parent signals are still queued here
        if pid == 0:
            for i in range(50):
                t.log_signal({"symbol": "CHILD", "action": "SELL", "entry_price": 2, "confidence": 2})
            ok = t.close(10)
            os._exit(0 if ok and t.stats()["persisted"] == 50 else 3)
        _, status = os.waitpid(pid, 0)
        for i in range(100):
            t.log_signal({"symbol": "PARENT", "action": "BUY", "entry_price": 1, "confidence": 1})
        t.close(10)
        print(os.waitstatus_to_exitcode(status), t.stats()["persisted"])
    """, db)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["0", "200"]
    got = rows(db)
    assert len(got) == 250 and len({r["signal_id"] for r in got}) == 250
    assert sum(r["symbol"] == "CHILD" for r in got) == 50


@pytest.mark.parametrize("sig,expected_rc", [(signal.SIGTERM, -signal.SIGTERM), (signal.SIGINT, 130)])
def test_sigterm_and_sigint_close_within_budget_then_chain(db, sig, expected_rc):
    proc = spawn_script("""
        import sys, time
        from argo_signals import SignalTracker
        t = SignalTracker(sys.argv[1], batch_size=10_000, batch_timeout=3600, flush_interval=3600,
                          handle_signals=True)
        for i in range(500):
            t.log_signal({"symbol": "AAPL", "action": "BUY", "entry_price": 1, "confidence": 1})
        try:
            print("ready", flush=True)
            time.sleep(60)
        except KeyboardInterrupt:
            sys.exit(130)
    """, db)
    out = LineReader(proc.stdout)
    assert out.readline().strip() == "ready"
    assert count(db) == 0
    start = time.monotonic()
    proc.send_signal(sig)
    rc = proc.wait(15)
    elapsed = time.monotonic() - start
    assert rc == expected_rc, proc.stderr.read()
    assert elapsed < 3.0
    assert count(db) == 500


def test_signal_handlers_need_the_main_thread(db):
    t = SignalTracker(db, **QUIET)
    errors = []
    th = threading.Thread(target=lambda: errors.append(pytest.raises(RuntimeError, t.install_signal_handlers)))
    th.start()
    th.join()
    assert errors and "main thread" in str(errors[0].value)
    t.close()


def test_kill_9_loses_at_most_the_uncommitted_window(db):
    batch_timeout = 0.3
    proc = spawn_script("""
        import sys, time
        from argo_signals import SignalTracker
        t = SignalTracker(sys.argv[1], batch_timeout=float(sys.argv[2]))
        while True:
            sid = t.log_signal({"symbol": "AAPL", "action": "BUY", "entry_price": 1, "confidence": 1})
            print(sid, time.monotonic(), flush=True)
            time.sleep(0.01)
    """, db, batch_timeout)
    out = LineReader(proc.stdout)
    logged = []
    deadline = time.monotonic() + 2.0
    while time.monotonic() < deadline:
        sid, t = out.readline().split()
        logged.append((sid, float(t)))
    proc.kill()
    proc.wait()
    kill_time = time.monotonic()
    while True:
        line = out.readline(timeout=5)
        if not line:
            break
        sid, t = line.split()
        logged.append((sid, float(t)))
    stored = {r["signal_id"] for r in rows(db)}
    lost = [(sid, t) for sid, t in logged if sid not in stored]
    assert len(stored) > 0 and all(sid in stored for sid, t in logged if kill_time - t > batch_timeout + 0.3)
    assert all(kill_time - t <= batch_timeout + 0.3 for _, t in lost)


def test_close_that_times_out_on_a_locked_database_spills_instead_of_losing(db):
    out = run_script("""
        import subprocess, sys, time
        from argo_signals import SignalTracker
        from argo_signals.store import connect, ensure_schema
        ensure_schema(connect(sys.argv[1]))
        locker = subprocess.Popen([sys.executable, "-c",
            "import sqlite3, sys, time; c = sqlite3.connect(sys.argv[1], isolation_level=None); "
            "c.execute('BEGIN EXCLUSIVE'); print('locked', flush=True); time.sleep(8)", sys.argv[1]],
            stdout=subprocess.PIPE, text=True)
        assert locker.stdout.readline().strip() == "locked"
        t = SignalTracker(sys.argv[1], batch_size=10, busy_timeout=3.0, register_atexit=False)
        for i in range(100):
            t.log_signal({"symbol": "AAPL", "action": "BUY", "entry_price": 1 + i, "confidence": 5})
        start = time.monotonic()
        ok = t.close(timeout=1.5)
        print(ok, round(time.monotonic() - start, 1), t.stats()["spilled"])
        locker.kill()
    """, db, timeout=60)
    assert out.returncode == 0, out.stderr
    ok, took, spilled = out.stdout.split()
    assert ok == "False" and float(took) < 2.5 and int(spilled) == 100
    assert "spilled" in out.stderr
    with SignalTracker(db, **QUIET) as t:
        t.log_signal(make_signal(999))
        assert t.flush(10)
    assert count(db) == 101 and not spill_file(db).exists()


def test_sigterm_during_a_synchronous_write_exits_with_everything_committed(db):
    """The handler never writes on top of the write it interrupted: it turns SIGTERM into an
    exit, the stack unwinds (the batch goes back to the queue) and the close runs at exit."""
    proc = spawn_script("""
        import os, signal, sys, threading
        from argo_signals import SignalTracker
        t = SignalTracker(sys.argv[1], batch_size=1_000_000, batch_timeout=3600, flush_interval=3600,
                          max_queue_size=30_000, queue_full_timeout=0.01, handle_signals=True)
        for i in range(30_000):
            t.log_signal({"symbol": "AAPL", "action": "BUY", "entry_price": 1, "confidence": 1})
        threading.Timer(0.2, os.kill, (os.getpid(), signal.SIGTERM)).start()
        for i in range(30_000):   # the queue is full: this thread writes for everyone
            t.log_signal({"symbol": "MSFT", "action": "BUY", "entry_price": 1, "confidence": 1})
            print(i, flush=True)
    """, db)
    out, err = proc.communicate(timeout=40)
    assert proc.returncode == -signal.SIGTERM, err
    returned = len(out.split())
    assert returned < 30_000, "SIGTERM came too late to interrupt the writes"
    assert 30_000 + returned <= count(db) <= 30_000 + returned + 1


def test_spilled_update_cannot_name_arbitrary_columns(db, caplog):
    with SignalTracker(db, **QUIET) as t:
        sid = t.log_signal(make_signal(0, symbol="SAFE"))
    spill_file(db).write_text(json.dumps({"update_of": sid, "fields": {"symbol = 'PWNED', outcome": "x"}}) + "\n")
    with SignalTracker(db, **QUIET) as t:
        t.log_signal(make_signal(1))
        assert t.flush(5)
        assert t.stats()["spill_bad"] == 1   # checked again at replay: set aside, never run
    assert rows(db)[0]["symbol"] == "SAFE" and not spill_file(db).exists()
    assert "PWNED" in (db.parent / "signals.db.spill.jsonl.bad").read_text()
    assert "cannot be updated" in caplog.text


def test_multiprocessing_fork_child_persists_without_calling_close(db):
    out = run_script("""
        import multiprocessing, sys
        from argo_signals import SignalTracker
        t = SignalTracker(sys.argv[1], batch_size=10_000, batch_timeout=3600, flush_interval=3600)

        def child():
            for i in range(30):
                t.log_signal({"symbol": "KID", "action": "BUY", "entry_price": 1, "confidence": 1})
            # no flush, no close: multiprocessing ends the child with os._exit()

        p = multiprocessing.get_context("fork").Process(target=child)
        p.start()
        p.join(30)
        print(p.exitcode)
    """, db)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["0"]
    assert count(db) == 30
