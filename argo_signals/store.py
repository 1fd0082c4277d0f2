"""SQLite storage: connections, schema, batch writes, and the sync outbox queries.

Every connection gets the same pragmas (WAL, synchronous, busy timeout).  sqlite-utils
creates the schema and serves queries; the hot insert is a prepared ``executemany`` inside
one ``BEGIN IMMEDIATE`` transaction per batch.
"""
from __future__ import annotations

import contextlib
import json
import os
import random
import sqlite3
import time
import urllib.parse
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any, Callable, Dict, Iterable, Iterator, List, Optional, Sequence, Tuple

import sqlite_utils

from .signal import FINISHED_FIELDS, UPDATABLE, DefaultTimestamp

__all__ = ["connect", "connect_readonly", "readonly_uri", "SYNC_STATUSES", "ensure_schema", "BatchResult", "write_batch", "is_environment_error",
           "SIGNAL_COLUMNS", "utc_now", "status_counts", "claim_due", "settle", "settle_many", "release",
           "settle_refused",
           "reset_status", "APPLICATION_ID", "SCHEMA_VERSION", "ForeignDatabaseError", "check_ours"]

DURABILITY = {"normal": "NORMAL", "full": "FULL"}
# The marker the schema sets (PRAGMA application_id / user_version): "ARGS" in ASCII.
APPLICATION_ID = 0x41524753
SCHEMA_VERSION = 1
# Values of signals.sync_status.
SYNC_STATUSES = ("pending", "synced", "rejected", "skipped", "failed")

SIGNAL_COLUMNS: Dict[str, type] = {
    "id": int, "signal_id": str, "symbol": str, "action": str, "entry_price": float,
    "target_price": float, "stop_price": float, "confidence": float, "strategy": str,
    "asset_type": str, "data_source": str, "timestamp": str, "sha256": str, "regime": str,
    "reasoning": str, "service_type": str, "executor_id": str, "generated_by": str,
    "order_id": str, "outcome": str, "exit_price": float, "profit_loss_pct": float,
    "metadata": str, "created_at": str, "sync_status": str, "sync_attempts": int,
    "synced_at": str, "sync_error": str, "sync_next_at": float, "sync_claim": str,
    "sync_claim_until": float,
}
# Content columns: what makes two rows with one signal_id "the same signal".
CONTENT_COLUMNS = tuple(c for c in FINISHED_FIELDS if c not in UPDATABLE)
# ... less these when the new row's timestamp was filled in by default (a retry of a signal
# logged without a timestamp gets a new one; the hash covers it, so it differs too).
_DEFAULTED_TS_SKIP = frozenset(("timestamp", "sha256"))

_INSERT_COLUMNS = FINISHED_FIELDS + ("created_at",)
_ROW = f"({', '.join('?' * len(_INSERT_COLUMNS))})"
_INSERT_HEAD = f"INSERT OR IGNORE INTO signals ({', '.join(_INSERT_COLUMNS)}) VALUES "
_INSERT_SQL = _INSERT_HEAD + _ROW  # one row: what the benchmark's executemany reference uses
# Rows per multi-row INSERT: as many as the bound-parameter limit allows (32766 since SQLite
# 3.32, 999 before).  One statement per few hundred rows means one sqlite3_step, so the GIL
# is dropped and re-taken once per statement instead of once per row (executemany): with
# busy producer threads the per-row hand-offs cost up to the 5 ms switch interval each.
_MAX_VARIABLES = 32766 if sqlite3.sqlite_version_info >= (3, 32, 0) else 999
ROWS_PER_STATEMENT = max(1, min(500, _MAX_VARIABLES // len(_INSERT_COLUMNS)))
_multi_sql: Dict[int, str] = {}


def _insert_sql(n: int) -> str:
    sql = _multi_sql.get(n)
    if sql is None:
        sql = _multi_sql[n] = _INSERT_HEAD + ", ".join([_ROW] * n)
    return sql


def utc_now() -> str:
    return datetime.now(timezone.utc).isoformat()


def connect(path: str, durability: str = "normal", busy_timeout: float = 5.0) -> sqlite3.Connection:
    """Open ``path`` with the pragmas every argo-signals connection uses."""
    conn = sqlite3.connect(path, timeout=busy_timeout, isolation_level=None,
                           check_same_thread=False)
    try:
        conn.execute(f"PRAGMA busy_timeout = {int(busy_timeout * 1000)}")
        _patiently(lambda: check_ours(conn, path), busy_timeout)  # before anything is written
        # switching needs an exclusive lock, so only ask when the file is not in WAL yet
        if conn.execute("PRAGMA journal_mode").fetchone()[0].lower() != "wal":
            _patiently(lambda: conn.execute("PRAGMA journal_mode = WAL"), busy_timeout)
        conn.execute(f"PRAGMA synchronous = {DURABILITY[durability]}")
    except BaseException:
        conn.close()
        raise
    return conn


def readonly_uri(path: str) -> str:
    """A ``file:`` URI opening exactly ``path`` read-only (``%``, ``?``, ``#`` are escaped)."""
    return f"file:{urllib.parse.quote(os.fsencode(os.path.abspath(path)), safe='/')}?mode=ro"


def connect_readonly(path: str, timeout: float = 5.0) -> sqlite3.Connection:
    """Open ``path`` read-only; raises ``sqlite3.OperationalError`` if it does not exist."""
    return sqlite3.connect(readonly_uri(path), uri=True, timeout=timeout)


@contextlib.contextmanager
def _immediate(conn: sqlite3.Connection) -> Iterator[None]:
    """One ``BEGIN IMMEDIATE`` transaction: committed on success, rolled back on any error."""
    conn.execute("BEGIN IMMEDIATE")
    try:
        yield
        conn.execute("COMMIT")
    except BaseException:
        if conn.in_transaction:  # SQLite may have rolled back already (e.g. SQLITE_FULL)
            conn.execute("ROLLBACK")
        raise


def _busy(exc: sqlite3.OperationalError) -> bool:
    text = str(exc).lower()
    return "locked" in text or "busy" in text


def _patiently(step: Callable[[], Any], wait: float) -> Any:
    """Run ``step``, again while another connection holds the lock, for up to ``wait`` seconds.
    (Changing the journal mode or the schema can answer "locked" at once, without waiting
    for the busy timeout, when several processes open one new database together.)"""
    deadline = time.monotonic() + wait
    while True:
        try:
            return step()
        except sqlite3.OperationalError as exc:
            if not _busy(exc) or time.monotonic() >= deadline:
                raise
            time.sleep(0.01 + random.random() * 0.04)


class ForeignDatabaseError(OSError):
    """The file is a database of another program: nothing was written to it."""


_REJECTED_COLUMNS = ("id", "signal_id", "payload", "reason", "rejected_at")


def check_ours(conn: sqlite3.Connection, path: Any) -> None:
    """Raise ``ForeignDatabaseError`` naming ``path`` unless the database is empty or ours:
    our marker (or, from before the marker, our tables) and the expected columns.  Reads only."""
    def refuse(why: str) -> None:
        raise ForeignDatabaseError(f"{os.fsdecode(path)} is not an argo-signals database ({why}); "
                                   "it was left unchanged: check --db / ARGO_SIGNALS_DB")

    app_id = conn.execute("PRAGMA application_id").fetchone()[0]
    tables = {name for (name,) in conn.execute(
        "SELECT name FROM sqlite_master WHERE type = 'table' AND name NOT LIKE 'sqlite!_%' ESCAPE '!'")}
    if app_id not in (0, APPLICATION_ID):
        refuse(f"it belongs to the application with id {app_id:#x}")
    if app_id == APPLICATION_ID:
        version = conn.execute("PRAGMA user_version").fetchone()[0]
        if version > SCHEMA_VERSION:
            refuse(f"made by a newer version of argo-signals (schema {version}, this one knows {SCHEMA_VERSION})")
    elif not tables:
        return  # empty: the schema will be created
    elif "signals" not in tables:
        refuse(f"it has tables {', '.join(sorted(tables)[:5])} but no signals table")
    for table, want in (("signals", tuple(SIGNAL_COLUMNS)), ("rejected_signals", _REJECTED_COLUMNS)):
        if table in tables:
            have = {row[1] for row in conn.execute(f"PRAGMA table_info({table})")}
            missing = [c for c in want if c not in have]
            if missing:
                refuse(f"its {table} table is missing the columns {', '.join(missing[:6])}"
                       + (" ..." if len(missing) > 6 else ""))


def ensure_schema(conn: sqlite3.Connection, wait: float = 5.0) -> None:
    """Create the tables and indexes if they do not exist (idempotent, multi-process safe:
    every statement is ``IF NOT EXISTS``; a creator that finds the lock taken tries again
    for up to ``wait`` seconds)."""
    _patiently(lambda: _create_schema(conn), wait)


def _create_schema(conn: sqlite3.Connection) -> None:
    db = sqlite_utils.Database(conn)
    if (db["signals"].exists() and db["rejected_signals"].exists()
            and conn.execute("PRAGMA application_id").fetchone()[0] == APPLICATION_ID):
        return
    signals = db.table("signals")
    signals.create(
        SIGNAL_COLUMNS, pk="id",
        not_null={"signal_id", "symbol", "action", "entry_price", "confidence", "timestamp",
                  "sha256", "created_at", "sync_status", "sync_attempts"},
        defaults={"sync_status": "pending", "sync_attempts": 0}, if_not_exists=True)
    signals.create_index(["signal_id"], unique=True, if_not_exists=True)
    signals.create_index(["symbol", "timestamp"], if_not_exists=True)
    signals.create_index(["sync_status"], if_not_exists=True)
    signals.create_index(["created_at"], if_not_exists=True)
    db.table("rejected_signals").create(
        {"id": int, "signal_id": str, "payload": str, "reason": str, "rejected_at": str},
        pk="id", if_not_exists=True)
    _mark(conn)


def _mark(conn: sqlite3.Connection) -> None:
    """Set the marker last: a database with it has the whole schema."""
    if conn.execute("PRAGMA application_id").fetchone()[0] != APPLICATION_ID:
        try:
            conn.execute(f"PRAGMA application_id = {APPLICATION_ID}")
            conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
        except sqlite3.OperationalError as exc:
            if "readonly" not in str(exc).lower():
                raise  # (a read-only file from before the marker keeps working unmarked)


def is_environment_error(exc: BaseException) -> bool:
    """True for failures of the database or disk (retry, then spill), False for a bad row."""
    if isinstance(exc, (sqlite3.OperationalError, OSError)):
        return True
    return type(exc) is sqlite3.DatabaseError  # e.g. "file is not a database", "disk image is malformed"


@dataclass
class BatchResult:
    inserted: int = 0
    duplicates: int = 0
    rejected_rows: List[Tuple[Optional[str], str, str]] = field(default_factory=list)  # id, reason, payload
    unknown_updates: List[str] = field(default_factory=list)
    refused_updates: List[str] = field(default_factory=list)  # named columns that cannot change


def write_batch(conn: sqlite3.Connection, rows: Sequence[tuple],
                updates: Sequence[Tuple[str, Dict[str, Any]]] = ()) -> BatchResult:
    """Insert finished rows and apply updates in one transaction.

    A signal_id already stored with the same content is a no-op; with other content the row
    goes to ``rejected_signals``.  A row the database refuses is isolated by bisection and
    rejected on its own, so it cannot sink its batch.  Errors of the database itself
    (locked, I/O, full) roll back and propagate: the caller keeps the batch and retries.
    """
    result = BatchResult()
    created = utc_now()
    with _immediate(conn):
        _insert(conn, [r + (created,) for r in rows], result)
        for sid, values in updates:
            if not values or not UPDATABLE.issuperset(values):
                # updates can come back from a spill file: never trust column names
                result.refused_updates.append(sid)
                continue
            cols = ", ".join(f"{k} = ?" for k in values)
            cur = conn.execute(f"UPDATE signals SET {cols} WHERE signal_id = ?", (*values.values(), sid))
            if cur.rowcount == 0:
                result.unknown_updates.append(sid)
        if result.rejected_rows:
            conn.executemany(
                "INSERT INTO rejected_signals (signal_id, payload, reason, rejected_at) VALUES (?, ?, ?, ?)",
                [(sid, payload, reason, created) for sid, reason, payload in result.rejected_rows])
    return result


def _insert(conn: sqlite3.Connection, rows: List[tuple], result: BatchResult) -> None:
    if not rows:
        return
    before = conn.total_changes
    try:
        conn.execute("SAVEPOINT batch")
        step = ROWS_PER_STATEMENT
        for i in range(0, len(rows), step):
            chunk = rows[i:i + step]
            conn.execute(_insert_sql(len(chunk)), [v for r in chunk for v in r])
        conn.execute("RELEASE batch")
    except Exception as exc:
        if is_environment_error(exc) or not conn.in_transaction:
            raise  # SQLite may already have rolled the whole transaction back (e.g. SQLITE_FULL)
        conn.execute("ROLLBACK TO batch")
        conn.execute("RELEASE batch")
        if len(rows) == 1:
            _reject(result, rows[0], f"refused by the database: {type(exc).__name__}: {exc}")
            return
        mid = len(rows) // 2
        _insert(conn, rows[:mid], result)
        _insert(conn, rows[mid:], result)
        return
    inserted = conn.total_changes - before
    result.inserted += inserted
    if inserted < len(rows):
        _sort_out_conflicts(conn, rows, result, len(rows) - inserted)


def _sort_out_conflicts(conn: sqlite3.Connection, rows: List[tuple], result: BatchResult,
                        conflicts: int) -> None:
    """Some rows were ignored: same content as stored is a duplicate, other content is rejected."""
    idx = [FINISHED_FIELDS.index(c) for c in CONTENT_COLUMNS]
    keep = [k for k, c in enumerate(CONTENT_COLUMNS) if c not in _DEFAULTED_TS_SKIP]
    ts_at = FINISHED_FIELDS.index("timestamp")
    stored: Dict[str, tuple] = {}
    ids = [r[0] for r in rows]
    cols = ", ".join(CONTENT_COLUMNS)
    for i in range(0, len(ids), 500):
        chunk = ids[i:i + 500]
        q = f"SELECT {cols} FROM signals WHERE signal_id IN ({', '.join('?' * len(chunk))})"
        for rec in conn.execute(q, chunk):
            stored[rec[0]] = tuple(rec)
    rejected = 0
    for r in rows:
        have = stored.get(r[0])
        if have is None:
            _reject(result, r, "refused by the database")
            rejected += 1
            continue
        want = tuple(r[i] for i in idx)
        if type(r[ts_at]) is DefaultTimestamp:
            have, want = tuple(have[k] for k in keep), tuple(want[k] for k in keep)
        if have != want:
            _reject(result, r, "signal_id already stored with different content")
            rejected += 1
    result.duplicates += conflicts - rejected


def _reject(result: BatchResult, row: tuple, reason: str) -> None:
    payload = json.dumps(dict(zip(FINISHED_FIELDS, row)), default=str)
    result.rejected_rows.append((row[0], reason, payload))


# -- read side and outbox -----------------------------------------------------------------
def status_counts(conn: sqlite3.Connection) -> Dict[str, int]:
    return {s: n for s, n in conn.execute(
        "SELECT sync_status, count(*) FROM signals GROUP BY sync_status")}


def claim_due(conn: sqlite3.Connection, token: str, limit: int, lease: float,
              after_id: Optional[int] = None, now: Optional[float] = None) -> List[Dict[str, Any]]:
    """Atomically claim up to ``limit`` due pending rows (oldest first) for this claimer.

    With ``after_id`` (a forced run) rows are taken whether due or not, in id order after it.
    """
    now = time.time() if now is None else now
    due = ("AND (sync_next_at IS NULL OR sync_next_at <= :now)" if after_id is None
           else "AND id > :after")
    with _immediate(conn):
        rows = [dict(zip([d[0] for d in cur.description], rec)) for cur in [conn.execute(
            f"SELECT * FROM signals WHERE sync_status = 'pending' {due} "
            "AND (sync_claim_until IS NULL OR sync_claim_until < :now) ORDER BY id LIMIT :limit",
            {"now": now, "limit": limit, "after": after_id})] for rec in cur.fetchall()]
        if rows:
            ids = [r["id"] for r in rows]
            conn.execute(f"UPDATE signals SET sync_claim = ?, sync_claim_until = ? "
                         f"WHERE id IN ({', '.join('?' * len(ids))})", (token, now + lease, *ids))
    return rows


def settle(conn: sqlite3.Connection, row_id: int, token: str, status: str,
           error: Optional[str] = None) -> None:
    """Record a final outcome (synced, rejected, skipped) for a row this claimer holds."""
    settle_many(conn, token, [(row_id, status, error)])


def settle_many(conn: sqlite3.Connection, token: str,
                outcomes: Sequence[Tuple[int, str, Optional[str]]]) -> None:
    """Record final outcomes [(row_id, status, error)] in one transaction."""
    now = utc_now()
    groups: Dict[Tuple[str, Optional[str]], List[int]] = {}
    for rid, status, error in outcomes:  # one statement per distinct outcome, not per row
        groups.setdefault((status, error), []).append(rid)
    with _immediate(conn):
        for (status, error), ids in groups.items():
            for i in range(0, len(ids), 500):
                chunk = ids[i:i + 500]
                conn.execute(
                    f"UPDATE signals SET sync_status = ?, sync_error = ?, synced_at = ?, sync_claim = NULL, "
                    f"sync_claim_until = NULL WHERE (sync_claim = ? OR sync_claim IS NULL) "
                    f"AND id IN ({', '.join('?' * len(chunk))})",
                    (status, error, now if status == "synced" else None, token, *chunk))


def release(conn: sqlite3.Connection, row_id: int, token: str, error: Optional[str],
            count_attempt: bool, next_at: Optional[float], max_attempts: int) -> str:
    """Give a claimed row back unsettled; returns its new status (pending or failed)."""
    with _immediate(conn):
        cur = conn.execute("SELECT sync_attempts FROM signals WHERE id = ? AND sync_claim = ?",
                           (row_id, token)).fetchone()
        if cur is None:
            return "lost-claim"
        attempts = cur[0] + (1 if count_attempt else 0)
        status = "failed" if attempts >= max_attempts else "pending"
        conn.execute(
            "UPDATE signals SET sync_status = ?, sync_attempts = ?, sync_error = ?, "
            "sync_next_at = ?, sync_claim = NULL, sync_claim_until = NULL WHERE id = ?",
            (status, attempts, error, next_at, row_id))
    return status


def settle_refused(conn: sqlite3.Connection, rules: Sequence[Tuple[str, str, str, Sequence[Any]]]) -> int:
    """Apply the transitions that need no network to pending, unclaimed rows; returns how many.

    ``rules`` are ``(status, reason, SQL condition, parameters)`` in order (the first that
    matches a row wins); they come from ``alpine.refusal_sql()``.
    """
    total = 0
    with _immediate(conn):
        for status, reason, cond, params in rules:
            cur = conn.execute(
                f"UPDATE signals SET sync_status = ?, sync_error = ? WHERE sync_status = 'pending' "
                f"AND sync_claim IS NULL AND ({cond})", (status, reason, *params))
            total += cur.rowcount
    return total


def reset_status(conn: sqlite3.Connection, statuses: Iterable[str]) -> int:
    """Put rows in ``statuses`` back to pending (operator's explicit request)."""
    total = 0
    for s in statuses:
        cur = conn.execute(
            "UPDATE signals SET sync_status = 'pending', sync_attempts = 0, sync_next_at = NULL, "
            "sync_claim = NULL, sync_claim_until = NULL WHERE sync_status = ?", (s,))
        total += cur.rowcount
    return total
