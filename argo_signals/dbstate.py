"""The state of a signals database, read from outside the writing process (``argo-signals metrics``).

One read-only connection (a ``file:`` URI with ``mode=ro``) and one read transaction, so
every figure comes from the same snapshot while another process commits (WAL readers do not
block the writer, nor it them).  Every query is answered from an index or a small table:

* rows per sync status: ``count(*)`` of the whole table (SQLite counts the pages of its
  smallest index) and, for every status but ``synced``, a range of the ``sync_status`` index;
  ``synced`` is the rest (on a healthy database it is nearly every row: counting its range
  would read the whole index, about ten times slower);
* the oldest pending row: the first entry of ``sync_status = 'pending'`` in that index;
* the last commit: ``max(created_at)`` among texts that look like dates, from the
  ``created_at`` index (one seek);
* a reader that may not write the directory (a monitoring account) reads a database nobody has
  open (no ``-wal`` file) as an immutable file: SQLite cannot create the ``-shm`` otherwise;
* refused rows and waiting updates: ``count(*)`` of the small ``rejected_signals`` and
  ``waiting_updates`` tables (the latter counted only where it exists: older databases
  have no such table and report 0).
"""
from __future__ import annotations

import os
import sqlite3
import time
from dataclasses import dataclass, field
from datetime import datetime
from typing import Dict, Optional

from . import spill, store
from .outcomes import read_last_error

__all__ = ["DatabaseState", "read_state", "QUERIES"]

QUERIES = {
    "total": "SELECT count(*) FROM signals",
    "with_status": "SELECT count(*) FROM signals WHERE sync_status = ?",
    "oldest_pending": "SELECT created_at FROM signals WHERE sync_status = 'pending' ORDER BY id LIMIT 1",
    # (a date: text another program wrote, e.g. 'n/a', sorts after every date and would hide it)
    "last_commit": "SELECT max(created_at) FROM signals WHERE created_at BETWEEN '0000' AND '9999-12-31U'",
    "refused": "SELECT count(*) FROM rejected_signals",
    "has_waiting": "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'waiting_updates'",
    "waiting": "SELECT count(*) FROM waiting_updates",
}


@dataclass
class DatabaseState:
    """What ``read_state`` found; times are epoch seconds (None: there is none)."""

    by_status: Dict[str, int] = field(default_factory=dict)
    oldest_pending_age_s: float = 0.0
    refused_rows: int = 0
    waiting_updates: int = 0
    spill_lines: int = 0
    last_commit_at: Optional[float] = None
    last_sync_error_at: Optional[float] = None


def _epoch(text: Optional[str]) -> Optional[float]:
    if not text:
        return None
    try:
        return datetime.fromisoformat(text).timestamp()
    except (TypeError, ValueError):
        return None


def _open(db_path: str, timeout: float) -> sqlite3.Connection:
    """A read-only connection.  A user who may read the file but not write its directory (a
    monitoring account) cannot create the ``-shm`` a WAL database needs while no process has it
    open (no ``-wal``): then the file is read as it is (``immutable``: nothing is writing it)."""
    conn = store.connect_readonly(db_path, timeout=timeout)
    try:
        conn.execute("SELECT 1 FROM sqlite_master LIMIT 1").fetchall()
        return conn
    except sqlite3.OperationalError as exc:
        conn.close()
        if "readonly" not in str(exc) or os.path.exists(f"{db_path}-wal"):
            raise
    return store.connect_readonly(db_path, timeout=timeout, immutable=True)


def read_state(db_path: str, now: Optional[float] = None, timeout: float = 5.0) -> DatabaseState:
    """Read the state of ``db_path``; raises ``sqlite3.Error`` when it cannot be read (missing,
    not a database, not an argo-signals database)."""
    now = time.time() if now is None else now
    conn = _open(db_path, timeout)
    try:
        conn.execute("BEGIN")  # one snapshot for every figure
        q = QUERIES
        total = conn.execute(q["total"]).fetchone()[0]
        counts = {s: conn.execute(q["with_status"], (s,)).fetchone()[0]
                  for s in store.SYNC_STATUSES if s != "synced"}
        counts["synced"] = total - sum(counts.values())
        state = DatabaseState(by_status={s: counts[s] for s in store.SYNC_STATUSES})
        oldest = conn.execute(q["oldest_pending"]).fetchone()
        at = _epoch(oldest[0]) if oldest else None
        state.oldest_pending_age_s = 0.0 if at is None else max(0.0, now - at)
        state.last_commit_at = _epoch(conn.execute(q["last_commit"]).fetchone()[0])
        state.refused_rows = conn.execute(q["refused"]).fetchone()[0]
        if conn.execute(q["has_waiting"]).fetchone():
            state.waiting_updates = conn.execute(q["waiting"]).fetchone()[0]
        error = read_last_error(conn)
        state.last_sync_error_at = _epoch(error["at"]) if error else None
        conn.execute("COMMIT")
    finally:
        conn.close()
    state.spill_lines = spill.pending_count(spill.spill_path(db_path))
    return state
