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
from decimal import Decimal
import re
import sqlite3
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from typing import Any, Dict, Iterable, List, Optional, Set, Tuple

from . import spill
from .demo import SIMULATED_SOURCE
from .record import SignalValidationError, format_timestamp
from .stats import percentiles_of_counts
from .store import SYNC_STATUSES, SYNC_STATUSES_SHOWN, connect_readonly, waiting_summary

__all__ = ["ReportError", "parse_since", "collect", "json_safe", "DEFAULT_BATCH_TIMEOUT", "DEFAULT_TOP",
           "MAX_BUCKETS", "SYNC_STATES", "ACTIONS", "CONFIDENCE_BANDS"]

DEFAULT_BATCH_TIMEOUT = 5.0  # SignalTracker's default: the reference line for time to durable
MAX_BUCKETS = 60
SYNC_STATES = SYNC_STATUSES_SHOWN   # the keys of the report's JSON, the columns of its tables
ACTIONS = ("BUY", "SELL", "NEUTRAL")
CONFIDENCE_BANDS = 10  # 0-10, 10-20, ... 90-100
TOP_REASONS = 10
DEFAULT_TOP = 10  # strategies drawn and listed on the page; the rest are summed as "other"
EXAMPLES = 3      # foreign values shown as stored, per column
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
_MAX_FLOAT = "1.7976931348623157e308"
_EARLIEST = "1970-01-01T00:00:00+00:00"   # created_at before this, or more than a year ahead
_AHEAD = timedelta(days=366)              # of now, is a time the report does not place
_PLACED = "(julianday(created_at) BETWEEN :earliest_jd AND :latest_jd)"  # NULL for a BLOB or no date
_PLACED_TS = "(julianday(timestamp) BETWEEN :earliest_jd AND :latest_jd)"  # the same, for the P/L time axis


def _finite(column: str) -> str:
    """SQL: ``column`` holds a finite number (text and BLOBs compare above every number, NULL
    and +-Inf fall outside)."""
    return f"({column} BETWEEN -{_MAX_FLOAT} AND {_MAX_FLOAT})"


@dataclass(frozen=True)
class _Guards:
    """SQL conditions that keep foreign values out of the figures; plain "1" when the census
    found none, so that a clean database pays nothing for them."""
    placed: str = _PLACED
    confidence: str = _finite("confidence")
    pnl: str = _finite("profit_loss_pct")
    timestamp: str = _PLACED_TS


def _shown_value(value: Any) -> Any:
    """A stored value as the report shows it: a BLOB as its SQL literal x'..'."""
    if isinstance(value, (bytes, bytearray, memoryview)):
        return f"x'{bytes(value).hex()}'"
    return value


class ReportError(Exception):
    """The report cannot be made (no database, not an argo-signals database, bad --since)."""


class _Text:
    """The connection's text factory: text that is not UTF-8 (another program's write) comes
    back with its bad bytes as ``\\xNN`` escapes, and is remembered so that it can be counted."""

    def __init__(self) -> None:
        self.bad: Set[str] = set()

    def __call__(self, data: bytes) -> str:
        try:
            return data.decode("utf-8")
        except UnicodeDecodeError:
            text = data.decode("utf-8", "backslashreplace")
            self.bad.add(text)
            return text


def json_safe(value: Any) -> Any:
    """``value`` with every non-finite float written as the string "Infinity", "-Infinity" or
    "NaN" (RFC 8259 JSON has no such numbers)."""
    if isinstance(value, float) and not math.isfinite(value):
        return "NaN" if value != value else ("Infinity" if value > 0 else "-Infinity")
    if isinstance(value, dict):  # keys too: an action or a strategy stored as -Inf is a key
        return {json_safe(k) if isinstance(k, float) else k: json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    return value


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


def _parse(text: Any) -> Optional[datetime]:
    if not isinstance(text, str):
        return None
    try:
        return datetime.fromisoformat(text).astimezone(_UTC)
    except (ValueError, OverflowError):
        return None


def _placed_time(conn: sqlite3.Connection, text: Any) -> Optional[datetime]:
    """A created_at the report placed (SQLite read it) as a datetime, whatever its format."""
    dt = _parse(text)
    if dt is None and text is not None:
        ms = conn.execute("SELECT CAST(round((julianday(?) - 2440587.5) * 86400000.0) AS INTEGER)",
                          (text,)).fetchone()[0]
        dt = None if ms is None else _from_ms(ms)
    return dt


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
    try:
        conn = connect_readonly(db_path)
    except sqlite3.Error as exc:
        raise ReportError(f"cannot open {db_path} ({exc})") from None
    conn.text_factory = _Text()
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
            per_symbol: bool = False, top: int = DEFAULT_TOP) -> Dict[str, Any]:
    """All of the report's numbers for ``db_path`` (see docs/cli.md for the meaning of each);
    ``per_symbol`` adds the per-strategy figures per symbol too (one more scan).  The
    cumulative P/L is kept for the ``top`` strategies by signal count, the rest summed."""
    now = (now or datetime.now(_UTC)).astimezone(_UTC)
    since_dt = parse_since(since, now) if since else None
    conn = _open(db_path)
    try:
        return _collect(conn, db_path, since_dt, strategy, now, batch_timeout, per_symbol, max(1, top))
    finally:
        conn.close()


def _collect(conn: sqlite3.Connection, db_path: str, since_dt: Optional[datetime], strategy: Optional[str],
             now: datetime, batch_timeout: float, per_symbol: bool, top: int) -> Dict[str, Any]:
    params: Dict[str, Any] = {"earliest_jd": _julian(datetime.fromisoformat(_EARLIEST)),
                              "latest_jd": _julian(now + _AHEAD)}
    census = _census(conn, strategy, params)
    guards = _Guards(placed=_PLACED if census["created_at"] else "1",
                     confidence=_finite("confidence") if census["confidence"] else "1",
                     pnl=_finite("profit_loss_pct") if census["profit_loss_pct"] else "profit_loss_pct IS NOT NULL",
                     timestamp=_PLACED_TS if census["timestamp"] else "1")
    clauses: List[str] = [guards.placed]
    if since_dt is not None:
        clauses.append("created_at >= :since")
        params["since"] = _iso(since_dt)
    if strategy is not None:
        clauses.append("strategy = :strategy")
        params["strategy"] = strategy
    where = " AND ".join(c for c in clauses if c != "1") or "created_at IS NOT NULL"

    if since_dt is not None:
        last = conn.execute(f"SELECT max(created_at) FROM signals WHERE {guards.placed}", params).fetchone()[0]
        start, end = since_dt, max(now, _placed_time(conn, last) or now)
    else:
        # one subquery each: SQLite answers a lone min() or max() from the created_at index
        first, last = conn.execute(f"SELECT (SELECT min(created_at) FROM signals WHERE {where}), "
                                   f"(SELECT max(created_at) FROM signals WHERE {where})", params).fetchone()
        start, end = _placed_time(conn, first) or now, _placed_time(conn, last) or now
        start = min(start, end)
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
    report["quality"] = _quality(conn, where, params, per_symbol, top, guards)
    report["foreign"] = _foreign(conn, strategy, params, census, report["quality"])
    return report


def _julian(dt: datetime) -> float:
    return dt.timestamp() / 86400.0 + 2440587.5


_STATES_SQL = ", ".join(f"'{s}'" for s in SYNC_STATUSES)
# (column, SQL: the row's value is one our writer would store); NULL counts as foreign only
# where our schema has NOT NULL
_CHECKS = (
    ("created_at", _PLACED),
    ("timestamp", _PLACED_TS),
    ("strategy", "typeof(strategy) != 'blob'"),
    ("action", "action IN ('BUY', 'SELL', 'NEUTRAL')"),
    ("sync_status", f"sync_status IN ({_STATES_SQL})"),
    ("confidence", _finite("confidence")),
    ("profit_loss_pct", f"(profit_loss_pct IS NULL OR {_finite('profit_loss_pct')})"),
)


def _census(conn: sqlite3.Connection, strategy: Optional[str], params: Dict[str, Any]) -> Dict[str, int]:
    """How many rows hold a value our writer never stores, per column: one scan of the whole
    database (or strategy)."""
    where = "strategy = :strategy" if strategy is not None else "1"
    counts = conn.execute("SELECT count(*), " + ", ".join(f"count(CASE WHEN {ok} THEN 1 END)" for _, ok in _CHECKS)
                          + f" FROM signals WHERE {where}", {**params, "strategy": strategy}).fetchone()
    return {column: counts[0] - n for (column, _), n in zip(_CHECKS, counts[1:])}


def _foreign(conn: sqlite3.Connection, strategy: Optional[str], params: Dict[str, Any], census: Dict[str, int],
             quality: Dict[str, Any]) -> Dict[str, Any]:
    """Values our writer never stores (another program's writes), whole database (or strategy):
    how many rows hold one, per column, and a few examples as stored."""
    where = "strategy = :strategy" if strategy is not None else "1"
    p = {**params, "strategy": strategy}
    factory = conn.text_factory
    bad_text: Set[str] = factory.bad if isinstance(factory, _Text) else set()
    bad_names = [s for s in quality["by_strategy"] if s["strategy"] in bad_text]
    out: Dict[str, Any] = {}
    for column, ok in _CHECKS:
        n = census[column]
        cond = f"NOT coalesce({ok}, 0)"
        examples: List[Any] = []
        if column == "strategy":
            n += sum(s["signals"] for s in bad_names)
            examples = [s["strategy"] for s in bad_names][:EXAMPLES]
        if n and len(examples) < EXAMPLES:
            examples += [_shown_value(v) for (v,) in conn.execute(
                f"SELECT DISTINCT {column} FROM signals WHERE {where} AND {cond} "
                f"LIMIT {EXAMPLES - len(examples)}", p)]
        out[column] = {"count": n, "examples": examples}
    out["unplaced_rows"] = out["created_at"]["count"]
    return out


def _health(conn: sqlite3.Connection, db_path: str, where: str, params: Dict[str, Any], bucket: str,
            origin_ms: int, width: int, n_buckets: int, strategy: Optional[str], now: datetime) -> Dict[str, Any]:
    intervals = [{"start": _iso(_from_ms(origin_ms + k * width)), "commits": {a: 0 for a in ACTIONS},
                  "total": 0, "sync": {s: 0 for s in SYNC_STATES}} for k in range(n_buckets)]
    totals: Dict[str, Any] = {"signals": 0, "by_action": {a: 0 for a in ACTIONS}, "by_sync_status": {s: 0 for s in SYNC_STATES}}
    # a table made by another program may have no data_source: then no signal is the demo's
    has_source = any(row[1] == "data_source" for row in conn.execute("PRAGMA table_info(signals)"))
    is_simulated = "data_source = :simulated" if has_source else "0"
    sim_params = {**params, "simulated": SIMULATED_SOURCE}
    simulated = 0
    for b, action, status, n, sim in conn.execute(
            f"SELECT {bucket}, action, sync_status, count(*), count(CASE WHEN {is_simulated} THEN 1 END) "
            f"FROM signals WHERE {where} GROUP BY 1, 2, 3", sim_params):
        simulated += sim
        action, status = _shown_value(action), _shown_value(status)
        slot = intervals[min(max(b, 0), n_buckets - 1)]
        slot["commits"][action] = slot["commits"].get(action, 0) + n
        slot["sync"][status] = slot["sync"].get(status, 0) + n
        slot["total"] += n
        totals["signals"] += n
        totals["by_action"][action] = totals["by_action"].get(action, 0) + n
        totals["by_sync_status"][status] = totals["by_sync_status"].get(status, 0) + n

    # signals whose own timestamp is simulated (the demo's) say nothing about time to durable
    durable, durable_all = _quantiles_by_bucket(
        conn, _ms_between("created_at", "timestamp"),
        f"{where} AND data_source IS NOT :simulated" if has_source else where, bucket, sim_params)
    lag, lag_all = _quantiles_by_bucket(conn, _ms_between("synced_at", "created_at"),
                                f"{where} AND sync_status = 'synced' AND synced_at IS NOT NULL", bucket, params)
    for k, slot in enumerate(intervals):
        slot["time_to_durable_ms"] = durable.get(k, {"n": 0, "p50": None, "p99": None})
        slot["sync_lag_ms"] = lag.get(k, {"n": 0, "p50": None, "p99": None})

    errors = [{"reason": _shown_value(r), "status": _shown_value(s), "count": n} for r, s, n in conn.execute(
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
    refused_total, refusals = 0, []
    if conn.execute("SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'rejected_signals'").fetchone():
        refused_total = conn.execute(f"SELECT count(*) FROM rejected_signals WHERE {rw}", refused_params).fetchone()[0]
        refusals = [{"reason": _shown_value(r), "count": n} for r, n in conn.execute(
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
            "created_at": _shown_value(oldest[0]),
            "age_ms": None if oldest_at is None else _epoch_ms(now) - _epoch_ms(oldest_at)},
        "spill_lines": spill.pending_count(spill.spill_path(db_path)),
        "waiting_updates": waiting_summary(conn)[0],
    }


_WIN, _LOSS = "lower(trim(outcome)) = 'win'", "lower(trim(outcome)) = 'loss'"


def _breakdown(conn: sqlite3.Connection, column: str, where: str, params: Dict[str, Any], guards: _Guards) -> Tuple[
        List[Dict[str, Any]], List[Dict[str, Any]], Optional[float], Optional[float]]:
    """Per ``column`` (strategy or symbol) figures, the calibration bands and the P/L range,
    from one GROUP BY column, confidence band.  Only finite numbers count as a confidence or a
    P/L (other values are counted apart, see ``_foreign``)."""
    step = 100 // CONFIDENCE_BANDS
    conf_ok = guards.confidence
    band = f"max(0, min({CONFIDENCE_BANDS - 1}, CAST(confidence / {step} AS INTEGER)))"
    conf = "confidence"
    if conf_ok != "1":
        band, conf = f"CASE WHEN {conf_ok} THEN {band} ELSE -1 END", f"CASE WHEN {conf_ok} THEN confidence END"
    pnl = "profit_loss_pct" if guards.pnl == "profit_loss_pct IS NOT NULL" else f"CASE WHEN {guards.pnl} THEN profit_loss_pct END"
    per: Dict[Any, Dict[str, Any]] = {}
    bands: List[Dict[str, Any]] = [{"low": k * step, "high": (k + 1) * step, "decided": 0, "wins": 0}
                                   for k in range(CONFIDENCE_BANDS)]
    lo = hi = None
    for (raw, k, n, buy, sell, neutral, conf_total, closed, wins, losses, with_pnl, total, pmin, pmax) in conn.execute(
            f"SELECT {column}, {band}, count(*), sum(action = 'BUY'), sum(action = 'SELL'), "
            f"sum(action = 'NEUTRAL'), total({conf}), count(outcome), count(CASE WHEN {_WIN} THEN 1 END), "
            f"count(CASE WHEN {_LOSS} THEN 1 END), count({pnl}), total({pnl}), "
            f"min({pnl}), max({pnl}) FROM signals WHERE {where} GROUP BY 1, 2", params):
        g = per.setdefault(raw, {column: _shown_value(raw), "raw": raw, "signals": 0, "buy": 0, "sell": 0, "neutral": 0, "conf": 0.0,
                                  "conf_n": 0, "closed": 0, "wins": 0, "losses": 0, "with_pnl": 0, "pnl": 0.0})
        for key, v in (("signals", n), ("buy", buy), ("sell", sell), ("neutral", neutral), ("conf", conf_total),
                       ("closed", closed), ("wins", wins), ("losses", losses), ("with_pnl", with_pnl), ("pnl", total)):
            g[key] += v
        if k >= 0:
            g["conf_n"] += n
            bands[k]["decided"] += wins + losses
            bands[k]["wins"] += wins
        if pmin is not None:
            lo = pmin if lo is None else min(lo, pmin)
            hi = pmax if hi is None else max(hi, pmax)
    groups = []
    for g in sorted(per.values(), key=lambda g: (-g["signals"], str(g[column]))):
        groups.append(_finish(g))
    for c in bands:
        c["win_rate"] = c["wins"] / c["decided"] if c["decided"] else None
    return groups, bands, lo, hi


def _finish(g: Dict[str, Any]) -> Dict[str, Any]:
    """A group's sums turned into its figures (means, win rate)."""
    conf, conf_n, pnl = g.pop("conf"), g.pop("conf_n"), g.pop("pnl")
    decided = g["wins"] + g["losses"]
    g.update(mean_confidence=conf / conf_n if conf_n else None, win_rate=g["wins"] / decided if decided else None,
             mean_pnl_pct=pnl / g["with_pnl"] if g["with_pnl"] else None,
             total_pnl_pct=pnl if g["with_pnl"] else None)
    return g


def other_row(groups: List[Dict[str, Any]], column: str, top: int) -> Optional[Dict[str, Any]]:
    """The groups after the first ``top`` summed into one row (None when there are none)."""
    rest = groups[top:]
    if not rest:
        return None
    out: Dict[str, Any] = {column: None, "count": len(rest), "conf": 0.0, "conf_n": 0, "pnl": 0.0}
    for key in ("signals", "buy", "sell", "neutral", "closed", "wins", "losses", "with_pnl"):
        out[key] = sum(g[key] for g in rest)
    for g in rest:
        if g["mean_confidence"] is not None:
            n = g["signals"]  # (rows without a finite confidence are rare: weigh by signals)
            out["conf"] += g["mean_confidence"] * n
            out["conf_n"] += n
        if g["total_pnl_pct"] is not None:
            out["pnl"] += g["total_pnl_pct"]
    return _finish(out)


_SIGNAL_TIME = "timestamp (the signal's own time), UTC"


def _signal_time(conn: sqlite3.Connection, where: str, params: Dict[str, Any]) -> Tuple[
        str, Dict[str, Any], int, Dict[str, Any]]:
    """Intervals over the signals' own time (``timestamp``) of the rows ``where`` selects (those
    with a finite P/L and a timestamp the report can place): the SQL bucket expression, its
    parameters, the first interval's start (epoch ms) and the axis (JSON-ready)."""
    # julianday(): any offset; the guard in ``where`` keeps out text that is no time at all
    first, last = conn.execute(f"SELECT min(julianday(timestamp)), max(julianday(timestamp)) FROM signals "
                               f"WHERE {where}", params).fetchone()
    if first is None or last is None:
        return "0", params, 0, {"by": _SIGNAL_TIME, "interval_ms": 0, "interval_count": 0, "starts": []}
    start_ms, end_ms = (int(round((jd - 2440587.5) * 86400000)) for jd in (first, last))
    width = _bucket_width_ms(max(1, end_ms - start_ms + 1))
    origin_ms = start_ms // width * width
    count = (end_ms - origin_ms) // width + 1
    bucket = f"({_ms_between('timestamp', ':ts_origin')} / :ts_width)"
    axis = {"by": _SIGNAL_TIME, "interval_ms": width, "interval_count": count,
            "starts": [_iso(_from_ms(origin_ms + k * width)) for k in range(count)]}
    return bucket, {**params, "ts_origin": _iso(_from_ms(origin_ms)), "ts_width": width}, origin_ms, axis


def _quality(conn: sqlite3.Connection, where: str, params: Dict[str, Any], per_symbol: bool, top: int,
             guards: _Guards) -> Dict[str, Any]:
    strategies, bands, lo, hi = _breakdown(conn, "strategy", where, params, guards)
    raws = [g.pop("raw") for g in strategies]
    shown = raws[:top]
    values = [v for v in shown if v is not None]
    mine = f"strategy IN ({', '.join(f':top{k}' for k in range(len(values)))})" if values else "0"
    if len(values) < len(shown):
        mine += " OR strategy IS NULL"
    if len(raws) <= top:
        mine = "1"  # every strategy has its own line: no test per row
    top_params = {f"top{k}": v for k, v in enumerate(values)}
    cumulative: Dict[Any, List[Dict[str, Any]]] = {}
    other: List[Dict[str, Any]] = []
    running: Dict[Any, float] = {}
    # over the signals' own time; a timestamp the report cannot place is left off the axis (and
    # counted in ``foreign``), its row still counts in the per-strategy figures
    on_axis = " AND ".join(c for c in (where, guards.pnl, guards.timestamp) if c != "1")
    bucket, ts_params, origin_ms, axis = _signal_time(conn, on_axis, params)
    width, n_axis = axis["interval_ms"], axis["interval_count"]
    # the top strategies one by one, the rest together: rows in Python follow the intervals, not the names
    for is_top, raw, b, n, total in conn.execute(
            f"SELECT ({mine}) AS is_top, CASE WHEN ({mine}) THEN strategy END, {bucket}, count(*), "
            f"total(profit_loss_pct) FROM signals WHERE {on_axis} "
            "GROUP BY 1, 2, 3 ORDER BY 1, 2, 3", {**ts_params, **top_params}):
        if b is None or not n_axis:
            continue  # (the guard keeps such rows out; never placed on an axis that is not there)
        b = min(max(b, 0), n_axis - 1)
        key = (raw,) if is_top else None
        running[key] = running.get(key, 0.0) + total
        points = cumulative.setdefault(_shown_value(raw), []) if is_top else other
        if points and points[-1]["interval"] == b:  # (clamped: a timestamp at the axis' rounded edge)
            points[-1].update(closed=points[-1]["closed"] + n, pnl_pct=points[-1]["pnl_pct"] + total,
                              cumulative_pnl_pct=running[key])
            continue
        points.append({"interval": b, "end": _iso(_from_ms(origin_ms + (b + 1) * width)), "closed": n,
                       "pnl_pct": total, "cumulative_pnl_pct": running[key]})

    n_pnl = sum(s["with_pnl"] for s in strategies)
    out = {"by_strategy": strategies, "top": top, "cumulative_pnl": cumulative, "cumulative_pnl_other": other,
           "pnl_axis": axis, "calibration": bands, "pnl_distribution": _distribution(conn, where, params, n_pnl, lo, hi, guards)}
    if per_symbol:
        symbols = _breakdown(conn, "symbol", where, params, guards)[0]
        for g in symbols:
            g.pop("raw")
        out["by_symbol"] = symbols
    return out


def _has_floor(conn: sqlite3.Connection) -> bool:
    """SQLite built with its math functions (3.35+, most builds)."""
    try:
        conn.execute("SELECT floor(1.5)")
        return True
    except sqlite3.Error:
        return False


def _nice_step(raw: Decimal) -> Tuple[int, int]:
    """The bin width as ``units * 10**exp`` (units 10, 20, 25, 50 or 100): at least ``raw``."""
    if raw <= 0:
        return 10, -1
    exp = raw.adjusted() - 1
    for units in (10, 20, 25, 50, 100):
        if Decimal(units).scaleb(exp) >= raw:
            return units, exp
    return 100, exp  # pragma: no cover


def _distribution(conn: sqlite3.Connection, where: str, params: Dict[str, Any], n: int,
                  lo: Optional[float], hi: Optional[float], guards: _Guards, bins: int = 20) -> Dict[str, Any]:
    """Histogram of the finite P/L values, exact at the bin edges: each value is scaled to
    whole millionths of the bin's unit 10**exp (rounding there undoes binary fractions such
    as 0.3 * 10 = 3.0000000000000004) and cut with whole-number arithmetic."""
    if not n or lo is None or hi is None:
        return {"n": 0, "bin_width": None, "bins": []}
    dlo, dhi = Decimal(repr(lo)), Decimal(repr(hi))
    units, exp = _nice_step((dhi - dlo) / bins)
    first = (dlo.scaleb(-exp) / units).to_integral_value(rounding="ROUND_FLOOR")  # bin of the lowest value
    count = int((dhi.scaleb(-exp) / units).to_integral_value(rounding="ROUND_FLOOR") - first) + 1
    # whole millionths of a unit: round() to 0 digits is SQLite's fast path, and exact
    scaled = "round(profit_loss_pct * :scale) / :units"
    floor = (f"floor({scaled})" if _has_floor(conn) else
             f"(CAST({scaled} AS INTEGER) - ({scaled} < CAST({scaled} AS INTEGER)))")
    got = dict(conn.execute(
        f"SELECT max(0, min({count - 1}, {floor} - :first)), count(*) "
        f"FROM signals WHERE {where} AND {guards.pnl} GROUP BY 1",
        {**params, "scale": float(Decimal(1).scaleb(6 - exp)), "units": units * 1_000_000, "first": int(first)}))

    def edge(k: int) -> float:
        return float((first + k) * units * Decimal(1).scaleb(exp))
    return {"n": n, "min": lo, "max": hi, "bin_width": float(Decimal(units).scaleb(exp)),
            "bins": [{"low": edge(k), "high": edge(k + 1), "count": got.get(k, 0)} for k in range(count)]}
