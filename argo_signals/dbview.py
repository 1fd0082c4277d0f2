"""What the read-only commands show of a database (``status``, ``verify``, ``tail``): opened
through ``store.connect_readonly``, gathered into plain data, and written as text.

Nothing here prints: the command line prints what these functions return.
"""
from __future__ import annotations

import os
import sqlite3
from typing import Any, Dict, List, Optional, Sequence, Tuple

from . import spill
from .outcomes import read_last_error
from .record import HASH_FIELDS, alpine_hash, recheck
from .safetext import escape_controls
from .store import SYNC_STATUSES, connect_readonly
from .tracker import database_state

__all__ = ["DatabaseUnavailable", "NEEDED_COLUMNS", "open_existing", "json_value", "status", "format_status",
           "verify", "format_verify", "TAIL_COLUMNS", "TAIL_WIDTHS", "newest", "newer_than", "table", "row_line"]

NEEDED_COLUMNS = ("id", "signal_id", "symbol", "action", "entry_price", "target_price", "stop_price",
                  "confidence", "strategy", "timestamp", "sha256", "sync_status", "created_at")


class DatabaseUnavailable(Exception):
    """The database is missing, cannot be opened, or is not an argo-signals database; the
    message says which (``missing`` is True for the first)."""

    def __init__(self, message: str, missing: bool = False) -> None:
        super().__init__(message)
        self.missing = missing


def open_existing(db_path: str) -> sqlite3.Connection:
    """A read-only connection (rows as ``sqlite3.Row``) to an existing database whose ``signals``
    table has the columns the commands read; ``DatabaseUnavailable`` otherwise."""
    if not os.path.exists(db_path):
        raise DatabaseUnavailable(f"no database at {db_path}", missing=True)
    try:
        conn = connect_readonly(db_path)
    except sqlite3.Error as exc:
        raise DatabaseUnavailable(f"cannot open {db_path} ({exc})") from None
    conn.row_factory = sqlite3.Row
    # text that is not valid UTF-8 (written by another program) is shown with U+FFFD, not raised
    conn.text_factory = lambda b: b.decode("utf-8", "replace")
    try:
        conn.execute(f"SELECT {', '.join(NEEDED_COLUMNS)} FROM signals LIMIT 1")
    except sqlite3.Error as exc:
        conn.close()
        raise DatabaseUnavailable(f"{db_path} is not an argo-signals database ({exc})") from None
    return conn


def json_value(value: Any) -> Any:
    """``json.dumps``' fallback: a BLOB (another program's write) as its SQL literal ``x'..'``."""
    if isinstance(value, (bytes, bytearray, memoryview)):
        return f"x'{bytes(value).hex()}'"
    return str(value)


def _has_table(conn: sqlite3.Connection, name: str) -> bool:
    return conn.execute("SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = ?", (name,)).fetchone() is not None


# -- status -----------------------------------------------------------------------------------------
def status(db_path: str) -> Dict[str, Any]:
    """Counts by sync status, oldest/newest signal, spill file, size and journal mode."""
    conn = open_existing(db_path)
    try:
        total = conn.execute("SELECT count(*) FROM signals").fetchone()[0]
        first = conn.execute("SELECT timestamp, created_at FROM signals ORDER BY id LIMIT 1").fetchone()
        last = conn.execute("SELECT timestamp, created_at FROM signals ORDER BY id DESC LIMIT 1").fetchone()
        journal = conn.execute("PRAGMA journal_mode").fetchone()[0]
        rejected = (conn.execute("SELECT count(*) FROM rejected_signals").fetchone()[0]
                    if _has_table(conn, "rejected_signals") else 0)  # another program's file
        last_error = read_last_error(conn)
    finally:
        conn.close()
    st = database_state(db_path)   # sync counts and waiting updates, one connection
    size = sum(os.path.getsize(p) for p in (db_path, db_path + "-wal") if os.path.exists(p))
    return {"database": db_path, "signals": total,
            "by_sync_status": {s: st["synced" if s == "synced" else f"sync_{s}"] for s in SYNC_STATUSES},
            "oldest_signal": first["timestamp"] if first else None,
            "newest_signal": last["timestamp"] if last else None,
            "last_written": last["created_at"] if last else None,
            "refused_rows": rejected,
            "spill_pending": spill.pending_count(spill.spill_path(db_path)),
            "waiting_updates": st["waiting_updates"], "waiting_update_oldest_s": st["waiting_update_oldest_s"],
            "size_bytes": size, "journal_mode": journal, "sync_lag_s": st["sync_lag_s"],
            "last_sync_error": last_error}


# The order the status line names the sync statuses in (store.SYNC_STATUSES has them in
# another order; the line keeps the order it has always been printed in).
STATUS_LINE_ORDER = ("pending", "synced", "skipped", "rejected", "failed")


def format_status(data: Dict[str, Any]) -> str:
    by, lag, oldest = data["by_sync_status"], data["sync_lag_s"], data["waiting_update_oldest_s"]
    last_error = data["last_sync_error"]
    return (f"{data['database']}: {data['signals']} signals ({data['size_bytes'] / 1024:.0f} KiB, "
            f"journal {data['journal_mode']})\n"
            f"  sync: {', '.join(f'{by[s]} {s}' for s in STATUS_LINE_ORDER)}; "
            f"lag {'-' if lag is None else str(lag) + ' s'}\n"
            f"  oldest {data['oldest_signal']}, newest {data['newest_signal']}\n"
            f"  refused rows (rejected_signals): {data['refused_rows']}; spill file lines: {data['spill_pending']}\n"
            f"  updates waiting for their insert: {data['waiting_updates']}"
            + (f" (oldest {oldest:.0f} s)\n" if oldest is not None else "\n") +
            "  last sync error: " + (f"{last_error['error']} (at {last_error['at']})" if last_error else "none"))


# -- verify -----------------------------------------------------------------------------------------
def verify(db_path: str) -> Dict[str, Any]:
    """Every row's sha256 recomputed with the Alpine formula and every row re-checked against
    ``log_signal()``'s rules: the mismatches (``rows``) and the broken rules (``invalid``)."""
    conn = open_existing(db_path)
    bad = []
    invalid = []
    n = 0
    try:
        for r in conn.execute("SELECT * FROM signals ORDER BY id"):
            n += 1
            for name, problem in recheck(dict(r)):
                invalid.append({"id": r["id"], "signal_id": r["signal_id"], "field": name, "problem": problem})
            try:
                want = alpine_hash(r["signal_id"], r["symbol"], r["action"], r["entry_price"], r["target_price"],
                                   r["stop_price"], r["confidence"], r["strategy"], r["timestamp"])
            except (TypeError, ValueError, AttributeError):
                want = None
            if want != r["sha256"]:
                bad.append({"id": r["id"], "signal_id": r["signal_id"], "stored": r["sha256"], "expected": want})
    finally:
        conn.close()
    broken = len({b["id"] for b in invalid})
    return {"checked": n, "mismatches": len(bad), "rows": bad, "rule_breaking_rows": broken,
            "invalid": invalid, "hash_covers": list(HASH_FIELDS)}


def format_verify(data: Dict[str, Any]) -> str:
    return (f"{data['checked']} rows checked, {data['mismatches']} hash mismatches, "
            f"{data['rule_breaking_rows']} rows break the rules of log_signal()\n"
            f"  the hash covers: {', '.join(HASH_FIELDS)} (other columns are checked against the rules only)"
            + "".join(f"\n  id {b['id']} ({b['signal_id']}): stored {b['stored']} expected {b['expected']}"
                      for b in data["rows"])
            + "".join(f"\n  id {b['id']} {b['field']}: {escape_controls(b['problem'])}" for b in data["invalid"]))


# -- tail -------------------------------------------------------------------------------------------
TAIL_COLUMNS = ("id", "timestamp", "symbol", "action", "entry_price", "confidence", "strategy", "sync_status")
# Starting widths, so that rows printed later by --follow line up with the header.
TAIL_WIDTHS = (6, 32, 10, 7, 11, 10, 16, 11)


def newest(conn: sqlite3.Connection, limit: int, symbol: Optional[str]) -> List[sqlite3.Row]:
    """The ``limit`` newest rows (of ``symbol``), oldest first."""
    where, params = ("WHERE symbol = ?", [symbol]) if symbol else ("", [])
    recs = conn.execute(f"SELECT * FROM signals {where} ORDER BY id DESC LIMIT ?", params + [limit]).fetchall()
    recs.reverse()
    return recs


def newer_than(conn: sqlite3.Connection, last: int, symbol: Optional[str]) -> List[sqlite3.Row]:
    """The rows (of ``symbol``) after id ``last``, oldest first."""
    cond = "WHERE id > ?" + (" AND symbol = ?" if symbol else "")
    return conn.execute(f"SELECT * FROM signals {cond} ORDER BY id", [last] + ([symbol] if symbol else [])).fetchall()


def row_line(record: Any, widths: Sequence[int]) -> str:
    """One row as a line of the table: every cell one line of plain text (control characters escaped)."""
    return _line([escape_controls(record[c]) for c in TAIL_COLUMNS], widths)


def _line(values: List[str], widths: Sequence[int]) -> str:
    return "  ".join(v.ljust(w) for v, w in zip(values, widths)).rstrip()


def table(records: List[Any]) -> Tuple[str, List[int]]:
    """The header and rows as text, and the column widths used (at least ``TAIL_WIDTHS``)."""
    cells = [[escape_controls(r[c]) for c in TAIL_COLUMNS] for r in records]
    widths = [max([len(c), w] + [len(row[i]) for row in cells])
              for i, (c, w) in enumerate(zip(TAIL_COLUMNS, TAIL_WIDTHS))]
    return "\n".join([_line(list(TAIL_COLUMNS), widths)] + [_line(row, widths) for row in cells]), widths
