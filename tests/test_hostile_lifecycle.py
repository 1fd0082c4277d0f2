"""Lifecycle events tried as a hostile user would: each test here reproduced a loss, a hang or a false
True before its fix (real processes, real SQLite files, real signals)."""
import json
import os
import shutil
import sqlite3
import threading


from argo_signals import SignalTracker

from conftest import LineReader, count, make_signal, run_script, spawn_script

QUIET = dict(batch_size=1_000_000, batch_timeout=3600, flush_interval=3600, register_atexit=False)


def lock_db(db):
    conn = sqlite3.connect(str(db), isolation_level=None, check_same_thread=False)
    conn.execute("BEGIN IMMEDIATE")
    return conn


def test_flush_without_timeout_replays_a_pending_spill_instead_of_raising(db):
    t = SignalTracker(db, write_retry_budget=0.2, busy_timeout=0.1, **QUIET)
    holder = lock_db(db)
    t.log_signal(make_signal(1))
    assert t.flush(1.5) is False            # spilled: the database is locked
    holder.rollback()
    holder.close()
    assert t.flush() is True                # OverflowError: Lock.acquire(timeout=inf)
    assert count(db) == 1
    t.close(5)


def nothing_writable(db, tmp_path):
    """A tracker whose database is locked by another writer and whose spill directory is gone."""
    spill_dir = tmp_path / "spill"
    spill_dir.mkdir()
    t = SignalTracker(db, spill_path=str(spill_dir / "s.jsonl"), write_retry_budget=0.2,
                      busy_timeout=0.1, **QUIET)
    holder = lock_db(db)
    shutil.rmtree(spill_dir)
    return t, holder


def test_flush_without_timeout_returns_when_nothing_can_be_written(db, tmp_path):
    t, holder = nothing_writable(db, tmp_path)
    t.log_signal(make_signal(1))
    res = []
    th = threading.Thread(target=lambda: res.append(t.flush()), daemon=True)
    th.start()
    th.join(10)
    alive = th.is_alive()
    holder.rollback()
    holder.close()
    t.close(5)
    assert not alive, "flush() with no timeout waited more than 10s"


def test_close_again_is_not_true_after_signals_went_only_to_stderr(db, tmp_path):
    t, holder = nothing_writable(db, tmp_path)
    for i in range(3):
        t.log_signal(make_signal(i))
    assert t.close(2) is False              # salvaged to stderr
    second, flushed = t.close(2), t.flush(2)
    holder.rollback()
    holder.close()
    assert count(db) == 0
    assert second is False and flushed is False, (second, flushed)


def test_a_tracker_dropped_without_close_still_commits_at_exit(db):
    out = run_script("""
        import sys
        from argo_signals import SignalTracker
        def work():
            t = SignalTracker(sys.argv[1])
            for i in range(10):
                t.log_signal({"symbol": "AAPL", "action": "BUY", "entry_price": 1, "confidence": 1, "seq": i})
        work()
    """, db)
    assert out.returncode == 0, out.stderr
    assert count(db) == 10, out.stderr


def test_log_after_close_with_nothing_writable_raises_or_prints_unsaved(db, tmp_path):
    spill_dir = tmp_path / "spill"
    spill_dir.mkdir()
    out = run_script("""
        import os, shutil, sqlite3, sys
        from argo_signals import SignalTracker
        db, sd = sys.argv[1], sys.argv[2]
        t = SignalTracker(db, spill_path=os.path.join(sd, "s.jsonl"), write_retry_budget=0.2, busy_timeout=0.1)
        assert t.close(5)
        h = sqlite3.connect(db, isolation_level=None); h.execute("BEGIN IMMEDIATE")
        shutil.rmtree(sd)
        try:
            t.log_signal({"symbol": "AAPL", "action": "BUY", "entry_price": 1, "confidence": 1})
            print("returned")
        except Exception as exc:
            print("raised", type(exc).__name__)
    """, db, spill_dir)
    assert out.returncode == 0, out.stderr
    refused = out.stdout.startswith("raised")
    assert refused or "argo-signals-unsaved:" in out.stderr, (out.stdout, out.stderr[-800:])


def test_fork_pool_workers_that_create_their_own_tracker_commit(db):
    SignalTracker(db, register_atexit=False).close()   # the schema exists before the workers
    out = run_script("""
        import multiprocessing, sys
        import argo_signals
        def work(i):
            return argo_signals.log_signal({"symbol": "POOL", "action": "BUY", "entry_price": 1,
                                            "confidence": 1, "seq": i})
        if __name__ == "__main__":
            pool = multiprocessing.get_context(sys.argv[1]).Pool(2)
            print(len(pool.map(work, range(20))))
            pool.close(); pool.join()
    """, "fork", env={"ARGO_SIGNALS_DB": str(db)}, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["20"]
    assert count(db) == 20


def test_processes_creating_one_new_database_at_once_all_open_it(tmp_path):
    out = run_script("""
        import multiprocessing, os, sys, time
        from argo_signals import SignalTracker
        def opener(db, at, q):
            while time.time() < at:
                pass
            try:
                SignalTracker(db, register_atexit=False).close(5); q.put("ok")
            except Exception as exc:
                q.put(f"{type(exc).__name__}: {exc}")
        ctx = multiprocessing.get_context("fork")
        for trial in range(4):
            db, q = os.path.join(sys.argv[1], f"t{trial}.db"), ctx.Queue()
            at = time.time() + 0.5
            ps = [ctx.Process(target=opener, args=(db, at, q)) for _ in range(3)]
            for p in ps: p.start()
            for p in ps: p.join(30)
            print(*[q.get(timeout=5) for _ in ps], sep="\\n")
    """, tmp_path, timeout=90)
    assert out.returncode == 0, out.stderr
    failures = [line for line in out.stdout.splitlines() if line != "ok"]
    assert not failures, failures


def test_exit_while_the_writer_waits_for_a_locked_database_loses_nothing(db):
    SignalTracker(db, register_atexit=False).close()
    holder = lock_db(db)
    try:
        out = run_script("""
            import sys, time
            from argo_signals import SignalTracker
            t = SignalTracker(sys.argv[1], atexit_timeout=1, batch_size=1)   # busy_timeout 5s
            for i in range(5):
                t.log_signal({"symbol": "AAPL", "action": "BUY", "entry_price": 1, "confidence": 1, "seq": i})
            time.sleep(0.5)     # the writer thread is inside its statement, waiting for the lock
        """, db, timeout=50)
    finally:
        holder.rollback()
        holder.close()
    spill = f"{db}.spill.jsonl"
    spilled = sum(1 for _ in open(spill)) if os.path.exists(spill) else 0
    unsaved = out.stderr.count("argo-signals-unsaved:")
    assert count(db) + spilled + unsaved == 5, (count(db), spilled, unsaved, out.stderr[-1500:])


def test_ctrl_c_storm_during_synchronous_writes_neither_loses_nor_hangs(db):
    out = run_script("""
        import faulthandler, json, os, signal, subprocess, sys, threading, time
        from argo_signals import SignalTracker
        faulthandler.dump_traceback_later(25, exit=True)     # a deadlock ends the run here
        t = SignalTracker(sys.argv[1], max_queue_size=3000, max_batch=3000, batch_size=3000,
                          queue_full_timeout=0.0, register_atexit=False)
        inside = [False]
        def handler(num, frame):            # Ctrl-C, only while log_signal() runs
            if inside[0]:
                raise KeyboardInterrupt
        signal.signal(signal.SIGINT, handler)
        killer = subprocess.Popen([sys.executable, "-c",
            "import os,sys,time,signal\\nend=time.monotonic()+4\\n"
            "while time.monotonic()<end: os.kill(int(sys.argv[1]), signal.SIGINT); time.sleep(0.003)",
            str(os.getpid())])
        ok, end, i = [], time.monotonic() + 5, 0
        while time.monotonic() < end:
            try:
                inside[0] = True
                sid = t.log_signal({"symbol": "AAPL", "action": "BUY", "entry_price": 1, "confidence": 1, "seq": i})
                inside[0] = False
                ok.append(sid)
            except KeyboardInterrupt:
                inside[0] = False
            i += 1
        killer.wait()
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        t.close(30)
        print(json.dumps(ok))
    """, db, timeout=60)
    assert out.returncode == 0, out.stderr[-3000:]       # a deadlock: faulthandler's stack dump
    returned = json.loads(out.stdout)
    conn = sqlite3.connect(str(db))
    stored = {r[0] for r in conn.execute("SELECT signal_id FROM signals")}
    conn.close()
    missing = [s for s in returned if s not in stored]
    assert not missing, f"{len(missing)} of {len(returned)} returned signal_ids are not stored"


def test_fork_while_the_spill_lock_is_held_does_not_keep_it_held(db):
    """A child forked while the parent holds the spill lock must not keep holding it."""
    path = f"{db}.spill.jsonl"
    proc = spawn_script("""
        import os, sys, time
        from argo_signals import spill
        with spill._locked(sys.argv[1]):     # as if the writer were appending right now
            child = os.fork()
            if child == 0:
                time.sleep(20)
                os._exit(0)
        print("released", child, flush=True)  # the parent's append is long over
        time.sleep(20)
    """, path)
    out = LineReader(proc.stdout)
    try:
        word, child = out.readline(10).split()
        assert word == "released"
        from argo_signals import spill
        spill.append(path, [], [("x", {"outcome": "win"})], timeout=1.0)   # another process
    finally:
        proc.kill()
        try:
            os.kill(int(child), 9)
        except (NameError, ProcessLookupError, ValueError):
            pass
    assert "update_of" in open(path).read()


def test_updates_keep_their_order_when_close_salvages_while_the_writer_holds_a_batch(db):
    t = SignalTracker(db, busy_timeout=2.0, batch_size=1, batch_timeout=0.01, register_atexit=False)
    sid = t.log_signal(make_signal(1))
    assert t.flush(5)
    holder = lock_db(db)
    t.update_signal(sid, outcome="win")      # the writer thread takes it and waits for the lock
    import time
    time.sleep(0.3)
    t.update_signal(sid, outcome="loss")     # newer: salvaged to the spill by close()
    assert t.close(1) is False
    time.sleep(3.0)                          # the thread gives up and spills the older update
    holder.rollback()
    holder.close()
    t2 = SignalTracker(db, register_atexit=False)
    assert t2.flush(5)
    t2.close(5)
    conn = sqlite3.connect(str(db))
    outcome = conn.execute("SELECT outcome FROM signals WHERE signal_id = ?", (sid,)).fetchone()[0]
    conn.close()
    assert outcome == "loss"


def test_close_keeps_its_deadline_when_the_spill_lock_is_busy(db):
    import subprocess
    import sys
    import time
    t = SignalTracker(db, busy_timeout=0.1, **QUIET)
    holder = lock_db(db)
    locker = subprocess.Popen(
        [sys.executable, "-c", "import fcntl,os,sys,time\nfd=os.open(sys.argv[1],os.O_RDWR|os.O_CREAT)\n"
         "fcntl.flock(fd,fcntl.LOCK_EX)\nprint('locked',flush=True)\ntime.sleep(40)", f"{db}.spill.jsonl.lock"],
        stdout=subprocess.PIPE, text=True)
    try:
        assert locker.stdout.readline().strip() == "locked"
        t.log_signal(make_signal(1))
        start = time.monotonic()
        t.close(1)
        took = time.monotonic() - start
    finally:
        locker.kill()
        locker.wait()
        holder.rollback()
        holder.close()
    assert took < 5, f"close(1) took {took:.1f}s"


def test_sigterm_with_an_application_handler_during_at_exit_close_still_closes_every_tracker(tmp_path):
    import signal
    import subprocess
    import sys
    import time
    db1, db2 = tmp_path / "a.db", tmp_path / "b.db"
    SignalTracker(db1, register_atexit=False).close()
    holder = lock_db(db1)
    code = """
import signal, sys
from argo_signals import SignalTracker
signal.signal(signal.SIGTERM, lambda n, f: sys.exit(3))    # the application's own handler
q = dict(batch_size=1_000_000, batch_timeout=3600, flush_interval=3600)
t1 = SignalTracker(sys.argv[1], handle_signals=True, busy_timeout=5, **q)
t2 = SignalTracker(sys.argv[2], handle_signals=True, **q)
for i in range(5):
    s = {"symbol": "AAPL", "action": "BUY", "entry_price": 1, "confidence": 1, "seq": i}
    t1.log_signal(s); t2.log_signal(s)
print("exiting", flush=True)
"""
    p = subprocess.Popen([sys.executable, "-c", code, str(db1), str(db2)], stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True)
    try:
        assert p.stdout.readline().strip() == "exiting"
        time.sleep(0.7)                      # the at-exit close of t1 waits for the lock
        p.send_signal(signal.SIGTERM)
        time.sleep(0.8)
    finally:
        holder.rollback()
        holder.close()
    _, err = p.communicate(timeout=40)
    assert count(db1) == 5, err[-1500:]
    assert count(db2) == 5, err[-1500:]
