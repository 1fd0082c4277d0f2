"""`argo-signals bench` runs end to end (tiny sizes) and reports every figure it promises.
Speed is measured by the benchmark, not asserted here."""
import json

from click.testing import CliRunner

from argo_signals.cli import main

KEYS = ["e2e_rows_per_s", "raw_rows_per_s", "e2e_vs_raw", "naive_rows_per_s", "e2e_vs_naive",
        "log_signal_p50_us", "log_signal_p99_us", "queuehandler_p50_us", "log_signal_vs_queuehandler",
        "sync_signals_per_s", "sync_backlog_drain_s", "e2e_full_rows_per_s", "e2e_random_ids_rows_per_s",
        "insert_all_rows_per_s", "requests_ceiling_per_s"]
KEYS += ["log_signal_p50_us_scraped", "log_signal_p50_us_unscraped", "scrapes_per_s"]  # metrics scraped or not


def test_bench_json_has_every_figure():
    r = CliRunner().invoke(main, ["bench", "--signals", "600", "--repeat", "1", "--sync-signals", "40",
                                  "--backlog", "60", "--json", "--quiet"], catch_exceptions=False)
    assert r.exit_code == 0, r.output
    data = json.loads(r.output)
    for k in KEYS:
        assert isinstance(data[k], (int, float)) and data[k] > 0, k
    assert abs(data["e2e_vs_raw"] - data["e2e_rows_per_s"] / data["raw_rows_per_s"]) < 0.002
    assert set(data["goals"]) >= {"e2e_vs_raw", "e2e_vs_naive", "log_signal_vs_queuehandler"}


def test_bench_table():
    r = CliRunner().invoke(main, ["bench", "--signals", "300", "--repeat", "1", "--sync-signals", "20",
                                  "--backlog", "30", "--quiet"], catch_exceptions=False)
    assert r.exit_code == 0 and "end-to-end vs raw executemany" in r.output and "goal" in r.output
