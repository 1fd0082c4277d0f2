"""`argo-signals bench` runs end to end (tiny sizes) and reports every figure it promises.
Speed is measured by the benchmark, not asserted here."""
import json

from click.testing import CliRunner

from argo_signals.cli import main

KEYS = ["e2e_rows_per_s", "raw_rows_per_s", "e2e_vs_raw", "naive_rows_per_s", "e2e_vs_naive",
        "log_signal_p50_us", "log_signal_p99_us", "queuehandler_p50_us", "log_signal_vs_queuehandler",
        "sync_signals_per_s", "sync_backlog_drain_s", "e2e_full_rows_per_s", "e2e_random_ids_rows_per_s",
        "insert_all_rows_per_s", "requests_ceiling_per_s", "stage_validate_us", "stage_normalise_id_us",
        "stage_hash_us", "stage_row_build_us", "stage_bind_step_us", "stage_handoff_us", "stage_total_us",
        "strategy_rate_1k", "strategy_rate_5k", "queuehandler_rate_5k", "strategy_cpu_us_5k", "queuehandler_cpu_us_5k", "e2e_us_per_row", "raw_us_per_row"]
SLOWDOWNS = ["strategy_slowdown_1k", "strategy_slowdown_5k", "queuehandler_slowdown_1k",
             "queuehandler_slowdown_5k", "noop_logger_slowdown_5k"]
KEYS += ["log_signal_p50_us_scraped", "log_signal_p50_us_unscraped", "scrapes_per_s"]  # metrics scraped or not


def test_bench_json_has_every_figure():
    r = CliRunner().invoke(main, ["bench", "--signals", "600", "--repeat", "1", "--sync-signals", "40",
                                  "--backlog", "60", "--slowdown-pairs", "1", "--json", "--quiet"],
                            catch_exceptions=False)
    assert r.exit_code == 0, r.output
    data = json.loads(r.stdout)
    for k in KEYS:
        assert isinstance(data[k], (int, float)) and data[k] > 0, k
    for k in SLOWDOWNS:  # a difference of two noisy speeds: any sign
        assert isinstance(data[k], (int, float)) and -100 < data[k] < 100, k
    stages = [data[f"stage_{k}_us"] for k in ("validate", "normalise_id", "hash", "row_build", "bind_step", "handoff")]
    assert abs(sum(stages) - data["stage_total_us"]) < 0.01
    assert abs(data["e2e_vs_raw"] - data["e2e_rows_per_s"] / data["raw_rows_per_s"]) < 0.002
    assert set(data["goals"]) >= {"e2e_vs_raw", "e2e_vs_naive", "log_signal_vs_queuehandler",
                                  "strategy_slowdown_1k", "strategy_slowdown_5k"}


def test_bench_only_runs_the_parts_asked_for():
    r = CliRunner().invoke(main, ["bench", "--signals", "300", "--repeat", "1", "--only", "stages", "--json", "--quiet"],
                           catch_exceptions=False)
    assert r.exit_code == 0, r.output
    data = json.loads(r.stdout)
    assert data["stage_total_us"] > 0 and "e2e_rows_per_s" not in data and "sync_signals_per_s" not in data
    assert data["params"]["sections"] == ["stages"] and data["goals"] == {}


def test_bench_table():
    r = CliRunner().invoke(main, ["bench", "--signals", "300", "--repeat", "1", "--sync-signals", "20",
                                  "--backlog", "30", "--slowdown-pairs", "1", "--quiet"], catch_exceptions=False)
    assert r.exit_code == 0 and "end-to-end vs raw executemany" in r.output and "goal" in r.output
    assert "stage budget" in r.output and "strategy slowdown" in r.output
