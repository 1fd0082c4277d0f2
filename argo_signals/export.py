"""``argo-signals export``: the query for the chosen rows, and the rows written as JSON Lines or
CSV, with the CSV cells a spreadsheet would run as formulas escaped (``escape_cell``) in a way
``ingest --csv`` undoes exactly (``unescape_cell``)."""
from __future__ import annotations

import csv
import json
import sqlite3
from typing import Any, List, Optional, TextIO, Tuple

from .dbview import json_value
from .record import format_timestamp
from .safetext import escape_controls

__all__ = ["FORMULA_START", "escape_cell", "unescape_cell", "query", "ExportStopped", "write_rows"]

# A spreadsheet runs a cell starting with one of these as a formula; export puts a ' before it
# (and before a leading ' itself, so that ingest can undo exactly that).
FORMULA_START = ("=", "+", "-", "@", "\t", "\r", "'")


def escape_cell(value: Any) -> Any:
    """A CSV cell a spreadsheet shows as text: ``'`` before text starting with = + - @ TAB CR '."""
    return "'" + value if type(value) is str and value.startswith(FORMULA_START) else value


def unescape_cell(text: str) -> str:
    """Undo ``escape_cell()``."""
    return text[1:] if text.startswith("'") and text[1:].startswith(FORMULA_START) else text


def query(since: Optional[str] = None, until: Optional[str] = None, symbol: Optional[str] = None,
          sync_status: Optional[str] = None) -> Tuple[str, List[Any]]:
    """The SELECT (and its parameters) for the rows to export, in id order.  ``since`` and
    ``until`` are checked like a signal's timestamp: ``SignalValidationError`` when not a time."""
    clauses, params = [], []
    if since:
        clauses.append("timestamp >= ?")
        params.append(format_timestamp(since, "--since"))
    if until:
        clauses.append("timestamp < ?")
        params.append(format_timestamp(until, "--until"))
    if symbol:
        clauses.append("symbol = ?")
        params.append(symbol)
    if sync_status:
        clauses.append("sync_status = ?")
        params.append(sync_status)
    where = ("WHERE " + " AND ".join(clauses)) if clauses else ""
    return f"SELECT * FROM signals {where} ORDER BY id", params


class ExportStopped(Exception):
    """Writing the output failed (``error``) after ``written`` rows."""

    def __init__(self, error: OSError, written: int) -> None:
        super().__init__(f"{error.strerror or error} (stopped after {written} signals)")
        self.error, self.written = error, written


def write_rows(conn: sqlite3.Connection, sql: str, params: List[Any], output: TextIO, fmt: str = "jsonl",
               raw: bool = False, terminal: bool = False) -> int:
    """Write the rows of ``sql`` to ``output`` as ``jsonl`` or ``csv``; the number written.

    CSV text cells are escaped with ``escape_cell`` unless ``raw``; to a ``terminal`` their
    control characters are shown escaped too (JSON escapes them itself), a file gets the text
    exactly as stored.  A write that fails raises ``ExportStopped``."""
    cur = conn.execute(sql, params)
    cols = [d[0] for d in cur.description]
    n = 0
    shown = escape_controls if terminal else (lambda v: v)
    writer = csv.writer(output) if fmt == "csv" else None
    try:
        if writer:
            writer.writerow(cols)
        for rec in cur:
            if writer:
                writer.writerow(["" if v is None else shown(v if raw else escape_cell(v)) if isinstance(v, str)
                                 else json_value(v) if isinstance(v, bytes) else v for v in rec])
            else:
                output.write(json.dumps(dict(zip(cols, rec)), default=json_value) + "\n")
            n += 1
        output.flush()
    except OSError as exc:
        raise ExportStopped(exc, n) from None
    return n
