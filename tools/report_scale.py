"""Measure ``argo-signals report`` on a large database: wall time and peak RSS of the real command.

    python tools/report_scale.py --rows 1000000 --db /tmp/report-1m.db

Builds (once) a database with the real schema holding ``--rows`` synthetic signals spread over
``--days`` days (all sync states, 40 % closed with outcomes, a few refused rows), then runs
``argo-signals report`` as a subprocess three ways (--json, the HTML page, --since 24h) and
prints wall seconds, CPU seconds (user + system: what the run costs whatever the machine's
load) and peak RSS (MiB) of each run.
"""
from __future__ import annotations

import argparse
import os
import random
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timedelta, timezone

from argo_signals import store
from argo_signals.demo import STRATEGIES, SYMBOLS, win_probability

STATES = (("synced", 0.80), ("pending", 0.08), ("skipped", 0.08), ("rejected", 0.03), ("failed", 0.01))


def build(path: str, rows: int, days: float, seed: int = 1, strategies: int = 0) -> None:
    rng = random.Random(seed)
    conn = store.connect(path)
    store.ensure_schema(conn)
    end = datetime.now(timezone.utc)
    start = end - timedelta(days=days)
    step = (end - start) / rows
    states, weights = zip(*STATES)
    symbols = list(SYMBOLS)
    names = [f"strategy-{k:05d}" for k in range(strategies)] if strategies else list(STRATEGIES)
    batch = []
    sql = ("INSERT INTO signals (signal_id, symbol, action, entry_price, confidence, strategy, timestamp, sha256, "
           "created_at, sync_status, sync_attempts, sync_error, synced_at, outcome, exit_price, profit_loss_pct) "
           "VALUES (?, ?, ?, ?, ?, ?, ?, 'x', ?, ?, 0, ?, ?, ?, ?, ?)")
    conn.execute("BEGIN")
    for i in range(rows):
        created = start + step * i
        ts = created - timedelta(milliseconds=rng.expovariate(1 / 40.0))
        status = rng.choices(states, weights)[0]
        action = "NEUTRAL" if status == "skipped" else rng.choice(("BUY", "SELL"))
        conf = round(min(100.0, max(0.0, rng.gauss(72, 12))), 1)
        strategy = rng.choice(names)
        synced = (created + timedelta(milliseconds=rng.expovariate(1 / 300.0))).isoformat() if status == "synced" else None
        error = {"rejected": "symbol empty or longer than 20 characters (receiver refuses it)",
                 "failed": "HTTP 503 from Alpine", "skipped": "NEUTRAL signals are not synced"}.get(status)
        outcome = pnl = exit_price = None
        if action != "NEUTRAL" and rng.random() < 0.4:
            win = rng.random() < win_probability(conf, strategy)
            outcome, pnl = ("win", rng.uniform(0.5, 3.0)) if win else ("loss", -rng.uniform(0.5, 2.0))
            exit_price = 100.0 * (1 + pnl / 100)
        batch.append((f"sig-{i}", rng.choice(symbols), action, 100.0, conf, strategy, ts.isoformat(),
                      created.isoformat(), status, error, synced, outcome, exit_price, pnl))
        if len(batch) == 10_000:
            conn.executemany(sql, batch)
            batch.clear()
    conn.executemany(sql, batch)
    conn.executemany("INSERT INTO rejected_signals (signal_id, payload, reason, rejected_at) VALUES (?, ?, ?, ?)",
                     [(f"sig-{k}", '{"strategy": "momentum"}', "signal_id already stored with different content",
                       end.isoformat()) for k in range(rows // 10_000)])
    conn.execute("COMMIT")
    conn.close()


def measure(args: list) -> tuple:
    t0 = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-m", "argo_signals.cli", "report", *args],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _, status, usage = os.wait4(proc.pid, 0)
    elapsed = time.perf_counter() - t0
    proc.returncode = os.waitstatus_to_exitcode(status) if hasattr(os, "waitstatus_to_exitcode") else status
    if proc.returncode:
        raise SystemExit(f"report failed: {proc.stderr.read().decode() if proc.stderr else ''}")
    return elapsed, usage.ru_utime + usage.ru_stime, usage.ru_maxrss / 1024  # ru_maxrss is KiB on Linux


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=100_000)
    ap.add_argument("--days", type=float, default=7.0)
    ap.add_argument("--strategies", type=int, default=0,
                    help="distinct strategy names (default: the demo's few)")
    ap.add_argument("--db", default=None, help="database file (built if absent)")
    a = ap.parse_args()
    db = a.db or os.path.join(tempfile.gettempdir(), f"argo-report-{a.rows}-{a.strategies}.db")
    if not os.path.exists(db):
        t0 = time.perf_counter()
        build(db, a.rows, a.days, strategies=a.strategies)
        print(f"built {db}: {a.rows} rows in {time.perf_counter() - t0:.1f}s", flush=True)
    out = os.path.join(tempfile.gettempdir(), "argo-report-scale.html")
    for label, args in (("--json", ["--db", db, "--json"]), ("page", ["--db", db, "--out", out]),
                        ("page --since 24h", ["--db", db, "--out", out, "--since", "24h"])):
        secs, cpu, rss = measure(args)
        print(f"{a.rows:>9} rows  {label:<17} {secs:6.2f} s wall  {cpu:6.2f} s CPU  peak RSS {rss:6.1f} MiB",
              flush=True)


if __name__ == "__main__":
    main()
