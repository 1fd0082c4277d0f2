"""argo_signals.export on its own: the formula escaping ingest undoes, the query, the rows written."""
import csv
import io
import json

import pytest

from argo_signals import SignalTracker
from argo_signals.dbview import open_existing
from argo_signals.export import ExportStopped, escape_cell, query, unescape_cell, write_rows
from argo_signals.record import SignalValidationError
from conftest import make_signal


@pytest.mark.parametrize("text", ["=1+2", "+1", "-2% gap", "@SUM(A1)", "\tx", "\rx", "'", "'=x", "''=x",
                                  "plain", "", "a=b", "1'"])
def test_unescape_cell_undoes_escape_cell(text):
    escaped = escape_cell(text)
    assert unescape_cell(escaped) == text
    assert escaped == ("'" + text if text[:1] in ("=", "+", "-", "@", "\t", "\r", "'") else text)


def test_escape_cell_leaves_numbers_and_none_alone():
    assert escape_cell(-1.5) == -1.5 and escape_cell(None) is None


def test_query_checks_times_and_combines_filters():
    sql, params = query(since="2026-01-01", symbol="AAPL", sync_status="pending")
    assert sql == ("SELECT * FROM signals WHERE timestamp >= ? AND symbol = ? AND sync_status = ? ORDER BY id")
    assert params[0].startswith("2026-01-01T00:00:00") and params[1:] == ["AAPL", "pending"]
    assert query() == ("SELECT * FROM signals  ORDER BY id", [])
    with pytest.raises(SignalValidationError):
        query(until="not a time")


def test_write_rows_as_csv_and_jsonl(db):
    with SignalTracker(db, register_atexit=False) as t:
        t.log_signal(make_signal(1, reasoning="=HYPERLINK(\"x\")"))
        t.log_signal(make_signal(2, reasoning="\x1b[2Jplain"))
    conn = open_existing(str(db))
    try:
        sql, params = query()
        out = io.StringIO()
        assert write_rows(conn, sql, params, out, "csv") == 2
        cells = [r["reasoning"] for r in csv.DictReader(io.StringIO(out.getvalue()))]
        assert cells == ["'=HYPERLINK(\"x\")", "\x1b[2Jplain"]
        shown = io.StringIO()
        write_rows(conn, sql, params, shown, "csv", raw=True, terminal=True)
        assert "\x1b" not in shown.getvalue() and "\\x1b[2Jplain" in shown.getvalue()
        lines = io.StringIO()
        assert write_rows(conn, sql, params, lines, "jsonl") == 2
        assert [json.loads(x)["reasoning"] for x in lines.getvalue().splitlines()][0] == "=HYPERLINK(\"x\")"
    finally:
        conn.close()


class Full(io.StringIO):
    def write(self, s):
        if self.tell() > 0:
            raise OSError(28, "No space left on device")
        return super().write(s)


def test_a_failed_write_says_how_many_rows_were_written(db):
    with SignalTracker(db, register_atexit=False) as t:
        for i in range(3):
            t.log_signal(make_signal(i))
    conn = open_existing(str(db))
    try:
        with pytest.raises(ExportStopped) as caught:
            write_rows(conn, *query(), Full(), "jsonl")
    finally:
        conn.close()
    assert caught.value.written == 1 and str(caught.value) == "No space left on device (stopped after 1 signals)"
