"""Alpine sync against a real loopback HTTP server that speaks the contract."""
import json
import logging
import os
import pty
import re
import select
import subprocess
import sys
import time
from decimal import Decimal
from pathlib import Path

import pytest

from argo_signals import SignalTracker
from argo_signals.sync import parse_retry_after

from argo_signals.testing import SIGNAL_PATH, AlpineServer, free_port
from conftest import count, make_signal, rows, run_script, wait_for

KEY = "test-key-123"
FAST = dict(batch_size=10, batch_timeout=0.05, flush_interval=0.2, register_atexit=False,
            sync_timeout=(1.0, 1.0), sync_shutdown_timeout=1.0, sync_retry_budget=3.0)


@pytest.fixture
def alpine():
    server = AlpineServer(KEY).start()
    yield server
    server.stop()


def tracker(db, server, **kw):
    t = SignalTracker(db, alpine_url=server.url if server else None, api_key=KEY, **{**FAST, **kw})
    if t._syncer is not None:  # short redelivery delays so tests need no long sleeps
        t._syncer.config.redelivery_base = 0.1
        t._syncer.config.max_backoff = 0.2
    return t


def statuses(db):
    return {r["signal_id"]: r["sync_status"] for r in rows(db)}


def all_settled(db, n):
    s = statuses(db)
    return len(s) == n and all(v in ("synced", "skipped", "rejected") for v in s.values())


def test_every_buy_sell_arrives_once_and_is_synced(db, alpine):
    with tracker(db, alpine) as t:
        ids = [t.log_signal(make_signal(i)) for i in range(60)]
        neutral = t.log_signal(make_signal(99, action="NEUTRAL"))
        assert wait_for(lambda: all_settled(db, 61), 10)
    st = statuses(db)
    assert all(st[i] == "synced" for i in ids) and st[neutral] == "skipped"
    assert sorted(alpine.stored_ids()) == sorted(ids)
    assert alpine.duplicates == 0
    assert all(r["synced_at"] for r in rows(db) if r["sync_status"] == "synced")


@pytest.mark.parametrize("price", [190, 190.25, Decimal("190.125"), "191.5"])
def test_receiver_hash_check_passes_for_every_number_type(db, alpine, price):
    with tracker(db, alpine) as t:
        t.log_signal(make_signal(1, entry_price=price, target_price=price, stop_price=None))
        assert wait_for(lambda: all_settled(db, 1), 10)
    assert list(statuses(db).values()) == ["synced"]


def test_500s_and_429_are_retried_and_retry_after_respected(db, alpine):
    alpine.fail(500, times=2)
    alpine.fail(429, headers={"Retry-After": "1"})
    with tracker(db, alpine, sync_workers=1) as t:
        t.log_signal(make_signal(1))
        assert wait_for(lambda: all_settled(db, 1), 15)
        assert t.stats()["sync_retries"] >= 2   # (the 429 ends the claim: the whole sync waits)
    times = [r["time"] for r in alpine.requests]
    assert len(times) == 4
    assert times[3] - times[2] >= 0.95  # the Retry-After: 1 floor
    assert list(statuses(db).values()) == ["synced"]


def test_422_and_400_are_rejected_without_retries(db, alpine):
    alpine.fail(422, body={"detail": [{"msg": "bad"}]})
    alpine.fail(400, body={"detail": "Signal hash verification failed"})
    with tracker(db, alpine, sync_workers=1) as t:
        t.log_signal(make_signal(1))
        assert wait_for(lambda: all_settled(db, 1), 10)
        t.log_signal(make_signal(2))
        assert wait_for(lambda: all_settled(db, 2), 10)
    got = rows(db)
    assert [r["sync_status"] for r in got] == ["rejected", "rejected"]
    assert got[0]["sync_error"].startswith("HTTP 422") and "hash verification" in got[1]["sync_error"]
    assert len(alpine.requests) == 2


def test_refused_locally_without_a_request(db, alpine):
    with tracker(db, alpine) as t:
        t.log_signal(make_signal(1, reasoning="too short"))
        t.log_signal(make_signal(2, symbol="X" * 21))
        assert wait_for(lambda: all_settled(db, 2), 10)
    assert [r["sync_status"] for r in rows(db)] == ["rejected", "rejected"]
    assert "reasoning" in rows(db)[0]["sync_error"]
    assert alpine.requests == []


def test_outage_heals_with_nothing_lost_and_nothing_stored_twice(db):
    port = free_port()
    server = AlpineServer(KEY, port=port)  # down at first: connections refused
    try:
        with tracker(db, server, sync_retry_budget=0.5) as t:
            t._syncer.config.alpine_url = f"http://127.0.0.1:{port}"
            ids = [t.log_signal(make_signal(i)) for i in range(40)]
            assert t.flush(5)
            assert wait_for(lambda: t._syncer.breaker.is_open, 10)
            assert all(s == "pending" for s in statuses(db).values())
            assert all(r["sync_attempts"] == 0 for r in rows(db))  # an outage is not the rows' fault
            server.start()
            assert wait_for(lambda: all_settled(db, 40), 20)
        assert sorted(server.stored_ids()) == sorted(ids)
        assert len(server.stored_ids()) == len(set(server.stored_ids())) == 40
    finally:
        server.stop()


def test_closed_during_outage_rows_stay_pending_and_next_tracker_syncs(db):
    port = free_port()
    server = AlpineServer(KEY, port=port)
    url = f"http://127.0.0.1:{port}"
    t = SignalTracker(db, alpine_url=url, api_key=KEY, **{**FAST, "sync_retry_budget": 0.3})
    ids = [t.log_signal(make_signal(i)) for i in range(20)]
    assert t.close(10)
    assert all(s == "pending" for s in statuses(db).values())
    assert all(r["sync_claim"] is None for r in rows(db))
    server.start()
    try:
        t2 = SignalTracker(db, alpine_url=url, api_key=KEY, **{**FAST, "sync_retry_budget": 0.3})
        # starting the tracker is enough: no new signal, no explicit call
        assert wait_for(lambda: all_settled(db, 20), 20)
        t2.close(5)
        assert sorted(server.stored_ids()) == sorted(ids)
    finally:
        server.stop()


def test_close_returns_within_budget_while_server_hangs(db, alpine):
    alpine.delay = 30
    t = tracker(db, alpine, sync_timeout=(1.0, 30.0), sync_shutdown_timeout=1.0)
    t.log_signal(make_signal(1))
    assert wait_for(lambda: len(alpine.requests) == 1, 5)
    start = time.monotonic()
    t.close()
    assert time.monotonic() - start < 3.0
    assert list(statuses(db).values()) == ["pending"]


def test_script_exits_within_budget_while_server_hangs(db, alpine):
    alpine.delay = 60
    start = time.monotonic()
    out = run_script("""
        import sys, time
        from argo_signals import SignalTracker
        t = SignalTracker(sys.argv[1], alpine_url=sys.argv[2], api_key="test-key-123",
                          batch_timeout=0.05, sync_timeout=(1, 60), sync_shutdown_timeout=1.0)
        t.log_signal({"symbol": "AAPL", "action": "BUY", "entry_price": 1, "confidence": 50})
        time.sleep(0.5)   # the request is now hanging in the receiver
    """, db, alpine.url, timeout=30)
    elapsed = time.monotonic() - start
    assert out.returncode == 0, out.stderr
    assert len(alpine.requests) == 1
    assert elapsed < 0.5 + 1.0 + 4.0, f"exit took {elapsed:.1f}s"
    assert count(db) == 1


def test_401_keeps_rows_pending_logs_error_once_and_never_leaks_key(db, alpine, caplog):
    caplog.set_level(logging.DEBUG, logger="argo_signals")
    alpine.api_key = "another-key"
    with tracker(db, alpine) as t:
        for i in range(5):
            t.log_signal(make_signal(i))
        assert wait_for(lambda: len(alpine.requests) >= 1, 5)
        time.sleep(0.5)
        s = t.stats()
        assert s["sync_pending"] == 5 and s["synced"] == 0
        assert KEY not in repr(t) and KEY not in json.dumps(s)
    assert all(r["sync_attempts"] == 0 and r["sync_status"] == "pending" for r in rows(db))
    errors = [r for r in caplog.records if r.levelno == logging.ERROR and "API key" in r.getMessage()]
    assert len(errors) == 1
    assert KEY not in caplog.text
    assert all(q["headers"]["X-API-Key"] == KEY for q in alpine.requests)


def test_retries_exhausted_counts_attempts_then_failed(db, alpine):
    alpine.fail(500, times=1000)   # the receiver's own 500 (a 502/503/504 is an outage: no attempt)
    with tracker(db, alpine, sync_workers=1, max_sync_attempts=2, sync_retry_budget=0.3) as t:
        t.log_signal(make_signal(1))
        assert wait_for(lambda: rows(db) and rows(db)[0]["sync_status"] == "failed", 15)
        assert t.stats()["sync_failed"] == 1
    r = rows(db)[0]
    assert r["sync_attempts"] == 2 and "500" in r["sync_error"]


def test_at_most_five_requests_per_claim(db, alpine):
    alpine.fail(500, times=1000)
    with tracker(db, alpine, sync_workers=1, max_sync_attempts=1, sync_retry_budget=30) as t:
        t._syncer.config.max_backoff = 0.01
        t.log_signal(make_signal(1))
        assert wait_for(lambda: rows(db) and rows(db)[0]["sync_status"] == "failed", 15)
    assert len(alpine.requests) == 5


def test_two_trackers_never_post_the_same_row_twice(db, alpine):
    alpine.delay = 0.01
    a, b = tracker(db, alpine), tracker(db, alpine)
    ids = [(a if i % 2 else b).log_signal(make_signal(i)) for i in range(100)]
    assert a.flush(5) and b.flush(5)
    assert wait_for(lambda: all_settled(db, 100), 20)
    a.close()
    b.close()
    posted = [json.loads(r["raw"])["signal_id"] for r in alpine.requests]
    assert sorted(posted) == sorted(ids)  # each exactly once


def test_sync_disabled_by_environment(db, alpine, monkeypatch):
    monkeypatch.setenv("ALPINE_API_URL", alpine.url)
    monkeypatch.setenv("ALPINE_SYNC_ENABLED", "false")
    with SignalTracker(db, **FAST) as t:
        assert not t.sync_enabled
        t.log_signal(make_signal(1))
    assert list(statuses(db).values()) == ["pending"] and alpine.requests == []


def test_payload_is_the_contract(db, alpine):
    with tracker(db, alpine) as t:
        t.log_signal(make_signal(1, data_source="unit", reasoning="a reasoning long enough to pass"))
        assert wait_for(lambda: all_settled(db, 1), 10)
    req = alpine.requests[0]
    assert req["headers"]["Content-Type"] == "application/json"
    body = json.loads(req["raw"])
    assert isinstance(body["entry_price"], float) and isinstance(body["strategy"], str)
    assert body["sha256"] == rows(db)[0]["sha256"]


def test_parse_retry_after():
    assert parse_retry_after("3") == 3.0
    assert parse_retry_after(None) is None and parse_retry_after("soon") is None
    assert parse_retry_after("Wed, 21 Oct 2015 07:28:00 GMT", now=1445412470.0) == pytest.approx(10.0)


def test_close_during_outage_applies_offline_transitions(db):
    port = free_port()
    t = SignalTracker(db, alpine_url=f"http://127.0.0.1:{port}", api_key=KEY,
                      **{**FAST, "flush_interval": 3600, "batch_timeout": 3600})
    t.log_signal(make_signal(1, action="NEUTRAL"))
    t.log_signal(make_signal(2, reasoning="short"))
    t.log_signal(make_signal(3, symbol="ABCDEFGHIJKLMNOPQRSTU"))
    t.log_signal(make_signal(4))
    assert t.close(10)
    assert [r["sync_status"] for r in rows(db)] == ["skipped", "rejected", "rejected", "pending"]
    assert "reasoning" in rows(db)[1]["sync_error"] and "symbol" in rows(db)[2]["sync_error"]


# -- a hostile or misconfigured receiver, a down server, an operator ----------------------------
BIN = Path(sys.executable).parent


def cli(*args, env=None, timeout=60, **kw):
    """The installed console script as a real process."""
    full = {**os.environ, "ARGO_API_KEY": KEY, **(env or {})}
    return subprocess.run([str(BIN / "argo-signals"), *map(str, args)], capture_output=True, text=True,
                          timeout=timeout, env=full, **kw)


def seeded(db, n, **over):
    with SignalTracker(db, register_atexit=False) as t:
        return [t.log_signal(make_signal(i, **over)) for i in range(n)]


def on_a_terminal(args, timeout=60):
    """Run the console script with stderr on a pseudo-terminal; returns (code, stdout, terminal bytes)."""
    master, slave = pty.openpty()
    proc = subprocess.Popen([str(BIN / "argo-signals"), *map(str, args)], stdin=subprocess.DEVNULL,
                            stdout=subprocess.PIPE, stderr=slave, env={**os.environ, "ARGO_API_KEY": KEY})
    os.close(slave)
    seen = b""
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            ready, _, _ = select.select([master], [], [], 0.1)
            if ready:
                try:
                    chunk = os.read(master, 65536)
                except OSError:  # EIO: the child closed the terminal
                    break
                if not chunk:
                    break
                seen += chunk
            elif proc.poll() is not None:
                break
        out = proc.communicate(timeout=max(1.0, deadline - time.monotonic()))[0]
    finally:
        os.close(master)
        if proc.poll() is None:
            proc.kill()
    return proc.returncode, out.decode(), seen


@pytest.fixture
def elsewhere():
    """Another receiver (another host, for a redirect): it must never see the key."""
    server = AlpineServer(KEY).start()
    yield server
    server.stop()


@pytest.mark.parametrize("status", [302, 307, 308])
def test_a_redirect_is_not_followed_and_is_one_configuration_error(db, alpine, elsewhere, caplog, status):
    caplog.set_level(logging.INFO, logger="argo_signals")
    location = elsewhere.url + SIGNAL_PATH
    alpine.redirect(location, status, times=1000)
    with tracker(db, alpine) as t:
        for i in range(3):
            t.log_signal(make_signal(i))
        assert wait_for(lambda: len(alpine.requests) >= 1, 5)
        time.sleep(0.5)
        assert t.stats()["sync_pending"] == 3
    assert elsewhere.requests == []
    assert all(r["sync_status"] == "pending" and r["sync_attempts"] == 0 for r in rows(db))
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(errors) == 1 and location in errors[0]


def test_sync_command_exits_non_zero_on_a_redirect(db, alpine, elsewhere):
    seeded(db, 3)
    location = elsewhere.url + SIGNAL_PATH
    alpine.redirect(location, 308, times=1000)
    out = cli("sync", "--db", db, "--alpine-url", alpine.url)
    assert out.returncode != 0
    assert location in out.stderr
    assert elsewhere.requests == []
    assert all(r["sync_status"] == "pending" for r in rows(db))


def test_a_key_echoed_by_the_receiver_is_redacted_everywhere(db, alpine, caplog):
    caplog.set_level(logging.DEBUG, logger="argo_signals")
    alpine.echo_key = True
    alpine.fail(422)
    with tracker(db, alpine, sync_workers=1, max_sync_attempts=1, sync_retry_budget=0.3) as t:
        t.log_signal(make_signal(1))
        assert wait_for(lambda: all_settled(db, 1), 10)
        alpine.fail(500, times=1000)   # the receiver's own 500 (JSON detail): an attempt that counts
        t.log_signal(make_signal(2))
        assert wait_for(lambda: rows(db)[-1]["sync_status"] == "failed", 10)
        transient_error = t.stats()["sync_last_error"]
        alpine.faults.clear()
        alpine.api_key = "another-key"
        sent = len(alpine.requests)
        t.log_signal(make_signal(3))
        assert wait_for(lambda: len(alpine.requests) > sent and t.stats()["sync_last_error"] != transient_error, 10)
        auth_error = t.stats()["sync_last_error"]
    stored = [r["sync_error"] for r in rows(db)]
    assert "X-API-Key" in stored[0] and "X-API-Key" in stored[1]  # the echo did happen
    for text in stored + [transient_error, auth_error, caplog.text]:
        assert KEY not in text


def test_a_symbol_too_long_once_upper_cased_is_refused_before_sending(db, alpine):
    with tracker(db, alpine) as t:
        t.log_signal(make_signal(1, symbol="ß" * 12))   # 12 characters, 24 once upper-cased
        assert wait_for(lambda: all_settled(db, 1), 5)
    assert rows(db)[0]["sync_status"] == "rejected" and "symbol" in rows(db)[0]["sync_error"]
    assert alpine.requests == []


def test_the_offline_pass_counts_symbol_length_after_upper_casing(db):
    t = SignalTracker(db, alpine_url=f"http://127.0.0.1:{free_port()}", api_key=KEY,
                      **{**FAST, "flush_interval": 3600, "batch_timeout": 3600})
    t.log_signal(make_signal(1, symbol="ß" * 12))
    t.log_signal(make_signal(2, symbol="ß" * 10))
    assert t.close(10)
    assert [r["sync_status"] for r in rows(db)] == ["rejected", "pending"]


@pytest.mark.parametrize("answer", ["retry-after", "deep-json"])
def test_an_unparseable_answer_is_an_attempt_that_counts(db, alpine, answer):
    if answer == "retry-after":
        alpine.fail(500, times=1000, headers={"Retry-After": "\u00b2"})
    else:
        alpine.fail(201, times=1000, body=b'{"status": ' + b"[" * 200_000 + b"]" * 200_000 + b"}")
    with tracker(db, alpine, sync_workers=1, max_sync_attempts=1, sync_retry_budget=0.3) as t:
        t.log_signal(make_signal(1))
        assert wait_for(lambda: rows(db) and rows(db)[0]["sync_status"] == "failed", 10)
    r = rows(db)[0]
    assert r["sync_attempts"] == 1 and r["sync_claim"] is None


@pytest.mark.parametrize("bad", ["cl\u00e9-\u043a\u043b\u044e\u0447", "key\r\nX-Other: 1", "key\n", "key\x00"])
def test_a_key_that_cannot_be_a_header_is_refused_at_construction(db, alpine, bad):
    with pytest.raises(ValueError) as err:
        SignalTracker(db, alpine_url=alpine.url, api_key=bad, **FAST)
    assert bad not in str(err.value) and "key" in str(err.value).lower()


def test_repr_hides_credentials_in_the_url(db, alpine):
    t = SignalTracker(db, alpine_url=alpine.url.replace("http://", "http://user:s3cret@"), api_key=KEY, **FAST)
    try:
        assert "s3cret" not in repr(t) and KEY not in repr(t) and "127.0.0.1" in repr(t)
    finally:
        t.close(5)


def test_sync_command_gives_up_on_a_down_server_with_one_line_and_exit_3(db):
    seeded(db, 30)
    url = f"http://127.0.0.1:{free_port()}"
    start = time.monotonic()
    out = cli("sync", "--db", db, "--alpine-url", url, "--timeout", 2)
    elapsed = time.monotonic() - start
    assert out.returncode == 3, out.stderr
    assert elapsed < 2 + 8, elapsed
    assert len([line for line in out.stderr.splitlines() if line.startswith("WARNING")]) <= 1
    assert "unreachable" in out.stderr + out.stdout
    assert all(r["sync_status"] == "pending" and r["sync_attempts"] == 0 for r in rows(db))


def test_a_down_server_trips_the_breaker_and_recovery_sends_everything_at_once(db, caplog):
    caplog.set_level(logging.INFO, logger="argo_signals")
    port = free_port()
    server = AlpineServer(KEY, port=port)  # connections refused until it starts
    t = SignalTracker(db, alpine_url=server.url, api_key=KEY, **FAST)
    t._syncer.config.redelivery_base = 60.0   # a row backing off on its own would wait a minute
    try:
        ids = [t.log_signal(make_signal(i)) for i in range(40)]
        assert t.flush(5)
        assert wait_for(lambda: any(r.levelno == logging.WARNING for r in caplog.records), 10)
        time.sleep(1.0)
        server.start()
        assert wait_for(lambda: all_settled(db, 40), 15)
    finally:
        t.close(5)
        server.stop()
    assert sorted(server.stored_ids()) == sorted(ids)
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "unreachable" in warnings[0] and server.url in warnings[0]
    assert any(r.levelno == logging.INFO and "again" in r.getMessage() for r in caplog.records)
    assert all(r["sync_attempts"] == 0 for r in rows(db))


@pytest.mark.parametrize("how", ["deleted", "replaced"])
def test_the_sync_follows_a_deleted_or_replaced_database_file(db, alpine, tmp_path, how):
    with tracker(db, alpine) as t:
        t.log_signal(make_signal(1))
        assert wait_for(lambda: all_settled(db, 1), 5)
        if how == "replaced":
            other = tmp_path / "other.db"
            with SignalTracker(other, register_atexit=False) as o:
                o.log_signal(make_signal(7))
            os.replace(other, db)
        else:
            os.remove(db)
        for suffix in ("-wal", "-shm"):
            if os.path.exists(str(db) + suffix):
                os.remove(str(db) + suffix)
        later = t.log_signal(make_signal(2))
        assert t.flush(5)
        assert wait_for(lambda: statuses(db).get(later) == "synced", 10)
    assert later in alpine.stored_ids()


def test_the_sync_bar_advances_per_settled_row(db, alpine):
    seeded(db, 40)
    alpine.delay = 0.05
    code, _, seen = on_a_terminal(["sync", "--db", db, "--alpine-url", alpine.url])
    assert code == 0
    shown = set(re.findall(rb"(\d+)%", seen))
    assert len(shown) >= 4, seen[-500:]


def test_demo_reports_this_runs_signals_only_with_a_sync_bar(db, alpine):
    assert cli("demo", "--db", db, "--count", 60, "--quiet", "--no-sync").returncode == 0   # rows stay pending
    out = cli("demo", "--db", db, "--count", 60, "--quiet", "--json", "--alpine-url", alpine.url)
    assert out.returncode == 0, out.stderr
    sync = json.loads(out.stdout)["sync"]
    assert sum(sync[k] for k in ("synced", "pending", "skipped", "rejected", "failed")) == 60
    assert sync["synced"] > 0 and sync["pending"] == 0
    code, _, seen = on_a_terminal(["demo", "--db", db, "--count", 60, "--alpine-url", alpine.url])
    assert code == 0 and b"syncing" in seen


def test_status_shows_the_last_sync_error_and_when(db, alpine):
    alpine.api_key = "another-key"
    with tracker(db, alpine) as t:
        t.log_signal(make_signal(1))
        assert wait_for(lambda: len(alpine.requests) >= 1, 5)
        time.sleep(0.3)
    out = cli("status", "--db", db)
    assert "last sync error" in out.stdout and "401" in out.stdout
    data = json.loads(cli("status", "--db", db, "--json").stdout)
    assert "401" in data["last_sync_error"]["error"] and data["last_sync_error"]["at"]


def test_a_fractional_confidence_warns_once_per_tracker(db, alpine, caplog):
    caplog.set_level(logging.WARNING, logger="argo_signals")
    n = 0
    for _ in range(2):
        with tracker(db, alpine) as t:
            for c in (0.8, 0.5, 1, 70):
                t.log_signal(make_signal(n, confidence=c))
                n += 1
            assert wait_for(lambda n=n: all_settled(db, n), 10)
    warned = [r.getMessage() for r in caplog.records if "confidence" in r.getMessage()]
    assert len(warned) == 2, warned
    assert "0-100" in warned[0] and "80" in warned[0]
