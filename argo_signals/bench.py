"""``argo-signals bench``: the library measured side by side with its references, in one run.

Every figure is the median of ``repeat`` runs; every goal is a ratio to a reference measured
in the same run, because absolute numbers on a shared machine mean little.  The references
use the same signal rows, schema, pragmas and commit sizes as the library.
"""
from __future__ import annotations

import logging
import logging.handlers
import os
import queue
import shutil
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from itertools import islice
from typing import Any, Callable, Dict, List, Optional, Sequence

import sqlite_utils

from .costbench import STAGES, stage_budget, strategy_slowdown
from .demo import signals as demo_signals
from .record import FINISHED_FIELDS, finish, normalise
from .stats import percentile
from .store import connect, ensure_schema, insert_sql, utc_now
from .tracker import SignalTracker, sync_state

GOALS = {
    "e2e_vs_raw": (">=", 0.6),
    "e2e_vs_naive": (">=", 8.0),
    "log_signal_vs_queuehandler": ("<=", 0.4),
    "log_signal_p99_us": ("<=", 25.0),
    "strategy_slowdown_1k": ("<=", 2.0),
    "strategy_slowdown_5k": ("<=", 5.0),
    "sync_signals_per_s": (">=", 1000.0),
    "sync_vs_requests_ceiling": (">=", 0.9),
    "sync_backlog_drain_s": ("<=", 15.0),
}
PRODUCERS = 4
# Parts of the run, for ``--only``: throughput (end-to-end and its references), producer cost,
# the per-signal stage budget, the strategy slowdown, sync.
SECTIONS = ("throughput", "producer", "stages", "slowdown", "sync")
_DB = "bench.db"


def _sample(n: int, random_ids: bool = False, seed: int = 1) -> List[Dict[str, Any]]:
    out = list(islice(demo_signals(seed), n))
    if random_ids:
        for s in out:
            s["signal_id"] = str(uuid.uuid4())
    return out


def _fresh(tmp: str, name: str = _DB) -> str:
    path = os.path.join(tmp, name)
    for suffix in ("", "-wal", "-shm", ".spill.jsonl"):
        if os.path.exists(path + suffix):
            os.remove(path + suffix)
    return path


# -- throughput -------------------------------------------------------------------------------
def e2e(tmp: str, sigs: List[Dict[str, Any]], durability: str = "normal") -> Dict[str, float]:
    """PRODUCERS threads call log_signal() until flush() returns; persisted rows/s."""
    path = _fresh(tmp)
    tracker = SignalTracker(path, durability=durability, register_atexit=False)
    tracker.log_signal(sigs[0])  # start the writer and create the schema outside the clock
    assert tracker.flush(30)
    body = sigs[1:]
    parts = [body[k::PRODUCERS] for k in range(PRODUCERS)]
    go = threading.Barrier(PRODUCERS + 1)

    def produce(part: List[Dict[str, Any]]) -> None:
        go.wait()
        log = tracker.log_signal
        for s in part:
            log(s)

    threads = [threading.Thread(target=produce, args=(p,)) for p in parts]
    for th in threads:
        th.start()
    go.wait()
    start = time.perf_counter()
    for th in threads:
        th.join()
    ok = tracker.flush(120)
    elapsed = time.perf_counter() - start
    st = tracker.stats()
    tracker.close()
    txns = st["transactions"] - 1
    if not ok or st["persisted"] != len(sigs):
        raise RuntimeError(f"end-to-end run lost signals: {st['persisted']} of {len(sigs)}")
    return {"rows_per_s": len(body) / elapsed, "avg_txn_rows": len(body) / max(1, txns),
            "fallback_writes": st["fallback_writes"]}


def raw(tmp: str, rows: List[tuple], batch: int, durability: str = "normal") -> float:
    """The ceiling: sqlite3.executemany of already-normalised rows, one transaction per batch."""
    path = _fresh(tmp)
    conn = connect(path, durability)
    ensure_schema(conn)
    one_row = insert_sql(1)
    start = time.perf_counter()
    for i in range(0, len(rows), batch):
        conn.execute("BEGIN IMMEDIATE")
        conn.executemany(one_row, rows[i:i + batch])
        conn.execute("COMMIT")
    elapsed = time.perf_counter() - start
    conn.close()
    return len(rows) / elapsed


def insert_all(tmp: str, rows: List[Dict[str, Any]], batch: int) -> float:
    """sqlite-utils insert_all inside one transaction per batch (what the writer could use)."""
    path = _fresh(tmp)
    conn = connect(path)
    ensure_schema(conn)
    table = sqlite_utils.Database(conn).table("signals")
    start = time.perf_counter()
    for i in range(0, len(rows), batch):
        conn.execute("BEGIN IMMEDIATE")
        table.insert_all(rows[i:i + batch], batch_size=batch, ignore=True)
        if conn.in_transaction:  # sqlite-utils 3.x commits by itself
            conn.execute("COMMIT")
    elapsed = time.perf_counter() - start
    conn.close()
    return len(rows) / elapsed


def naive(tmp: str, rows: List[Dict[str, Any]]) -> float:
    """What users write instead: one sqlite-utils table.insert(row) per signal."""
    path = _fresh(tmp)
    conn = connect(path)
    ensure_schema(conn)
    table = sqlite_utils.Database(conn).table("signals")
    start = time.perf_counter()
    for r in rows:
        table.insert(r)
    elapsed = time.perf_counter() - start
    conn.close()
    return len(rows) / elapsed


# -- producer cost ----------------------------------------------------------------------------
def producer_cost(tmp: str, sigs: List[Dict[str, Any]]) -> Dict[str, float]:
    """Per-call cost of log_signal(), queue.Queue.put_nowait and logger.info through a
    QueueHandler, interleaved call by call so that drifts of machine speed hit all three."""
    path = _fresh(tmp)
    tracker = SignalTracker(path, register_atexit=False, max_queue_size=len(sigs) + 10)
    tracker.log_signal(sigs[0])
    tracker.flush(30)
    q: "queue.Queue[Any]" = queue.Queue()
    logger = logging.getLogger("argo_signals.bench.queuehandler")
    logger.propagate = False
    logger.setLevel(logging.INFO)
    handler = logging.handlers.QueueHandler(queue.Queue())
    logger.addHandler(handler)
    log, put, info, clock = tracker.log_signal, q.put_nowait, logger.info, time.perf_counter_ns
    a: List[float] = []
    b: List[float] = []
    c: List[float] = []
    try:
        for s in sigs:
            t0 = clock()
            log(s)
            t1 = clock()
            put(s)
            t2 = clock()
            info("signal %s %s", s["symbol"], s["action"])
            t3 = clock()
            a.append((t1 - t0) / 1000.0)
            b.append((t2 - t1) / 1000.0)
            c.append((t3 - t2) / 1000.0)
    finally:
        logger.removeHandler(handler)
        tracker.close()
    a.sort()
    b.sort()
    c.sort()
    return {"log_signal_p50_us": percentile(a, 0.5) or 0.0, "log_signal_p99_us": percentile(a, 0.99) or 0.0,
            "put_nowait_p50_us": percentile(b, 0.5) or 0.0, "queuehandler_p50_us": percentile(c, 0.5) or 0.0,
            "queuehandler_p99_us": percentile(c, 0.99) or 0.0}


def scrape_cost(tmp: str, sigs: List[Dict[str, Any]]) -> Dict[str, float]:
    """log_signal() per-call cost while a thread scrapes a TrackerCollector in a loop, and
    while it does not, in alternating blocks of calls (empty without prometheus-client)."""
    block = max(1, min(500, len(sigs) // 10))
    try:
        from prometheus_client import CollectorRegistry, generate_latest
        from .metrics import TrackerCollector
    except ImportError:
        return {}
    path = _fresh(tmp)
    tracker = SignalTracker(path, register_atexit=False, max_queue_size=len(sigs) + 10)
    registry = CollectorRegistry()
    registry.register(TrackerCollector(tracker))
    scraping, done, scrapes = threading.Event(), threading.Event(), [0]

    def scrape() -> None:
        while not done.is_set():
            if scraping.wait(0.01):
                generate_latest(registry)
                scrapes[0] += 1
    th = threading.Thread(target=scrape, daemon=True)
    th.start()
    times: Dict[bool, List[float]] = {True: [], False: []}
    log, clock = tracker.log_signal, time.perf_counter_ns
    on_since, on_ns = 0, 0   # wall time with the scraper on
    try:
        for i, s in enumerate(sigs):
            on = (i // block) % 2 == 1
            if on != scraping.is_set():
                if on:
                    scraping.set()
                    on_since = clock()
                else:
                    scraping.clear()
                    on_ns += clock() - on_since
            t0 = clock()
            log(s)
            times[on].append((clock() - t0) / 1000.0)
        if scraping.is_set():
            on_ns += clock() - on_since
    finally:
        done.set()
        th.join(5)
        tracker.close()
    for v in times.values():
        v.sort()
    return {"log_signal_p50_us_scraped": percentile(times[True], 0.5) or 0.0,
            "log_signal_p99_us_scraped": percentile(times[True], 0.99) or 0.0,
            "log_signal_p50_us_unscraped": percentile(times[False], 0.5) or 0.0,
            "log_signal_p99_us_unscraped": percentile(times[False], 0.99) or 0.0,
            "scrapes_per_s": scrapes[0] / max(1e-9, on_ns / 1e9)}

# -- sync ------------------------------------------------------------------------------------------
class _Receiver:
    """The loopback receiver in its own process, so it does not share our GIL."""

    def __init__(self) -> None:
        self.proc = subprocess.Popen([sys.executable, "-m", "argo_signals.testing", "--api-key", "bench-key"],
                                     stdout=subprocess.PIPE, text=True)
        line = self.proc.stdout.readline().strip()  # type: ignore[union-attr]
        if not line.startswith("http://"):
            self.proc.kill()
            raise RuntimeError("the benchmark receiver did not start")
        self.url = line

    def close(self) -> None:
        self.proc.kill()
        self.proc.wait()


def _wait_all_synced(path: str, n: int, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        st = sync_state(path)
        if st["synced"] + st["sync_skipped"] + st["sync_rejected"] >= n:
            return True
        time.sleep(0.01)  # the poll's resolution is part of the figure: keep it small
    return False


def sync_live(tmp: str, url: str, sigs: List[Dict[str, Any]]) -> float:
    """Signals/s from the first log_signal() until the receiver has them all."""
    path = _fresh(tmp)
    tracker = SignalTracker(path, alpine_url=url, api_key="bench-key", register_atexit=False,
                            batch_timeout=0.05)
    start = time.perf_counter()
    for s in sigs:
        tracker.log_signal(s)
    tracker.flush(60)
    ok = _wait_all_synced(path, len(sigs), 120)
    elapsed = time.perf_counter() - start
    tracker.close(10)
    if not ok:
        raise RuntimeError("sync did not finish within 120 s")
    return len(sigs) / elapsed


def requests_ceiling(url: str, sigs: List[Dict[str, Any]]) -> float:
    """Reference: one thread posting the same bodies with a bare requests.Session (no DB, no retries)."""
    import json

    import requests

    from .alpine import SIGNAL_PATH, payload

    bodies = [json.dumps(payload(dict(zip(FINISHED_FIELDS, finish(normalise(s)))))) for s in sigs]
    session = requests.Session()
    session.trust_env = False
    session.headers.update({"Content-Type": "application/json", "X-API-Key": "bench-key"})
    start = time.perf_counter()
    for body in bodies:
        session.post(url + SIGNAL_PATH, data=body, timeout=(5, 10))
    elapsed = time.perf_counter() - start
    session.close()
    return len(bodies) / elapsed


def sync_backlog(tmp: str, url: str, sigs: List[Dict[str, Any]]) -> float:
    """Seconds to drain a backlog of pending rows once the receiver is reachable."""
    path = _fresh(tmp)
    with SignalTracker(path, register_atexit=False, max_queue_size=len(sigs) + 10) as t:
        for s in sigs:
            t.log_signal(s)
    start = time.perf_counter()
    tracker = SignalTracker(path, alpine_url=url, api_key="bench-key", register_atexit=False)
    ok = _wait_all_synced(path, len(sigs), 300)
    elapsed = time.perf_counter() - start
    tracker.close(10)
    if not ok:
        raise RuntimeError("backlog did not drain within 300 s")
    return elapsed


# -- the run -----------------------------------------------------------------------------------
def run(n_signals: int = 20_000, repeat: int = 3, sync_signals: int = 1000, backlog: int = 10_000,
        progress: Optional[Callable[[str], None]] = None, only: Optional[Sequence[str]] = None,
        slowdown_seconds: float = 0.1, slowdown_pairs: int = 10) -> Dict[str, Any]:
    say = progress or (lambda msg: None)
    parts = set(SECTIONS if not only else only)
    tmp = tempfile.mkdtemp(prefix="argo-bench-")
    med = statistics.median
    lib_log = logging.getLogger("argo_signals")
    level = lib_log.level
    lib_log.setLevel(logging.ERROR)  # overload is the point here: its fallback warnings are expected
    try:
        sigs = _sample(n_signals)
        sigs_random = _sample(n_signals, random_ids=True)
        finished = [finish(normalise(s)) + (utc_now(),) for s in sigs]
        finished_random = [finish(normalise(s)) + (utc_now(),) for s in sigs_random]
        as_dicts = [dict(zip(FINISHED_FIELDS + ("created_at",), r)) for r in finished]

        res: Dict[str, List[float]] = {}

        def add(key: str, value: float) -> None:
            res.setdefault(key, []).append(value)

        for i in range(repeat if parts & {"throughput", "producer", "slowdown"} else 0):
            if "slowdown" in parts:
                say(f"round {i + 1}/{repeat}: strategy slowdown")
                for k, v in strategy_slowdown(tmp, sigs, slowdown_seconds, slowdown_pairs).items():
                    add(k, v)
            if "producer" in parts:
                say(f"round {i + 1}/{repeat}: producer cost")
                for k, v in producer_cost(tmp, sigs).items():
                    add(k, v)
                for k, v in scrape_cost(tmp, sigs).items():
                    add(k, v)
            if "throughput" not in parts:
                continue
            say(f"round {i + 1}/{repeat}: end-to-end, raw, naive, durability")
            e = e2e(tmp, sigs)
            batch = max(1, int(round(e["avg_txn_rows"])))
            add("e2e_rows_per_s", e["rows_per_s"])
            add("e2e_avg_txn_rows", e["avg_txn_rows"])
            add("e2e_fallback_writes", e["fallback_writes"])
            add("raw_rows_per_s", raw(tmp, finished, batch))
            add("insert_all_rows_per_s", insert_all(tmp, as_dicts, batch))
            add("naive_rows_per_s", naive(tmp, as_dicts[: max(500, n_signals // 10)]))
            e_rand = e2e(tmp, sigs_random)
            add("e2e_random_ids_rows_per_s", e_rand["rows_per_s"])
            add("raw_random_ids_rows_per_s", raw(tmp, finished_random, max(1, int(round(e_rand["avg_txn_rows"])))))
            e_full = e2e(tmp, sigs, durability="full")
            add("e2e_full_rows_per_s", e_full["rows_per_s"])
            add("raw_full_rows_per_s", raw(tmp, finished, max(1, int(round(e_full["avg_txn_rows"]))), "full"))

        if "stages" in parts:
            say("stage budget")
            batch = int(round(med(res["e2e_avg_txn_rows"]))) if "e2e_avg_txn_rows" in res else 1000
            for k, v in stage_budget(_fresh(tmp, "stages.db"), sigs, max(1, batch)).items():
                add(f"stage_{k}_us", v)

        receiver = _Receiver() if "sync" in parts else None
        try:
            for i in range(repeat if receiver else 0):
                assert receiver is not None
                say(f"round {i + 1}/{repeat}: sync ({sync_signals} signals live)")
                add("sync_signals_per_s", sync_live(tmp, receiver.url, _sample(sync_signals, seed=10 + i)))
                add("requests_ceiling_per_s", requests_ceiling(receiver.url, _sample(sync_signals, seed=50 + i)))
            if receiver:
                # one drain of the whole backlog: itself an aggregate of `backlog` requests
                say(f"sync backlog: {backlog} pending rows")
                add("sync_backlog_drain_s", sync_backlog(tmp, receiver.url, _sample(backlog, seed=100)))
        finally:
            if receiver:
                receiver.close()

        r: Dict[str, Any] = {k: med(v) for k, v in res.items()}
        if "throughput" in parts:
            r["e2e_vs_raw"] = r["e2e_rows_per_s"] / r["raw_rows_per_s"]
            r["e2e_random_ids_vs_raw"] = r["e2e_random_ids_rows_per_s"] / r["raw_random_ids_rows_per_s"]
            r["e2e_full_vs_raw_full"] = r["e2e_full_rows_per_s"] / r["raw_full_rows_per_s"]
            r["full_vs_normal"] = r["e2e_full_rows_per_s"] / r["e2e_rows_per_s"]
            r["e2e_vs_naive"] = r["e2e_rows_per_s"] / r["naive_rows_per_s"]
            r["insert_all_vs_executemany"] = r["insert_all_rows_per_s"] / r["raw_rows_per_s"]
            r["e2e_us_per_row"] = 1e6 / r["e2e_rows_per_s"]
            r["raw_us_per_row"] = 1e6 / r["raw_rows_per_s"]
        if "producer" in parts:
            r["log_signal_vs_queuehandler"] = r["log_signal_p50_us"] / r["queuehandler_p50_us"]
            r["log_signal_p99_vs_queuehandler_p99"] = r["log_signal_p99_us"] / r["queuehandler_p99_us"]
        if "sync" in parts:
            r["sync_vs_requests_ceiling"] = r["sync_signals_per_s"] / r["requests_ceiling_per_s"]
            # what the bare session would need for the backlog's count, next to the drain's time
            r["requests_ceiling_backlog_s"] = backlog / r["requests_ceiling_per_s"]
        r["params"] = {"signals": n_signals, "repeat": repeat, "sync_signals": sync_signals,
                       "backlog": backlog, "producers": PRODUCERS, "python": sys.version.split()[0],
                       "sqlite": sqlite3.sqlite_version, "cpus": os.cpu_count(),
                       "sections": [p for p in SECTIONS if p in parts], "slowdown_pairs": slowdown_pairs,
                       "slowdown_seconds": slowdown_seconds}
        r["goals"] = {k: {"goal": f"{op} {target:g}", "value": r[k],
                          "met": r[k] >= target if op == ">=" else r[k] <= target}
                      for k, (op, target) in GOALS.items() if k in r}
        return {k: (round(v, 3) if isinstance(v, float) else v) for k, v in r.items()}
    finally:
        lib_log.setLevel(level)
        shutil.rmtree(tmp, ignore_errors=True)


_STAGE_NAMES = {"validate": "validate", "normalise_id": "normalise + id", "hash": "hash",
                "row_build": "row build", "bind_step": "bind + step in SQLite", "handoff": "queue hand-off"}


def format_report(r: Dict[str, Any]) -> str:
    p = r["params"]
    lines = [
        f"argo-signals bench: {p['signals']} signals x {p['repeat']} rounds (medians), "
        f"{p['producers']} producers, Python {p['python']}, SQLite {p['sqlite']}, {p['cpus']} CPUs",
    ]
    if "e2e_vs_raw" in r:
        lines += [
            "",
            f"{'throughput (rows/s)':34} {'library':>10} {'reference':>10} {'ratio':>7}",
            f"{'end-to-end vs raw executemany':34} {r['e2e_rows_per_s']:>10,.0f} {r['raw_rows_per_s']:>10,.0f} {r['e2e_vs_raw']:>7.2f}",
            f"{'  same, random uuid4 ids':34} {r['e2e_random_ids_rows_per_s']:>10,.0f} {r['raw_random_ids_rows_per_s']:>10,.0f} {r['e2e_random_ids_vs_raw']:>7.2f}",
            f"{'  same, durability=full':34} {r['e2e_full_rows_per_s']:>10,.0f} {r['raw_full_rows_per_s']:>10,.0f} {r['e2e_full_vs_raw_full']:>7.2f}",
            f"{'end-to-end vs naive insert()':34} {r['e2e_rows_per_s']:>10,.0f} {r['naive_rows_per_s']:>10,.0f} {r['e2e_vs_naive']:>7.1f}",
            f"{'insert_all vs executemany':34} {r['insert_all_rows_per_s']:>10,.0f} {r['raw_rows_per_s']:>10,.0f} {r['insert_all_vs_executemany']:>7.2f}",
            f"  (avg rows per transaction: {r['e2e_avg_txn_rows']:.0f}; fallback writes: {r['e2e_fallback_writes']:.0f}; "
            f"full/normal: {r['full_vs_normal']:.2f})",
        ]
    if "stage_total_us" in r:
        lines += ["", f"{'stage budget (us per signal)':34} {'us':>10}"]
        lines += [f"{'  ' + _STAGE_NAMES[k]:34} {r[f'stage_{k}_us']:>10.2f}" for k in STAGES]
        lines.append(f"{'  sum of the stages':34} {r['stage_total_us']:>10.2f}")
        if "e2e_us_per_row" in r:
            lines.append(f"{'  end-to-end / raw executemany':34} {r['e2e_us_per_row']:>10.2f} {r['raw_us_per_row']:>10.2f}")
    if "log_signal_vs_queuehandler" in r:
        lines += [
            "",
            f"{'producer cost (us per call)':34} {'p50':>10} {'p99':>10}",
            f"{'log_signal()':34} {r['log_signal_p50_us']:>10.2f} {r['log_signal_p99_us']:>10.2f}",
            f"{'logger.info via QueueHandler':34} {r['queuehandler_p50_us']:>10.2f} {r['queuehandler_p99_us']:>10.2f}",
            f"{'queue.Queue.put_nowait':34} {r['put_nowait_p50_us']:>10.2f}",
            *([f"{'log_signal(), no metrics scrape':34} {r['log_signal_p50_us_unscraped']:>10.2f} {r['log_signal_p99_us_unscraped']:>10.2f}",
               f"{'log_signal(), scraped in a loop':34} {r['log_signal_p50_us_scraped']:>10.2f} {r['log_signal_p99_us_scraped']:>10.2f}"
               f"  ({r['scrapes_per_s']:,.0f} scrapes/s)"] if "scrapes_per_s" in r else []),
        ]
    if "strategy_slowdown_5k" in r:
        lines += ["", f"{'strategy slowdown (% of its speed)':40} {'library':>10} {'reference':>10} {'no-op':>7}"]
        for k in ("1k", "5k"):
            lines.append(f"{'  ' + k + ' signals/s logged beside it':40} {r['strategy_slowdown_' + k]:>9.1f}% "
                         f"{r['queuehandler_slowdown_' + k]:>9.1f}% {r['noop_logger_slowdown_' + k]:>6.1f}%")
        for k in ("1k", "5k"):
            lines.append(f"{'  CPU of the logging threads, ' + k:40} {r['strategy_cpu_us_' + k]:>8.1f}us "
                         f"{r['queuehandler_cpu_us_' + k]:>8.1f}us {r['noop_logger_cpu_us_' + k]:>5.1f}us")
        lines.append(f"  (reference: QueueHandler + QueueListener, executemany every 50 records; no-op: a logger "
                     f"that does nothing, the measurement's floor; rates reached: library "
                     f"{r['strategy_rate_1k']:,.0f}/{r['strategy_rate_5k']:,.0f}, reference "
                     f"{r['queuehandler_rate_1k']:,.0f}/{r['queuehandler_rate_5k']:,.0f} per s; speeds per wall second; "
                     f"CPU: of the process's other threads, per signal logged)")
    if "sync_vs_requests_ceiling" in r:
        lines += [
            "",
            f"sync: {r['sync_signals_per_s']:,.0f} signals/s delivered; "
            f"{p['backlog']}-row backlog drained in {r['sync_backlog_drain_s']:.1f} s "
            f"(the bare session below: {r['requests_ceiling_backlog_s']:.1f} s for as many requests)",
            f"  (a bare single-thread requests.Session posting the same bodies: "
            f"{r['requests_ceiling_per_s']:,.0f}/s; ratio {r['sync_vs_requests_ceiling']:.2f})",
        ]
    lines += ["", f"{'goal':30} {'target':>10} {'measured':>10}  met"]
    for k, g in r["goals"].items():
        lines.append(f"{k:30} {g['goal']:>10} {g['value']:>10.2f}  {'yes' if g['met'] else 'NO'}")
    return "\n".join(lines)
