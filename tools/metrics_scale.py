"""Measure ``argo-signals metrics`` on a large database: one read of its state, idle and while
another process commits.

    python tools/metrics_scale.py --rows 1000000 --db /tmp/report-1m.db

Builds (once) the same database as ``report_scale.py`` (all sync states, a few refused rows)
and adds a ``waiting_updates`` table of 1,000 rows.  Prints the median and worst of
``--repeat`` reads of ``dbstate.read_state`` in this process, the wall time of the real
command as a subprocess, and the reads again while a writer process commits a batch of 50
signals every 10 ms.
"""
from __future__ import annotations

import argparse
import os
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time

from report_scale import build

from argo_signals.dbstate import read_state

WRITER = textwrap.dedent("""
    import sys, time
    from argo_signals import store
    conn = store.connect(sys.argv[1])
    i = 0
    while True:
        conn.execute("BEGIN IMMEDIATE")
        conn.executemany("INSERT INTO signals (signal_id, symbol, action, entry_price, confidence, timestamp, "
                         "sha256, created_at) VALUES (?, 'AAPL', 'BUY', 1.0, 50, ?, 'x', ?)",
                         [(f"w-{i + k}", store.utc_now(), store.utc_now()) for k in range(50)])
        conn.execute("COMMIT")
        i += 50
        time.sleep(0.01)
""")


def reads(db: str, repeat: int) -> str:
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        read_state(db)
        times.append(time.perf_counter() - t0)
    return f"median {statistics.median(times) * 1000:6.1f} ms, worst {max(times) * 1000:6.1f} ms"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=100_000)
    ap.add_argument("--repeat", type=int, default=20)
    ap.add_argument("--db", default=None, help="database file (built if absent)")
    a = ap.parse_args()
    db = a.db or os.path.join(tempfile.gettempdir(), f"argo-report-{a.rows}.db")
    if not os.path.exists(db):
        build(db, a.rows, 7.0)
    conn = sqlite3.connect(db)
    conn.execute("CREATE TABLE IF NOT EXISTS waiting_updates (seq INTEGER PRIMARY KEY AUTOINCREMENT, "
                 "signal_id TEXT NOT NULL, fields TEXT NOT NULL, queued_at REAL NOT NULL)")
    if conn.execute("SELECT count(*) FROM waiting_updates").fetchone()[0] == 0:
        conn.executemany("INSERT INTO waiting_updates (signal_id, fields, queued_at) VALUES (?, '{}', 0)",
                         [(f"w{k}",) for k in range(1000)])
    conn.commit()
    conn.close()
    state = read_state(db)
    print(f"{db}: {sum(state.by_status.values())} rows {state.by_status}")
    print(f"read_state, idle:              {reads(db, a.repeat)}")
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-m", "argo_signals.cli", "metrics", "--db", db], check=True,
                   stdout=subprocess.DEVNULL)
    print(f"`argo-signals metrics` process: {time.perf_counter() - t0:6.2f} s wall (interpreter start included)")
    writer = subprocess.Popen([sys.executable, "-c", WRITER, db])
    try:
        time.sleep(1.0)
        before = read_state(db)
        print(f"read_state, writer committing: {reads(db, a.repeat)}")
        after = read_state(db)
        grew = sum(after.by_status.values()) - sum(before.by_status.values())
        print(f"  the writer committed {grew} rows meanwhile; every read succeeded")
    finally:
        writer.kill()
        writer.wait()


if __name__ == "__main__":
    main()
