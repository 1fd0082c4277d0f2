"""Forks that meet a thread of ours at work, and forked children that end by ``os._exit()``.

Each test runs in a real process and forks for real (``os.fork``, fork-context ``Pool`` and
``ProcessPoolExecutor``); every wait has a deadline, so a child that inherited a lock held shows
as a failure here, not as a hung suite."""
import json
import sqlite3

from argo_signals import SignalTracker

from conftest import WAIT_CHILD, count, run_script

# Another process holds the database's write lock for a while (prints "locked" once it has it).
HOLD_LOCK = """
import subprocess
def hold_lock(db, seconds):
    p = subprocess.Popen([sys.executable, "-c", "import sqlite3, sys, time; "
                          "c = sqlite3.connect(sys.argv[1], isolation_level=None); "
                          "c.execute('BEGIN EXCLUSIVE'); print('locked', flush=True); "
                          "time.sleep(float(sys.argv[2]))", db, str(seconds)],
                         stdout=subprocess.PIPE, text=True)
    assert p.stdout.readline().strip() == "locked"
    return p
"""


# A writer that is inside SQLite, in the middle of its transaction, for 0.3 s whenever it
# inserts a row of strategy "slow" (a user function called by a temporary trigger).
SLOW_WRITER = """
import json, multiprocessing, os, signal, sqlite3, sys, threading, time
from concurrent.futures import ProcessPoolExecutor
from argo_signals import SignalTracker
db = sys.argv[1]
inside = threading.Event()
def slow():
    inside.set()
    time.sleep(0.3)
def on_connect(conn):
    conn.create_function("slow", 0, slow)
    conn.execute("CREATE TEMP TRIGGER IF NOT EXISTS slow_ins AFTER INSERT ON main.signals "
                 "WHEN NEW.strategy = 'slow' BEGIN SELECT slow(); END")
def sig(i, strategy="s"):
    return {"symbol": "FORK", "action": "BUY", "entry_price": 1 + i, "confidence": 1, "strategy": strategy}
def stored(sid):
    conn = sqlite3.connect(db)
    try:
        return conn.execute("SELECT count(*) FROM signals WHERE signal_id = ?", (sid,)).fetchone()[0]
    finally:
        conn.close()
t = SignalTracker(db, sync_enabled=False, on_connect=on_connect, batch_size=1,
                  busy_timeout=0.3, write_retry_budget=1.0, register_atexit=False)
def writer_busy():
    inside.clear()
    t.log_signal(sig(0, "slow"))         # batch_size=1: the writer thread takes it at once
    assert inside.wait(10), "the writer never reached the trigger"
"""


def test_fork_while_the_writer_is_inside_a_transaction_gives_children_that_write(db):
    """Before: a child forked while the writer thread was inside its transaction inherited
    SQLite's in-process lock state; its first log_signal() waited out the retry budget on a
    lock nobody held, then spilled (not in the database when it returned)."""
    SignalTracker(db, register_atexit=False).close()   # the schema exists before on_connect
    out = run_script(SLOW_WRITER + WAIT_CHILD + """
def work(i):
    t0 = time.monotonic()
    sid = t.log_signal(sig(i))
    return [stored(sid), round(time.monotonic() - t0, 2)]

res = {}
writer_busy()
t0 = time.monotonic()
pid = os.fork()
if pid == 0:
    code = 1
    try:
        got = work(1)
        code = 0 if got[0] == 1 and got[1] < 0.9 else 1
    finally:
        os._exit(code)
res["fork_s"] = round(time.monotonic() - t0, 2)
res["fork"] = wait_child(pid, 20)

ctx = multiprocessing.get_context("fork")
writer_busy()
with ctx.Pool(2) as pool:
    res["pool"] = pool.map_async(work, range(10, 14)).get(20)
writer_busy()
with ProcessPoolExecutor(2, mp_context=ctx) as ex:
    res["executor"] = [f.result(20) for f in [ex.submit(work, i) for i in range(20, 24)]]
print(json.dumps(res))
t.close(5)
""", db, timeout=90)
    assert out.returncode == 0, out.stderr[-3000:]
    res = json.loads(out.stdout)
    assert res["fork"] == 0, res
    for kind in ("pool", "executor"):
        assert all(n == 1 and took < 0.9 for n, took in res[kind]), res
    assert res["fork_s"] < 1.5, res   # the fork waited for the writer's transaction (0.3 s), bounded


def test_fork_that_cannot_wait_for_a_stuck_writer_still_gives_a_working_child(db):
    """A writer stuck in a long busy wait (another process holds the database) makes the fork
    wait no longer than its bound; the child does not use the connection it inherited."""
    SignalTracker(db, register_atexit=False).close()
    out = run_script("""
import os, sqlite3, sys, threading, time
from argo_signals import SignalTracker
db = sys.argv[1]
""" + HOLD_LOCK + WAIT_CHILD + """
locker = hold_lock(db, 2.0)
t = SignalTracker(db, sync_enabled=False, batch_size=1, busy_timeout=8, write_retry_budget=10,
                  register_atexit=False)
sig = {"symbol": "FORK", "action": "BUY", "entry_price": 1, "confidence": 1}
t.log_signal(sig)
time.sleep(0.3)                                   # the writer waits inside SQLite for the lock
t0 = time.monotonic()
pid = os.fork()
if pid == 0:
    code = 1
    try:
        sid = t.log_signal(dict(sig, strategy="child"))
        conn = sqlite3.connect(db)
        code = 0 if conn.execute("SELECT count(*) FROM signals WHERE signal_id = ?", (sid,)).fetchone()[0] else 1
    finally:
        os._exit(code)
fork_s = time.monotonic() - t0
status = wait_child(pid, 20)
print(round(fork_s, 2), status, t.close(10))
""", db, timeout=60)
    assert out.returncode == 0, out.stderr[-3000:]
    fork_s, status, closed = out.stdout.split()
    assert status == "0" and closed == "True", out.stdout
    assert float(fork_s) < 1.5, out.stdout        # the bound (1 s), not the lock (2 s)


def test_pool_replacing_workers_while_the_parent_logs_from_a_thread(db):
    """Pool(maxtasksperchild=2) forks a new worker every two tasks while a strategy thread of
    the parent logs (its writer commits a batch of one every few milliseconds)."""
    SignalTracker(db, register_atexit=False).close()
    out = run_script("""
import multiprocessing, sqlite3, sys, threading, time
from argo_signals import SignalTracker
db = sys.argv[1]
t = SignalTracker(db, sync_enabled=False, batch_size=1, busy_timeout=0.5, write_retry_budget=1.0,
                  register_atexit=False)
sig = lambda i, s: {"symbol": "FORK", "action": "BUY", "entry_price": 1 + i, "confidence": 1, "strategy": s}
stop = threading.Event()
def strategy():
    i = 0
    while not stop.is_set():
        t.log_signal(sig(i, "parent")); i += 1
        time.sleep(0.0005)
def work(i):
    sid = t.log_signal(sig(i, "child"))
    conn = sqlite3.connect(db)
    return conn.execute("SELECT count(*) FROM signals WHERE signal_id = ?", (sid,)).fetchone()[0]
th = threading.Thread(target=strategy); th.start()
try:
    with multiprocessing.get_context("fork").Pool(2, maxtasksperchild=2) as pool:
        got = pool.map_async(work, range(40), chunksize=1).get(30)
finally:
    stop.set(); th.join()
print(sum(got), t.close(10))
""", db, timeout=90)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.split() == ["40", "True"]


def test_first_module_level_log_on_a_thread_while_a_fork_pool_starts(db):
    """The module-level tracker is created under a module lock; a worker forked while another
    thread held it inherited it held and blocked forever in its first log_signal()."""
    SignalTracker(db, register_atexit=False).close()   # ours, but taken out of WAL again:
    conn = sqlite3.connect(db)                          # the creation must wait for the lock
    conn.execute("PRAGMA journal_mode = DELETE")
    conn.close()
    out = run_script("""
import multiprocessing, sqlite3, sys, threading, time
import argo_signals
db = sys.argv[1]
sig = {"symbol": "FORK", "action": "BUY", "entry_price": 1, "confidence": 1}
""" + HOLD_LOCK + """
locker = hold_lock(db, 0.4)            # the tracker's creation waits for it, holding the lock,
def work(i):                            # well within the fork's 1 s bound
    return argo_signals.log_signal(dict(sig, strategy="child%d" % i))
th = threading.Thread(target=argo_signals.log_signal, args=(sig,)); th.start()
time.sleep(0.1)
try:
    with multiprocessing.get_context("fork").Pool(2) as pool:
        ids = pool.map_async(work, range(6)).get(20)
    print(len(ids))
except multiprocessing.TimeoutError:
    print("hung")
th.join()
print(argo_signals.close(10))
""", db, env={"ARGO_SIGNALS_DB": str(db)}, timeout=60)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.split() == ["6", "True"], out.stdout
    assert count(db) == 7


def test_tracker_created_in_a_bare_fork_child_keeps_what_it_returned_through_sigterm(db):
    """A child of os.fork() creates its tracker (handle_signals=True), logs on its main thread
    with a small queue and ends with finally: os._exit(); SIGTERM becomes SystemExit, the
    finally runs, no atexit runs.  Every id the child reported must be in the database."""
    SignalTracker(db, register_atexit=False).close()
    out = run_script("""
import os, signal, sqlite3, sys, time
from argo_signals import SignalTracker
db = sys.argv[1]
r, w = os.pipe()
pid = os.fork()
if pid == 0:
    os.close(r)
    try:
        t = SignalTracker(db, sync_enabled=False, handle_signals=True, max_queue_size=50,
                          batch_size=10_000, batch_timeout=3600, flush_interval=3600)
        i = 0
        while True:
            sid = t.log_signal({"symbol": "FORK", "action": "BUY", "entry_price": 1 + i, "confidence": 1})
            os.write(w, (sid + "\\n").encode())
            i += 1
    finally:
        os._exit(3)
os.close(w)
got = b""
deadline = time.monotonic() + 20
while got.count(b"\\n") < 120 and time.monotonic() < deadline:
    got += os.read(r, 65536)
os.kill(pid, signal.SIGTERM)
while True:
    chunk = os.read(r, 65536)
    if not chunk:
        break
    got += chunk
os.waitpid(pid, 0)
ids = [line for line in got.decode().split("\\n")[:-1]]
stored = {row[0] for row in sqlite3.connect(db).execute("SELECT signal_id FROM signals")}
print(len(ids), len([s for s in ids if s not in stored]))
""", db, timeout=60)
    assert out.returncode == 0, out.stderr[-3000:]
    returned, lost = map(int, out.stdout.split())
    assert returned >= 120 and lost == 0, out.stdout
