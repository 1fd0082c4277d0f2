"""Prometheus metrics: a real registry and prometheus_client's own parser over the tracker's
collector and the `metrics` command; values checked against stats() and SQL."""
import json
import os
import re
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from datetime import datetime, timezone
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from argo_signals import SignalTracker
from argo_signals.cli import main
from argo_signals.metrics import DatabaseCollector, MetricsServer, TrackerCollector
from argo_signals.spill import spill_path
from argo_signals.testing import AlpineServer
from conftest import ROOT, LineReader, make_signal, run_script

KEY = "metrics-key"


def samples(text):
    """{(sample name, frozenset of labels): value} parsed by prometheus_client itself."""
    return {(s.name, frozenset(s.labels.items())): s.value
            for fam in text_string_to_metric_families(text) for s in fam.samples}


def cli_metrics(*args):
    r = CliRunner().invoke(main, ["metrics", *map(str, args)], catch_exceptions=False)
    assert r.exit_code == 0, r.output
    return r.output


def sql(db, query):
    conn = sqlite3.connect(str(db))
    try:
        return conn.execute(query).fetchall()
    finally:
        conn.close()


class CountingTracker:
    """The tracker as the collector sees it, counting stats() calls."""

    def __init__(self, tracker):
        self.tracker, self.calls, self.last = tracker, 0, None

    def stats(self):
        self.calls += 1
        self.last = self.tracker.stats()
        return self.last


def test_tracker_collector_reports_one_stats_snapshot(db):
    alpine = AlpineServer(KEY).start()
    try:
        t = SignalTracker(db, alpine_url=alpine.url, api_key=KEY, register_atexit=False)
        alpine.fail(500, times=1)  # one retry within a delivery
        for i in range(30):
            t.log_signal(make_signal(i, action="NEUTRAL" if i == 7 else "BUY"))
        t.log_signal(make_signal(1, signal_id="same", symbol="MSFT"))
        t.log_signal(make_signal(2, signal_id="same", symbol="NVDA"))  # other content: refused
        assert t.flush(30) and t.wait_synced(30)
        seen = CountingTracker(t)
        registry = CollectorRegistry()
        registry.register(TrackerCollector(seen))
        calls_at_registration = seen.calls
        got = samples(generate_latest(registry).decode())
        assert seen.calls == calls_at_registration + 1
        st = seen.last
    finally:
        t.close(10)
        alpine.stop()

    def v(name, **labels):
        return got[(name, frozenset(labels.items()))]
    assert st["logged"] == 32 and st["rejected"] == 1 and st["sync_retries"] >= 1
    assert v("argo_signals_logged_total") == st["logged"]
    assert sum(v("argo_signals_persisted_total", trigger=k) for k in st["persisted_by"]) == st["persisted"] == 31
    assert v("argo_signals_persisted_total", trigger="manual") == st["persisted_by"]["manual"]
    for key in ("rejected", "fallback_writes", "spilled", "duplicates", "transactions"):
        assert v(f"argo_signals_{key}_total") == st[key], key
    assert v("argo_signals_queue_depth") == st["pending"]
    assert v("argo_signals_time_to_durable_seconds_count") == st["time_to_durable_s"]["count"] == 32
    assert v("argo_signals_time_to_durable_seconds_bucket", le="+Inf") == 32
    assert v("argo_signals_time_to_durable_seconds_sum") == pytest.approx(st["time_to_durable_s"]["sum"])
    assert v("argo_signals_sync_delivered_total") == st["sync_outcomes"]["synced"] == st["synced"] == 30
    assert v("argo_signals_sync_skipped_total") == st["sync_skipped"] == 1
    assert v("argo_signals_sync_rejected_total") == st["sync_outcomes"]["rejected"] == 0
    assert v("argo_signals_sync_failed_total", reason="transient") == st["sync_outcomes"]["transient"]
    assert v("argo_signals_sync_retries_total") == st["sync_retries"]
    lag = st["sync_delivery_lag_s"]
    assert v("argo_signals_sync_lag_seconds_count") == lag["count"] == 30 and 0 < lag["sum"] < 30 * 30
    assert v("argo_signals_sync_lag_seconds_bucket", le="60.0") == lag["buckets"]["60.0"] == 30
    assert v("argo_signals_sync_pending") == st["sync_pending"] == 0
    assert v("argo_signals_sync_breaker_open") == 0 and v("argo_signals_writer_state", state="open") == 1
    by_sql = dict(sql(db, "SELECT sync_status, count(*) FROM signals GROUP BY 1"))
    for status in ("synced", "skipped", "pending"):
        assert v("argo_signals_signals", status=status) == by_sql.get(status, 0)


def test_importing_the_library_needs_no_prometheus_client(db):
    r = run_script("""
        import sys
        sys.modules['prometheus_client'] = None
        import argo_signals
        from argo_signals import SignalTracker
        with SignalTracker(sys.argv[1], register_atexit=False) as t:
            t.log_signal({"symbol": "AAPL", "action": "BUY", "entry_price": 1.0, "confidence": 50})
        try:
            import argo_signals.metrics
        except ImportError:
            print("no metrics module without prometheus_client")
        from argo_signals.cli import main
        main(["metrics", "--db", sys.argv[1]])
    """, db)
    assert "no metrics module without prometheus_client" in r.stdout, r.stderr
    assert r.returncode == 1 and "pip install 'argo-signals[prometheus]'" in r.stderr
    assert "Traceback" not in r.stderr


def _seed_database(db):
    """Pending rows, a refused row, a sync error, a spill file with two lines."""
    with SignalTracker(db, register_atexit=False) as t:
        for i in range(12):
            t.log_signal(make_signal(i))
        t.log_signal(make_signal(1, signal_id="same"))
        t.log_signal(make_signal(2, signal_id="same", symbol="TSLA"))
    conn = sqlite3.connect(str(db))
    conn.execute("UPDATE signals SET sync_status = 'synced' WHERE id <= 3")
    conn.execute("UPDATE signals SET sync_status = 'failed' WHERE id = 4")
    conn.execute("CREATE TABLE sync_last_error (id INTEGER PRIMARY KEY CHECK (id = 1), error TEXT NOT NULL, "
                 "at TEXT NOT NULL)")
    conn.execute("INSERT INTO sync_last_error VALUES (1, 'HTTP 503', '2026-01-02T03:04:05+00:00')")
    conn.commit()
    conn.close()
    Path(spill_path(str(db))).write_text('{"a": 1}\n{"b": 2}\n')


def test_metrics_command_reports_the_database_as_sql_sees_it(db):
    _seed_database(db)
    got = samples(cli_metrics("--db", db))

    def v(name, **labels):
        return got[(name, frozenset(labels.items()))]
    for status, n in sql(db, "SELECT sync_status, count(*) FROM signals GROUP BY 1"):
        assert v("argo_signals_signals", status=status) == n
    assert v("argo_signals_signals", status="pending") == 9 and v("argo_signals_signals", status="rejected") == 0
    assert v("argo_signals_refused_rows") == sql(db, "SELECT count(*) FROM rejected_signals")[0][0] == 1
    assert v("argo_signals_spill_lines") == 2 and v("argo_signals_waiting_updates") == 0
    assert v("argo_signals_last_sync_error_timestamp_seconds") == datetime(2026, 1, 2, 3, 4, 5, tzinfo=timezone.utc).timestamp()
    oldest, last = sql(db, "SELECT (SELECT created_at FROM signals WHERE sync_status = 'pending' ORDER BY id "
                           "LIMIT 1), max(created_at) FROM signals")[0]
    assert v("argo_signals_last_commit_timestamp_seconds") == datetime.fromisoformat(last).timestamp()
    age = time.time() - datetime.fromisoformat(oldest).timestamp()
    assert age - 5 < v("argo_signals_oldest_pending_age_seconds") <= age
    # updates waiting for their insert (the schema's own table)
    conn = sqlite3.connect(str(db))
    conn.executemany("INSERT INTO waiting_updates (signal_id, fields, queued_at) VALUES (?, '{}', 0)",
                     [("x",), ("y",), ("z",)])
    conn.commit()
    conn.close()
    assert samples(cli_metrics("--db", db))[("argo_signals_waiting_updates", frozenset())] == 3


def test_metrics_serve_answers_a_real_get_and_exits_cleanly_on_sigterm(db):
    _seed_database(db)
    proc = subprocess.Popen([str(Path(sys.executable).parent / "argo-signals"), "metrics", "--db", str(db),
                             "--serve", "127.0.0.1:0"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        line = LineReader(proc.stdout).readline(30)
        url = re.search(r"(http://\S+/metrics)", line).group(1)
        with urllib.request.urlopen(url, timeout=10) as resp:
            assert resp.status == 200 and resp.headers["Content-Type"].startswith("text/plain")
            got = samples(resp.read().decode())
        assert got[("argo_signals_signals", frozenset({("status", "pending")}))] == 9
        assert got[("argo_signals_database_up", frozenset())] == 1
        # scrapes while this process commits: each answers, from one snapshot, never going back
        pending = frozenset({("status", "pending")})
        seen = []
        with SignalTracker(db, register_atexit=False, batch_size=5) as t:
            for i in range(40):
                t.log_signal(make_signal(100 + i))
                if i % 8 == 0:
                    with urllib.request.urlopen(url, timeout=10) as resp:
                        seen.append(samples(resp.read().decode()))
        assert all(s[("argo_signals_database_up", frozenset())] == 1 for s in seen)
        counts = [s[("argo_signals_signals", pending)] for s in seen]
        assert counts == sorted(counts) and counts[0] >= 9
        with urllib.request.urlopen(url, timeout=10) as resp:
            assert samples(resp.read().decode())[("argo_signals_signals", pending)] == 49
        with pytest.raises(urllib.error.HTTPError) as err:
            urllib.request.urlopen(url.replace("/metrics", "/other"), timeout=10)
        assert err.value.code == 404
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=15) == 0
        assert "Traceback" not in proc.stderr.read()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def _exported_names(db):
    """Every sample name the library exports: a live tracker's collector and the command."""
    with SignalTracker(db, register_atexit=False) as t:
        t.log_signal(make_signal(1))
        t.flush(10)
        registry = CollectorRegistry()
        registry.register(TrackerCollector(t))
        names = {name for name, _ in samples(generate_latest(registry).decode())}
    return names | {name for name, _ in samples(cli_metrics("--db", db))}


def test_alert_rules_load_and_name_only_exported_metrics(db):
    rules = yaml.safe_load((ROOT / "docs" / "prometheus-alerts.yml").read_text())
    exported = _exported_names(db)
    alerts = [r for g in rules["groups"] for r in g["rules"]]
    assert {"alert", "expr", "labels", "annotations"} <= set().union(*map(set, alerts))
    assert len(alerts) >= 6
    for rule in alerts:
        named = set(re.findall(r"\bargo_signals_\w+", rule["expr"]))
        assert named and named <= exported, (rule["alert"], named - exported)
        assert re.fullmatch(r"\d+[smh]", rule.get("for", "0s")) and rule["annotations"]["summary"]
    json.dumps(rules)  # plain data: nothing YAML-specific slipped in


def test_serve_takes_an_ipv6_host(db):
    _seed_database(db)
    try:
        with socket.socket(socket.AF_INET6) as probe:
            probe.bind(("::1", 0))
    except OSError:  # a host without an IPv6 loopback: the command says so in one line
        r = CliRunner().invoke(main, ["metrics", "--db", str(db), "--serve", "[::1]:0"])
        assert r.exit_code == 1 and "cannot listen on [::1]:0" in r.output
        return
    server = MetricsServer("::1", 0, DatabaseCollector(str(db))).start()
    try:
        with urllib.request.urlopen(f"http://[::1]:{server.address[1]}/metrics", timeout=10) as resp:
            assert samples(resp.read().decode())[("argo_signals_database_up", frozenset())] == 1
    finally:
        server.stop()


@pytest.mark.parametrize("address", ["127.0.0.1:\u00b2", "127.0.0.1:", "127.0.0.1:+80", "9100"])
def test_serve_refuses_an_address_that_is_not_host_and_port(db, address):
    _seed_database(db)
    r = CliRunner().invoke(main, ["metrics", "--db", str(db), "--serve", address])
    assert r.exit_code == 2 and "expected HOST:PORT" in r.output, (r.exit_code, r.output, r.exception)


def _traversable_by_others(*paths):
    """Let another user reach the checkout and its venv (a clone may live in a 0700 folder):
    add the search bit where a folder on the way lacks it; returns what to restore."""
    opened = []
    for path in paths:
        for d in [Path(path).resolve(), *Path(path).resolve().parents]:
            mode = d.stat().st_mode & 0o7777
            if not mode & 0o001 and d.is_dir() and (d, mode) not in opened:
                d.chmod(mode | 0o001)
                opened.append((d, mode))
    return opened


def test_metrics_read_a_database_whose_directory_this_user_cannot_write(tmp_path):
    """A monitoring user with read access only, while no process has the database open (no
    -wal/-shm file): SQLite cannot create the -shm a WAL database needs to be read."""
    as_other = []
    if hasattr(os, "geteuid") and os.geteuid() == 0:
        if shutil.which("setpriv") is None:
            pytest.skip("root without setpriv cannot drop the write access")
        as_other = ["setpriv", "--reuid=nobody", "--regid=nogroup", "--clear-groups"]
    where = Path(tempfile.mkdtemp(dir="/tmp" if as_other else tmp_path))
    opened = _traversable_by_others(ROOT, Path(sys.executable).parent) if as_other else []
    try:
        db = where / "signals.db"
        with SignalTracker(db, sync_enabled=False, register_atexit=False) as t:
            t.log_signal(make_signal(1))
        assert not Path(f"{db}-wal").exists()
        db.chmod(0o644)
        where.chmod(0o555)
        r = subprocess.run([*as_other, str(Path(sys.executable).parent / "argo-signals"), "metrics", "--db", str(db)],
                           capture_output=True, text=True, timeout=60)
        assert r.returncode == 0, r.stderr
        assert samples(r.stdout)[("argo_signals_signals", frozenset({("status", "pending")}))] == 1
        assert sorted(p.name for p in where.iterdir()) == ["signals.db"]
    finally:
        where.chmod(0o755)
        shutil.rmtree(where)
        for d, mode in opened:
            d.chmod(mode)


def test_serve_drops_a_connection_that_never_sends_a_request(db, monkeypatch):
    import argo_signals.metrics
    monkeypatch.setattr(argo_signals.metrics, "REQUEST_TIMEOUT", 0.3, raising=False)
    _seed_database(db)
    server = MetricsServer("127.0.0.1", 0, DatabaseCollector(str(db))).start()
    try:
        with socket.create_connection(("127.0.0.1", server.address[1]), timeout=5) as idle:
            t0 = time.monotonic()
            assert idle.recv(100) == b""   # closed by the server, not by our 5 s timeout
            assert time.monotonic() - t0 < 4
        with urllib.request.urlopen(f"http://127.0.0.1:{server.address[1]}/metrics", timeout=10) as resp:
            assert resp.status == 200
    finally:
        server.stop()


def test_a_tracker_whose_database_cannot_be_read_reports_no_rows_rather_than_zero(db):
    """The database file removed under a live tracker: its rows are unknown, not 0 pending."""
    with SignalTracker(db, sync_enabled=False, register_atexit=False) as t:
        t.log_signal(make_signal(1))
        assert t.flush(10)
        registry = CollectorRegistry()
        registry.register(TrackerCollector(t))
        assert samples(generate_latest(registry).decode())[("argo_signals_database_up", frozenset())] == 1
        Path(db).unlink()
        got = samples(generate_latest(registry).decode())
    assert got[("argo_signals_database_up", frozenset())] == 0
    assert ("argo_signals_sync_pending", frozenset()) not in got
    assert not [k for k in got if k[0] == "argo_signals_signals"]
    assert got[("argo_signals_logged_total", frozenset())] == 1   # the tracker's own counters stay


def test_a_row_whose_created_at_is_junk_does_not_hide_the_last_commit(db):
    """Another program inserted a row with created_at 'n/a' (text sorts after every date)."""
    with SignalTracker(db, sync_enabled=False, register_atexit=False) as t:
        t.log_signal(make_signal(1))
    conn = sqlite3.connect(str(db))
    conn.execute("INSERT INTO signals (signal_id, symbol, action, entry_price, confidence, timestamp, sha256, "
                 "created_at) SELECT 'other', symbol, action, entry_price, confidence, timestamp, 'x', 'n/a' "
                 "FROM signals")
    conn.commit()
    conn.close()
    got = samples(cli_metrics("--db", db))
    assert abs(got[("argo_signals_last_commit_timestamp_seconds", frozenset())] - time.time()) < 600
