"""The argo-signals command line: CliRunner for every command, and real subprocesses of the
installed console script on real database files."""
import csv
import io
import json
import re
import signal
import socket
import sqlite3
import subprocess
import sys
from datetime import datetime, timedelta
from pathlib import Path

import pytest
from click.testing import CliRunner

from argo_signals import SignalTracker
from argo_signals.cli import main
from argo_signals.report import collect

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
    r = cli("demo", "--db", db, "--count", 300, "--producers", 3, "--quiet", "--no-sync")
    assert r.exit_code == 0, r.output
    assert "300 of 300 signals persisted" in r.output and "log_signal(): p50" in r.output
    assert "sync: off (--no-sync" in r.output
    assert count(db) == 300
    r = cli("demo", "--db", db, "--count", 50, "--json", "--no-sync")
    data = json.loads(r.stdout)
    assert data["persisted"] == 50 and data["logged"] == 50 and data["sync"]["enabled"] is False
    assert count(db) == 350 and count(db) == len(rows(db, "sync_status = 'pending'"))
    assert cli("demo", "--db", db, "--no-sync", "--alpine-url", "http://127.0.0.1:9").exit_code == 2


def test_demo_without_a_url_syncs_to_a_stand_in_receiver_and_stops_it(db):
    r = cli("demo", "--db", db, "--count", 200, "--quiet")
    assert r.exit_code == 0, r.output
    port = int(re.search(r"sync: to a local stand-in receiver on 127\.0\.0\.1:(\d+); "
                         r"pass --alpine-url for a real one\n", r.output).group(1))
    done = rows(db)
    synced = [x for x in done if x["sync_status"] == "synced"]
    assert len(synced) + sum(x["sync_status"] == "skipped" for x in done) == 200 and synced
    assert re.search(rf"\n    {len(synced)} synced, 0 pending, .* lag p50 \d+\.\d ms, p99 \d+\.\d ms\n", r.output)
    with pytest.raises(OSError):  # stopped at the end
        socket.create_connection(("127.0.0.1", port), timeout=2).close()
    # the signals' own timestamps span the simulated session; commit times are real
    stamps = sorted(datetime.fromisoformat(x["timestamp"]) for x in done)
    assert timedelta(hours=6) < stamps[-1] - stamps[0] <= timedelta(hours=6, minutes=30)
    assert len(set(stamps)) == 200 and all(x["timestamp"] < x["created_at"] for x in done)
    h = collect(str(db))["health"]
    assert h["sync_lag_ms"]["n"] == len(synced) and h["by_sync_status"]["synced"] == len(synced)
    assert h["simulated_time_signals"] == 200 and h["time_to_durable_ms"]["n"] == 0  # simulated: left out


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
    assert json.loads(r.stdout)["already_stored"] == 5 and count(other) == 5


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
    data = json.loads(r.stdout)
    assert r.exit_code == 0 and data["signals"] == 0 and data["journal_mode"] == "wal"
    seeded(db, 4)
    data = json.loads(cli("status", "--db", db, "--json").stdout)
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
    got = [json.loads(x) for x in r.stdout.splitlines()]
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
    data = json.loads(r.stdout)
    assert r.exit_code == 0, r.output
    assert data["synced"] == 6 and data["skipped"] == 1 and data["still_pending"] == 0
    assert len(alpine.stored_ids()) == 6


def test_sync_exit_status_and_retry_rejected(db, alpine):
    seeded(db, 2)
    alpine.fail(422)
    env = {"ARGO_API_KEY": KEY, "ALPINE_API_URL": alpine.url}
    r = cli("sync", "--db", db, "--json", env=env)
    data = json.loads(r.stdout)
    assert r.exit_code == 1 and data["rejected"] == 1 and data["synced"] == 1
    r = cli("sync", "--db", db, "--json", env=env)
    assert r.exit_code == 0 and json.loads(r.stdout)["taken"] == 0
    r = cli("sync", "--db", db, "--retry-rejected", "--json", env=env)
    data = json.loads(r.stdout)
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
    data = json.loads(r.stdout)
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
    """Every command is in --help and has its own section in docs/cli.md (a new one cannot go
    undocumented)."""
    r = cli("--help")
    listed = {line.split()[0] for line in r.output.split("Commands:", 1)[1].splitlines() if line.strip()}
    doc = (Path(__file__).resolve().parent.parent / "docs" / "cli.md").read_text(encoding="utf-8")
    assert len(main.commands) >= 10
    for name in main.commands:
        assert name in listed, name
        assert f"\n### `argo-signals {name}`\n" in doc, f"docs/cli.md has no section for {name}"
        assert cli(name, "--help").exit_code == 0


def test_ingest_and_export_as_real_processes(db, tmp_path):
    lines = "\n".join(json.dumps(make_signal(i)) for i in range(4)) + "\n{bad\n"
    out = script("ingest", "-", "--db", db, input=lines)
    assert out.returncode == 1 and "line 5: not valid JSON" in out.stderr
    assert "4 accepted" in out.stdout and count(db) == 4
    target = tmp_path / "all.csv"
    out = script("export", "--db", db, "--format", "csv", "-o", target)
    assert out.returncode == 0 and "exported 4 signals" in out.stderr
    assert len(list(csv.DictReader(target.open()))) == 4


# -- hostile data and operator edges ------------------------------------------------------------
FORMULAS = ["=HYPERLINK(\"http://x\",\"y\")", "+1+1", "-2+3", "@SUM(A1)", "\tTAB", "'=quoted"]


def test_export_csv_escapes_text_that_a_spreadsheet_would_run(db, tmp_path):
    with SignalTracker(db, register_atexit=False) as t:
        for i, text in enumerate(FORMULAS):
            t.log_signal(make_signal(i, reasoning=text, strategy=text, profit_loss_pct=-1.5))
    r = cli("export", "--db", db, "--format", "csv")
    recs = list(csv.DictReader(io.StringIO(r.stdout)))
    assert [x["reasoning"] for x in recs] == ["'" + f for f in FORMULAS]
    assert {x["profit_loss_pct"] for x in recs} == {"-1.5"}  # numbers are not text: left alone
    raw = list(csv.DictReader(io.StringIO(cli("export", "--db", db, "--format", "csv", "--raw").stdout)))
    assert [x["reasoning"] for x in raw] == FORMULAS
    # an escaped export ingests back to the original text; a raw one with --raw
    out = tmp_path / "x.csv"
    out.write_text(r.stdout)
    assert cli("ingest", out, "--csv", "--db", tmp_path / "back.db").exit_code == 0
    assert [x["reasoning"] for x in rows(tmp_path / "back.db")] == FORMULAS
    out.write_text(cli("export", "--db", db, "--format", "csv", "--raw").stdout)
    assert cli("ingest", out, "--csv", "--raw", "--db", tmp_path / "raw.db").exit_code == 0
    assert [x["reasoning"] for x in rows(tmp_path / "raw.db")] == FORMULAS


def test_tail_escapes_control_characters_and_follow_rows_line_up(db):
    with SignalTracker(db, register_atexit=False) as t:
        t.log_signal(make_signal(1, symbol="\x1b[31mRED", strategy="a\tb\rc\x07"))
    r = cli("tail", "--db", db)
    assert "\x1b" not in r.output and "\x07" not in r.output and "\\x1b[31mRED" in r.output
    assert "\r" not in r.output and r.output.count("\n") == 2
    proc = subprocess.Popen([str(BIN / "argo-signals"), "tail", "--db", str(db), "-f", "--interval", "0.1"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    out = LineReader(proc.stdout)
    try:
        header = out.readline()
        first = out.readline()
        with SignalTracker(db, register_atexit=False) as t:
            t.log_signal(make_signal(2, symbol="\x1b[2JX", strategy="m"))
        new = out.readline()
        proc.send_signal(signal.SIGINT)
        assert proc.wait(5) == 0
    finally:
        proc.kill()
    assert "\x1b" not in new and "\\x1b[2JX" in new
    starts = [header.index(c) for c in ("timestamp", "symbol", "action", "entry_price", "sync_status")]
    for line in (first, new):
        assert all(line[s - 2:s] == "  " and line[s] != " " for s in starts), (header, line)


def test_verify_rechecks_every_row_against_the_rules(db):
    seeded(db, 4)
    r = cli("verify", "--db", db)
    assert r.exit_code == 0 and "hash covers: signal_id, symbol, action" in r.output
    conn = sqlite3.connect(db)
    conn.execute("UPDATE signals SET action = 'buy' WHERE id = 2")
    conn.execute("UPDATE signals SET exit_price = -1 WHERE id = 3")
    conn.execute("UPDATE signals SET entry_price = -1 WHERE id = 4")
    conn.commit()
    conn.close()
    r = runner().invoke(main, ["verify", "--db", str(db), "--json"])
    data = json.loads(r.stdout)
    assert r.exit_code == 1
    assert {(b["id"], b["field"]) for b in data["invalid"]} == {(2, "action"), (3, "exit_price"), (4, "entry_price")}
    assert "exit_price" not in data["hash_covers"] and "action" in data["hash_covers"]
    out = script("verify", "--db", db)
    assert out.returncode == 1 and "3 rows break the rules of log_signal()" in out.stdout
    assert "id 2 action:" in out.stdout


@pytest.mark.parametrize("name", ["p%41.db", "c?mode=rw.db", "h#x.db"])
def test_db_paths_with_uri_characters_work_in_every_command(tmp_path, name):
    path = tmp_path / name
    decoy = tmp_path / "pA.db"  # what 'p%41.db' means as a URI
    seeded(decoy, 5)
    seeded(path, 2)
    data = json.loads(cli("status", "--db", path, "--json").stdout)
    assert data["signals"] == 2 and data["by_sync_status"]["pending"] == 2
    assert len(cli("export", "--db", path).stdout.splitlines()) == 2
    assert len(cli("tail", "--db", path).output.splitlines()) == 3
    assert cli("verify", "--db", path).exit_code == 0
    with SignalTracker(path, register_atexit=False) as t:
        assert t.stats()["sync_pending"] == 2
    src = tmp_path / "in.jsonl"
    src.write_text(json.dumps(make_signal(9)) + "\n")
    assert cli("ingest", src, "--db", path).exit_code == 0
    assert cli("demo", "--db", path, "--count", 3, "--quiet").exit_code == 0
    assert count(path) == 6 and count(decoy) == 5


def test_ingest_reports_invalid_utf8_lines_and_keeps_the_rest(db, tmp_path):
    src = tmp_path / "in.jsonl"
    src.write_bytes(json.dumps(make_signal(1)).encode() + b"\n"
                    + b'{"symbol": "\xff\xfeBAD", "entry_price": 1, "confidence": 1}\n'
                    + json.dumps(make_signal(3, reasoning="caf\u00e9")).encode() + b"\n")
    r = runner().invoke(main, ["ingest", str(src), "--db", str(db)])
    assert r.exit_code == 1 and "line 2: not valid UTF-8" in r.stderr and "Traceback" not in r.stderr
    assert "2 accepted" in r.output and count(db) == 2
    csv_src = tmp_path / "in.csv"
    csv_src.write_bytes(b"symbol,entry_price,confidence\nAAPL,1,2\nX\xff,1,2\nMSFT,3,4\n")
    r = runner().invoke(main, ["ingest", str(csv_src), "--csv", "--db", str(tmp_path / "c.db")])
    assert r.exit_code == 1 and "line 3: not valid UTF-8" in r.stderr
    assert [x["symbol"] for x in rows(tmp_path / "c.db")] == ["AAPL", "MSFT"]


def test_ingest_of_csv_without_the_flag_says_so(db, tmp_path):
    src = tmp_path / "s.csv"
    src.write_text("symbol,action,entry_price,confidence\nAAPL,BUY,1,2\n")
    r = runner().invoke(main, ["ingest", str(src), "--db", str(db)])
    assert r.exit_code != 0 and "--csv" in r.stderr and "header" in r.stderr
    assert r.stderr.count("not valid JSON") == 0 and not db.exists()


def test_ingest_dedupe_makes_reingesting_idempotent(db, tmp_path):
    src = tmp_path / "hand.jsonl"
    src.write_text("\n".join(json.dumps({"symbol": s, "action": "BUY", "entry_price": p, "confidence": 50})
                             for s, p in (("AAPL", 1), ("MSFT", 2), ("AAPL", "1.0"))) + "\n")
    first = json.loads(cli("ingest", src, "--db", db, "--dedupe", "--json").stdout)
    assert (first["persisted"], first["already_stored"]) == (2, 1)  # line 3 is line 1 again
    again = json.loads(cli("ingest", src, "--db", db, "--dedupe", "--json").stdout)
    assert (again["persisted"], again["already_stored"], again["rejected"]) == (0, 3, 0)
    assert count(db) == 2
    cli("ingest", src, "--db", db)  # without --dedupe every line is a new signal
    assert count(db) == 5


def test_export_status_is_a_choice(db):
    seeded(db, 2)
    r = runner().invoke(main, ["export", "--db", str(db), "--status", "bogus"])
    assert r.exit_code == 2 and "bogus" in r.stderr
    assert "pending" in cli("export", "--help").output and "synced" in cli("export", "--help").output
    assert len(cli("export", "--db", db, "--status", "pending").stdout.splitlines()) == 2


def test_db_before_or_after_the_command_and_from_the_environment(db, tmp_path):
    seeded(db, 3)
    for args, env in ((["--db", db, "status", "--json"], None), (["status", "--db", db, "--json"], None),
                      (["status", "--json"], {"ARGO_SIGNALS_DB": str(db)}),
                      (["--db", db, "status", "--json"], {"ARGO_SIGNALS_DB": str(tmp_path / "other.db")})):
        r = runner().invoke(main, [str(a) for a in args], env=env)
        assert r.exit_code == 0, (args, r.stderr)
        assert json.loads(r.stdout)["signals"] == 3
    r = runner().invoke(main, ["--db", str(tmp_path / "other.db"), "status", "--db", str(db), "--json"])
    assert json.loads(r.stdout)["database"] == str(db)  # the one nearer the command wins
    out = script("--db", db, "tail", "-n", 1)
    assert out.returncode == 0 and len(out.stdout.splitlines()) == 2


def test_sync_on_a_missing_database_says_so_first(tmp_path):
    r = runner().invoke(main, ["sync", "--db", str(tmp_path / "missing.db")])
    assert r.exit_code == 1 and "no database at" in r.stderr and "URL" not in r.stderr
