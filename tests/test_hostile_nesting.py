"""Writes nested on one thread (an application signal handler that logs while the main thread
writes synchronously) and replays racing each other: each test reproduced a loss, a false
answer or a swallowed exit before its fix.  Real processes, real SQLite files, real signals."""
import subprocess
import sys
import textwrap

PREAMBLE = textwrap.dedent('''
    import os, signal, sqlite3, sys, tempfile, threading, time, logging
    logging.basicConfig(level=logging.CRITICAL)
    from argo_signals import SignalTracker
    d = tempfile.mkdtemp(); db = os.path.join(d, "s.db")
    def sig(i): return {"symbol": "AAPL", "action": "BUY", "entry_price": 100.0 + i,
                        "confidence": 50, "strategy": "s%d" % i}
''')


def _run(body: str) -> str:
    proc = subprocess.run([sys.executable, "-c", PREAMBLE + textwrap.dedent(body)],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout.strip().splitlines()[-1]


def test_nested_sync_write_from_signal_handler_loses_signals():
    """WriteLock.acquire() releases the lock when the calling thread already owns it, so a
    synchronous write nested in an outer one (an app's signal handler that logs a signal while
    the main thread writes synchronously because the queue is full) frees the outer write's
    lock and writes its batch; the outer write then drops len(batch) *other* entries."""
    out = _run('''
        t = SignalTracker(db, sync_enabled=False, max_queue_size=3, batch_size=1000,
                          batch_timeout=30, flush_interval=30, busy_timeout=0.05)
        ids = []
        def producer():
            for i in range(3): ids.append(t.log_signal(sig(100 + i)))
        def handler(num, frame):
            ids.append(t.log_signal(sig(99)))
            th = threading.Thread(target=producer); th.start(); th.join()
        signal.signal(signal.SIGALRM, handler)
        for i in range(3): ids.append(t.log_signal(sig(i)))   # queue full, writer thread asleep
        other = sqlite3.connect(db, isolation_level=None, check_same_thread=False)
        other.execute("BEGIN EXCLUSIVE")
        threading.Timer(0.8, lambda: other.execute("COMMIT")).start()
        signal.setitimer(signal.ITIMER_REAL, 0.3)
        ids.append(t.log_signal(sig(3)))   # synchronous write on the main thread, DB locked
        time.sleep(1.0)
        t.close(5)
        got = {r[0] for r in sqlite3.connect(db).execute("select signal_id from signals")}
        print(len([s for s in ids if s not in got]))
    ''')
    assert out == "0", f"{out} signals lost"


def test_nested_sync_write_after_close_makes_flush_false_forever():
    """Same root cause after close(): the outer drop() pops an empty deque (IndexError, then
    'release unlocked lock'), 'taken' is over-counted, and every later flush()/close()
    returns False although every row is in the database."""
    out = _run('''
        fired, closed = [False], [False]
        def on_connect(conn):   # a deterministic moment inside the outer synchronous write
            if closed[0] and not fired[0]:
                fired[0] = True
                os.kill(os.getpid(), signal.SIGUSR1)
        t = SignalTracker(db, sync_enabled=False, on_connect=on_connect)
        signal.signal(signal.SIGUSR1, lambda n, f: t.log_signal(sig(99)))
        t.log_signal(sig(0))
        assert t.close(5)
        closed[0] = True
        t.log_signal(sig(1))
        n = sqlite3.connect(db).execute("select count(*) from signals").fetchone()[0]
        print(fired[0], n, t.flush(3), t.close(3))
    ''')
    assert out == "True 3 True True", out


def test_two_replays_of_one_taken_spill_reapply_an_older_update():
    """spill.take() hands an existing <spill>.replaying to every replayer (no exclusive claim,
    the lock covers only the read): a slow replay by tracker B commits spilled update U1 after
    tracker A replayed the same file and committed the newer update U2 directly."""
    out = _run('''
        slow = [False]
        def b_connect(conn):
            if slow[0]:
                slow[0] = False
                time.sleep(1.5)
        kw = dict(sync_enabled=False, write_retry_budget=0.3, busy_timeout=0.05,
                  batch_timeout=30, flush_interval=30)
        A = SignalTracker(db, **kw)
        B = SignalTracker(db, on_connect=b_connect, **kw)
        sid = A.log_signal({"symbol": "AAPL", "action": "BUY", "entry_price": 100.0, "confidence": 50})
        assert A.flush(5)
        other = sqlite3.connect(db, isolation_level=None); other.execute("BEGIN EXCLUSIVE")
        A.update_signal(sid, exit_price=1.0); A.flush(3)     # U1 spilled
        B.update_signal(sid, exit_price=1.0); B.flush(3)     # B's connection closed
        other.execute("COMMIT"); other.close()
        slow[0] = True
        tb = threading.Thread(target=B.flush, args=(10,)); tb.start()
        time.sleep(0.5)
        A.update_signal(sid, exit_price=2.0)                 # U2, after U1
        assert A.flush(5)
        tb.join(10)
        print(sqlite3.connect(db).execute("select exit_price from signals").fetchone()[0])
    ''')
    assert out == "2.0", f"exit_price {out}: the older spilled update overwrote the newer one"


def test_sys_exit_from_handler_during_sync_write_is_swallowed():
    """An app signal handler logs a last signal then sys.exit()s while the main thread writes
    synchronously: the nested write freed the outer write's lock, the outer finally's
    release() raises 'release unlocked lock', which replaces SystemExit and is then swallowed
    by Engine._write_to's `except Exception`: the process keeps running."""
    out = _run('''
        fired, closed = [False], [False]
        def on_connect(conn):
            if closed[0] and not fired[0]:
                fired[0] = True
                os.kill(os.getpid(), signal.SIGUSR1)
        t = SignalTracker(db, sync_enabled=False, on_connect=on_connect)
        def handler(n, f):
            t.log_signal(sig(99)); sys.exit(3)
        signal.signal(signal.SIGUSR1, handler)
        t.close(5)
        closed[0] = True
        try:
            t.log_signal(sig(1))
        except SystemExit:
            print("exited")
        else:
            print("still running")
    ''')
    assert out == "exited", out


def test_slow_replay_removes_a_newer_taken_spill():
    """Replay A (slow) and B take the same <spill>.replaying; B commits and removes it; a newer
    spill is renamed to .replaying by C's replay; A then commits its old lines and removes
    .replaying by name (sink.py os.remove(taken.path)) - C's file.  C's commit fails and
    give_back() finds nothing to put back: the newer signal is gone, later flush() is True."""
    out = _run('''
        a_slow, c_fail = [False], [False]
        a_done = threading.Event()
        def a_connect(conn):
            if a_slow[0]:
                a_slow[0] = False; time.sleep(2.0)
        def c_connect(conn):
            if c_fail[0]:
                c_fail[0] = False; a_done.wait(10)
                raise sqlite3.OperationalError("database is locked")
        kw = dict(sync_enabled=False, write_retry_budget=0.3, busy_timeout=0.05,
                  batch_timeout=30, flush_interval=30)
        A = SignalTracker(db, on_connect=a_connect, **kw)
        B = SignalTracker(db, **kw)
        C = SignalTracker(db, on_connect=c_connect, **kw)
        def lock():
            o = sqlite3.connect(db, isolation_level=None); o.execute("BEGIN EXCLUSIVE"); return o
        o = lock(); A.log_signal(sig(1)); B.log_signal(sig(2)); A.flush(2); B.flush(2)
        o.execute("COMMIT"); o.close()
        a_slow[0] = True
        ta = threading.Thread(target=lambda: (A.flush(10), a_done.set())); ta.start()
        time.sleep(0.4)
        B.flush(5)
        o = lock(); new = C.log_signal(sig(3)); C.flush(2); o.execute("COMMIT"); o.close()
        c_fail[0] = True
        C.flush(10); ta.join(10)
        ok = C.flush(3)
        got = {r[0] for r in sqlite3.connect(db).execute("select signal_id from signals")}
        print(ok, new in got)
    ''')
    assert out in ("False False", "True True"), f"flush() True / signal in db: {out}"


CLOSE_UNDER_TIMER = '''
    t = SignalTracker(db, sync_enabled=False, batch_size=1000, batch_timeout=30, flush_interval=30,
                      max_queue_size=100_000, max_batch=500, register_atexit=False)
    ids = [t.log_signal(sig(i)) for i in range(6_000)]   # close() writes most of them itself
    handled = []
    def handler(num, frame):
        handled.append(t.log_signal(sig(100_000 + len(handled))))
    signal.signal(signal.SIGALRM, handler)
    signal.setitimer(signal.ITIMER_REAL, FIRST, EVERY)
    t0 = time.monotonic()
    ok = t.close(5)
    took = time.monotonic() - t0
    signal.setitimer(signal.ITIMER_REAL, 0)
    returned = len(handled)   # ids returned before close() returned, and just after
    stored = {r[0] for r in sqlite3.connect(db).execute("select signal_id from signals")}
    spilled = open(db + ".spill.jsonl").read() if os.path.exists(db + ".spill.jsonl") else ""
    lost = [s for s in ids + handled[:returned] if s not in stored and s not in spilled]
    print(returned, len(lost), ok, round(took, 2))
'''


def test_signal_handler_logging_while_close_writes_the_queue_is_kept():
    """close() wrote up to the count it took at its start: a signal logged by a handler that
    interrupted close()'s own write (its id returned) was left queued, and close() then
    returned True and marked the tracker closed, so it vanished at exit."""
    out = _run("FIRST, EVERY = 0.05, 0\n" + textwrap.dedent(CLOSE_UNDER_TIMER))
    returned, lost, ok, took = out.split()
    assert returned == "1" and lost == "0" and ok == "True", out


def test_a_storm_of_handlers_logging_during_close_neither_loses_nor_hangs():
    """A 2 ms timer whose handler logs, through the whole close(): nested handler calls piled
    up (RecursionError, or close() hung far past its timeout) or lost their signals."""
    out = _run("FIRST, EVERY = 0.002, 0.002\n" + textwrap.dedent(CLOSE_UNDER_TIMER))
    returned, lost, ok, took = out.split()
    assert int(returned) > 10 and lost == "0", out
    assert float(took) < 8, out
