"""The argo-signals command line: CliRunner for every command, and real subprocesses of the
installed console script on real database files."""
import csv
import io
import json
import signal
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from argo_signals import SignalTracker
from argo_signals.cli import main

from argo_signals.testing import AlpineServer
from conftest import LineReader, count, make_signal, rows

BIN = Path(sys.executable).parent
KEY = "test-key-123"


def runner():
    """A CliRunner with stdout and stderr apart (click < 8.2 needs mix_stderr=False)."""
    try:
        return CliRunner(mix_stderr=False)
    except TypeError:
        return CliRunner()



def cli(*args, input=None, env=None):
    return runner().invoke(main, [str(a) for a in args], input=input, env=env, catch_exceptions=False)


def script(*args, env=None, timeout=60, **kw):
    return subprocess.run([str(BIN / "argo-signals"), *map(str, args)], capture_output=True, text=True,
                          timeout=timeout, env=env, **kw)


def seeded(db, n=10):
    with SignalTracker(db, register_atexit=False) as t:
        return [t.log_signal(make_signal(i)) for i in range(n)]


@pytest.fixture
def alpine():
    server = AlpineServer(KEY).start()
    yield server
    server.stop()


def test_demo_runs_and_reports(db):
    r = cli("demo", "--db", db, "--count", 300, "--producers", 3, "--quiet")
    assert r.exit_code == 0, r.output
    assert "300 of 300 signals persisted" in r.output and "log_signal(): p50" in r.output
    assert count(db) == 300
    r = cli("demo", "--db", db, "--count", 50, "--json")
    data = json.loads(r.output)
    assert data["persisted"] == 50 and data["logged"] == 50 and data["sync"]["enabled"] is False
    assert count(db) == 350


def test_demo_as_a_real_process_with_alpine(tmp_path, alpine):
    out = script("demo", "--count", 120, "--alpine-url", alpine.url, "--json", cwd=tmp_path,
                 env={"ARGO_API_KEY": KEY, "PATH": str(BIN)})
    assert out.returncode == 0, out.stderr
    data = json.loads(out.stdout)
    db = tmp_path / "argo_signals.db"  # the embedded default
    assert data["persisted"] == 120 and count(db) == 120
    settled = data["sync"]["synced"] + data["sync"]["skipped"] + data["sync"]["rejected"]
    assert data["sync"]["synced"] > 0 and settled + data["sync"]["pending"] == 120
    assert len(alpine.stored_ids()) == data["sync"]["synced"]


def test_ingest_jsonl_reports_bad_lines_and_keeps_good_ones(db, tmp_path):
    src = tmp_path / "in.jsonl"
    src.write_text("\n".join([
        json.dumps(make_signal(1)),
        json.dumps({**make_signal(2), "action": "HOLD"}),
        "{not json",
        json.dumps(make_signal(3)),
        "[1, 2]",
    ]) + "\n")
    r = runner().invoke(main, ["ingest", str(src), "--db", str(db), "--quiet"])
    assert r.exit_code == 1
    assert "line 2: action" in r.stderr and "line 3: not valid JSON" in r.stderr and "line 5" in r.stderr
    assert "2 accepted" in r.output
    assert count(db) == 2
    r = runner().invoke(main, ["ingest", str(src), "--db", str(tmp_path / "strict.db"), "--strict"])
    assert r.exit_code == 1 and count(tmp_path / "strict.db") == 1


def test_ingest_csv_and_stdin(db):
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=["symbol", "action", "entry_price", "confidence", "target_price"])
    w.writeheader()
    w.writerow({"symbol": "AAPL", "action": "buy", "entry_price": "190.5", "confidence": "80", "target_price": ""})
    w.writerow({"symbol": "MSFT", "action": "sell", "entry_price": "410", "confidence": "70", "target_price": "400"})
    r = cli("ingest", "-", "--csv", "--db", db, input=buf.getvalue())
    assert r.exit_code == 0, r.output
    got = rows(db)
    assert [g["symbol"] for g in got] == ["AAPL", "MSFT"] and got[0]["target_price"] is None


def test_export_then_ingest_round_trips(db, tmp_path):
    ids = seeded(db, 5)
    out = tmp_path / "out.jsonl"
    r = cli("export", "--db", db, "-o", out)
    assert r.exit_code == 0 and "exported 5" in r.stderr
    other = tmp_path / "copy.db"
    r = cli("ingest", out, "--db", other)
    assert r.exit_code == 0, r.output
    assert [x["sha256"] for x in rows(other)] == [x["sha256"] for x in rows(db)]
    assert [x["signal_id"] for x in rows(other)] == ids
    r = cli("ingest", out, "--db", other, "--json")  # again: all already stored
    assert json.loads(r.output)["already_stored"] == 5 and count(other) == 5


def test_export_filters_and_csv(db):
    with SignalTracker(db, register_atexit=False) as t:
        t.log_signal(make_signal(1, symbol="AAPL", timestamp="2026-01-01T00:00:00Z"))
        t.log_signal(make_signal(2, symbol="MSFT", timestamp="2026-02-01T00:00:00Z"))
        t.log_signal(make_signal(3, symbol="AAPL", timestamp="2026-03-01T00:00:00Z"))
    r = cli("export", "--db", db, "--symbol", "AAPL", "--since", "2026-02-01", "--format", "csv")
    recs = list(csv.DictReader(io.StringIO(r.stdout)))
    assert [x["timestamp"] for x in recs] == ["2026-03-01T00:00:00+00:00"]
    r = cli("export", "--db", db, "--until", "2026-02-01T00:00:00+00:00", "--status", "pending")
    assert [json.loads(line)["symbol"] for line in r.stdout.splitlines()] == ["AAPL"]
    r = runner().invoke(main, ["export", "--db", str(db), "--since", "soon"])
    assert r.exit_code == 2 and "--since" in r.stderr


def test_status_empty_and_missing(db, tmp_path):
    r = runner().invoke(main, ["status", "--db", str(tmp_path / "missing.db")])
    assert r.exit_code == 1 and "no database at" in r.stderr and "Traceback" not in r.output
    from argo_signals.store import connect, ensure_schema
    ensure_schema(connect(str(db)))
    r = cli("status", "--db", db, "--json")
    data = json.loads(r.output)
    assert r.exit_code == 0 and data["signals"] == 0 and data["journal_mode"] == "wal"
    seeded(db, 4)
    data = json.loads(cli("status", "--db", db, "--json").output)
    assert data["signals"] == 4 and data["by_sync_status"]["pending"] == 4 and data["sync_lag_s"] >= 0


def test_status_as_a_real_process(db):
    seeded(db, 3)
    out = script("status", "--db", db)
    assert out.returncode == 0 and "3 signals" in out.stdout and "3 pending" in out.stdout
    out = script("status", "--db", db.parent / "nope.db")
    assert out.returncode == 1 and out.stderr.strip().startswith("Error: no database at")
    assert "Traceback" not in out.stderr


def test_tail(db):
    ids = seeded(db, 30)
    r = cli("tail", "--db", db, "-n", 3)
    lines = r.output.splitlines()
    assert lines[0].split()[:3] == ["id", "timestamp", "symbol"] and len(lines) == 4
    r = cli("tail", "--db", db, "-n", 5, "--symbol", "AAPL", "--json")
    got = [json.loads(x) for x in r.output.splitlines()]
    assert len(got) == 5 and {g["symbol"] for g in got} == {"AAPL"} and got[-1]["signal_id"] == ids[-1]


def test_tail_follow_prints_new_rows_until_ctrl_c(db):
    seeded(db, 2)
    proc = subprocess.Popen([str(BIN / "argo-signals"), "tail", "--db", str(db), "-f", "--interval", "0.1"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    out = LineReader(proc.stdout)
    try:
        assert out.readline().startswith("id")
        out.readline(), out.readline()
        with SignalTracker(db, register_atexit=False) as t:
            t.log_signal(make_signal(7, symbol="NEWROW"))
        assert "NEWROW" in out.readline()
        proc.send_signal(signal.SIGINT)
        assert proc.wait(5) == 0
    finally:
        proc.kill()


def test_sync_command(db, alpine):
    seeded(db, 6)
    with SignalTracker(db, register_atexit=False) as t:
        t.log_signal(make_signal(50, action="NEUTRAL"))
    r = runner().invoke(main, ["sync", "--db", str(db), "--quiet"])
    assert r.exit_code == 1 and "no Alpine URL" in r.stderr
    r = cli("sync", "--db", db, "--alpine-url", alpine.url, "--json", env={"ARGO_API_KEY": KEY})
    data = json.loads(r.output)
    assert r.exit_code == 0, r.output
    assert data["synced"] == 6 and data["skipped"] == 1 and data["still_pending"] == 0
    assert len(alpine.stored_ids()) == 6


def test_sync_exit_status_and_retry_rejected(db, alpine):
    seeded(db, 2)
    alpine.fail(422)
    env = {"ARGO_API_KEY": KEY, "ALPINE_API_URL": alpine.url}
    r = cli("sync", "--db", db, "--json", env=env)
    data = json.loads(r.output)
    assert r.exit_code == 1 and data["rejected"] == 1 and data["synced"] == 1
    r = cli("sync", "--db", db, "--json", env=env)
    assert r.exit_code == 0 and json.loads(r.output)["taken"] == 0
    r = cli("sync", "--db", db, "--retry-rejected", "--json", env=env)
    data = json.loads(r.output)
    assert r.exit_code == 0 and data["reset_to_pending"] == 1 and data["synced"] == 1
    assert [x["sync_status"] for x in rows(db)] == ["synced", "synced"]


def test_sync_as_a_real_process_with_limit(db, alpine):
    seeded(db, 5)
    out = script("sync", "--db", db, "--alpine-url", alpine.url, "--limit", 2,
                 env={"ARGO_API_KEY": KEY, "PATH": str(BIN)})
    assert out.returncode == 0, out.stderr
    assert "took 2: 2 synced" in out.stdout
    assert [x["sync_status"] for x in rows(db)].count("synced") == 2


def test_sync_with_a_wrong_key_exits_1_and_does_not_leak_it(db, alpine):
    seeded(db, 1)
    r = runner().invoke(main, ["sync", "--db", str(db), "--alpine-url", alpine.url],
                           env={"ARGO_API_KEY": "wrong-secret-key"})
    assert r.exit_code == 1 and "wrong-secret-key" not in r.output + r.stderr
    assert rows(db)[0]["sync_status"] == "pending"


def test_verify_finds_tampered_rows(db):
    seeded(db, 4)
    assert cli("verify", "--db", db).exit_code == 0
    conn = sqlite3.connect(db)
    conn.execute("UPDATE signals SET entry_price = 1.0 WHERE id = 3")
    conn.commit()
    conn.close()
    r = runner().invoke(main, ["verify", "--db", str(db), "--json"])
    data = json.loads(r.output)
    assert r.exit_code == 1 and data["mismatches"] == 1 and data["rows"][0]["id"] == 3
    out = script("verify", "--db", db)
    assert out.returncode == 1 and "1 hash mismatches" in out.stdout


def test_store_opens_unchanged_in_the_sqlite_utils_cli(db):
    seeded(db, 3)
    tables = subprocess.run([str(BIN / "sqlite-utils"), "tables", str(db)], capture_output=True, text=True)
    assert tables.returncode == 0 and {t["table"] for t in json.loads(tables.stdout)} >= {"signals", "rejected_signals"}
    got = subprocess.run([str(BIN / "sqlite-utils"), "rows", str(db), "signals"], capture_output=True, text=True)
    assert got.returncode == 0 and len(json.loads(got.stdout)) == 3


def test_help_lists_every_command():
    r = cli("--help")
    for name in ("demo", "ingest", "status", "tail", "export", "sync", "verify", "bench"):
        assert name in r.output


def test_ingest_and_export_as_real_processes(db, tmp_path):
    lines = "\n".join(json.dumps(make_signal(i)) for i in range(4)) + "\n{bad\n"
    out = script("ingest", "-", "--db", db, input=lines)
    assert out.returncode == 1 and "line 5: not valid JSON" in out.stderr
    assert "4 accepted" in out.stdout and count(db) == 4
    target = tmp_path / "all.csv"
    out = script("export", "--db", db, "--format", "csv", "-o", target)
    assert out.returncode == 0 and "exported 4 signals" in out.stderr
    assert len(list(csv.DictReader(target.open()))) == 4
