"""SQLite storage: connections, schema, batch writes, and the sync outbox queries.

Every connection gets the same pragmas (WAL, synchronous, busy timeout).  sqlite-utils
creates the schema; the hot insert is multi-row ``INSERT OR IGNORE`` statements (up to
``ROWS_PER_STATEMENT`` rows each, not ``executemany``: see below) inside one
``BEGIN IMMEDIATE`` transaction per batch.
"""
from __future__ import annotations

import contextlib
import json
import math
import os
import random
import sqlite3
import time
import urllib.parse
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any, Callable, Dict, Iterable, Iterator, List, Mapping, Optional, Sequence, Tuple

import sqlite_utils

from .record import FINISHED_FIELDS, UPDATABLE, DefaultTimestamp

__all__ = ["connect", "connect_readonly", "readonly_uri", "SYNC_STATUSES", "SYNC_STATUSES_SHOWN", "ensure_schema", "BatchResult", "write_batch", "is_environment_error",
           "SIGNAL_COLUMNS", "utc_now", "insert_sql", "insert_params", "status_counts", "claim_due", "reclaim",
           "settle", "settle_many", "release", "settle_refused", "file_token",
           "reset_status", "waiting_summary", "overdue_waiting",
           "APPLICATION_ID", "SCHEMA_VERSION", "ForeignDatabaseError", "check_ours"]

DURABILITY = {"normal": "NORMAL", "full": "FULL"}
# The marker the schema sets (PRAGMA application_id / user_version): "ARGS" in ASCII.
APPLICATION_ID = 0x41524753
SCHEMA_VERSION = 1
# Values of signals.sync_status.
SYNC_STATUSES = ("pending", "synced", "rejected", "skipped", "failed")
# The same, in the order a person reads them: delivered, waiting, then the ones that never will
# be (the report's keys and columns, the demo's summary).
SYNC_STATUSES_SHOWN = ("synced", "pending", "skipped", "rejected", "failed")

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
# Rows per multi-row INSERT: as many as the bound-parameter limit allows (32766 since SQLite
# 3.32, 999 before), up to 500.  One statement per few hundred rows means one sqlite3_step, so
# the GIL is dropped and re-taken once per statement instead of once per row (executemany):
# with busy Python threads each re-take can wait the 5 ms switch interval.  (Not more: the
# sqlite3 module caches each prepared statement, about 1 MB per 500 rows.)
_MAX_VARIABLES = 32766 if sqlite3.sqlite_version_info >= (3, 32, 0) else 999
ROWS_PER_STATEMENT = max(1, min(500, _MAX_VARIABLES // len(_INSERT_COLUMNS)))
_multi_sql: Dict[int, str] = {}


def insert_sql(n: int) -> str:
    """The statement inserting ``n`` rows (bind values from ``insert_params()``); ``insert_sql(1)``
    is the one-row statement the benchmark's ``executemany`` reference uses."""
    sql = _multi_sql.get(n)
    if sql is None:
        sql = _multi_sql[n] = _INSERT_HEAD + ", ".join([_ROW] * n)
    return sql


def _nan_binds_as_null() -> bool:
    conn = sqlite3.connect(":memory:")
    try:
        return conn.execute("SELECT ? IS NULL", (math.nan,)).fetchone()[0] == 1
    finally:
        conn.close()


# What a NULL is bound as.  The sqlite3 module binds an exact int, float or str directly, but
# passes None (and a str subclass such as DefaultTimestamp) through its adapter lookup first,
# which costs about ten times as much per value (CPython 3.11: ~1 us against ~0.1 us); a row
# has ten or more NULLs.  SQLite stores a NaN bound as a double as NULL (checked here once;
# the library never stores a NaN, it refuses them), so NaN is bound where None stands.
_NULL: Any = math.nan if _nan_binds_as_null() else None
_NULL_OF: Callable[..., Any] = {None: _NULL}.get   # _NULL_OF(v, v): the bind value of v (C-level, no Python step)
_AS_IS: Callable[..., Any] = {None: None}.get
_FLOAT_ADAPTER = (float, sqlite3.PrepareProtocol)
_WIDTH = len(_INSERT_COLUMNS)
_TS = FINISHED_FIELDS.index("timestamp")
# Columns that are often NULL.  Only a fast path: a None elsewhere is bound as None, which
# SQLite stores as NULL all the same (or refuses, for a NOT NULL column).
_OPTIONAL = frozenset(FINISHED_FIELDS.index(c) for c in (
    "target_price", "stop_price", "data_source", "regime", "reasoning", "service_type", "executor_id",
    "generated_by", "order_id", "outcome", "exit_price", "profit_loss_pct", "metadata"))


def insert_params(rows: Sequence[tuple], created: str) -> List[Any]:
    """The bind values of ``insert_sql(len(rows))`` for finished rows stamped ``created``.

    Built column by column in C-level steps: an optional column that is all NULL (the usual
    case for most of them) costs one comparison and one list repeat."""
    n = len(rows)
    out: List[Any] = [created] * (n * _WIDTH)
    if not n:
        return out
    # a float adapter registered by the application would be handed our NaN: bind None then
    null_of = _NULL_OF if _FLOAT_ADAPTER not in sqlite3.adapters else _AS_IS
    all_null = (None,) * n
    for k, col in enumerate(zip(*rows)):
        if k in _OPTIONAL:
            if col == all_null:
                out[k::_WIDTH] = [null_of(None)] * n
            else:
                out[k::_WIDTH] = map(null_of, col, col)
        elif k == _TS:   # a DefaultTimestamp bound as the plain str it is
            out[k::_WIDTH] = [str(v) if type(v) is DefaultTimestamp else v for v in col]
        else:
            out[k::_WIDTH] = col
    return out


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


def readonly_uri(path: str, immutable: bool = False) -> str:
    """A ``file:`` URI opening exactly ``path`` read-only (``%``, ``?``, ``#`` are escaped).

    With ``immutable`` SQLite reads the file as it is, without locks nor a ``-shm``: only for
    a file nothing is writing (see ``dbstate``)."""
    uri = f"file:{urllib.parse.quote(os.fsencode(os.path.abspath(path)), safe='/')}?mode=ro"
    return uri + "&immutable=1" if immutable else uri


def connect_readonly(path: str, timeout: float = 5.0, immutable: bool = False) -> sqlite3.Connection:
    """Open ``path`` read-only (the one way this package opens a database for reading); raises
    ``sqlite3.OperationalError`` if it does not exist.  ``immutable``: see ``readonly_uri``."""
    return sqlite3.connect(readonly_uri(path, immutable), uri=True, timeout=timeout)


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
    if (db["signals"].exists() and db["rejected_signals"].exists() and db["waiting_updates"].exists()
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
    # update_signal() calls whose signal was not stored yet: applied, in seq order, in the
    # transaction that inserts it (whichever process's tracker commits that insert)
    conn.execute("CREATE TABLE IF NOT EXISTS waiting_updates (seq INTEGER PRIMARY KEY AUTOINCREMENT, "
                 "signal_id TEXT NOT NULL, fields TEXT NOT NULL /* JSON */, "
                 "queued_at REAL NOT NULL /* unix seconds */)")
    conn.execute("CREATE INDEX IF NOT EXISTS idx_waiting_updates_signal_id ON waiting_updates (signal_id)")
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
    unknown_updates: List[str] = field(default_factory=list)   # not stored yet: kept waiting
    refused_updates: List[str] = field(default_factory=list)  # named columns that cannot change
    applied_waiting: int = 0     # waiting updates applied to rows inserted now
    unstored_rejections: int = 0  # refused rows that not even a shortened record could keep


_UPDATE_SQL: Dict[Tuple[str, ...], str] = {}
_REJECT_SQL = "INSERT INTO rejected_signals (signal_id, payload, reason, rejected_at) VALUES (?, ?, ?, ?)"


def write_batch(conn: sqlite3.Connection, rows: Sequence[tuple],
                updates: Sequence[Tuple[str, Dict[str, Any]]] = ()) -> BatchResult:
    """Insert finished rows and apply updates in one transaction.

    A signal_id already stored with the same content is a no-op; with other content the row
    goes to ``rejected_signals``.  A row the database refuses is isolated by bisection and
    rejected on its own, so it cannot sink its batch; so is an update the database refuses.
    An update whose signal is not stored yet waits in ``waiting_updates`` and is applied, in
    call order, by the transaction that inserts that signal.  Errors of the database itself
    (locked, I/O, full) roll back and propagate: the caller keeps the batch and retries.
    """
    result = BatchResult()
    created = utc_now()
    with _immediate(conn):
        _insert(conn, list(rows), created, result)
        if rows and conn.execute("SELECT 1 FROM waiting_updates LIMIT 1").fetchone() is not None:
            _apply_waiting(conn, [r[0] for r in rows], result)
        now = time.time()
        for sid, values in updates:
            if not values or not UPDATABLE.issuperset(values):
                # updates can come back from a spill file: never trust column names
                result.refused_updates.append(sid)
                continue
            try:
                if _update(conn, sid, values) == 0:
                    conn.execute("INSERT INTO waiting_updates (signal_id, fields, queued_at) VALUES (?, ?, ?)",
                                 (sid, json.dumps(values), now))
                    result.unknown_updates.append(sid)
            except sqlite3.Error as exc:
                if is_environment_error(exc) or not conn.in_transaction:
                    raise
                result.rejected_rows.append((sid, _refused("update refused by the database", exc),
                                             json.dumps({"update_of": sid, "fields": values}, default=str)))
        if result.rejected_rows:
            _store_rejected(conn, result, created)
    return result


def _update(conn: sqlite3.Connection, sid: str, values: Dict[str, Any]) -> int:
    key = tuple(values)
    sql = _UPDATE_SQL.get(key)
    if sql is None:
        sql = _UPDATE_SQL[key] = f"UPDATE signals SET {', '.join(f'{k} = ?' for k in key)} WHERE signal_id = ?"
    return conn.execute(sql, (*values.values(), sid)).rowcount


def _apply_waiting(conn: sqlite3.Connection, ids: List[str], result: BatchResult) -> None:
    """Apply, oldest first, the waiting updates of the signals in ``ids`` that are stored now."""
    done: List[int] = []
    for i in range(0, len(ids), 500):
        chunk = ids[i:i + 500]
        recs = conn.execute(f"SELECT seq, signal_id, fields FROM waiting_updates WHERE signal_id IN "
                            f"({', '.join('?' * len(chunk))}) ORDER BY seq", chunk).fetchall()
        for seq, sid, fields in recs:
            try:
                values = json.loads(fields)
                if not isinstance(values, dict) or not values or not UPDATABLE.issuperset(values):
                    raise ValueError("names columns that cannot be updated")
                if _update(conn, sid, values) == 0:
                    continue        # its insert was rejected: it keeps waiting, and is reported
            except (ValueError, TypeError, sqlite3.Error) as exc:
                if isinstance(exc, sqlite3.Error) and (is_environment_error(exc) or not conn.in_transaction):
                    raise
                result.rejected_rows.append((sid, _refused("waiting update refused", exc), str(fields)))
            done.append(seq)
            result.applied_waiting += 1
    for i in range(0, len(done), 500):
        seqs = done[i:i + 500]
        conn.execute(f"DELETE FROM waiting_updates WHERE seq IN ({', '.join('?' * len(seqs))})", seqs)


def _refused(what: str, exc: BaseException) -> str:
    return f"{what}: {type(exc).__name__}: {str(exc)[:300]}"


def _store_rejected(conn: sqlite3.Connection, result: BatchResult, created: str) -> None:
    """Record refused rows; a payload the database refuses too (too big) is shortened to fit."""
    getlimit = getattr(conn, "getlimit", None)
    limit = getlimit(sqlite3.SQLITE_LIMIT_LENGTH) if getlimit is not None else 1_000_000_000
    keep = max(0, min(4096, (limit - 600) // 4))   # characters: up to 4 bytes each in UTF-8
    for sid, reason, payload in result.rejected_rows:
        tries = [(sid, payload, reason),
                 (sid, payload[:keep], f"{reason} (payload shortened from {len(payload)} characters)"),
                 (None if sid is None else sid[:128], None, reason[:200] + " (payload not kept)")]
        for attempt in tries:
            try:
                conn.execute(_REJECT_SQL, (*attempt, created))
                break
            except sqlite3.Error as exc:
                if is_environment_error(exc) or not conn.in_transaction:
                    raise
        else:
            result.unstored_rejections += 1


def _insert(conn: sqlite3.Connection, rows: List[tuple], created: str, result: BatchResult) -> None:
    if not rows:
        return
    before = conn.total_changes
    # one statement is undone as a whole when it fails: a savepoint is needed only for several
    single = len(rows) <= ROWS_PER_STATEMENT
    try:
        if single:
            conn.execute(insert_sql(len(rows)), insert_params(rows, created))
        else:
            conn.execute("SAVEPOINT batch")
            step = ROWS_PER_STATEMENT
            for i in range(0, len(rows), step):
                chunk = rows[i:i + step]
                conn.execute(insert_sql(len(chunk)), insert_params(chunk, created))
            conn.execute("RELEASE batch")
    except Exception as exc:
        if is_environment_error(exc) or not conn.in_transaction:
            raise  # SQLite may already have rolled the whole transaction back (e.g. SQLITE_FULL)
        if not single:
            conn.execute("ROLLBACK TO batch")
            conn.execute("RELEASE batch")
        if len(rows) == 1:
            _reject(result, rows[0], f"refused by the database: {type(exc).__name__}: {exc}")
            return
        mid = len(rows) // 2
        _insert(conn, rows[:mid], created, result)
        _insert(conn, rows[mid:], created, result)
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
def waiting_summary(conn: sqlite3.Connection) -> Tuple[int, Optional[float]]:
    """How many updates wait for their insert, and when the oldest was queued (unix seconds)."""
    try:
        n, oldest = conn.execute("SELECT count(*), min(queued_at) FROM waiting_updates").fetchone()
    except sqlite3.OperationalError:   # a database made before the table existed
        return 0, None
    return n, oldest


def overdue_waiting(conn: sqlite3.Connection, queued_before: float, after_seq: int,
                    limit: int = 100) -> List[Tuple[int, str, float]]:
    """Waiting updates (seq, signal_id, queued_at) queued before ``queued_before``, past ``after_seq``."""
    return [tuple(r) for r in conn.execute(  # type: ignore[misc]
        "SELECT seq, signal_id, queued_at FROM waiting_updates WHERE seq > ? AND queued_at < ? "
        "ORDER BY seq LIMIT ?", (after_seq, queued_before, limit))]


def status_counts(conn: sqlite3.Connection) -> Dict[str, int]:
    return {s: n for s, n in conn.execute(
        "SELECT sync_status, count(*) FROM signals GROUP BY sync_status")}


# The outbox names its database file: a random token kept in the file itself, read in the
# same transaction as a claim and checked in the same transaction as an outcome, so an outcome
# can only land in the file its row was claimed from (not in a file moved into its place).
_FILE_TABLE = "sync_file"


def file_token(conn: sqlite3.Connection) -> str:
    """This database file's token (created on first use; call inside a write transaction)."""
    try:
        rec = conn.execute(f"SELECT token FROM {_FILE_TABLE} WHERE id = 1").fetchone()
    except sqlite3.OperationalError:   # no such table yet
        rec = None
    if rec is not None:
        return str(rec[0])
    conn.execute(f"CREATE TABLE IF NOT EXISTS {_FILE_TABLE} "
                 "(id INTEGER PRIMARY KEY CHECK (id = 1), token TEXT NOT NULL)")
    conn.execute(f"INSERT OR IGNORE INTO {_FILE_TABLE} (id, token) VALUES (1, ?)", (os.urandom(16).hex(),))
    return str(conn.execute(f"SELECT token FROM {_FILE_TABLE} WHERE id = 1").fetchone()[0])


def _current_token(conn: sqlite3.Connection) -> Optional[str]:
    try:
        rec = conn.execute(f"SELECT token FROM {_FILE_TABLE} WHERE id = 1").fetchone()
    except sqlite3.OperationalError:
        return None
    return None if rec is None else str(rec[0])


def claim_due(conn: sqlite3.Connection, token: str, limit: int, lease: float,
              after_id: Optional[int] = None, now: Optional[float] = None,
              horizon: Optional[float] = None) -> List[Dict[str, Any]]:
    """Atomically claim up to ``limit`` due, unclaimed pending rows (oldest first) for ``token``.

    With ``after_id`` (a forced run) rows are taken whether due or not, in id order after it.
    With ``horizon``, a row due more than that many seconds ahead is due now: no sender sets
    such a time, the wall clock was set back since.  Each row carries ``sync_file``, the token
    of the file it was claimed from.  Claims held by others are freed only by ``reclaim``.
    """
    now = time.time() if now is None else now
    later = "" if horizon is None else " OR sync_next_at > :latest"
    due = (f"AND (sync_next_at IS NULL OR sync_next_at <= :now{later})" if after_id is None
           else "AND id > :after")
    with _immediate(conn):
        rows = [dict(zip([d[0] for d in cur.description], rec)) for cur in [conn.execute(
            f"SELECT * FROM signals WHERE sync_status = 'pending' {due} "
            "AND sync_claim IS NULL ORDER BY id LIMIT :limit",
            {"now": now, "limit": limit, "after": after_id, "latest": now + (horizon or 0.0)})]
            for rec in cur.fetchall()]
        if rows:
            this_file = file_token(conn)
            ids = [r["id"] for r in rows]
            conn.execute(f"UPDATE signals SET sync_claim = ?, sync_claim_until = ? "
                         f"WHERE id IN ({', '.join('?' * len(ids))})", (token, now + lease, *ids))
            for r in rows:
                r["sync_file"] = this_file
    return rows


def reclaim(conn: sqlite3.Connection, token: str, owner_alive: Callable[[str], Optional[bool]],
            now: Optional[float] = None) -> int:
    """Free the claims of other owners that are gone (``owner_alive`` False: at once) or that
    cannot be judged (None: once their lease has passed); returns how many rows were freed."""
    now = time.time() if now is None else now
    freed = 0
    with _immediate(conn):
        owners = [o for (o,) in conn.execute(
            "SELECT DISTINCT sync_claim FROM signals WHERE sync_status = 'pending' "
            "AND sync_claim IS NOT NULL AND sync_claim != ?", (token,))]
        for owner in owners:
            alive = owner_alive(str(owner))
            if alive:
                continue
            lease = "" if alive is False else "AND (sync_claim_until IS NULL OR sync_claim_until < ?)"
            cur = conn.execute(
                f"UPDATE signals SET sync_claim = NULL, sync_claim_until = NULL "
                f"WHERE sync_status = 'pending' AND sync_claim = ? {lease}",
                (owner,) if alive is False else (owner, now))
            freed += cur.rowcount
    return freed


Claimed = Mapping[str, Any]   # a row as claim_due returned it (id, sha256, sync_file...)


def settle(conn: sqlite3.Connection, row: Claimed, token: str, status: str,
           error: Optional[str] = None) -> int:
    """Record a final outcome (synced, rejected, skipped) for a row this claimer holds."""
    return settle_many(conn, token, [(row, status, error)])


def settle_many(conn: sqlite3.Connection, token: str,
                outcomes: Sequence[Tuple[Claimed, str, Optional[str]]]) -> int:
    """Record final outcomes [(claimed row, status, error)] in one transaction; returns how
    many rows were marked.

    An outcome lands only in the file its row was claimed from and only on that very row
    (same id and same hash) while it is still this claimer's (or nobody's).
    """
    now = utc_now()
    with _immediate(conn):
        this_file = _current_token(conn)
        params = [(status, error, now if status == "synced" else None, row["id"], row["sha256"], token)
                  for row, status, error in outcomes if this_file is not None and row.get("sync_file") == this_file]
        if not params:
            return 0
        before = conn.total_changes
        conn.executemany(
            "UPDATE signals SET sync_status = ?, sync_error = ?, synced_at = ?, sync_claim = NULL, "
            "sync_claim_until = NULL WHERE id = ? AND sha256 = ? AND (sync_claim = ? OR sync_claim IS NULL)",
            params)
        return conn.total_changes - before


def release(conn: sqlite3.Connection, row: Claimed, token: str, error: Optional[str],
            count_attempt: bool, next_at: Optional[float], max_attempts: int) -> str:
    """Give a claimed row back unsettled; returns its new status (pending or failed), or
    ``lost-claim`` when this claimer no longer holds that row in that file."""
    with _immediate(conn):
        cur = None
        if row.get("sync_file") is not None and row.get("sync_file") == _current_token(conn):
            cur = conn.execute("SELECT sync_attempts FROM signals WHERE id = ? AND sha256 = ? AND sync_claim = ?",
                               (row["id"], row["sha256"], token)).fetchone()
        if cur is None:
            return "lost-claim"
        attempts = cur[0] + (1 if count_attempt else 0)
        status = "failed" if attempts >= max_attempts else "pending"
        conn.execute(
            "UPDATE signals SET sync_status = ?, sync_attempts = ?, sync_error = ?, "
            "sync_next_at = ?, sync_claim = NULL, sync_claim_until = NULL WHERE id = ?",
            (status, attempts, error, next_at, row["id"]))
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
