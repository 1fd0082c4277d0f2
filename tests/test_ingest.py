"""argo_signals.ingest on its own: the readers (line numbers, what a bad line comes as) and run()."""
import io
import json

import pytest

from argo_signals import ingest
from argo_signals.export import escape_cell
from conftest import count, make_signal, rows


def read(data: bytes, as_csv=False, raw=False):
    return list(ingest.records(io.BytesIO(data), as_csv, raw))


def test_jsonl_records_number_lines_and_say_why_a_line_is_bad():
    data = b"\n".join([json.dumps(make_signal(1)).encode(), b"", b"{bad", b"[1]", b'{"symbol": "\xff"}',
                       b"[" * 100_000])
    got = read(data)
    assert [n for n, _ in got] == [1, 3, 4, 5, 6]
    assert got[0][1] == make_signal(1)
    assert "not valid JSON" in str(got[1][1]) and isinstance(got[2][1], TypeError)
    assert "not valid UTF-8 (byte 0xff at column 13)" in str(got[3][1])
    assert isinstance(got[4][1], ValueError)


def test_a_line_longer_than_max_line_is_skipped_and_reading_goes_on():
    data = b'{"a": "' + b"x" * ingest.MAX_LINE + b'"}\n' + json.dumps(make_signal(2)).encode() + b"\n"
    got = read(data)
    assert [n for n, _ in got] == [1, 2]
    assert f"longer than {ingest.MAX_LINE} bytes" in str(got[0][1]) and got[1][1] == make_signal(2)


def test_a_bom_and_the_unsaved_prefix_are_read_past():
    unsaved = b"argo-signals-unsaved: " + json.dumps(make_signal(3)).encode()
    got = read(b"\xef\xbb\xbf" + json.dumps(make_signal(1)).encode() + b"\n" + unsaved + b"\n")
    assert [r for _, r in got] == [make_signal(1), make_signal(3)]


def test_a_csv_header_is_refused_as_json_lines_and_read_with_as_csv():
    data = b"\n\nsymbol,action,entry_price,confidence,reasoning\nAAPL,BUY,1.5,70," + escape_cell("=1+2").encode() + b"\n"
    with pytest.raises(ingest.LooksLikeCsv) as caught:
        read(data)
    assert caught.value.lineno == 3 and caught.value.text.startswith("symbol,action")
    data = data.lstrip(b"\n")
    (n, rec), = read(data, as_csv=True)
    assert n == 2 and rec == {"symbol": "AAPL", "action": "BUY", "entry_price": "1.5", "confidence": "70",
                              "reasoning": "=1+2"}
    assert read(data, as_csv=True, raw=True)[0][1]["reasoning"] == "'=1+2"


@pytest.mark.parametrize("text,csv", [("symbol,action", True), ("SYMBOL , x", True), ('{"symbol": 1}', False),
                                      ("symbol", False), ("a,b", False), ("", False)])
def test_looks_like_csv_header(text, csv):
    assert ingest.looks_like_csv_header(text) is csv


def test_content_id_is_equal_for_equal_content_and_keeps_out_stored_columns():
    a = ingest.content_id({"symbol": "MSFT", "action": "sell", "entry_price": "410", "confidence": 64})
    b = ingest.content_id({"symbol": "MSFT", "action": "SELL", "entry_price": 410, "confidence": 64})
    assert a == b and a != ingest.content_id({"symbol": "MSFT", "action": "BUY", "entry_price": 410,
                                              "confidence": 64})
    stored = ingest.strip_stored({"id": 7, "sha256": "x", "sync_status": "synced", "symbol": "A",
                                  "action": None, "metadata": '{"k": 1}', "reasoning": None})
    assert stored == {"symbol": "A", "action": None, "metadata": {"k": 1}}


def test_run_stores_good_lines_reports_bad_ones_and_strict_stops(db):
    data = b"\n".join([json.dumps(make_signal(1)).encode(), b"{bad", json.dumps(make_signal(2, action="HOLD")).encode(),
                       json.dumps(make_signal(3)).encode()])
    bad = []
    result = ingest.run(str(db), ingest.records(io.BytesIO(data)), on_bad=lambda n, why: bad.append((n, str(why))))
    assert (result.accepted, result.bad_lines, result.last_line, result.flushed) == (2, 2, 4, True)
    assert [n for n, _ in bad] == [2, 3] and "action" in bad[1][1]
    assert count(db) == 2 and result.stats["persisted"] == 2 and not result.interrupted
    strict = ingest.run(str(db), ingest.records(io.BytesIO(data)), strict=True)
    assert (strict.accepted, strict.bad_lines, strict.last_line) == (1, 1, 2)
    assert strict.stats["duplicates"] == 0 and count(db) == 3   # no signal_id: a new row each time


def test_run_with_dedupe_adds_nothing_the_second_time(db):
    data = (json.dumps(make_signal(1)) + "\n" + json.dumps(make_signal(1)) + "\n").encode()
    first = ingest.run(str(db), ingest.records(io.BytesIO(data)), dedupe=True)
    second = ingest.run(str(db), ingest.records(io.BytesIO(data)), dedupe=True)
    assert first.accepted == second.accepted == 2
    assert count(db) == 1 and second.stats["persisted"] == 0 and second.stats["duplicates"] == 2
    assert rows(db)[0]["signal_id"] == ingest.content_id(make_signal(1))
