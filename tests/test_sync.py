"""Alpine sync against a real loopback HTTP server that speaks the contract."""
import json
import logging
import time
from decimal import Decimal

import pytest

from argo_signals import SignalTracker
from argo_signals.sync import parse_retry_after

from argo_signals.testing import AlpineServer, free_port
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
        assert t.stats()["sync_retries"] >= 3
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
            assert wait_for(lambda: rows(db)[0]["sync_attempts"] >= 1, 10)
            assert all(s == "pending" for s in statuses(db).values())
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
    alpine.fail(503, times=1000)
    with tracker(db, alpine, sync_workers=1, max_sync_attempts=2, sync_retry_budget=0.3) as t:
        t.log_signal(make_signal(1))
        assert wait_for(lambda: rows(db) and rows(db)[0]["sync_status"] == "failed", 15)
        assert t.stats()["sync_failed"] == 1
    r = rows(db)[0]
    assert r["sync_attempts"] == 2 and "503" in r["sync_error"]


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
