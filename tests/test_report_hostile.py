"""argo-signals report on whatever is stored: names matplotlib would read as markup, numbers at
the edge of the float range, values written by other programs, bin edges, many strategies."""
import json
import sqlite3

from argo_signals.report import collect
from test_report import NOW, Tables, build, cli


def strict_json(text):
    def refuse(token):
        raise AssertionError(f"{token} is not JSON (RFC 8259)")
    return json.loads(text, parse_constant=refuse)


def one(created="09:10:00", strategy="alpha", pnl=1.0, outcome="win", action="BUY"):
    return (created, 100, action, strategy, 80, "synced", None, 1000, outcome, pnl)


def test_whatever_is_stored_is_counted_drawn_literally_and_valid_json(db, tmp_path):
    # names matplotlib would read as math, totals past the float range, and other programs' values
    build(db, signals=[one(), one("09:20:00", pnl=2.0), one("09:21:00", "$x_y_z$", 0.5),
                       one("09:22:00", "a^b_{c}", 1e308), one("09:23:00", "a^b_{c}", 1e308),
                       one("09:24:00", "beta", -1e308)], refused=[], spill_lines=0)
    conn = sqlite3.connect(db)
    base = ("INSERT INTO signals (signal_id, symbol, action, entry_price, confidence, strategy, timestamp, sha256, "
            "created_at, sync_status, sync_attempts, outcome, profit_loss_pct) VALUES (?, 'AAPL', ?, 1.0, ?, ?, "
            "'2026-01-01T09:00:00+00:00', 'x', ?, 'pending', 0, ?, ?)")
    good_time = "2026-01-01T09:30:00+00:00"
    conn.executemany(base, [
        ("f1", "BUY", 50.0, "alpha", good_time, "win", 1.0),                     # strategy: bad UTF-8 (below)
        ("f2", "BUY", 50.0, sqlite3.Binary(b"\x00\x01"), good_time, "win", 1.0),  # strategy: a BLOB
        ("f3", "BUY", 50.0, "alpha", "9999-12-31T23:59:59+00:00", "win", 1.0),  # far future
        ("f4", "BUY", 50.0, "alpha", "0001-01-01T00:00:00+00:00", "win", 1.0),  # year 1
        ("f5", "BUY", 50.0, "alpha", "yesterday", "win", 1.0),                   # not a date
        ("f6", "BUY", 50.0, "alpha", sqlite3.Binary(b"\x07"), "win", 1.0),       # a BLOB date
        ("f7", "BUY", 50.0, "alpha", good_time, "win", float("inf")),            # +Inf P/L
        ("f8", "SELL", float("-inf"), "alpha", good_time, "loss", float("-inf")),  # -Inf P/L and confidence
        ("f9", sqlite3.Binary(b"B"), 50.0, "alpha", good_time, None, None),      # a BLOB action
    ])
    conn.execute("UPDATE signals SET strategy = CAST(x'fffe626164' AS TEXT), symbol = CAST(x'c328' AS TEXT) "
                 "WHERE signal_id = 'f1'")  # text that is not UTF-8 (a Python bytes value is stored as a BLOB)
    conn.commit()
    conn.close()
    r = cli("report", "--db", db, "--json")
    assert r.exit_code == 0, r.stderr
    data = strict_json(r.stdout)
    foreign = data["foreign"]
    assert foreign["unplaced_rows"] == 4, foreign  # f3-f6: their created_at is no time the report can place
    assert foreign["created_at"]["count"] == 4 and "yesterday" in foreign["created_at"]["examples"]
    assert foreign["profit_loss_pct"]["count"] == 2 and foreign["confidence"]["count"] == 1
    assert foreign["strategy"]["count"] == 2 and foreign["action"]["count"] == 1
    assert data["health"]["signals"] == 6 + 5  # f1, f2, f7, f8, f9 are placed
    assert data["quality"]["pnl_distribution"]["n"] == 8  # the infinities are not binned
    by = {s["strategy"]: s for s in data["quality"]["by_strategy"]}
    assert by["a^b_{c}"]["total_pnl_pct"] == "Infinity"  # 2e308 overflows a double: said, not hidden
    assert by["beta"]["total_pnl_pct"] == -1e308
    names = {s["strategy"] for s in data["quality"]["by_strategy"]}
    assert "x'0001'" in names and "\\xff\\xfebad" in names
    out = tmp_path / "r.html"
    r = cli("report", "--db", db, "--out", out)
    assert r.exit_code == 0, r.stderr
    page = Tables(out.read_text())
    foreign = page.keyed("t-foreign")
    assert foreign["rows the report could not place in time"][0] == "4"
    placed = foreign["created_at not a time from 1970 to a year ahead (row not placed)"]
    assert placed[0] == "4" and "yesterday" in placed[1]
    assert {"x'0001'", "$x_y_z$", "a^b_{c}", "beta"} <= set(page.keyed("t-strategies"))


def test_histogram_bins_are_exact_at_their_edges(db):
    values = [round(k * 0.1, 10) for k in range(21)]  # 0.0 .. 2.0: every value on an edge of step 0.1
    build(db, signals=[one(f"09:{k:02d}:00", pnl=v) for k, v in enumerate(values)], refused=[], spill_lines=0)
    dist = collect(str(db), now=NOW)["quality"]["pnl_distribution"]
    assert dist["bin_width"] == 0.1
    assert [b["low"] for b in dist["bins"]] == values
    assert [b["count"] for b in dist["bins"]] == [1] * 21


def test_many_strategies_show_the_top_and_sum_the_rest(db, tmp_path):
    signals = [one(f"09:{k % 60:02d}:{k // 60 % 60:02d}", f"s{k:04d}", 1.0) for k in range(1500)]
    signals += [one("10:00:00", "big", 2.0)] * 3
    build(db, signals=[(*s[:3], s[3], *s[4:]) for s in signals], refused=[], spill_lines=0)
    conn = sqlite3.connect(db)
    conn.execute("UPDATE signals SET signal_id = 'id' || id")
    conn.commit()
    conn.close()
    data = strict_json(cli("report", "--db", db, "--json").stdout)
    assert len(data["quality"]["by_strategy"]) == 1501  # the full table is in --json
    out = tmp_path / "r.html"
    assert cli("report", "--db", db, "--out", out, "--top", 5).exit_code == 0
    page = Tables(out.read_text())
    shown = page.keyed("t-strategies")
    assert len(shown) == 6 and shown["big"][0] == "3"
    assert shown["other (1496 strategies)"][0] == "1496"
    assert len(page.keyed("t-cumulative")) == 6


def test_numbers_where_names_belong_stay_valid_json(tmp_path):
    db = tmp_path / "typeless.db"  # another program's table without column types: floats stay floats
    conn = sqlite3.connect(db)
    conn.execute("CREATE TABLE signals (id INTEGER PRIMARY KEY, signal_id, symbol, action, entry_price, confidence, "
                 "strategy, timestamp, sha256, sync_status, created_at, outcome, profit_loss_pct, synced_at, sync_error)")
    conn.execute("INSERT INTO signals (signal_id, symbol, action, entry_price, confidence, strategy, timestamp, "
                 "sha256, sync_status, created_at, outcome, profit_loss_pct) VALUES ('a', 'X', ?, 1, 50, ?, "
                 "'2026-01-01T09:00:00+00:00', 'h', ?, '2026-01-01T09:00:01+00:00', 'win', 1.0)",
                 (float("-inf"), float("inf"), float("nan")))
    conn.commit()
    conn.close()
    r = cli("report", "--db", db, "--json")
    assert r.exit_code == 0, r.stderr
    data = strict_json(r.stdout)
    assert data["health"]["by_action"]["-Infinity"] == 1
    assert data["foreign"]["action"]["examples"] == ["-Infinity"]


def test_the_signal_time_axis_leaves_out_foreign_timestamps_and_sums_the_rest_as_other(db):
    build(db, signals=[one("09:10:00", "a", 1.0), one("09:20:00", "b", 2.0), one("09:30:00", "c", 4.0)],
          refused=[], spill_lines=0)
    conn = sqlite3.connect(db)
    conn.execute("UPDATE signals SET timestamp = '9999-12-31T23:59:59+00:00' WHERE strategy = 'a'")
    conn.execute("UPDATE signals SET timestamp = 'soon' WHERE strategy = 'b'")
    conn.commit()
    conn.close()
    data = collect(str(db), now=NOW, top=1)
    q = data["quality"]
    assert data["foreign"]["timestamp"]["count"] == 2 and "soon" in data["foreign"]["timestamp"]["examples"]
    assert q["pnl_axis"]["interval_count"] >= 1 and q["pnl_axis"]["starts"][0].startswith("2026-01-01T09:")
    assert sum(s["with_pnl"] for s in q["by_strategy"]) == 3  # the rows still count per strategy
    on_axis = [p for points in q["cumulative_pnl"].values() for p in points] + q["cumulative_pnl_other"]
    assert sum(p["closed"] for p in on_axis) == 1 and on_axis[0]["pnl_pct"] == 4.0
