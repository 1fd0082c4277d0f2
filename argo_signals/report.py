"""The report's numbers: pipeline health and signal quality, aggregated in SQL.

Every figure comes from a ``GROUP BY`` (or a window function for percentiles) inside SQLite,
so the rows never travel into Python: only a few hundred aggregate rows do.  ``collect()``
returns a JSON-ready dict with exact values (durations in integer milliseconds, the
resolution of SQLite's date functions); ``report_html`` renders it.

The period is by commit time (``created_at``, UTC); the cumulative P/L is over the signals'
own time (``timestamp``), on an axis of its own.  It is cut into at most ``MAX_BUCKETS``
intervals of a round width, and every interval is listed, empty ones included, so that a
gap in a busy stream shows.
"""
from __future__ import annotations

import math
import os
import re
import sqlite3
from datetime import datetime, timedelta, timezone
from urllib.parse import quote
from typing import Any, Dict, Iterable, List, Optional, Tuple

from . import spill
from .demo import SIMULATED_SOURCE
from .signal import SignalValidationError, format_timestamp
from .stats import percentiles_of_counts
from .store import waiting_summary

__all__ = ["ReportError", "parse_since", "collect", "DEFAULT_BATCH_TIMEOUT", "MAX_BUCKETS",
           "SYNC_STATES", "ACTIONS", "CONFIDENCE_BANDS"]

DEFAULT_BATCH_TIMEOUT = 5.0  # SignalTracker's default: the reference line for time to durable
MAX_BUCKETS = 60
SYNC_STATES = ("synced", "pending", "skipped", "rejected", "failed")
ACTIONS = ("BUY", "SELL", "NEUTRAL")
CONFIDENCE_BANDS = 10  # 0-10, 10-20, ... 90-100
TOP_REASONS = 10
_MERGE_LIMIT = 100_000  # distinct values merged in Python for the overall percentiles

_UTC = timezone.utc
_SECOND = 1000
_NICE_MS = (10, 20, 50, 100, 200, 500,
            _SECOND, 2 * _SECOND, 5 * _SECOND, 10 * _SECOND, 15 * _SECOND, 30 * _SECOND,
            60 * _SECOND, 120 * _SECOND, 300 * _SECOND, 600 * _SECOND, 900 * _SECOND, 1800 * _SECOND,
            3600 * _SECOND, 7200 * _SECOND, 10800 * _SECOND, 21600 * _SECOND, 43200 * _SECOND,
            86400 * _SECOND, 2 * 86400 * _SECOND, 7 * 86400 * _SECOND)
_RELATIVE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([smhdw])\s*$", re.IGNORECASE)
_UNIT_S = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}


class ReportError(Exception):
    """The report cannot be made (no database, not an argo-signals database, bad --since)."""


def _ms_between(later: str, earlier: str) -> str:
    """SQL: whole milliseconds from ``earlier`` to ``later`` (NULL when either is NULL)."""
    return f"CAST(round((julianday({later}) - julianday({earlier})) * 86400000.0) AS INTEGER)"


def parse_since(value: str, now: datetime) -> datetime:
    """``24h``, ``7d``, ``30m``, ``90s``, ``2w`` (before ``now``) or an ISO-8601 time (naive = UTC)."""
    m = _RELATIVE.match(value)
    if m:
        try:
            return now - timedelta(seconds=float(m.group(1)) * _UNIT_S[m.group(2).lower()])
        except (OverflowError, ValueError):
            raise ReportError(f"--since: {value!r} reaches back before the year 1") from None
    try:
        return datetime.fromisoformat(format_timestamp(value, "--since"))
    except SignalValidationError as exc:
        raise ReportError(f"--since: expected 24h, 7d, 30m or an ISO-8601 time, got {value!r} ({exc.problem})") from None


def _shown(path: str) -> str:
    """``path`` as text that can be written anywhere: bytes that are not UTF-8 become U+FFFD."""
    return os.fsencode(path).decode("utf-8", "replace")


def _iso(dt: datetime) -> str:
    return dt.astimezone(_UTC).isoformat()


def _parse(text: Optional[str]) -> Optional[datetime]:
    if text is None:
        return None
    try:
        return datetime.fromisoformat(text).astimezone(_UTC)
    except ValueError:
        return None


def _epoch_ms(dt: datetime) -> int:
    return int(round(dt.timestamp() * 1000))


def _from_ms(ms: int) -> datetime:
    return datetime.fromtimestamp(ms / 1000, _UTC)


def _bucket_width_ms(span_ms: int) -> int:
    need = span_ms / MAX_BUCKETS
    for w in _NICE_MS:
        if w >= need:
            return w
    step = 30 * 86400 * _SECOND
    return int(math.ceil(need / step)) * step


def _open(db_path: str) -> sqlite3.Connection:
    if not os.path.exists(db_path):
        raise ReportError(f"no database at {db_path}")
    if os.path.isdir(db_path):
        raise ReportError(f"{db_path} is a directory, not a database")
    # the path's bytes percent-encoded: '#', '?' and '%' in the name would otherwise end the
    # path, and a name that is not valid UTF-8 could not be written as a URI at all
    uri = "file:" + quote(os.fsencode(os.path.abspath(db_path))) + "?mode=ro"
    try:
        conn = sqlite3.connect(uri, uri=True, timeout=5.0)
    except sqlite3.Error as exc:
        raise ReportError(f"cannot open {db_path} ({exc})") from None
    try:
        # one read transaction: every figure comes from the same snapshot, even while a
        # writer commits (WAL readers see the database as of their first read)
        conn.execute("BEGIN")
        conn.execute("SELECT created_at, sync_status, outcome, profit_loss_pct FROM signals LIMIT 1")
    except sqlite3.Error as exc:
        conn.close()
        raise ReportError(f"{db_path} is not an argo-signals database ({exc})") from None
    return conn


def _pick(pairs: Iterable[Tuple[int, int]], n: int) -> Dict[str, Any]:
    """p50/p99 of n values given as sorted (value, how many) pairs."""
    return {"n": n, **percentiles_of_counts(pairs, n, {"p50": 0.5, "p99": 0.99})}


def _quantiles_by_bucket(conn: sqlite3.Connection, value: str, where: str, bucket: str,
                 params: Dict[str, Any]) -> Tuple[Dict[int, Dict[str, Any]], Dict[str, Any]]:
    """Exact p50/p99 of ``value`` (integer ms) per bucket and overall.

    SQLite counts each distinct (bucket, value); Python walks those sorted counts one bucket
    at a time and merges them for the overall figures, so memory follows the number of
    distinct values, not rows (past ``_MERGE_LIMIT`` of them SQLite counts the overall too)."""
    per: Dict[int, Dict[str, Any]] = {}
    merged: Optional[Dict[int, int]] = {}
    current: Optional[int] = None
    pairs: List[Tuple[int, int]] = []
    for b, x, c in conn.execute(f"SELECT {bucket}, {value} AS x, count(*) FROM signals WHERE {where} "
                                "AND x IS NOT NULL GROUP BY 1, 2 ORDER BY 1, 2", params):
        if b != current:
            if current is not None:
                per[current] = _pick(pairs, sum(n for _, n in pairs))
            current, pairs = b, []
        pairs.append((x, c))
        if merged is not None:
            merged[x] = merged.get(x, 0) + c
            if len(merged) > _MERGE_LIMIT:
                merged = None
    if current is not None:
        per[current] = _pick(pairs, sum(n for _, n in pairs))
    total = sum(p["n"] for p in per.values())
    if merged is not None:
        overall = _pick(sorted(merged.items()), total)
    else:
        overall = _pick(conn.execute(f"SELECT {value} AS x, count(*) FROM signals WHERE {where} "
                                     "AND x IS NOT NULL GROUP BY 1 ORDER BY 1", params), total)
    return per, overall


def collect(db_path: str, since: Optional[str] = None, strategy: Optional[str] = None,
            now: Optional[datetime] = None, batch_timeout: float = DEFAULT_BATCH_TIMEOUT,
            per_symbol: bool = False) -> Dict[str, Any]:
    """All of the report's numbers for ``db_path`` (see docs/cli.md for the meaning of each);
    ``per_symbol`` adds the per-strategy figures per symbol too (one more scan)."""
    now = (now or datetime.now(_UTC)).astimezone(_UTC)
    since_dt = parse_since(since, now) if since else None
    conn = _open(db_path)
    try:
        return _collect(conn, db_path, since_dt, strategy, now, batch_timeout, per_symbol)
    finally:
        conn.close()


def _collect(conn: sqlite3.Connection, db_path: str, since_dt: Optional[datetime], strategy: Optional[str],
             now: datetime, batch_timeout: float, per_symbol: bool) -> Dict[str, Any]:
    clauses: List[str] = []
    params: Dict[str, Any] = {}
    if since_dt is not None:
        clauses.append("created_at >= :since")
        params["since"] = _iso(since_dt)
    if strategy is not None:
        clauses.append("strategy = :strategy")
        params["strategy"] = strategy
    where = " AND ".join(clauses) or "1"

    if since_dt is not None:
        last = conn.execute("SELECT max(created_at) FROM signals").fetchone()[0]
        start, end = since_dt, max(now, _parse(last) or now)
    else:
        first, last = conn.execute(f"SELECT min(created_at), max(created_at) FROM signals WHERE {where}",
                                   params).fetchone()
        start, end = _parse(first) or now, _parse(last) or now
    start_ms, end_ms = _epoch_ms(start), _epoch_ms(end)
    width = _bucket_width_ms(max(1, end_ms - start_ms + 1))
    origin_ms = start_ms // width * width
    n_buckets = max(1, (end_ms - origin_ms) // width + 1)  # a --since in the future: one empty interval
    params["origin"] = _iso(_from_ms(origin_ms))
    params["width"] = width
    bucket = f"({_ms_between('created_at', ':origin')} / :width)"

    report: Dict[str, Any] = {
        "database": _shown(db_path),
        "generated_at": _iso(now),
        "filter": {"strategy": strategy},
        "period": {"since": _iso(start), "until": _iso(end), "by": "created_at (commit time), UTC",
                   "interval_ms": width, "interval_count": n_buckets},
        "batch_timeout_ms": int(round(batch_timeout * 1000)),
    }
    report["health"] = _health(conn, db_path, where, params, bucket, origin_ms, width, n_buckets, strategy, now)
    report["quality"] = _quality(conn, where, params, per_symbol)
    return report


def _health(conn: sqlite3.Connection, db_path: str, where: str, params: Dict[str, Any], bucket: str,
            origin_ms: int, width: int, n_buckets: int, strategy: Optional[str], now: datetime) -> Dict[str, Any]:
    intervals = [{"start": _iso(_from_ms(origin_ms + k * width)), "commits": {a: 0 for a in ACTIONS},
                  "total": 0, "sync": {s: 0 for s in SYNC_STATES}} for k in range(n_buckets)]
    totals: Dict[str, Any] = {"signals": 0, "by_action": {a: 0 for a in ACTIONS}, "by_sync_status": {s: 0 for s in SYNC_STATES}}
    simulated = 0
    for b, action, status, n, sim in conn.execute(
            f"SELECT {bucket}, action, sync_status, count(*), count(CASE WHEN data_source = :simulated THEN 1 END) "
            f"FROM signals WHERE {where} GROUP BY 1, 2, 3", {**params, "simulated": SIMULATED_SOURCE}):
        simulated += sim
        slot = intervals[min(max(b, 0), n_buckets - 1)]
        slot["commits"][action] = slot["commits"].get(action, 0) + n
        slot["sync"][status] = slot["sync"].get(status, 0) + n
        slot["total"] += n
        totals["signals"] += n
        totals["by_action"][action] = totals["by_action"].get(action, 0) + n
        totals["by_sync_status"][status] = totals["by_sync_status"].get(status, 0) + n

    # signals whose own timestamp is simulated (the demo's) say nothing about time to durable
    durable, durable_all = _quantiles_by_bucket(conn, _ms_between("created_at", "timestamp"),
                                                f"{where} AND data_source IS NOT :simulated", bucket,
                                                {**params, "simulated": SIMULATED_SOURCE})
    lag, lag_all = _quantiles_by_bucket(conn, _ms_between("synced_at", "created_at"),
                                f"{where} AND sync_status = 'synced' AND synced_at IS NOT NULL", bucket, params)
    for k, slot in enumerate(intervals):
        slot["time_to_durable_ms"] = durable.get(k, {"n": 0, "p50": None, "p99": None})
        slot["sync_lag_ms"] = lag.get(k, {"n": 0, "p50": None, "p99": None})

    errors = [{"reason": r, "status": s, "count": n} for r, s, n in conn.execute(
        f"SELECT sync_error, sync_status, count(*) FROM signals WHERE {where} AND sync_error IS NOT NULL "
        f"GROUP BY 1, 2 ORDER BY 3 DESC, 1 LIMIT {TOP_REASONS}", params)]
    refused_where, refused_params = ["1"], {}
    if "since" in params:
        refused_where.append("rejected_at >= :since")
        refused_params["since"] = params["since"]
    if strategy is not None:
        refused_where.append("json_valid(payload) AND json_extract(payload, '$.strategy') = :strategy")
        refused_params["strategy"] = strategy
    rw = " AND ".join(refused_where)
    refused_total = conn.execute(f"SELECT count(*) FROM rejected_signals WHERE {rw}", refused_params).fetchone()[0]
    refusals = [{"reason": r, "count": n} for r, n in conn.execute(
        f"SELECT reason, count(*) FROM rejected_signals WHERE {rw} GROUP BY 1 ORDER BY 2 DESC, 1 "
        f"LIMIT {TOP_REASONS}", refused_params)]

    # current state, whole database (not only the period): the outbox's oldest waiting row
    pend_where, pend_params = "sync_status = 'pending'", {}
    if strategy is not None:
        pend_where += " AND strategy = :strategy"
        pend_params["strategy"] = strategy
    pending_now = conn.execute(f"SELECT count(*) FROM signals WHERE {pend_where}", pend_params).fetchone()[0]
    oldest = conn.execute(f"SELECT created_at FROM signals WHERE {pend_where} ORDER BY id LIMIT 1",
                          pend_params).fetchone()
    oldest_at = _parse(oldest[0]) if oldest else None
    return {
        **totals,
        "intervals": intervals,
        "time_to_durable_ms": durable_all,
        "simulated_time_signals": simulated,
        "sync_lag_ms": lag_all,
        "sync_errors": errors,
        "refused": {"total": refused_total, "top_reasons": refusals},
        "pending_now": pending_now,
        "oldest_pending": None if oldest is None else {
            "created_at": oldest[0],
            "age_ms": None if oldest_at is None else _epoch_ms(now) - _epoch_ms(oldest_at)},
        "spill_lines": spill.pending_count(spill.spill_path(db_path)),
        "waiting_updates": waiting_summary(conn)[0],
    }


_WIN, _LOSS = "lower(trim(outcome)) = 'win'", "lower(trim(outcome)) = 'loss'"


def _breakdown(conn: sqlite3.Connection, column: str, where: str, params: Dict[str, Any]) -> Tuple[
        List[Dict[str, Any]], List[Dict[str, Any]], Optional[float], Optional[float]]:
    """Per ``column`` (strategy or symbol) figures, the calibration bands and the P/L range,
    from one GROUP BY column, confidence band."""
    step = 100 // CONFIDENCE_BANDS
    band = f"min({CONFIDENCE_BANDS - 1}, CAST(confidence / {step} AS INTEGER))"
    per: Dict[str, Dict[str, Any]] = {}
    bands: List[Dict[str, Any]] = [{"low": k * step, "high": (k + 1) * step, "decided": 0, "wins": 0}
                                   for k in range(CONFIDENCE_BANDS)]
    lo = hi = None
    for (name, k, n, buy, sell, neutral, conf, closed, wins, losses, with_pnl, pnl, pmin, pmax) in conn.execute(
            f"SELECT {column}, {band}, count(*), sum(action = 'BUY'), sum(action = 'SELL'), "
            f"sum(action = 'NEUTRAL'), total(confidence), count(outcome), count(CASE WHEN {_WIN} THEN 1 END), "
            f"count(CASE WHEN {_LOSS} THEN 1 END), count(profit_loss_pct), total(profit_loss_pct), "
            f"min(profit_loss_pct), max(profit_loss_pct) FROM signals WHERE {where} GROUP BY 1, 2", params):
        g = per.setdefault(name, {column: name, "signals": 0, "buy": 0, "sell": 0, "neutral": 0, "conf": 0.0,
                                  "closed": 0, "wins": 0, "losses": 0, "with_pnl": 0, "pnl": 0.0})
        for key, v in (("signals", n), ("buy", buy), ("sell", sell), ("neutral", neutral), ("conf", conf),
                       ("closed", closed), ("wins", wins), ("losses", losses), ("with_pnl", with_pnl), ("pnl", pnl)):
            g[key] += v
        bands[k]["decided"] += wins + losses
        bands[k]["wins"] += wins
        if pmin is not None:
            lo = pmin if lo is None else min(lo, pmin)
            hi = pmax if hi is None else max(hi, pmax)
    groups = []
    for g in sorted(per.values(), key=lambda g: (-g["signals"], str(g[column]))):
        conf, pnl = g.pop("conf"), g.pop("pnl")
        decided = g["wins"] + g["losses"]
        g.update(mean_confidence=conf / g["signals"], win_rate=g["wins"] / decided if decided else None,
                 mean_pnl_pct=pnl / g["with_pnl"] if g["with_pnl"] else None,
                 total_pnl_pct=pnl if g["with_pnl"] else None)
        groups.append(g)
    for c in bands:
        c["win_rate"] = c["wins"] / c["decided"] if c["decided"] else None
    return groups, bands, lo, hi


_SIGNAL_TIME = "timestamp (the signal's own time), UTC"


def _signal_time(conn: sqlite3.Connection, where: str, params: Dict[str, Any]) -> Tuple[str, Dict[str, Any], Dict[str, Any]]:
    """Intervals over the signals' own time (``timestamp``) of the rows with a P/L: the SQL
    bucket expression, its parameters, and the axis (JSON-ready)."""
    # julianday(): any offset, and NULL (left out) for text that is no time at all
    first, last = conn.execute(f"SELECT min(julianday(timestamp)), max(julianday(timestamp)) FROM signals "
                               f"WHERE {where} AND profit_loss_pct IS NOT NULL", params).fetchone()
    if first is None or last is None:
        return "0", params, {"by": _SIGNAL_TIME, "interval_ms": 0, "interval_count": 0, "starts": []}
    start_ms, end_ms = (int(round((jd - 2440587.5) * 86400000)) for jd in (first, last))
    width = _bucket_width_ms(max(1, end_ms - start_ms + 1))
    origin_ms = start_ms // width * width
    count = (end_ms - origin_ms) // width + 1
    bucket = f"({_ms_between('timestamp', ':ts_origin')} / :ts_width)"
    axis = {"by": _SIGNAL_TIME, "interval_ms": width, "interval_count": count,
            "starts": [_iso(_from_ms(origin_ms + k * width)) for k in range(count)]}
    return bucket, {**params, "ts_origin": _iso(_from_ms(origin_ms)), "ts_width": width}, axis


def _quality(conn: sqlite3.Connection, where: str, params: Dict[str, Any], per_symbol: bool) -> Dict[str, Any]:
    strategies, bands, lo, hi = _breakdown(conn, "strategy", where, params)
    cumulative: Dict[str, List[Dict[str, Any]]] = {}
    running: Dict[str, float] = {}
    bucket, ts_params, axis = _signal_time(conn, where, params)
    width, n_axis = axis["interval_ms"], axis["interval_count"]
    origin_ms = _epoch_ms(_parse(axis["starts"][0]) or datetime.now(_UTC)) if n_axis else 0
    for name, b, n, total in conn.execute(
            f"SELECT strategy, {bucket}, count(*), sum(profit_loss_pct) FROM signals "
            f"WHERE {where} AND profit_loss_pct IS NOT NULL GROUP BY 1, 2 ORDER BY 1, 2", ts_params):
        if b is None:
            continue  # a timestamp that is no time: counted per strategy, not placed on the axis
        b = min(max(b, 0), n_axis - 1)
        running[name] = running.get(name, 0.0) + total
        end = _iso(_from_ms(origin_ms + (b + 1) * width))
        points = cumulative.setdefault(name, [])
        if points and points[-1]["interval"] == b:  # (clamped: a timestamp the axis could not place)
            points[-1].update(closed=points[-1]["closed"] + n, pnl_pct=points[-1]["pnl_pct"] + total,
                              cumulative_pnl_pct=running[name])
            continue
        points.append({"interval": b, "end": end, "closed": n, "pnl_pct": total, "cumulative_pnl_pct": running[name]})

    n_pnl = sum(s["with_pnl"] for s in strategies)
    out = {"by_strategy": strategies, "cumulative_pnl": cumulative, "pnl_axis": axis, "calibration": bands,
           "pnl_distribution": _distribution(conn, where, params, n_pnl, lo, hi)}
    if per_symbol:
        out["by_symbol"] = _breakdown(conn, "symbol", where, params)[0]
    return out


def _nice_step(raw: float) -> float:
    if raw <= 0:
        return 1.0
    exp = math.floor(math.log10(raw))
    for m in (1, 2, 2.5, 5, 10):
        if m * 10 ** exp >= raw:
            return m * 10 ** exp
    return 10 ** (exp + 1)  # pragma: no cover


def _distribution(conn: sqlite3.Connection, where: str, params: Dict[str, Any], n: int,
                  lo: Optional[float], hi: Optional[float], bins: int = 20) -> Dict[str, Any]:
    if not n or lo is None or hi is None:
        return {"n": 0, "bin_width": None, "bins": []}
    step = _nice_step((hi - lo) / bins)
    start = math.floor(lo / step) * step
    count = int(math.floor((hi - start) / step)) + 1
    got = dict(conn.execute(
        f"SELECT min({count - 1}, CAST((profit_loss_pct - :lo) / :step AS INTEGER)), count(*) "
        f"FROM signals WHERE {where} AND profit_loss_pct IS NOT NULL GROUP BY 1",
        {**params, "lo": start, "step": step}))
    return {"n": n, "min": lo, "max": hi, "bin_width": step,
            "bins": [{"low": start + k * step, "high": start + (k + 1) * step, "count": got.get(k, 0)}
                     for k in range(count)]}
