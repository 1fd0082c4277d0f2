"""What one signal costs the process: the stage budget and the strategy slowdown (for ``bench``).

``stage_budget()`` times each stage a signal passes through, in isolation, on the bench's own
sample, in microseconds per signal.  ``strategy_slowdown()`` measures what a trading process
feels: how much less work a CPU-bound Python loop gets done per wall second while signals are
logged and persisted beside it from another thread (under the GIL, every microsecond of Python
the library runs is a microsecond the loop does not), against a stdlib ``QueueHandler`` +
``QueueListener`` writing the same signals to SQLite through ``executemany``.
"""
from __future__ import annotations

import json
import logging
import logging.handlers
import os
import queue
import statistics
import threading
import time
from typing import Any, Callable, Dict, List, Optional, Sequence

from .config import Config
from .engine import Engine
from .record import default_timestamp, finish, hash_row, new_signal_id, normalise
from .entry import INSERT, BatchFate, Entry
from .stats import Stats
from .store import connect, ensure_schema, insert_params, insert_sql, utc_now
from .tracker import SignalTracker

__all__ = ["STAGES", "stage_budget", "strategy_slowdown", "SLOWDOWN_RATES"]

STAGES = ("validate", "normalise_id", "hash", "row_build", "bind_step", "handoff")
SLOWDOWN_RATES = (1000, 5000)   # signals per second logged beside the strategy


# Stages are timed in CPU time of the measuring thread: on a shared machine the wall clock
# also counts the time other processes had the CPU.  (Every stage runs on this one thread;
# SQLite's own work is CPU time of it too, and with synchronous=NORMAL a commit does not
# wait for the disk.)
_clock = time.thread_time


def _per_signal(work: Callable[[], Any], n: int, passes: int = 3) -> float:
    """Microseconds per signal of ``work`` (which handles ``n`` signals): the best pass."""
    best = float("inf")
    for _ in range(passes):
        start = _clock()
        work()
        best = min(best, _clock() - start)
    return best / n * 1e6


class _Accept:
    """A sink that takes every batch at once: what is left is the queue hand-off itself."""

    def write(self, entries: Sequence[Entry], reason: Optional[str], stop_at: Callable[[], float]) -> BatchFate:
        return BatchFate.COMMITTED

    def replay(self, max_wait: Optional[float] = None) -> bool:
        return True

    def spill_pending(self) -> bool:
        return False

    def salvage(self, entries: Sequence[Entry], max_wait: Optional[float] = None) -> BatchFate:
        return BatchFate.COMMITTED

    def close(self) -> None:
        pass

    def after_fork(self) -> None:
        pass

    def tick(self) -> None:
        return None


def stage_budget(path: str, sigs: List[Dict[str, Any]], batch: int = 1000) -> Dict[str, float]:
    """Microseconds per signal in each stage (CPU time, the best of three passes over ``sigs``).

    validate      ``normalise()`` of signals that carry their id (checks and conversions)
    normalise_id  what the library makes up: a new id and the default timestamp's text
    hash          the Alpine sha256 of a finished row (hash text + sha256)
    row_build     the writer's per-row Python besides timestamp and hash: ``finish()`` less
                  those two, plus the statement's bind list (``insert_params``)
    bind_step     binding and stepping the multi-row INSERT in SQLite, one transaction per
                  ``batch`` rows, fresh database
    handoff       ``put()`` of the queue entry, and the writer taking it in batches
    """
    n = len(sigs)
    with_ids = [dict(s, signal_id=new_signal_id()) for s in sigs]
    norm = [normalise(s) for s in sigs]
    done = [finish(r) for r in norm]
    now = time.time()
    created = utc_now()
    out: Dict[str, float] = {}
    out["validate"] = _per_signal(lambda: [normalise(s) for s in with_ids], n)
    out["normalise_id"] = _per_signal(
        lambda: [(new_signal_id(now), default_timestamp(now + k * 1e-5)) for k in range(n)], n)
    out["hash"] = _per_signal(lambda: [hash_row(r) for r in done], n)
    finish_us = _per_signal(lambda: [finish(r) for r in norm], n)
    ts_us = _per_signal(lambda: [default_timestamp(now + k * 1e-5) for k in range(n)], n)
    params_us = _per_signal(lambda: [insert_params(done[i:i + 500], created) for i in range(0, n, 500)], n)
    out["row_build"] = max(0.0, finish_us - ts_us - out["hash"]) + params_us
    out["bind_step"] = _bind_step(path, done, created, batch)
    out["handoff"] = _handoff(norm)
    out["total"] = sum(out[k] for k in STAGES)
    return out


def _bind_step(path: str, rows: List[tuple], created: str, batch: int) -> float:
    chunks = []
    for i in range(0, len(rows), batch):
        part = rows[i:i + batch]
        chunks.append([(insert_sql(len(part[j:j + 500])), insert_params(part[j:j + 500], created))
                       for j in range(0, len(part), 500)])
    best = float("inf")
    for _ in range(3):
        for suffix in ("", "-wal", "-shm"):
            if os.path.exists(path + suffix):
                os.remove(path + suffix)
        conn = connect(path)
        ensure_schema(conn)
        start = _clock()
        for statements in chunks:
            conn.execute("BEGIN IMMEDIATE")
            for sql, params in statements:
                conn.execute(sql, params)
            conn.execute("COMMIT")
        best = min(best, _clock() - start)
        conn.close()
    return best / len(rows) * 1e6


def _handoff(rows: List[tuple]) -> float:
    n = len(rows)
    config = Config.resolve(":memory:", sync_enabled=False, register_atexit=False, max_queue_size=n + 10)

    def run() -> None:
        engine = Engine(config, _Accept(), Stats(), threading.Event())  # no thread: flush() takes
        put, clock = engine.put, time.monotonic
        for r in rows:
            put((INSERT, r, clock()))
        if not engine.flush(60):
            raise RuntimeError("hand-off measurement: flush failed")

    return _per_signal(run, n)


# -- strategy slowdown ---------------------------------------------------------------------------
def _spin(seconds: float) -> float:
    """The strategy: pure-Python arithmetic for ``seconds``; returns work units per wall second."""
    clock = time.perf_counter
    start = clock()
    end = start + seconds
    units = 0
    while clock() < end:
        x = 0
        for i in range(300):
            x += i * i
        units += 1
    return units / (clock() - start)


def _paced(log: Callable[[Dict[str, Any]], Any], sigs: List[Dict[str, Any]], rate: int,
           active: threading.Event, stop: threading.Event, count: List[int]) -> None:
    """Call ``log`` ``rate`` times a second, in 10 ms ticks, while ``active`` is set."""
    tick = 0.01
    per_tick = max(1, int(rate * tick))
    i, n = 0, len(sigs)
    due = time.perf_counter()
    while not stop.is_set():
        if not active.is_set():
            active.wait(0.05)
            due = time.perf_counter()
            continue
        for _ in range(per_tick):
            log(sigs[i % n])
            i += 1
        count[0] = i
        due += tick
        delay = due - time.perf_counter()
        if delay > 0:
            time.sleep(delay)


def _pairs(log: Callable[[Dict[str, Any]], Any], settle: Callable[[], None], sigs: List[Dict[str, Any]],
           rate: int, seconds: float, pairs: int) -> Dict[str, Any]:
    """``pairs`` times: the loop alone (the logger paused, everything written), then the loop
    while the logger runs (in alternating order, so that a drift of the machine's speed
    cancels); returns each pair's loaded/alone speed ratio and the rate the logger reached."""
    active, stop = threading.Event(), threading.Event()
    count = [0]
    th = threading.Thread(target=_paced, args=(log, sigs, rate, active, stop, count), name="bench-producer")
    th.start()
    ratios: List[float] = []
    busy = 0.0
    cpu = logged = 0.0   # CPU time of the process's other threads while loaded, and signals logged
    try:
        for k in range(pairs):
            speeds: Dict[bool, float] = {}
            for loaded in ((False, True) if k % 2 == 0 else (True, False)):
                if loaded:
                    cpu0, own0, n0 = time.process_time(), time.thread_time(), count[0]
                    active.set()
                    time.sleep(0.02)
                    start = time.perf_counter()
                    speeds[loaded] = _spin(seconds)
                    active.clear()
                    busy += time.perf_counter() - start + 0.02
                    settle()
                    cpu += (time.process_time() - cpu0) - (time.thread_time() - own0)
                    logged += count[0] - n0
                else:
                    settle()
                    speeds[loaded] = _spin(seconds)
            ratios.append(speeds[True] / speeds[False])
    finally:
        active.set()
        stop.set()
        th.join()
    return {"ratios": ratios, "rate": count[0] / busy if busy else 0.0,
            "cpu_us": cpu / logged * 1e6 if logged else 0.0}


def _library(path: str, sigs: List[Dict[str, Any]], rate: int, seconds: float, pairs: int) -> Dict[str, Any]:
    tracker = SignalTracker(path, register_atexit=False)
    try:
        tracker.log_signal(sigs[0])

        def settle() -> None:
            if not tracker.flush(60):
                raise RuntimeError("slowdown run: flush failed")

        settle()
        out = _pairs(tracker.log_signal, settle, sigs, rate, seconds, pairs)
        settle()
        st = tracker.stats()
    finally:
        tracker.close()
    if st["persisted"] != st["logged"]:
        raise RuntimeError(f"slowdown run lost signals: {st['persisted']} of {st['logged']}")
    return out


class _SQLiteBatchHandler(logging.Handler):
    """The reference: a handler on a QueueListener's thread that stores each record's signal
    (a few columns and the whole of it as JSON) with ``executemany``, 50 records at a time."""

    SQL = "INSERT INTO log_records VALUES (?, ?, ?, ?, ?, ?, ?)"

    def __init__(self, path: str, batch: int = 50) -> None:
        super().__init__()
        self.conn = connect(path)
        self.conn.execute("CREATE TABLE IF NOT EXISTS log_records (created REAL, level TEXT, symbol TEXT, "
                          "action TEXT, entry_price REAL, confidence REAL, payload TEXT)")
        self.batch = batch
        self.rows: List[tuple] = []

    def emit(self, record: logging.LogRecord) -> None:
        sig = record.signal  # type: ignore[attr-defined]
        self.rows.append((record.created, record.levelname, sig.get("symbol"), sig.get("action"),
                          sig.get("entry_price"), sig.get("confidence"), json.dumps(sig, default=str)))
        if len(self.rows) >= self.batch:
            self.flush()

    def flush(self) -> None:
        if self.rows:
            self.conn.execute("BEGIN IMMEDIATE")
            self.conn.executemany(self.SQL, self.rows)
            self.conn.execute("COMMIT")
            self.rows = []

    def close(self) -> None:
        self.flush()
        self.conn.close()
        super().close()


def _reference(path: str, sigs: List[Dict[str, Any]], rate: int, seconds: float, pairs: int) -> Dict[str, Any]:
    q: "queue.Queue[Any]" = queue.Queue()
    handler = _SQLiteBatchHandler(path)
    listener = logging.handlers.QueueListener(q, handler)
    logger = logging.getLogger("argo_signals.bench.reference")
    logger.propagate = False
    logger.setLevel(logging.INFO)
    qh = logging.handlers.QueueHandler(q)
    logger.addHandler(qh)
    listener.start()

    def settle() -> None:
        q.join()   # the listener has handled every record; then write what its handler holds
        handler.acquire()
        try:
            handler.flush()
        finally:
            handler.release()

    try:
        info = logger.info
        out = _pairs(lambda s: info("signal %s %s", s["symbol"], s["action"], extra={"signal": s}),
                     settle, sigs, rate, seconds, pairs)
    finally:
        listener.stop()
        logger.removeHandler(qh)
        handler.close()
    return out


def strategy_slowdown(tmp: str, sigs: List[Dict[str, Any]], seconds: float = 0.1,
                      pairs: int = 10) -> Dict[str, float]:
    """One round: at each of ``SLOWDOWN_RATES``, ``pairs`` pairs of ``seconds``-long spins of the
    loop alone and beside the library, then the same beside the reference, and beside a logger
    that does nothing (the measurement's own floor).  Each slowdown is 100 * (1 - the median
    loaded/alone speed ratio) percent, speeds per wall second (on a shared machine other
    processes move them by tens of percent).  ``*_cpu_us_*`` is the CPU time
    the process's other threads (logging, writing) spent per signal logged, settling included:
    unlike the speeds, other processes on the machine hardly move it."""
    def fresh(name: str) -> str:
        path = os.path.join(tmp, name)
        for suffix in ("", "-wal", "-shm", ".spill.jsonl"):
            if os.path.exists(path + suffix):
                os.remove(path + suffix)
        return path

    out: Dict[str, float] = {}
    med = statistics.median
    for rate in SLOWDOWN_RATES:
        k = f"{rate // 1000}k"
        runs = {"strategy": _library(fresh("slowdown.db"), sigs, rate, seconds, pairs),
                "queuehandler": _reference(fresh("slowdown-ref.db"), sigs, rate, seconds, pairs),
                "noop_logger": _pairs(lambda s: None, lambda: None, sigs, rate, seconds, pairs)}
        for name, run in runs.items():
            out[f"{name}_slowdown_{k}"] = 100.0 * (1.0 - med(run["ratios"]))
            out[f"{name}_rate_{k}"] = run["rate"]
            out[f"{name}_cpu_us_{k}"] = run["cpu_us"]
    return out
