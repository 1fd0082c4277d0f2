"""``argo-signals demo``: producer threads log synthetic signals (``demo``) through one tracker,
close a share of them with an outcome, sync them, and sum up what was persisted and synced.

Kept apart from ``demo`` (the signal generator, which the report and the bench import without
the tracker).  Progress is shown by the caller (``progress.Progress``).
"""
from __future__ import annotations

import sqlite3
import threading
import time
import uuid
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any, Dict, List, Optional

from .config import alpine_target, env_flag
from .demo import outcome_picker, session_time, signals
from .progress import Progress, no_progress
from .stats import percentile
from .store import SYNC_STATUSES_SHOWN, connect_readonly
from .tracker import SignalTracker

__all__ = ["DemoError", "DemoResult", "run", "run_sync_counts",
           "run_sync_lag_ms", "wait_synced"]

class DemoError(ValueError):
    """The demo cannot start (a bad receiver URL or key)."""


@dataclass
class DemoResult:
    summary: Dict[str, Any]
    text: str
    complete: bool   # every logged signal persisted, refused or already stored


def run(db_path: str, count: int = 2000, producers: int = 4, rate: float = 0.0,
        alpine_url: Optional[str] = None, no_sync: bool = False,
        progress: Progress = no_progress) -> DemoResult:
    """The demo: without ``alpine_url``, ``$ALPINE_API_URL`` or ``no_sync`` (or
    ``ALPINE_SYNC_ENABLED=false``) it syncs to a local stand-in receiver, stopped at the end."""
    stand_in = None
    if not no_sync and alpine_url is None and not alpine_target()[0] \
            and env_flag("ALPINE_SYNC_ENABLED") is not False:
        from .testing import AlpineServer

        stand_in = AlpineServer(api_key=uuid.uuid4().hex).start()
    try:
        return _run(db_path, count, producers, rate, alpine_url, no_sync, stand_in, progress)
    finally:
        if stand_in is not None:
            stand_in.stop()


def _run(db_path: str, count: int, producers: int, rate: float, alpine_url: Optional[str], no_sync: bool,
         stand_in: Any, progress: Progress) -> DemoResult:
    try:
        if stand_in is not None:
            tracker = SignalTracker(db_path, alpine_url=stand_in.url, api_key=stand_in.api_key,
                                    register_atexit=False)
        else:
            tracker = SignalTracker(db_path, alpine_url=alpine_url, sync_enabled=False if no_sync else None,
                                    register_atexit=False)
    except ValueError as exc:
        raise DemoError(str(exc)) from None
    session_end = datetime.now(timezone.utc)
    call_us: List[float] = []
    lock = threading.Lock()
    shares = [count // producers + (1 if k < count % producers else 0) for k in range(producers)]
    done = [0]
    closed = {"win": 0, "loss": 0}
    run_ids: List[str] = []

    def produce(k: int, n: int) -> None:
        gen = signals(seed=k)
        mine: List[float] = []
        pick = outcome_picker(seed=k)
        mine_closed = {"win": 0, "loss": 0}
        ids: List[str] = []
        gap = 1.0 / rate if rate > 0 else 0.0
        for j in range(n):
            if stop.is_set():
                break
            sig = next(gen)
            sig["timestamp"] = session_time(j * producers + k, count, session_end)
            t0 = time.perf_counter()
            sid = tracker.log_signal(sig)
            ids.append(sid)
            mine.append((time.perf_counter() - t0) * 1e6)
            fields = pick(sig)
            if fields is not None:  # the same queue: the update lands after its insert
                tracker.update_signal(sid, **fields)
                mine_closed[fields["outcome"]] += 1
            with lock:
                done[0] += 1
            if gap:
                stop.wait(gap)
        with lock:
            call_us.extend(mine)
            for key, n_closed in mine_closed.items():
                closed[key] += n_closed
            run_ids.extend(ids)

    stop = threading.Event()
    start = time.perf_counter()
    threads = [threading.Thread(target=produce, args=(k, n), daemon=True) for k, n in enumerate(shares)]
    try:
        for th in threads:
            th.start()
        with progress(count, "logging") as bar:
            shown = 0
            while any(th.is_alive() for th in threads):
                time.sleep(0.05)
                bar.update(done[0] - shown)
                shown = done[0]
            bar.update(done[0] - shown)
        flushed = tracker.flush(60)
        elapsed = time.perf_counter() - start
        if tracker.sync_enabled:
            wait_synced(tracker, db_path, run_ids, progress)
    except BaseException:  # Ctrl-C: what was logged is still committed before leaving
        stop.set()
        for th in threads:
            if th.is_alive():
                th.join(5)
        tracker.close(30)
        raise
    tracker.close(30)
    st = tracker.stats()
    call_us.sort()
    mine_sync = run_sync_counts(db_path, run_ids)
    lag = run_sync_lag_ms(db_path, run_ids)
    receiver = ("stand-in" if stand_in is not None else "alpine") if st["sync_enabled"] else None
    summary: Dict[str, Any] = {
        "database": db_path,
        "logged": st["logged"], "persisted": st["persisted"], "rejected": st["rejected"],
        "fallback_writes": st["fallback_writes"], "flushed": flushed,
        "rows_per_s": round(st["persisted"] / elapsed, 1) if elapsed else None,
        "log_signal_us": {"p50": _r(percentile(call_us, 0.5)), "p99": _r(percentile(call_us, 0.99))},
        "time_to_durable_ms": st["latency_ms"],
        "flushes": st["flushes"],
        "closed": {"wins": closed["win"], "losses": closed["loss"]},
        "sync": {"enabled": st["sync_enabled"], "receiver": receiver, **mine_sync, "lag_ms": lag},  # this run's
        "signal_time": {"since": session_time(0, count, session_end).isoformat(), "until": session_end.isoformat()},
    }
    sync_text = ("off (--no-sync or ALPINE_SYNC_ENABLED=false); rows stay pending" if not st["sync_enabled"] else
                 f"{mine_sync['synced']} synced, {mine_sync['pending']} pending, {mine_sync['skipped']} skipped, "
                 f"{mine_sync['rejected']} rejected, {mine_sync['failed']} failed (this run's signals); "
                 + ("nothing synced, no lag" if lag["p50"] is None else f"lag p50 {lag['p50']} ms, p99 {lag['p99']} ms"))
    if stand_in is not None:
        sync_text = (f"to a local stand-in receiver on 127.0.0.1:{stand_in.port}; pass --alpine-url for a real one"
                     f"\n    {sync_text}")
    text = (f"{summary['persisted']} of {summary['logged']} signals persisted to {db_path} "
            f"in {elapsed:.2f}s ({summary['rows_per_s']} rows/s)\n"
            f"  rejected: {summary['rejected']}   fallback writes: {summary['fallback_writes']}\n"
            f"  log_signal(): p50 {summary['log_signal_us']['p50']} us, p99 {summary['log_signal_us']['p99']} us\n"
            f"  time to durable: p50 {st['latency_ms']['p50']} ms, p99 {st['latency_ms']['p99']} ms\n"
            f"  flushes: {', '.join(f'{k} {v}' for k, v in st['flushes'].items())}\n"
            f"  signal timestamps: simulated, {summary['signal_time']['since'][:16]} to "
            f"{summary['signal_time']['until'][:16]} UTC (the session before this run)\n"
            f"  sync: " + sync_text
            + f"\n  closed with an outcome: {closed['win']} wins, {closed['loss']} losses (update_signal)"
            + f"\nsee it all on one page: argo-signals report --db {db_path} --open" + _report_extra_hint())
    complete = summary["persisted"] + summary["rejected"] + st["duplicates"] == summary["logged"]
    return DemoResult(summary, text, complete)


def _report_extra_hint() -> str:
    from .report_html import EXTRA_HINT, charts_available

    return "" if charts_available() else f" (first: {EXTRA_HINT})"


def run_sync_lag_ms(db_path: str, ids: List[str]) -> Dict[str, Optional[float]]:
    """p50/p99 of synced_at - created_at (ms) over the synced rows with these signal ids."""
    lags: List[float] = []
    try:
        conn = connect_readonly(db_path)
    except sqlite3.Error:
        return {"p50": None, "p99": None}
    try:
        for i in range(0, len(ids), 500):
            chunk = ids[i:i + 500]
            lags += [v for (v,) in conn.execute(
                "SELECT (julianday(synced_at) - julianday(created_at)) * 86400000.0 FROM signals WHERE "
                f"signal_id IN ({', '.join('?' * len(chunk))}) AND sync_status = 'synced' AND synced_at IS NOT NULL",
                chunk) if v is not None]
    except sqlite3.Error:
        pass
    finally:
        conn.close()
    lags.sort()
    return {"p50": _r(percentile(lags, 0.5)), "p99": _r(percentile(lags, 0.99))}


def run_sync_counts(db_path: str, ids: List[str]) -> Dict[str, int]:
    """Counts by sync status of the rows with these signal ids (every status, in ``store.SYNC_STATUSES_SHOWN``)."""
    out = dict.fromkeys(SYNC_STATUSES_SHOWN, 0)
    try:
        conn = connect_readonly(db_path)
    except sqlite3.Error:
        return out
    try:
        for i in range(0, len(ids), 500):
            chunk = ids[i:i + 500]
            for status, n in conn.execute(
                    f"SELECT sync_status, count(*) FROM signals WHERE signal_id IN ({', '.join('?' * len(chunk))}) "
                    "GROUP BY sync_status", chunk):
                out[status] = out.get(status, 0) + n
    except sqlite3.Error:
        pass
    finally:
        conn.close()
    return out


def wait_synced(tracker: SignalTracker, db_path: str, ids: List[str], progress: Progress = no_progress,
                patience: float = 5.0) -> None:
    """The demo's sync phase: progress over this run's signals until none is pending, or until
    nothing has moved for ``patience`` seconds."""
    last_move = time.monotonic()
    with progress(len(ids), "syncing") as bar:
        shown = 0
        while True:
            counts = run_sync_counts(db_path, ids)
            settled = len(ids) - counts["pending"]
            if settled > shown:
                bar.update(settled - shown)
                shown = settled
                last_move = time.monotonic()
            if counts["pending"] == 0 or time.monotonic() - last_move > patience:
                return
            tracker.wait_synced(0.1)


def _r(v: Optional[float]) -> Optional[float]:
    return None if v is None else round(v, 1)
