"""Writers touch only files that are empty or argo-signals databases (a marker the schema sets,
plus the expected columns); another program's database is refused and left byte for byte as it
was. Readers read a foreign ``signals`` table without writing to it."""
import hashlib
import json
import sqlite3

import pytest
from click.testing import CliRunner

from argo_signals import SignalTracker, store
from argo_signals.cli import main
from conftest import count, make_signal


def digest(path):
    return hashlib.sha256(path.read_bytes()).hexdigest()


def cli(*args):
    try:
        runner = CliRunner(mix_stderr=False)
    except TypeError:
        runner = CliRunner()
    return runner.invoke(main, [str(a) for a in args], catch_exceptions=False)


def other_app(path, columns="id INTEGER PRIMARY KEY, name TEXT, value REAL", app_id=0):
    conn = sqlite3.connect(path)
    conn.execute(f"CREATE TABLE signals ({columns})")
    conn.execute("INSERT INTO signals (name) VALUES ('theirs')" if "name" in columns else
                 "INSERT INTO signals (signal_id, symbol, action, entry_price, confidence, strategy, timestamp, "
                 "sha256, sync_status, created_at) VALUES ('a', 'AAPL', 'BUY', 1.0, 50.0, 'x', "
                 "'2026-01-01T00:00:00+00:00', 'h', 'pending', '2026-01-01T00:00:00+00:00')")
    if app_id:
        conn.execute(f"PRAGMA application_id = {app_id}")
    conn.commit()
    conn.close()
    return path


def test_writers_refuse_another_programs_database_and_leave_it_unchanged(tmp_path):
    db = other_app(tmp_path / "their app.db")
    before = digest(db)
    with pytest.raises(store.ForeignDatabaseError) as info:
        SignalTracker(db, register_atexit=False)
    assert str(db) in str(info.value) and "not an argo-signals database" in str(info.value)
    src = tmp_path / "in.jsonl"
    src.write_text(json.dumps(make_signal(1)) + "\n")
    for args in (("ingest", src, "--db", db), ("demo", "--db", db, "--count", 5, "--quiet"),
                 ("sync", "--db", db, "--alpine-url", "http://127.0.0.1:9")):
        r = cli(*args)
        assert r.exit_code == 1 and "not an argo-signals database" in r.stderr and str(db) in r.stderr, args
        assert "Traceback" not in r.stderr
    with pytest.raises(store.ForeignDatabaseError):
        store.connect(str(db))
    assert digest(db) == before
    assert not (tmp_path / "their app.db-wal").exists()
    conn = sqlite3.connect(db)  # the other program still inserts as before
    conn.execute("INSERT INTO signals (name) VALUES ('again')")
    conn.commit()
    conn.close()


def test_a_database_with_another_application_id_or_other_tables_is_refused(tmp_path):
    marked = tmp_path / "marked.db"
    conn = sqlite3.connect(marked)
    conn.execute("PRAGMA application_id = 1234")
    conn.execute("CREATE TABLE t (x)")
    conn.commit()
    conn.close()
    plain = tmp_path / "plain.db"
    conn = sqlite3.connect(plain)
    conn.execute("CREATE TABLE users (name TEXT)")
    conn.commit()
    conn.close()
    for path in (marked, plain):
        before = digest(path)
        with pytest.raises(store.ForeignDatabaseError):
            SignalTracker(path, register_atexit=False)
        assert digest(path) == before


def test_new_and_old_databases_are_accepted_and_get_the_marker(tmp_path):
    new = tmp_path / "new.db"
    with SignalTracker(new, register_atexit=False) as t:
        t.log_signal(make_signal(1))
    conn = sqlite3.connect(new)
    assert conn.execute("PRAGMA application_id").fetchone()[0] == store.APPLICATION_ID
    assert conn.execute("PRAGMA user_version").fetchone()[0] == store.SCHEMA_VERSION
    conn.close()
    # a database made before the marker existed: our tables, no marker
    old = tmp_path / "old.db"
    conn = sqlite3.connect(old)
    for (sql,) in sqlite3.connect(new).execute("SELECT sql FROM sqlite_master WHERE sql IS NOT NULL "
                                                 "AND name NOT LIKE 'sqlite!_%' ESCAPE '!'"):
        conn.execute(sql)
    conn.commit()
    assert conn.execute("PRAGMA application_id").fetchone()[0] == 0
    conn.close()
    with SignalTracker(old, register_atexit=False) as t:
        t.log_signal(make_signal(2))
    assert count(old) == 1
    conn = sqlite3.connect(old)
    assert conn.execute("PRAGMA application_id").fetchone()[0] == store.APPLICATION_ID
    conn.close()
    empty = tmp_path / "empty.db"
    empty.write_bytes(b"")
    with SignalTracker(empty, register_atexit=False) as t:
        t.log_signal(make_signal(3))
    assert count(empty) == 1


def test_a_marked_database_missing_columns_is_refused(tmp_path):
    db = tmp_path / "half.db"
    conn = sqlite3.connect(db)
    conn.execute(f"PRAGMA application_id = {store.APPLICATION_ID}")
    conn.execute("CREATE TABLE signals (id INTEGER PRIMARY KEY, signal_id TEXT)")
    conn.commit()
    conn.close()
    before = digest(db)
    with pytest.raises(store.ForeignDatabaseError) as info:
        store.connect(str(db))
    assert "missing" in str(info.value) and "symbol" in str(info.value)
    assert digest(db) == before


def test_readers_read_a_foreign_signals_table_without_writing(tmp_path):
    cols = ("id INTEGER PRIMARY KEY, signal_id TEXT, symbol TEXT, action TEXT, entry_price REAL, target_price REAL, "
            "stop_price REAL, confidence REAL, strategy TEXT, timestamp TEXT, sha256 TEXT, sync_status TEXT, "
            "created_at TEXT, outcome TEXT, profit_loss_pct REAL, synced_at TEXT, sync_error TEXT")
    db = other_app(tmp_path / "foreign.db", cols)
    before = digest(db)
    assert json.loads(cli("status", "--db", db, "--json").stdout)["signals"] == 1
    assert len(cli("export", "--db", db).stdout.splitlines()) == 1
    assert cli("verify", "--db", db).exit_code == 1  # its sha256 is not ours: reported, not rewritten
    assert cli("tail", "--db", db).exit_code == 0
    r = cli("report", "--db", db, "--json")
    assert r.exit_code == 0, r.stderr
    assert json.loads(r.stdout)["health"]["signals"] == 1
    assert digest(db) == before

