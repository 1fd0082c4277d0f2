"""Lifecycle events that overlap: close + close, SIGTERM + close, Ctrl-C + a write, pools, a
database that cannot be written.  Real SQLite files; real processes wherever a signal, an exit
or a fork is involved."""
import json
import os
import signal
import sqlite3
import subprocess
import sys
import threading
import time

import pytest

from argo_signals import SignalTracker

from conftest import ROOT, WAIT_CHILD, LineReader, count, make_signal, rows, run_script, spawn_script

QUIET = dict(batch_size=1_000_000, batch_timeout=3600, flush_interval=3600, register_atexit=False)
UNSAVED_PREFIX = "argo-signals-unsaved: "


def spill_lines(db):
    p = f"{db}.spill.jsonl"
    return sum(1 for _ in open(p)) if os.path.exists(p) else 0


def seqs(db):
    return sorted(json.loads(r["metadata"])["seq"] for r in rows(db) if r["metadata"])


def hold_write_lock(db):
    """An outside writer holding the database's write lock (what another process would do)."""
    conn = sqlite3.connect(str(db), isolation_level=None, check_same_thread=False)
    conn.execute("BEGIN IMMEDIATE")
    return conn


# -- close() from several threads ---------------------------------------------------------------
def test_concurrent_closes_each_return_after_everything_is_committed(db):
    t = SignalTracker(db, max_queue_size=50_000, **QUIET)
    for i in range(20_000):
        t.log_signal(make_signal(i))
    results = []

    def closer():
        ok = t.close(30)
        results.append((ok, count(db)))

    threads = [threading.Thread(target=closer) for _ in range(4)]
    for th in threads:
        th.start()
    for th in threads:
        th.join(60)
    assert len(results) == 4
    assert all(ok for ok, _ in results), results
    assert all(n == 20_000 for _, n in results), results


def test_producers_racing_close_lose_nothing(db):
    for _ in range(3):
        if db.exists():
            db.unlink()
        t = SignalTracker(db, **{**QUIET, "batch_size": 7})
        returned = [0] * 4
        stop = threading.Event()

        def produce(k, t=t, stop=stop, returned=returned):
            i = 0
            while not stop.is_set() and i < 3000:
                t.log_signal(make_signal(i, strategy=f"p{k}"))
                returned[k] += 1
                i += 1

        threads = [threading.Thread(target=produce, args=(k,)) for k in range(4)]
        for th in threads:
            th.start()
        time.sleep(0.05)
        t.close(30)
        stop.set()
        for th in threads:
            th.join(30)
        t.close(30)
        assert count(db) == sum(returned)


# -- signals --------------------------------------------------------------------------------------
def test_sigterm_during_close_commits_everything_then_exits(db):
    proc = spawn_script("""
        import os, signal, sys, threading, time
        from argo_signals import SignalTracker
        t = SignalTracker(sys.argv[1], batch_size=1_000_000, batch_timeout=3600, flush_interval=3600,
                          max_queue_size=100_000, handle_signals=True)
        for i in range(60_000):
            t.log_signal({"symbol": "AAPL", "action": "BUY", "entry_price": 1, "confidence": 1})
        threading.Timer(0.05, os.kill, (os.getpid(), signal.SIGTERM)).start()
        t.close(30)
        time.sleep(30)  # the deferred SIGTERM ends the process before this returns
    """, db)
    rc = proc.wait(40)
    assert rc in (-signal.SIGTERM, 128 + signal.SIGTERM), proc.stderr.read()
    assert count(db) + spill_lines(db) == 60_000
    assert count(db) == 60_000


def test_sigterm_while_the_main_thread_waits_for_room_does_not_deadlock(db, tmp_path):
    progress = tmp_path / "progress"
    sqlite3.connect(str(db)).close()
    proc = spawn_script("""
        import sys
        from argo_signals import SignalTracker
        t = SignalTracker(sys.argv[1], batch_size=10, batch_timeout=0.05, flush_interval=3600,
                          max_queue_size=50, queue_full_timeout=5.0, busy_timeout=0.05,
                          write_retry_budget=60, handle_signals=True)
        print("ready", flush=True)
        with open(sys.argv[2], "w") as f:
            for i in range(100_000):
                t.log_signal({"symbol": "AAPL", "action": "BUY", "entry_price": 1, "confidence": 1,
                              "seq": i})
                f.write(f"{i}\\n")
                f.flush()
    """, db, progress)
    out = LineReader(proc.stdout)
    assert out.readline().strip() == "ready"
    blocker = hold_write_lock(db)   # the writer cannot commit: the queue fills, main waits for room
    time.sleep(1.0)
    proc.send_signal(signal.SIGTERM)
    time.sleep(0.5)
    blocker.execute("ROLLBACK")
    blocker.close()
    rc = proc.wait(30)
    assert rc in (-signal.SIGTERM, 128 + signal.SIGTERM), proc.stderr.read()
    done = [int(x) for x in progress.read_text().split()]
    assert done, "the child logged nothing"
    stored = set(seqs(db))
    assert set(done) <= stored


@pytest.mark.parametrize("delay", [0.15, 0.4, 0.8])
def test_ctrl_c_during_a_synchronous_write_loses_nothing(db, delay):
    out = run_script("""
        import json, signal, sys
        from argo_signals import SignalTracker
        t = SignalTracker(sys.argv[1], batch_size=1_000_000, batch_timeout=3600, flush_interval=3600,
                          max_queue_size=40_000, queue_full_timeout=0.01, register_atexit=False)
        for i in range(40_000):
            t.log_signal({"symbol": "AAPL", "action": "BUY", "entry_price": 1, "confidence": 1, "seq": i})
        signal.setitimer(signal.ITIMER_REAL, float(sys.argv[2]))
        signal.signal(signal.SIGALRM, signal.default_int_handler)  # Ctrl-C at a random moment
        interrupted, last = False, 39_999
        try:
            for i in range(40_000, 80_000):   # the queue is full: this thread writes for everyone
                t.log_signal({"symbol": "AAPL", "action": "BUY", "entry_price": 1, "confidence": 1, "seq": i})
                last = i
        except KeyboardInterrupt:
            interrupted = True
        print(json.dumps({"interrupted": interrupted, "last": last, "closed": t.close(30)}))
    """, db, delay)
    assert out.returncode == 0, out.stderr
    res = json.loads(out.stdout)
    assert res["interrupted"]
    stored = set(seqs(db))
    assert set(range(res["last"] + 1)) <= stored
    assert res["closed"] is True


# -- pools ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["pool", "executor"])
def test_fork_pool_tasks_are_committed_when_the_with_block_exits(db, kind):
    out = run_script("""
        import multiprocessing, sqlite3, sys
        from concurrent.futures import ProcessPoolExecutor
        from argo_signals import SignalTracker
        t = SignalTracker(sys.argv[1], batch_size=10_000, batch_timeout=3600, flush_interval=3600)

        def work(i):
            t.log_signal({"symbol": "POOL", "action": "BUY", "entry_price": 1, "confidence": 1, "seq": i})
            return i

        ctx = multiprocessing.get_context("fork")
        if sys.argv[2] == "pool":
            with ctx.Pool(4) as pool:
                done = pool.map(work, range(1000))
        else:
            with ProcessPoolExecutor(4, mp_context=ctx) as ex:
                done = list(ex.map(work, range(1000)))
        conn = sqlite3.connect(sys.argv[1])
        print(len(done), conn.execute("SELECT count(*) FROM signals WHERE symbol = 'POOL'").fetchone()[0])
    """, db, kind, timeout=90)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["1000", "1000"]


# -- a database that cannot be written --------------------------------------------------------------
def test_missing_directory_fails_fast_naming_the_path(tmp_path):
    path = tmp_path / "does" / "not" / "exist" / "s.db"
    with pytest.raises(OSError) as info:
        SignalTracker(path, register_atexit=False)
    assert str(path) in str(info.value)
    assert not (tmp_path / "does").exists()


@pytest.mark.skipif(not os.path.isdir("/proc/self"), reason="uses /proc as a directory nobody can write")
def test_unwritable_directory_fails_fast_naming_the_path():
    # /proc exists but takes no new files, whoever runs the test (chmod does not stop root)
    with pytest.raises(OSError) as info:
        SignalTracker("/proc/argo-signals-test.db", register_atexit=False)
    assert "/proc/argo-signals-test.db" in str(info.value)


def test_nothing_writable_at_close_prints_unsaved_signals_for_ingest(tmp_path):
    db = tmp_path / "s.db"
    spill_dir = tmp_path / "spill"
    spill_dir.mkdir()
    SignalTracker(db, register_atexit=False).close()  # the schema exists; then the disk "fills"
    out = run_script("""
        import json, os, sys
        from argo_signals import SignalTracker
        t = SignalTracker(sys.argv[1], spill_path=sys.argv[2], write_retry_budget=0.2,
                          batch_size=1_000_000, batch_timeout=3600, flush_interval=3600,
                          register_atexit=False,
                          on_connect=lambda c: c.execute("PRAGMA query_only = ON"))
        for i in range(25):
            t.log_signal({"symbol": "FULL", "action": "BUY", "entry_price": 1, "confidence": 1, "seq": i})
        os.rmdir(os.path.dirname(sys.argv[2]))     # the spill's disk is gone too
        ok = t.close(5)
        print(json.dumps({"closed": ok, "unsaved": t.stats()["unsaved"]}))
    """, db, spill_dir / "s.spill.jsonl")
    assert out.returncode == 0, out.stderr
    res = json.loads(out.stdout)
    assert res == {"closed": False, "unsaved": 25}
    lines = [ln for ln in out.stderr.splitlines() if ln.startswith(UNSAVED_PREFIX)]
    assert len(lines) == 25
    assert count(db) == 0
    # the operator pipes those lines back in, prefix and all
    ingest = subprocess.run([sys.executable, "-m", "argo_signals.cli", "ingest", "--db", str(db), "-"],
                            input="\n".join(lines) + "\n", capture_output=True, text=True, timeout=60,
                            env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert ingest.returncode == 0, ingest.stderr
    got = rows(db)
    assert sorted(json.loads(r["metadata"])["seq"] for r in got) == list(range(25))


# -- spill: flush truth, replay on flush, updates after their inserts, bad lines ---------------------
def test_flush_is_false_while_rows_are_only_spilled_and_true_after_replay(db):
    t = SignalTracker(db, write_retry_budget=0.2, busy_timeout=0.05, **QUIET)
    t.log_signal(make_signal(0))
    assert t.flush(5)
    blocker = hold_write_lock(db)
    for i in range(1, 1500):
        t.log_signal(make_signal(i))
    assert t.flush(10) is False
    assert t.stats()["spill_pending"] == 1499
    blocker.execute("ROLLBACK")
    blocker.close()
    assert t.flush(10) is True            # replays: no tick needed
    assert count(db) == 1500 and t.stats()["spill_pending"] == 0
    assert t.close(5) is True


def test_update_of_a_spilled_insert_lands_after_replay(db):
    t = SignalTracker(db, write_retry_budget=0.2, busy_timeout=0.05, **QUIET)
    t.log_signal(make_signal(0))
    assert t.flush(5)
    blocker = hold_write_lock(db)
    sid = t.log_signal(make_signal(1))
    assert t.flush(5) is False              # spilled
    blocker.execute("ROLLBACK")
    blocker.close()
    t.update_signal(sid, order_id="X-1", outcome="win")
    assert t.close(10) is True
    row = rows(db, "signal_id = ?", (sid,))[0]
    assert (row["order_id"], row["outcome"]) == ("X-1", "win")
    assert t.stats()["unknown_updates"] == 0


def test_bad_spill_lines_are_set_aside_and_the_rest_replays(db, caplog):
    good = SignalTracker(db, **QUIET)
    good.close()
    from argo_signals.record import FINISHED_FIELDS, finish, normalise
    valid = [dict(zip(FINISHED_FIELDS, finish(normalise(make_signal(i))))) for i in range(3)]
    bad_price = dict(valid[0], signal_id="bad-price", entry_price="abc")
    lines = ["123", "null", json.dumps({"update_of": "x"}), json.dumps(bad_price)]
    lines += [json.dumps(v) for v in valid]
    with open(f"{db}.spill.jsonl", "w") as f:
        f.write("\n".join(lines) + "\n")
    t = SignalTracker(db, **QUIET)
    assert t.flush(5) is True
    t.close()
    assert count(db) == 3
    assert {r["signal_id"] for r in rows(db)} == {v["signal_id"] for v in valid}
    bad = open(f"{db}.spill.jsonl.bad").read().splitlines()
    assert len(bad) == 4
    assert not os.path.exists(f"{db}.spill.jsonl")


# -- a new database with sync on; writes after close --------------------------------------------------
def test_new_database_with_sync_creates_the_schema_without_lock_warnings(tmp_path, caplog):
    from argo_signals.testing import AlpineServer
    server = AlpineServer("k").start()
    try:
        for i in range(6):
            db = tmp_path / f"new{i}.db"
            with SignalTracker(db, alpine_url=server.url, api_key="k", register_atexit=False) as t:
                t.log_signal(make_signal(i))
                t.flush(5)
    finally:
        server.stop()
    assert "locked" not in caplog.text


def test_log_after_close_reuses_one_connection(db):
    opened = []
    t = SignalTracker(db, on_connect=opened.append, **QUIET)
    t.close()
    before = len(opened)
    for i in range(200):
        t.log_signal(make_signal(i))
    assert count(db) == 200
    assert len(opened) - before <= 1


def test_tracker_dropped_without_close_is_still_written_at_exit(db):
    out = run_script("""
        import gc, sys
        from argo_signals import SignalTracker
        t = SignalTracker(sys.argv[1], batch_size=10_000, batch_timeout=3600, flush_interval=3600)
        for i in range(300):
            t.log_signal({"symbol": "GONE", "action": "BUY", "entry_price": 1, "confidence": 1})
        del t
        gc.collect()
    """, db)
    assert out.returncode == 0, out.stderr
    assert count(db) == 300


# -- module state re-created in a forked child ----------------------------------------------------
FORK_RESETS = """
import json, os, sys
from argo_signals import SignalTracker, lifecycle, record, spill
db = sys.argv[1]
calls = []
lifecycle.after_fork_in_child(lambda: calls.append("first"))
lifecycle.after_fork_in_child(lambda: calls.append("second"))

def node(signal_id):            # the per-process random bits of an id (UUIDv7 layout)
    parts = signal_id.split("-")
    return parts[2][1:] + parts[3]

def fork_and_report():
    # the parent holds the spill file's lock across the fork, as a thread spilling would
    with spill._locked(spill.spill_path(db)):
        parent_node = node(record.new_signal_id())
        r, w = os.pipe()
        pid = os.fork()
        if pid == 0:
            try:
                os.close(r)
                try:
                    with spill._locked(spill.spill_path(db), timeout=2.0):
                        lock = "free"
                except OSError as exc:
                    lock = str(exc)
                out = {"calls": calls, "lock": lock, "new_node": node(record.new_signal_id()) != parent_node}
                os.write(w, json.dumps(out).encode())
            finally:
                os._exit(0)
    os.close(w)
    with os.fdopen(r) as f:
        got = json.loads(f.read() or "null")
    assert wait_child(pid, 10) != "hung"
    return got

before = fork_and_report()          # no tracker exists yet
t = SignalTracker(db, sync_enabled=False, register_atexit=False)
after = fork_and_report()
t.close()
print(json.dumps([before, after]))
"""


def test_fork_resets_run_in_every_child_in_registration_order(db):
    """What modules register with ``lifecycle.after_fork_in_child`` runs in a forked child
    whether or not a tracker exists: the child draws new id bits and gets a spill lock that the
    parent's holder cannot keep from it."""
    p = run_script(WAIT_CHILD + FORK_RESETS, db, timeout=60)
    assert p.returncode == 0, p.stderr
    before, after = json.loads(p.stdout.strip().splitlines()[-1])
    for child in (before, after):
        assert child == {"calls": ["first", "second"], "lock": "free", "new_node": True}
