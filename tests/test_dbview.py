"""The read-only views (status, verify, tail rows), the sync command's setup and the demo's
counts, as library functions: one list of sync statuses, one environment reader."""
import re
import sqlite3
from pathlib import Path

import pytest

import argo_signals
from argo_signals import SignalTracker, dbview, demo_run, drain
from argo_signals.config import alpine_target
from argo_signals.store import SYNC_STATUSES, SYNC_STATUSES_SHOWN
from conftest import make_signal


def seed(db, n=3):
    with SignalTracker(db, register_atexit=False) as t:
        return [t.log_signal(make_signal(i)) for i in range(n)]


def test_the_printed_orders_name_every_sync_status_once():
    for order in (dbview.STATUS_LINE_ORDER, SYNC_STATUSES_SHOWN):
        assert sorted(order) == sorted(SYNC_STATUSES) and len(set(order)) == len(order)


def test_demo_counts_cover_every_status_in_the_summary_order(db):
    ids = seed(db)
    counts = demo_run.run_sync_counts(str(db), ids + ["not-there"])
    assert tuple(counts) == SYNC_STATUSES_SHOWN and counts["pending"] == 3 and sum(counts.values()) == 3
    assert demo_run.run_sync_lag_ms(str(db), ids) == {"p50": None, "p99": None}   # nothing synced


def test_status_and_its_text(db):
    seed(db)
    data = dbview.status(str(db))
    assert data["signals"] == 3 and data["by_sync_status"]["pending"] == 3 and data["refused_rows"] == 0
    text = dbview.format_status(data)
    assert text.splitlines()[1].startswith("  sync: 3 pending, 0 synced, 0 skipped, 0 rejected, 0 failed; lag ")


def test_verify_finds_an_edited_row(db):
    seed(db)
    conn = sqlite3.connect(str(db))
    with conn:
        conn.execute("UPDATE signals SET entry_price = 1.0 WHERE id = 2")
        conn.execute("UPDATE signals SET action = 'buy' WHERE id = 3")
    conn.close()
    data = dbview.verify(str(db))
    assert data["checked"] == 3 and [b["id"] for b in data["rows"]] == [2]
    assert [b["id"] for b in data["invalid"]] == [3]
    assert "id 3 action:" in dbview.format_verify(data)


def test_a_missing_or_foreign_database_is_named(tmp_path):
    with pytest.raises(dbview.DatabaseUnavailable) as missing:
        dbview.open_existing(str(tmp_path / "none.db"))
    assert missing.value.missing and str(missing.value).startswith("no database at ")
    other = tmp_path / "other.db"
    sqlite3.connect(str(other)).execute("CREATE TABLE signals (x)").connection.close()
    with pytest.raises(dbview.DatabaseUnavailable) as foreign:
        dbview.open_existing(str(other))
    assert not foreign.value.missing and "is not an argo-signals database" in str(foreign.value)


def test_tail_rows_oldest_first_and_after_an_id(db):
    seed(db, 5)
    conn = dbview.open_existing(str(db))
    try:
        assert [r["id"] for r in dbview.newest(conn, 2, None)] == [4, 5]
        assert [r["id"] for r in dbview.newer_than(conn, 3, "AAPL")] == [4]   # odd i: AAPL (ids 2, 4)
        text, widths = dbview.table(dbview.newest(conn, 1, None))
    finally:
        conn.close()
    assert text.splitlines()[0].split() == list(dbview.TAIL_COLUMNS) and len(widths) == len(dbview.TAIL_COLUMNS)


def test_alpine_target_reads_the_environment(monkeypatch):
    monkeypatch.setenv("ALPINE_API_URL", "")
    monkeypatch.delenv("ARGO_API_KEY", raising=False)
    assert alpine_target() == (None, None)
    monkeypatch.setenv("ALPINE_API_URL", "http://127.0.0.1:1")
    monkeypatch.setenv("ARGO_API_KEY", "k")
    assert alpine_target() == ("http://127.0.0.1:1", "k")


@pytest.mark.parametrize("url,env,status,words", [
    (None, {}, 1, "no Alpine URL"),
    (None, {"ALPINE_API_URL": "http://127.0.0.1:1", "ALPINE_SYNC_ENABLED": "false"}, 1, "disabled"),
    ("http://127.0.0.1:1", {"ARGO_API_KEY": "bad\tkey"}, 2, "Error: configuration: "),
])
def test_sync_setup_refuses_before_sending(db, monkeypatch, url, env, status, words):
    seed(db, 1)
    for name in ("ALPINE_API_URL", "ARGO_API_KEY", "ALPINE_SYNC_ENABLED"):
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    with pytest.raises(drain.SyncSetupError) as caught:
        drain.push(str(db), url, timeout=1)
    assert caught.value.exit_status == status and words in caught.value.line
    assert "\t" not in caught.value.line


def test_sync_of_a_missing_database_is_exit_1(tmp_path):
    with pytest.raises(drain.SyncSetupError) as caught:
        drain.push(str(tmp_path / "none.db"), "http://127.0.0.1:1")
    assert caught.value.exit_status == 1 and caught.value.line == f"Error: no database at {tmp_path / 'none.db'}"


def test_only_config_reads_the_environment():
    package = Path(argo_signals.__file__).parent
    readers = sorted(p.name for p in package.glob("*.py")
                     if re.search(r"os\.environ|os\.getenv|getenv\(", p.read_text(encoding="utf-8")))
    assert readers == ["config.py"]
