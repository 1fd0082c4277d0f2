"""Hostile checks of the spill's framing and replay at their edges (real files)."""
import os

import pytest

from argo_signals import SignalTracker, spill
from argo_signals.record import finish, normalise

from conftest import make_signal, run_script, wait_for

QUIET = dict(batch_size=10_000, batch_timeout=3600, register_atexit=False)


def test_a_spilled_signal_longer_than_the_readers_line_buffer_is_replayed_not_set_aside(tmp_path, monkeypatch):
    monkeypatch.setattr(spill, "MAX_LINE", 4096)   # the buffer, made small; log_signal() has no such limit
    path = str(tmp_path / "s.db.spill.jsonl")
    big = finish(normalise(make_signal(1, metadata={"note": "x" * 10_000})))
    small = finish(normalise(make_signal(2)))
    spill.append(path, [small, big, small], [])
    chunk = spill.take(path)
    assert chunk.bad == []
    assert [r[0] for r in chunk.rows] == [small[0], big[0], small[0]]
    assert chunk.rows[1] == big


def test_a_spill_holding_only_a_torn_fragment_is_set_aside_and_cleared(tmp_path):
    path = str(tmp_path / "s.db.spill.jsonl")
    with open(path, "wb") as f:
        f.write(b'{"signal_id": "abc", "sym')
    chunk = spill.take(path)
    assert chunk.rows == [] and len(chunk.bad) == 1 and chunk.last
    spill.consumed(chunk)
    assert spill.take(path) is None and spill.pending_count(path) == 0


def test_an_update_waiting_in_the_new_file_after_a_rotation_is_reported_too(tmp_path):
    db = tmp_path / "signals.db"
    with SignalTracker(str(db), **QUIET, flush_interval=0.05, waiting_update_max_age=0.1) as t:
        for i in range(3):   # waiting updates 1..3 in the first file, reported
            t.update_signal(f"early-{i}", outcome="win")
        assert t.flush(5)
        assert wait_for(lambda: t.stats()["waiting_updates_overdue"] == 3, 5)
        os.rename(db, tmp_path / "signals-archive.db")
        t.update_signal("late", outcome="loss")   # seq 1 of the fresh file at the path
        assert t.flush(5)
        assert wait_for(lambda: t.stats()["waiting_updates_overdue"] == 4, 3)


def test_a_bad_line_is_set_aside_once_even_when_recording_the_offset_keeps_failing(tmp_path):
    path = str(tmp_path / "s.db.spill.jsonl")
    rows = [finish(normalise(make_signal(i))) for i in range(3)]
    spill.append(path, rows[:1], [])
    with open(path, "ab") as f:
        f.write(b"not json\n")
    spill.append(path, rows[1:], [])
    os.mkdir(f"{path}.replaying.done.tmp")   # the offset cannot be written (as on a full disk)
    for _ in range(3):                        # three replays commit the chunk, none records it
        with spill.replaying(path, max_entries=2) as chunk:
            assert chunk is not None and len(chunk.bad) == 1
            with pytest.raises(OSError):
                spill.consumed(chunk)
    os.rmdir(f"{path}.replaying.done.tmp")
    with spill.replaying(path, max_entries=2) as chunk:
        spill.consumed(chunk)
    with open(f"{path}.bad", "rb") as f:
        assert f.read().count(b"not json") == 1


def test_a_child_forked_from_a_handler_inside_the_parents_own_write_does_not_stall(tmp_path):
    # The handler interrupts close() while it writes: the child inherits that open transaction
    # (SQLite's in-process lock state), so it can never write this file; it must spill at once,
    # not wait out the 30 s write-retry budget on each call.
    res = run_script("""
        import os, signal, sqlite3, sys, time
        from argo_signals import SignalTracker, spill
        db = sys.argv[1]
        t = SignalTracker(db, batch_size=100000, batch_timeout=3600, flush_interval=3600,
                          register_atexit=False, max_queue_size=20000)
        for _ in range(6000):
            t.log_signal({"symbol": "AAPL", "entry_price": 1, "confidence": 1})
        kids = []
        def h(n, f):
            conn = t._sink._conn
            if kids or conn is None or not conn.in_transaction:
                return
            kids.append(None)   # before the fork: this handler may run again during it
            r, w = os.pipe()
            pid = os.fork()
            if pid == 0:
                c = SignalTracker(db, register_atexit=False)
                t0 = time.monotonic()
                sid = c.log_signal({"symbol": "KID", "entry_price": 1, "confidence": 1})
                os.write(w, f"{sid} {time.monotonic() - t0:.2f}".encode())
                os._exit(0)
            os.close(w)
            kids[0] = (pid, r)
        signal.signal(signal.SIGALRM, h)
        signal.setitimer(signal.ITIMER_REAL, 0.001, 0.001)
        assert t.close(20)
        signal.setitimer(signal.ITIMER_REAL, 0)
        assert kids, "no fork inside the write"
        pid, r = kids[0]
        os.waitpid(pid, 0)
        sid, took = os.read(r, 200).decode().split()
        assert float(took) < 5, took
        with SignalTracker(db, register_atexit=False) as again:   # replays the child's spill
            pass
        assert sqlite3.connect(db).execute("SELECT count(*) FROM signals WHERE signal_id = ?",
                                           (sid,)).fetchone()[0] == 1
        print("ok", took)
    """, tmp_path / "signals.db", timeout=60)
    assert res.returncode == 0 and "ok" in res.stdout, res.stdout + res.stderr[-2000:]
