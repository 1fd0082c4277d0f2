"""Where the process meets the world outside it: other processes updating a signal before its
insert lands, the database file renamed away, a disk that fills in the middle of a spill
append, spills replayed under a deadline, and rows SQLite itself refuses.  Each test
reproduced a loss, a wrong value or a hang before its fix.  Real processes, files, limits."""
import json
import logging
import os
import sqlite3
import threading
import time
from pathlib import Path

import pytest

from argo_signals import SignalTracker, spill
from argo_signals.record import FINISHED_FIELDS, finish, normalise

from conftest import LineReader, count, make_signal, rows, run_script, spawn_script, wait_for

QUIET = dict(batch_size=10_000, batch_timeout=3600, flush_interval=3600, register_atexit=False)


def read_only_while(flag):
    """on_connect hook: the connection refuses writes while ``flag`` is set."""
    def hook(conn):
        if flag.is_set():
            conn.execute("PRAGMA query_only = 1")
    return hook


def spill_of(db):
    return Path(f"{db}.spill.jsonl")


# -- updates that arrive before their insert ---------------------------------------------------
def test_update_from_another_process_before_the_insert_lands_is_kept(db):
    with SignalTracker(db, **QUIET) as t:
        sid = t.log_signal(make_signal(0))       # queued, not committed yet
        out = run_script("""
            import sys
            from argo_signals import SignalTracker
            w = SignalTracker(sys.argv[1], register_atexit=False)
            w.update_signal(sys.argv[2], order_id="ORD-1")
            w.update_signal(sys.argv[2], order_id="ORD-2", outcome="win")
            print(w.close(10))
        """, db, sid)
        assert out.returncode == 0, out.stderr
        assert out.stdout.split() == ["True"]
        s = t.stats()
        assert s["waiting_updates"] == 2 and s["waiting_update_oldest_s"] >= 0
        assert t.flush(5)
        assert t.stats()["waiting_updates"] == 0
    (r,) = rows(db)
    assert (r["order_id"], r["outcome"]) == ("ORD-2", "win")   # both, in call order
    assert count(db, "waiting_updates") == 0


def test_an_update_waiting_past_its_age_is_reported_once_never_dropped(db, caplog):
    from click.testing import CliRunner
    from argo_signals.cli import main
    caplog.set_level(logging.WARNING, "argo_signals")
    with SignalTracker(db, **{**QUIET, "flush_interval": 0.05, "waiting_update_max_age": 0.1}) as t:
        t.update_signal("not-yet", outcome="win")
        assert t.flush(5)
        assert wait_for(lambda: t.stats()["waiting_updates_overdue"] == 1, 5)
        time.sleep(0.3)                          # several more ticks: still reported once
        assert t.stats()["waiting_updates_overdue"] == 1 and t.stats()["waiting_updates"] == 1
    assert sum("not-yet" in r.getMessage() and "waiting" in r.getMessage()
               for r in caplog.records if r.levelno == logging.WARNING) == 1
    res = CliRunner().invoke(main, ["status", "--db", str(db), "--json"])
    assert res.exit_code == 0, res.output
    data = json.loads(res.stdout)
    assert data["waiting_updates"] == 1 and data["waiting_update_oldest_s"] >= 0.1
    with SignalTracker(db, **QUIET) as t:        # the insert lands at last: applied then
        t.log_signal(make_signal(0, signal_id="not-yet"))
    assert rows(db)[0]["outcome"] == "win" and count(db, "waiting_updates") == 0


# -- the database renamed away while a tracker runs -------------------------------------------
def test_mv_of_the_database_keeps_every_confirmed_row_in_the_moved_file(tmp_path):
    db, archive, stop = tmp_path / "signals.db", tmp_path / "signals-2026-01-01.db", tmp_path / "stop"
    proc = spawn_script("""
        import os, sys, time
        from argo_signals import SignalTracker
        t = SignalTracker(sys.argv[1], batch_size=5, batch_timeout=0.02, flush_interval=0.05)
        while not os.path.exists(sys.argv[2]):
            ids = [t.log_signal({"symbol": "AAPL", "entry_price": 1, "confidence": 1}) for _ in range(10)]
            if t.flush(10):
                print(" ".join(ids), flush=True)
            time.sleep(0.01)
        print("closed", t.close(10), flush=True)
    """, db, stop)
    reader = LineReader(proc.stdout)
    before = [reader.readline(20).split() for _ in range(3)]
    os.rename(db, archive)                       # the daily archive step
    moved_at = time.monotonic()
    after = [reader.readline(20).split() for _ in range(5)]
    stop.touch()
    rest = []
    while True:
        line = reader.readline(30)
        if not line or line.startswith("closed"):
            break
        rest.append(line.split())
    assert line.split() == ["closed", "True"], proc.stderr.read()
    assert proc.wait(10) == 0
    assert time.monotonic() - moved_at < 30
    for f in (archive, db):
        c = sqlite3.connect(f)
        assert c.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        c.close()
    def ids_in(f):
        c = sqlite3.connect(f)
        try:
            return [r[0] for r in c.execute("SELECT signal_id FROM signals")]
        finally:
            c.close()
    old, new = ids_in(archive), ids_in(db)
    confirmed_before = {i for line in before for i in line}
    assert confirmed_before <= set(old), f"{len(confirmed_before - set(old))} confirmed rows missing"
    every = confirmed_before | {i for line in after + rest for i in line}
    assert every <= set(old) | set(new) and not set(old) & set(new)
    assert len(new) > 0                          # new rows went to a fresh file at the path


# -- the spill file ----------------------------------------------------------------------------
def test_disk_full_in_the_middle_of_a_spill_append_loses_nothing(db):
    """RLIMIT_FSIZE with SIGXFSZ ignored: a write past the limit is cut short, the next one
    fails with EFBIG, as on a full disk."""
    out = run_script("""
        import os, resource, signal, sys, threading
        from argo_signals import SignalTracker
        ro = threading.Event()
        def hook(conn):
            if ro.is_set():
                conn.execute("PRAGMA query_only = 1")
        t = SignalTracker(sys.argv[1], batch_size=10_000, batch_timeout=3600, flush_interval=3600,
                          register_atexit=False, write_retry_budget=0.05, on_connect=hook)
        sp = sys.argv[1] + ".spill.jsonl"
        ro.set(); t._sink.close()
        ids = [t.log_signal({"symbol": "AAPL", "entry_price": 1, "confidence": 1}) for _ in range(3)]
        print("first", t.flush(5), file=sys.stderr)
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
        base = os.path.getsize(sp) if os.path.exists(sp) else 0   # a replay may have taken it
        resource.setrlimit(resource.RLIMIT_FSIZE, (base + 300, hard))
        ids += [t.log_signal({"symbol": "MSFT", "entry_price": 2, "confidence": 2}) for _ in range(5)]
        print("cut", t.flush(0.5), file=sys.stderr)     # the append is torn, then EFBIG
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        ids += [t.log_signal({"symbol": "NVDA", "entry_price": 3, "confidence": 3}) for _ in range(2)]
        print("room", t.flush(5), file=sys.stderr)    # room again: the next append goes through
        ro.clear()
        t._sink.close()
        ok = t.flush(10)
        print(ok, " ".join(ids))
    """, db)
    assert out.returncode == 0, out.stderr
    ok, *ids = out.stdout.split()
    stored = {r["signal_id"] for r in rows(db)}
    assert set(ids) - stored == set(), f"{len(set(ids) - stored)} returned ids not in the database"
    assert ok == "True" and len(ids) == 10


def test_replay_stores_what_log_signal_accepted(db):
    """A metadata key equal to a field that was defaulted at the call (strategy, asset_type)."""
    ro = threading.Event()
    with SignalTracker(db, **{**QUIET, "write_retry_budget": 0.05, "on_connect": read_only_while(ro)}) as t:
        ro.set()
        t._sink.close()
        sid = t.log_signal({"symbol": "AAPL", "entry_price": 1, "confidence": 1,
                            "metadata": {"strategy": "from-meta", "asset_type": "etf"}})
        assert t.flush(5) is False
        ro.clear()
        t._sink.close()
        assert t.flush(5)
        assert t.stats()["spill_bad"] == 0
    (r,) = rows(db)
    assert r["signal_id"] == sid and json.loads(r["metadata"]) == {"strategy": "from-meta", "asset_type": "etf"}
    assert not Path(f"{spill_of(db)}.bad").exists()


def test_spilled_updates_replay_in_call_order_when_the_wall_clock_steps_back(db, monkeypatch):
    ro = threading.Event()
    with SignalTracker(db, **{**QUIET, "write_retry_budget": 0.05, "on_connect": read_only_while(ro)}) as t:
        ro.set()
        t._sink.close()
        sid = t.log_signal(make_signal(0))
        t.update_signal(sid, outcome="first")
        assert t.flush(5) is False
        real = time.time
        monkeypatch.setattr(time, "time", lambda: real() - 3600)   # NTP steps the clock back
        t.update_signal(sid, outcome="second")
        assert t.flush(5) is False
        monkeypatch.setattr(time, "time", real)
        ro.clear()
        t._sink.close()
        assert t.flush(5)
    assert rows(db)[0]["outcome"] == "second"


def _write_spill(path, n, tag="r"):
    with open(path, "w") as f:
        for i in range(n):
            row = finish(normalise(make_signal(i, signal_id=f"{tag}-{i}")))
            f.write(json.dumps(dict(zip(FINISHED_FIELDS, row))) + "\n")


def test_close_returns_by_its_deadline_whatever_the_spill_holds_and_replay_memory_is_bounded(db, tmp_path):
    n = 15_000
    prepared = tmp_path / "prepared.jsonl"
    _write_spill(prepared, n)
    out = run_script("""
        import os, resource, sys, time
        from argo_signals import SignalTracker
        base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        t = SignalTracker(sys.argv[1], batch_size=10_000, batch_timeout=3600, flush_interval=3600,
                          register_atexit=False)
        time.sleep(0.1)                          # past the writer's first tick: close() replays
        os.rename(sys.argv[2], sys.argv[1] + ".spill.jsonl")
        start = time.monotonic()
        ok = t.close(timeout=0.3)
        took = time.monotonic() - start
        t2 = SignalTracker(sys.argv[1], batch_size=10_000, batch_timeout=3600, flush_interval=3600,
                           register_atexit=False)
        ok2 = t2.flush(60)
        grown = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base
        print(ok, round(took, 2), ok2, grown)
    """, db, prepared, timeout=120)
    assert out.returncode == 0, out.stderr
    ok, took, ok2, grown_kb = out.stdout.split()
    assert ok == "False" and float(took) < 1.5, f"close(timeout=0.3) returned {ok} after {took}s"
    assert ok2 == "True"
    c = sqlite3.connect(db)
    assert c.execute("SELECT count(*), count(DISTINCT signal_id) FROM signals").fetchone() == (n, n)
    c.close()
    assert not spill_of(db).exists()
    assert int(grown_kb) < 12 * 1024, f"replaying {n} spilled rows grew the process by {grown_kb} KiB"


def test_replay_stopped_at_its_deadline_resumes_exactly_once(db):
    from argo_signals.config import Config
    from argo_signals.sink import SQLiteSink
    from argo_signals.stats import Stats
    n = 5_000
    _write_spill(spill_of(db), n)
    sink = SQLiteSink(Config(db_path=str(db)), Stats())
    sink.open()
    assert sink.replay(0.0) is False              # no time at all: one chunk, no more
    done = count(db)
    assert 0 < done < n and spill.pending_count(str(spill_of(db))) == n - done
    other = SQLiteSink(Config(db_path=str(db)), Stats())   # another tracker (or the next run)
    assert other.replay(30) is True
    sink.close()
    other.close()
    c = sqlite3.connect(db)
    assert c.execute("SELECT count(*), count(DISTINCT signal_id) FROM signals").fetchone() == (n, n)
    c.close()
    assert other.stats.duplicates == 0 and other.stats.replayed == n - done


def test_a_replay_killed_between_chunks_leaves_each_line_for_exactly_one_commit(db):
    n = 6_000
    _write_spill(spill_of(db), n)
    proc = spawn_script("""
        import sys
        from argo_signals.config import Config
        from argo_signals.sink import SQLiteSink
        from argo_signals.stats import Stats
        sink = SQLiteSink(Config(db_path=sys.argv[1]), Stats())
        sink.open()
        sink.replay(None)
    """, db)
    try:
        assert wait_for(lambda: count(db) >= 1000 or proc.poll() is not None, 30)
    finally:
        proc.kill()                                   # kill -9, somewhere in the replay
        proc.wait(10)
    assert 0 < count(db) < n, "the replay was not cut short"
    with SignalTracker(db, **QUIET) as t:
        assert t.flush(30)
    c = sqlite3.connect(db)
    assert c.execute("SELECT count(*), count(DISTINCT signal_id) FROM signals").fetchone() == (n, n)
    c.close()
    assert spill.pending_count(str(spill_of(db))) == 0 and not Path(f"{spill_of(db)}.bad").exists()


def test_a_bad_spill_line_is_set_aside_once_through_an_outage(db):
    ro = threading.Event()
    good = finish(normalise(make_signal(1, signal_id="good-1")))
    with SignalTracker(db, **{**QUIET, "write_retry_budget": 0.05, "on_connect": read_only_while(ro)}) as t:
        ro.set()
        t._sink.close()
        spill_of(db).write_text("not json at all\n" + json.dumps(dict(zip(FINISHED_FIELDS, good))) + "\n")
        for _ in range(5):                           # five failed replays
            t._sink.close()
            assert t.flush(1) is False
        ro.clear()
        t._sink.close()
        assert t.flush(5)
    assert Path(f"{spill_of(db)}.bad").read_text().count("not json at all") == 1
    assert [r["signal_id"] for r in rows(db)] == ["good-1"]


# -- rows SQLite refuses -----------------------------------------------------------------------
def small_limit(conn):
    conn.setlimit(sqlite3.SQLITE_LIMIT_LENGTH, 5000)


@pytest.mark.skipif(not hasattr(sqlite3.Connection, "setlimit"), reason="needs Python 3.11's setlimit")
def test_a_row_too_big_for_sqlite_is_rejected_with_a_reason_and_blocks_nothing(db):
    with SignalTracker(db, **{**QUIET, "on_connect": small_limit}) as t:
        before = [t.log_signal(make_signal(i)) for i in range(5)]
        big = t.log_signal(make_signal(99, reasoning="x" * 20_000))
        after = [t.log_signal(make_signal(i)) for i in range(5, 10)]
        t.update_signal(before[0], order_id="y" * 20_000)          # an update too big as well
        t.update_signal(before[1], order_id="fine")
        assert t.flush(5) is True
        s = t.stats()
        assert s["writer_restarts"] == 0 and s["rejected"] == 2
    stored = {r["signal_id"]: r for r in rows(db)}
    assert set(stored) == set(before + after) and stored[before[1]]["order_id"] == "fine"
    c = sqlite3.connect(db)
    rej = c.execute("SELECT signal_id, reason, length(payload) FROM rejected_signals ORDER BY id").fetchall()
    c.close()
    assert [r[0] for r in rej] == [big, before[0]]
    assert all("too big" in r[1] for r in rej) and all(r[2] < 5000 for r in rej)
