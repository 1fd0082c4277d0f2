"""argo-signals report: the numbers of a database with known content, in --json and in the
page's tables; empty states; the missing-extra message in a real process without matplotlib."""
import json
import re
import stat
import sys
from datetime import datetime, timedelta, timezone
from html.parser import HTMLParser

import pytest
from click.testing import CliRunner

from argo_signals import SignalTracker, report, spill, store
from argo_signals.cli import main
from argo_signals.demo import win_probability
from argo_signals.report import ReportError, collect, parse_since
from argo_signals.report_html import NO_OUTCOMES, render
from conftest import make_signal, run_script, spawn_script

UTC = timezone.utc
NOW = datetime(2026, 1, 1, 12, 0, tzinfo=UTC)
SINCE = "2026-01-01T09:00:00+00:00"

# created (UTC), ms from timestamp to commit, action, strategy, confidence, sync status, sync_error,
# ms from commit to sync, outcome, P/L %
SIGNALS = [
    ("09:10:00", 100, "BUY", "alpha", 95, "synced", None, 1000, "win", 2.0),
    ("09:10:10", 200, "BUY", "alpha", 85, "synced", None, 3000, "win", 1.0),
    ("09:10:20", 300, "SELL", "beta", 65, "pending", None, None, "loss", -1.5),
    ("09:10:30", 400, "NEUTRAL", "beta", 50, "skipped", "NEUTRAL signals are not synced", None, None, None),
    ("10:10:00", 50, "BUY", "alpha", 92, "rejected", "symbol too long", None, "LOSS", -2.0),
    ("10:10:10", 50, "BUY", "beta", 61, "failed", "HTTP 500", None, "Win", 3.0),
    ("10:10:20", 5000, "BUY", "alpha", 88, "synced", None, 2000, "expired", 0.0),
    ("11:10:00", 10, "SELL", "beta", 45, "pending", "connection refused", None, None, None),
    ("11:10:10", 20, "SELL", "alpha", 71, "pending", None, None, None, None),
]
REFUSED = [("alpha", "signal_id already stored with different content", "10:30:00"),
           ("alpha", "signal_id already stored with different content", "10:31:00"),
           ("beta", "refused by the database", "10:32:00")]


def at(hms, ms=0):
    h, m, s = map(int, hms.split(":"))
    return datetime(2026, 1, 1, h, m, s, tzinfo=UTC) + timedelta(milliseconds=ms)


def build(db, signals=SIGNALS, refused=REFUSED, spill_lines=3):
    conn = store.connect(str(db))
    store.ensure_schema(conn)
    for k, (created, dur, action, strat, conf, status, err, lag, outcome, pnl) in enumerate(signals):
        c = at(created)
        conn.execute(
            "INSERT INTO signals (signal_id, symbol, action, entry_price, confidence, strategy, timestamp, sha256, "
            "created_at, sync_status, sync_attempts, sync_error, synced_at, outcome, profit_loss_pct) "
            "VALUES (?, ?, ?, 100.0, ?, ?, ?, 'x', ?, ?, 0, ?, ?, ?, ?)",
            (f"s{k}", "MSFT" if k % 2 else "AAPL", action, float(conf), strat, (c - timedelta(milliseconds=dur)).isoformat(), c.isoformat(),
             status, err, None if lag is None else (c + timedelta(milliseconds=lag)).isoformat(), outcome, pnl))
    for strat, reason, when in refused:
        conn.execute("INSERT INTO rejected_signals (signal_id, payload, reason, rejected_at) VALUES (?, ?, ?, ?)",
                     ("r", json.dumps({"strategy": strat}), reason, at(when).isoformat()))
    conn.close()
    if spill_lines:
        spill.append(spill.spill_path(str(db)), [tuple(range(22))] * spill_lines)
    return db


class Tables(HTMLParser):
    """Every <table id=...> of a page as rows of cell texts (header row first), and ids of other tags."""

    def __init__(self, page):
        super().__init__()
        self.tables, self.ids, self._cur, self._row, self._cell = {}, set(), None, None, None
        self.feed(page)

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if "id" in a:
            self.ids.add(a["id"])
        if tag == "table":
            self._cur = self.tables.setdefault(a.get("id"), [])
        elif tag == "tr" and self._cur is not None:
            self._row = []
        elif tag in ("td", "th") and self._row is not None:
            self._cell = ""

    def handle_endtag(self, tag):
        if tag in ("td", "th") and self._cell is not None:
            self._row.append(self._cell.strip())
            self._cell = None
        elif tag == "tr" and self._row is not None:
            self._cur.append(self._row)
            self._row = None
        elif tag == "table":
            self._cur = None

    def handle_data(self, data):
        if self._cell is not None:
            self._cell += data

    def body(self, tid):
        return self.tables[tid][1:]

    def keyed(self, tid):
        return {r[0]: r[1:] for r in self.body(tid)}


def cli(*args, env=None):
    try:
        runner = CliRunner(mix_stderr=False)
    except TypeError:
        runner = CliRunner()
    return runner.invoke(main, [str(a) for a in args], env=env, catch_exceptions=False)


def test_json_has_the_exact_numbers(db):
    r = collect(str(build(db)), since=SINCE, now=NOW)
    assert r["period"]["interval_ms"] == 300_000 and r["period"]["interval_count"] == 37
    h = r["health"]
    assert h["signals"] == 9 and h["by_action"] == {"BUY": 5, "SELL": 3, "NEUTRAL": 1}
    assert h["by_sync_status"] == {"synced": 3, "pending": 3, "skipped": 1, "rejected": 1, "failed": 1}
    busy = {iv["start"]: iv for iv in h["intervals"] if iv["total"]}
    assert sorted(busy) == ["2026-01-01T09:10:00+00:00", "2026-01-01T10:10:00+00:00", "2026-01-01T11:10:00+00:00"]
    nine, ten, eleven = (busy[k] for k in sorted(busy))
    assert nine["commits"] == {"BUY": 2, "SELL": 1, "NEUTRAL": 1} and ten["commits"]["BUY"] == 3
    assert nine["time_to_durable_ms"] == {"n": 4, "p50": 300, "p99": 400}
    assert ten["time_to_durable_ms"] == {"n": 3, "p50": 50, "p99": 5000}
    assert eleven["time_to_durable_ms"] == {"n": 2, "p50": 20, "p99": 20}
    assert h["time_to_durable_ms"] == {"n": 9, "p50": 100, "p99": 5000}
    assert nine["sync"] == {"synced": 2, "pending": 1, "skipped": 1, "rejected": 0, "failed": 0}
    assert ten["sync"] == {"synced": 1, "pending": 0, "skipped": 0, "rejected": 1, "failed": 1}
    assert nine["sync_lag_ms"] == {"n": 2, "p50": 3000, "p99": 3000}
    assert h["sync_lag_ms"] == {"n": 3, "p50": 2000, "p99": 3000}
    assert [(e["reason"], e["status"], e["count"]) for e in h["sync_errors"]] == [
        ("HTTP 500", "failed", 1), ("NEUTRAL signals are not synced", "skipped", 1),
        ("connection refused", "pending", 1), ("symbol too long", "rejected", 1)]
    assert h["refused"] == {"total": 3, "top_reasons": [
        {"reason": "signal_id already stored with different content", "count": 2},
        {"reason": "refused by the database", "count": 1}]}
    assert h["pending_now"] == 3 and h["spill_lines"] == 3
    assert h["oldest_pending"] == {"created_at": "2026-01-01T09:10:20+00:00", "age_ms": (2 * 3600 + 49 * 60 + 40) * 1000}
    # empty intervals are listed too, so that a gap shows
    assert sum(1 for iv in h["intervals"] if not iv["total"]) == 34

    q = r["quality"]
    alpha, beta = q["by_strategy"]
    assert alpha == {"strategy": "alpha", "signals": 5, "buy": 4, "sell": 1, "neutral": 0,
                     "mean_confidence": pytest.approx(86.2), "closed": 4, "wins": 2, "losses": 1,
                     "win_rate": pytest.approx(2 / 3), "with_pnl": 4, "mean_pnl_pct": pytest.approx(0.25),
                     "total_pnl_pct": pytest.approx(1.0)}
    assert (beta["signals"], beta["buy"], beta["sell"], beta["neutral"], beta["closed"], beta["win_rate"],
            beta["mean_confidence"], beta["total_pnl_pct"]) == (4, 1, 2, 1, 2, 0.5, 55.25, 1.5)
    # by the signals' own time (timestamp = commit time - the ms above): 09:09:59.9 to 10:10:15,
    # so 2-minute intervals from 09:08
    assert (q["pnl_axis"]["interval_ms"], q["pnl_axis"]["starts"][0][11:19]) == (120_000, "09:08:00")
    assert [(p["end"][11:16], p["cumulative_pnl_pct"]) for p in q["cumulative_pnl"]["alpha"]] == [
        ("09:10", 2.0), ("09:12", 3.0), ("10:10", 1.0), ("10:12", 1.0)]
    assert [p["cumulative_pnl_pct"] for p in q["cumulative_pnl"]["beta"]] == [-1.5, 1.5]
    decided = [(c["low"], c["decided"], c["wins"], c["win_rate"]) for c in q["calibration"] if c["decided"]]
    assert decided == [(60, 2, 1, 0.5), (80, 1, 1, 1.0), (90, 2, 1, 0.5)]
    dist = q["pnl_distribution"]
    assert (dist["n"], dist["bin_width"], dist["bins"][0]["low"], len(dist["bins"])) == (6, 0.25, -2.0, 21)
    assert [b["low"] for b in dist["bins"] if b["count"]] == [-2.0, -1.5, 0.0, 1.0, 2.0, 3.0]


def test_page_tables_show_the_same_numbers_rounded(db):
    page = Tables(render(collect(str(build(db)), since=SINCE, now=NOW)))
    summary = {**page.keyed("t-summary"), **page.keyed("t-state")}
    assert summary["signals committed in the period"] == ["9"]
    assert summary["time to durable p50"] == ["100 ms"] and summary["time to durable p99"] == ["5.00 s"]
    assert summary["sync lag p50"] == ["2.00 s"] and summary["pending now (whole database)"] == ["3"]
    assert summary["oldest pending (UTC)"] == ["2026-01-01 09:10:20"] and summary["oldest pending age"] == ["2.8 h"]
    assert summary["refused rows (rejected_signals)"] == ["3"] and summary["spill lines waiting"] == ["3"]
    commits = page.keyed("t-commits")
    assert len(commits) == 37  # every interval, empty ones included
    assert commits["2026-01-01 09:10"] == ["2", "1", "1", "4"]
    assert commits["2026-01-01 10:10"] == ["3", "0", "0", "3"] and commits["2026-01-01 09:15"] == ["0", "0", "0", "0"]
    assert page.keyed("t-durable") == {"2026-01-01 09:10": ["4", "300 ms", "400 ms"],
                                       "2026-01-01 10:10": ["3", "50 ms", "5.00 s"],
                                       "2026-01-01 11:10": ["2", "20 ms", "20 ms"]}
    sync = page.keyed("t-sync")
    assert sync["2026-01-01 09:10"] == ["50.0% (2)", "25.0% (1)", "25.0% (1)", "0.0% (0)", "0.0% (0)"]
    assert sync["2026-01-01 10:10"] == ["33.3% (1)", "0.0% (0)", "0.0% (0)", "33.3% (1)", "33.3% (1)"]
    assert page.keyed("t-lag") == {"2026-01-01 09:10": ["2", "3.00 s", "3.00 s"],
                                   "2026-01-01 10:10": ["1", "2.00 s", "2.00 s"]}
    assert page.body("t-errors")[0] == ["HTTP 500", "failed", "1"]
    assert page.body("t-refusals") == [["signal_id already stored with different content", "2"],
                                       ["refused by the database", "1"]]
    strategies = page.keyed("t-strategies")
    assert strategies["alpha"] == ["5", "4", "1", "0", "86.2", "4", "2", "1", "66.7%", "0.25", "1.00"]
    assert strategies["beta"] == ["4", "1", "2", "1", "55.2", "2", "1", "1", "50.0%", "0.75", "1.50"]
    assert page.keyed("t-cumulative") == {"alpha": ["4", "1.00", "1.00", "3.00"], "beta": ["2", "1.50", "-1.50", "1.50"]}
    assert page.keyed("t-calibration") == {"60–70": ["2", "1", "50.0%"], "80–90": ["1", "1", "100.0%"],
                                           "90–100": ["2", "1", "50.0%"]}
    pnl = [r for r in page.body("t-pnl") if r[2] != "0"]
    assert pnl == [["-2.00", "-1.75", "1"], ["-1.50", "-1.25", "1"], ["0.00", "0.25", "1"],
                   ["1.00", "1.25", "1"], ["2.00", "2.25", "1"], ["3.00", "3.25", "1"]]


def test_per_symbol_on_demand(db, tmp_path):
    build(db)
    assert "by_symbol" not in collect(str(db), now=NOW)["quality"]
    data = json.loads(cli("report", "--db", db, "--json", "--per-symbol").stdout)
    aapl, msft = data["quality"]["by_symbol"]
    assert (aapl["symbol"], aapl["signals"], aapl["closed"], aapl["wins"], aapl["losses"]) == ("AAPL", 5, 4, 1, 2)
    assert (aapl["mean_confidence"], aapl["total_pnl_pct"], aapl["mean_pnl_pct"]) == (82.2, -1.5, -0.375)
    out = tmp_path / "r.html"
    assert cli("report", "--db", db, "--out", out, "--per-symbol").exit_code == 0
    page = Tables(out.read_text())
    assert page.keyed("t-symbols") == {
        "AAPL": ["5", "3", "2", "0", "82.2", "4", "1", "2", "33.3%", "-0.38", "-1.50"],
        "MSFT": ["4", "2", "1", "1", "60.2", "2", "2", "0", "100.0%", "2.00", "4.00"]}
    assert "t-symbols" not in Tables(render(collect(str(db), now=NOW))).tables


def test_page_is_self_contained_and_says_utc(db):
    page = render(collect(str(build(db)), since=SINCE, now=NOW))
    assert page.count("<svg") == 7  # commits, durable, shares, lag, cumulative, calibration, P/L
    lowered = page.lower()
    for fetch in ("<script", "<link", "<img", "src=", "@import", "@font-face"):
        assert fetch not in lowered, fetch
    assert not re.findall(r"url\((?!#)|href=\"(?!#)", page)  # only references inside the page
    assert set(re.findall(r"https?://[^\s\"'<>)]+", page)) == {"http://www.w3.org/2000/svg",
                                                          "http://www.w3.org/1999/xlink"}  # namespaces
    assert "All times are UTC" in page and "09:00:00.000 to 2026-01-01 12:00:00.000 UTC" in page


def test_the_page_says_which_figures_use_commit_time_and_leaves_simulated_time_out_of_durable(db):
    assert cli("demo", "--db", db, "--count", 30, "--quiet", "--no-sync").exit_code == 0
    with SignalTracker(db, register_atexit=False) as t:   # one signal stamped by the library
        t.log_signal(make_signal(1, outcome="win", profit_loss_pct=1.0))
    r = collect(str(db))
    assert r["health"]["simulated_time_signals"] == 30 and r["health"]["time_to_durable_ms"]["n"] == 1
    axis = r["quality"]["pnl_axis"]  # the demo's session: hours, not the run's second
    assert axis["interval_count"] * axis["interval_ms"] >= 6 * 3600 * 1000 > r["period"]["interval_count"] * r["period"]["interval_ms"]
    page = render(r)
    assert "Pipeline health is by commit time (created_at)" in page
    assert "The 30 signals of argo-signals demo in this period carry simulated timestamps" in page
    assert "Cumulative P/L % per strategy (by the signal&#x27;s own time)" in page


def test_a_timestamp_another_program_wrote_as_junk_does_not_stop_the_pnl_axis(db):
    build(db)
    conn = store.connect(str(db))
    conn.execute("INSERT INTO signals (signal_id, symbol, action, entry_price, confidence, strategy, timestamp, "
                 "sha256, created_at, sync_status, sync_attempts, profit_loss_pct) VALUES ('junk', 'X', 'BUY', 1, "
                 "50, 'alpha', 'zzz not a time', 'x', '2026-01-01T10:00:00+00:00', 'pending', 0, 5.0)")
    conn.close()
    q = collect(str(db), since=SINCE, now=NOW)["quality"]
    assert q["pnl_axis"]["starts"][0][11:19] == "09:08:00"   # the junk is not the axis' end
    assert [p["cumulative_pnl_pct"] for p in q["cumulative_pnl"]["alpha"]] == [2.0, 3.0, 1.0, 1.0]


def test_strategy_filter_and_relative_since(db):
    build(db)
    r = collect(str(db), since="3h", strategy="beta", now=NOW)
    assert r["period"]["since"] == SINCE
    assert r["health"]["signals"] == 4 and [s["strategy"] for s in r["quality"]["by_strategy"]] == ["beta"]
    assert r["health"]["refused"]["total"] == 1 and r["health"]["pending_now"] == 2
    later = collect(str(db), since="2026-01-01T11:00:00", now=NOW)  # naive ISO is UTC
    assert later["health"]["signals"] == 2 and later["health"]["refused"]["total"] == 0
    assert parse_since("90m", NOW) == NOW - timedelta(minutes=90) and parse_since("1w", NOW) == NOW - timedelta(days=7)
    with pytest.raises(ReportError, match="--since"):
        collect(str(db), since="yesterday")


def test_overall_percentiles_when_sqlite_counts_them(db, monkeypatch):
    build(db)
    merged = collect(str(db), since=SINCE, now=NOW)
    monkeypatch.setattr(report, "_MERGE_LIMIT", 2)  # too many distinct values to merge in Python
    counted = collect(str(db), since=SINCE, now=NOW)
    assert counted["health"]["time_to_durable_ms"] == merged["health"]["time_to_durable_ms"] == \
        {"n": 9, "p50": 100, "p99": 5000}
    assert counted["health"]["sync_lag_ms"] == {"n": 3, "p50": 2000, "p99": 3000}


def test_since_in_the_future_and_negative_durations(db, tmp_path):
    build(db, signals=[("09:10:00", -1500, "BUY", "a", 80, "pending", None, None, None, None),
                       ("09:10:01", -20, "BUY", "a", 80, "pending", None, None, None, None)], refused=[])
    r = collect(str(db), since="2099-01-01", now=NOW)
    assert r["period"]["interval_count"] == 1 and r["health"]["signals"] == 0
    r = collect(str(db), now=NOW)
    assert r["health"]["time_to_durable_ms"] == {"n": 2, "p50": -20, "p99": -20}
    page = Tables(render(r))
    assert list(page.keyed("t-durable").values()) == [["1", "-1.50 s", "-1.50 s"], ["1", "-20 ms", "-20 ms"]]
    assert cli("report", "--db", db, "--since", "2099-01-01", "--out", tmp_path / "f.html").exit_code == 0


def test_empty_database_page_says_so(db, tmp_path):
    conn = store.connect(str(db))
    store.ensure_schema(conn)
    conn.close()
    data = collect(str(db))
    assert data["health"]["signals"] == 0 and data["quality"]["by_strategy"] == []
    assert data["health"]["oldest_pending"] is None and data["quality"]["pnl_distribution"]["n"] == 0
    out = tmp_path / "empty.html"
    r = cli("report", "--db", db, "--out", out)
    assert r.exit_code == 0 and r.output.strip() == str(out)
    page = Tables(out.read_text())
    assert {"empty-health", "empty-quality"} <= page.ids and "<svg" not in out.read_text()
    assert page.keyed("t-summary")["signals committed in the period"] == ["0"]
    assert page.keyed("t-state")["oldest pending (UTC)"] == ["none"]


def test_database_without_outcomes(db, tmp_path):
    with SignalTracker(db, register_atexit=False) as t:
        for i in range(20):
            t.log_signal(make_signal(i))
    out = tmp_path / "r.html"
    r = cli("report", "--db", db, "--out", out)
    assert r.exit_code == 0, r.output
    text = out.read_text()
    page = Tables(text)
    assert "empty-outcomes" in page.ids and NO_OUTCOMES in text
    assert page.keyed("t-strategies")["momentum"][:9] == ["20", "13", "7", "0", "59.5", "0", "0", "0", "–"]
    assert page.keyed("t-commits") and text.count("<svg") == 3  # commits, durable, shares; no lag, no outcomes
    assert "empty-lag" in page.ids


def test_cli_json_and_page_from_a_real_tracker_with_outcomes(db, tmp_path):
    with SignalTracker(db, register_atexit=False) as t:
        ids = [t.log_signal(make_signal(i, strategy="s1" if i < 6 else "s2")) for i in range(10)]
        for sid, (outcome, pnl) in zip(ids, [("win", 1.5), ("loss", -1.0), ("win", 0.5), ("win", 2.0)]):
            t.update_signal(sid, outcome=outcome, exit_price=101.0, profit_loss_pct=pnl)
    r = cli("report", "--db", db, "--json")
    data = json.loads(r.stdout)
    s1 = data["quality"]["by_strategy"][0]
    assert (s1["strategy"], s1["signals"], s1["closed"], s1["wins"], s1["losses"]) == ("s1", 6, 4, 3, 1)
    assert s1["total_pnl_pct"] == 3.0 and s1["win_rate"] == 0.75
    assert data["health"]["by_sync_status"]["pending"] == 10 and data["health"]["spill_lines"] == 0
    out = tmp_path / "sub" / "page.html"
    out.parent.mkdir()
    r = cli("report", "--db", db, "--out", out, "--strategy", "s1")
    page = Tables(out.read_text())
    assert list(page.keyed("t-strategies")) == ["s1"] and page.keyed("t-strategies")["s1"][8] == "75.0%"


def test_names_from_the_database_are_escaped(db):
    build(db, signals=[("09:10:00", 5, "BUY", "<script>x</script>", 80, "rejected", "<img src=x>", None,
                        "win", 1.0)], refused=[], spill_lines=0)
    page = render(collect(str(db), now=NOW))
    assert "<script>" not in page and "&lt;script&gt;" in page and "<img" not in page


def test_errors_are_messages_not_tracebacks(tmp_path):
    assert "report" in cli("--help").output and "--per-symbol" in cli("report", "--help").output
    r = cli("report", "--db", tmp_path / "none.db")
    assert r.exit_code == 1 and "no database at" in r.stderr
    (tmp_path / "other.db").write_bytes(b"")
    r = cli("report", "--db", tmp_path / "other.db", "--json")
    assert r.exit_code == 1 and "is not an argo-signals database" in r.stderr
    build(tmp_path / "ok.db")
    r = cli("report", "--db", tmp_path / "ok.db", "--since", "soon")
    assert r.exit_code == 1 and "--since" in r.stderr


BLOCK = "import sys; sys.modules['matplotlib'] = None\nfrom argo_signals.cli import main\nmain()\n"


def test_without_matplotlib_the_page_names_the_extra_and_json_still_works(db, tmp_path):
    build(db)
    out = tmp_path / "r.html"
    r = run_script(BLOCK, "report", "--db", db, "--out", out)
    assert r.returncode == 1 and "pip install 'argo-signals[report]'" in r.stderr, r.stderr
    assert "Traceback" not in r.stderr and not out.exists()
    r = run_script(BLOCK, "report", "--db", db, "--json")
    assert r.returncode == 0 and json.loads(r.stdout)["health"]["signals"] == 9
    r = run_script(BLOCK, "demo", "--db", tmp_path / "demo.db", "--count", 40, "--quiet", "--no-sync")
    assert r.returncode == 0 and r.stdout.splitlines()[-1] == (
        f"see it all on one page: argo-signals report --db {tmp_path / 'demo.db'} --open "
        "(first: pip install 'argo-signals[report]')")


def test_open_hands_the_file_to_the_browser(db, tmp_path):
    build(db)
    seen = tmp_path / "seen.txt"
    browser = tmp_path / "browser"
    browser.write_text(f"#!{sys.executable}\nimport sys\nopen({str(seen)!r}, 'w').write(sys.argv[1])\n")
    browser.chmod(browser.stat().st_mode | stat.S_IEXEC)
    out = tmp_path / "r.html"
    r = run_script("from argo_signals.cli import main\nmain()\n", "report", "--db", db, "--out", out, "--open",
                   env={"BROWSER": f"{browser} %s", "DISPLAY": ""})
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == str(out) and seen.read_text() == out.as_uri()


def test_demo_closes_a_share_with_confidence_tracking_win_rate(tmp_path):
    assert win_probability(90, "momentum") > win_probability(60, "momentum") > win_probability(30, "momentum")
    db = tmp_path / "demo.db"
    r = cli("demo", "--db", db, "--count", 4000, "--quiet", "--json", "--no-sync")
    data = json.loads(r.stdout)
    closed = data["closed"]["wins"] + data["closed"]["losses"]
    assert 0.45 * 4000 < closed < 0.65 * 4000
    q = collect(str(db))["quality"]
    assert sum(s["closed"] for s in q["by_strategy"]) == closed  # every update landed
    assert sum(s["wins"] for s in q["by_strategy"]) == data["closed"]["wins"]

    def rate(bands):
        return sum(c["wins"] for c in bands) / sum(c["decided"] for c in bands)
    low = [c for c in q["calibration"] if c["high"] <= 70]
    high = [c for c in q["calibration"] if c["low"] >= 80]
    assert rate(high) > rate(low) + 0.05  # expected gap about 0.14, more than 5 standard errors
    r = cli("demo", "--db", tmp_path / "d2.db", "--count", 30, "--quiet")
    assert r.output.splitlines()[-1] == f"see it all on one page: argo-signals report --db {tmp_path / 'd2.db'} --open"


def test_figures_come_from_one_snapshot_while_a_writer_commits(db):
    build(db, spill_lines=0)
    writer = spawn_script("""
        import sqlite3, sys, time
        conn = sqlite3.connect(sys.argv[1], isolation_level=None)
        conn.execute("PRAGMA busy_timeout = 5000")
        print("ready", flush=True)
        i = 0
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            i += 1
            conn.execute("INSERT INTO signals (signal_id, symbol, action, entry_price, confidence, strategy, "
                         "timestamp, sha256, created_at, sync_status, sync_attempts, outcome, profit_loss_pct) "
                         "VALUES (?, 'X', 'BUY', 1.0, 70.0, 'gamma', '2026-01-01T11:59:00+00:00', 'x', "
                         "'2026-01-01T11:59:00.5+00:00', 'pending', 0, 'win', 1.0)", (f"w{i}",))
        """, db)
    try:
        assert writer.stdout.readline().strip() == "ready"
        mismatches = 0
        for _ in range(15):
            r = collect(str(db), now=NOW)
            per_strategy = sum(s["signals"] for s in r["quality"]["by_strategy"])
            per_interval = sum(iv["total"] for iv in r["health"]["intervals"])
            mismatches += not (per_strategy == per_interval == r["health"]["signals"]
                               == r["health"]["time_to_durable_ms"]["n"])
        assert mismatches == 0
    finally:
        writer.kill()
        writer.wait(10)


def test_odd_database_file_names_and_unwritable_out(tmp_path):
    db = build(tmp_path / "a#b?c%20.db", spill_lines=0)
    assert collect(str(db), now=NOW)["health"]["signals"] == 9
    r = cli("report", "--db", db, "--out", tmp_path / "no" / "such" / "dir" / "r.html")
    assert r.exit_code == 1 and "cannot write" in r.stderr
