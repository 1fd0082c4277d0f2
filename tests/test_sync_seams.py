"""The sync at its seams: proxy outages, rate limits, a swapped file, clocks and crashes, partial
key echoes, URLs and keys checked once, a locked database, and -0.0."""
import json
import os
import signal
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
import urllib.parse
from decimal import Decimal
from pathlib import Path

import pytest
from click.testing import CliRunner
from hypothesis import given, settings, strategies as st

from argo_signals import SignalTracker, store
from argo_signals.alpine import check_api_key, payload, receiver_hash
from argo_signals.breaker import Breaker, Prober
from argo_signals.cli import main
from argo_signals.config import Config
from argo_signals.delivery import Redactor, safe_url
from argo_signals.drain import drain
from argo_signals.record import SignalValidationError, finish, normalise
from argo_signals.sync import Syncer, SyncConfig
from argo_signals.testing import AlpineServer
from conftest import make_signal, rows, wait_for

KEY = "test-key-123"
FAST = dict(batch_size=10, batch_timeout=0.05, flush_interval=0.2, register_atexit=False,
            sync_timeout=(1.0, 1.0), sync_shutdown_timeout=1.0, sync_retry_budget=1.0)
BIN = Path(sys.executable).parent


@pytest.fixture
def alpine():
    server = AlpineServer(KEY).start()
    yield server
    server.stop()


def seeded(db, n, **over):
    with SignalTracker(str(db), sync_enabled=False, register_atexit=False) as t:
        return [t.log_signal(make_signal(i, **over)) for i in range(n)]


def cli(*args, env=None, timeout=60, **kw):
    full = {**os.environ, "ARGO_API_KEY": KEY, **(env or {})}
    return subprocess.run([str(BIN / "argo-signals"), *map(str, args)], capture_output=True, text=True,
                          timeout=timeout, env=full, **kw)


def posts(server):
    return [r for r in server.requests if r["method"] == "POST"]


# -- 1. an outage is an outage, whatever its shape --------------------------------------------
def test_a_proxy_outage_opens_the_breaker_and_no_row_spends_an_attempt(db, alpine):
    """Every row stays pending with no attempt spent through an outage of hundreds of probes
    (at the default 30 s probe interval, 300 probes are 2.5 hours), with one attempt allowed.
    (A bare 500 and a 503/504 are the same kind of answer: see the test below.)"""
    alpine.outage = (502, b"<html>502 Bad Gateway</html>", {})
    with SignalTracker(str(db), alpine_url=alpine.url, api_key=KEY, max_sync_attempts=1, **FAST) as t:
        syncer = t._syncer
        syncer.breaker.probe_base = syncer.breaker.probe_max = 0.002
        ids = [t.log_signal(make_signal(i)) for i in range(8)]
        assert t.flush(5)
        assert wait_for(lambda: syncer.breaker.is_open and alpine.outage_answers >= 300, 20)
        during = len(posts(alpine))
        assert all(r["sync_status"] == "pending" and r["sync_attempts"] == 0 for r in rows(db))
        alpine.outage = None
        assert wait_for(lambda: all(r["sync_status"] == "synced" for r in rows(db)), 10)
    assert during <= 8, f"{during} posts while the proxy said the backend was down"
    assert sorted(alpine.stored_ids()) == sorted(ids)


@pytest.mark.parametrize("status,body,outage", [
    (502, b'{"detail": "x"}', True), (503, b"", True), (504, b"<html/>", True), (500, b"<html>oops</html>", True),
    (500, b'{"detail": "Failed to store signal: boom"}', False), (429, b"{}", False)])
def test_which_answers_speak_of_the_receiver_not_of_the_row(status, body, outage):
    from argo_signals.alpine import Kind, classify
    kind = classify(status, {}, body).kind
    assert (kind is Kind.UNREACHABLE) == outage, kind


# -- 2. a rate limit holds the whole sync --------------------------------------------------------
def test_a_retry_after_pauses_every_worker_and_spends_no_attempt(db, alpine):
    """Retry-After: 60 clamped to 0.4 s here (30 s by default): in 1.3 s, the first burst (one
    per worker) and then one request per pause."""
    seeded(db, 20)
    alpine.fail(429, times=10_000, headers={"Retry-After": "60"})
    cfg = SyncConfig(alpine.url, KEY, workers=4, timeout=(1.0, 1.0), max_retry_after=0.4)
    syncer = Syncer(str(db), cfg)
    try:
        report = drain(syncer, patience=1.3)
    finally:
        syncer.stop(1.0)
    n = len(posts(alpine))
    assert n <= 4 + 3, f"{n} POSTs in {report.waited:.1f} s under a rate limit"
    assert all(r["sync_status"] == "pending" and r["sync_attempts"] == 0 for r in rows(db))


def test_the_probe_waits_for_the_rate_limit():
    b = Breaker(1, 0.01, 0.01)
    b.failure("down")
    until = time.monotonic() + 0.4
    asked = []
    stopping = threading.Event()
    p = Prober(b, lambda: asked.append(time.monotonic()) or None, stopping, lambda r: None, lambda s: None,
               hold=lambda: max(0.0, until - time.monotonic()))
    p.ensure()
    assert wait_for(lambda: asked, 3)
    stopping.set()
    assert asked[0] >= until - 0.01


# -- 3. an outcome lands only on the row that was posted ------------------------------------------
def test_an_outcome_lands_only_in_the_file_and_on_the_row_that_was_claimed(tmp_path):
    """A connection opened by path after the file was swapped (a worker's first write) must not
    mark the new file's rows: they were never posted."""
    a, b = tmp_path / "signals.db", tmp_path / "new.db"
    seeded(a, 5)
    seeded(b, 5, strategy="other-file")
    conn = store.connect(str(a))
    claimed = store.claim_due(conn, "owner", 5, 60.0)
    conn.close()
    os.replace(b, a)
    store.settle_many(store.connect(str(a)), "owner", [(r, "synced", None) for r in claimed])
    assert store.release(store.connect(str(a)), claimed[0], "owner", "x", True, None, 1) == "lost-claim"
    assert [r["sync_status"] for r in rows(a)] == ["pending"] * 5
    assert all(r["sync_attempts"] == 0 for r in rows(a))


def test_an_outcome_needs_the_same_row_not_just_the_same_id(tmp_path):
    db = tmp_path / "signals.db"
    seeded(db, 2)
    conn = store.connect(str(db))
    claimed = store.claim_due(conn, "owner", 2, 60.0)
    conn.execute("UPDATE signals SET sha256 = 'changed' WHERE id = ?", (claimed[0]["id"],))
    store.settle_many(conn, "owner", [(r, "synced", None) for r in claimed])
    assert [r["sync_status"] for r in rows(db)] == ["pending", "synced"]


# -- 4. claims that survive clocks and crashes -----------------------------------------------------
class _Shifted:
    """The ``time`` module as a store sees it after the wall clock stepped ``by`` seconds."""

    def __init__(self, by):
        self.by = by

    def __getattr__(self, name):
        return getattr(time, name)

    def time(self):
        return time.time() + self.by


def test_a_live_claim_survives_a_clock_step_and_a_dead_ones_come_back_at_once(db, alpine, monkeypatch):
    seeded(db, 5)
    hang = AlpineServer(KEY).start()
    hang.delay = 30
    child = subprocess.Popen([str(BIN / "argo-signals"), "sync", "--db", str(db), "--alpine-url", hang.url, "-q"],
                             env={**os.environ, "ARGO_API_KEY": KEY}, stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL)
    try:
        assert wait_for(lambda: len(hang.requests) >= 1, 15)
        monkeypatch.setattr(store, "time", _Shifted(10_000))   # the wall clock jumps past every lease
        syncer = Syncer(str(db), SyncConfig(alpine.url, KEY))
        try:
            drain(syncer, patience=0.5)
        finally:
            syncer.stop(1.0)
        assert posts(alpine) == [], "rows claimed by a live process were posted again"
        monkeypatch.undo()
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait(10)
        hang.delay = 0
        hang.stop()
    out = CliRunner().invoke(main, ["sync", "--db", str(db), "--alpine-url", alpine.url, "--json", "-q"],
                             env={"ARGO_API_KEY": KEY})
    assert out.exit_code == 0, out.output
    data = json.loads(out.stdout)
    assert data["synced"] == 5 and data["reclaimed"] >= 1, data
    assert all(r["sync_status"] == "synced" for r in rows(db))


# -- 5. the key leaves no usable trace --------------------------------------------------------------
SECRET = "sk_live_9f8e7d6c5b4a3210ZYXWVUTS"


def _html(s):
    return "".join(f"&#x{ord(c):x};" for c in s)


def _json_escaped(s):
    return "".join(f"\\u{ord(c):04x}" for c in s)


@pytest.mark.parametrize("piece", [SECRET[:12], SECRET[-9:], SECRET[5:13], SECRET[:-4]])
@pytest.mark.parametrize("form", ["raw", "percent", "html", "json"])
def test_any_run_of_eight_characters_of_the_key_is_redacted(piece, form):
    shown = {"raw": piece, "percent": "".join(f"%{ord(c):02X}" for c in piece), "html": _html(piece),
             "json": _json_escaped(piece)}[form]
    out = Redactor([SECRET])(f"HTTP 401: Invalid API key '{shown}\u2026' (check it)")
    for i in range(len(piece) - 7):
        assert piece[i:i + 8] not in urllib.parse.unquote(out), out
    assert shown not in out and "(check it)" in out


def test_a_short_common_run_is_kept():
    assert Redactor([SECRET])("HTTP 401: sk_live (test mode)") == "HTTP 401: sk_live (test mode)"


@pytest.mark.parametrize("key", ["cl\u00e9-secret-1", "secret\u00a0key", "secret\x7fkey", "s\u00e9cret"])
def test_a_key_that_is_not_printable_ascii_is_a_configuration_error_naming_the_variable(db, key):
    with pytest.raises(ValueError) as err:
        check_api_key(key)
    assert "ARGO_API_KEY" in str(err.value) and key not in str(err.value)
    seeded(db, 1)
    res = CliRunner().invoke(main, ["sync", "--db", str(db), "--alpine-url", "http://127.0.0.1:9"],
                             env={"ARGO_API_KEY": key})
    assert res.exit_code == 2 and "ARGO_API_KEY" in res.output and key not in res.output, res.output


# -- 6. URLs are checked once ---------------------------------------------------------------------
@pytest.mark.parametrize("url,word", [("https://user:pa#ss@alpine.example", "fragment"),
                                      ("http://alpine.example:99999", "port"),
                                      ("http://alpine.example:80a/", "port"),
                                      ("http://alpine.example/base?x=1", "query"),
                                      ("http://alpine.example/#top", "fragment"),
                                      ("http:///nohost", "host")])
def test_a_bad_url_is_a_configuration_error_with_a_clear_message(db, url, word):
    for make in (lambda: SyncConfig(url, KEY), lambda: Config(db_path=str(db), alpine_url=url, api_key=KEY)):
        with pytest.raises(ValueError) as err:
            make()
        assert word in str(err.value) and "pa#ss" not in str(err.value) and "ss@" not in str(err.value)
    seeded(db, 1)
    res = CliRunner().invoke(main, ["sync", "--db", str(db), "--alpine-url", url], env={"ARGO_API_KEY": KEY})
    assert res.exit_code == 2 and word in res.output and "pa#ss" not in res.output, res.output


def test_credentials_are_hidden_wherever_the_url_is_shown():
    assert safe_url("https://user:pa/ss@alpine.example/x") == "https://***@alpine.example/x"
    cfg = SyncConfig("https://user:s3cret-pw@alpine.example", KEY)
    assert "s3cret" not in repr(cfg) and "s3cret" not in cfg.public_url
    assert "s3cret" not in repr(Config(alpine_url="https://user:s3cret-pw@alpine.example", api_key=KEY))


# -- 7. a database problem is reported as one --------------------------------------------------------
def test_a_locked_database_is_a_database_problem_not_an_unreachable_receiver(db, alpine):
    seeded(db, 3)
    holder = sqlite3.connect(str(db), isolation_level=None)
    holder.execute("BEGIN IMMEDIATE")
    try:
        res = CliRunner().invoke(main, ["sync", "--db", str(db), "--alpine-url", alpine.url, "--timeout", "1"],
                                 env={"ARGO_API_KEY": KEY})
    finally:
        holder.execute("ROLLBACK")
        holder.close()
    assert res.exit_code == 4 and "database" in res.output and "unreachable" not in res.output, res.output
    assert alpine.requests == []


def test_an_unreadable_database_is_a_database_problem(tmp_path, alpine):
    bad = tmp_path / "bad.db"
    bad.write_bytes(b"not a database at all" * 100)
    res = CliRunner().invoke(main, ["sync", "--db", str(bad), "--alpine-url", alpine.url], env={"ARGO_API_KEY": KEY})
    assert res.exit_code == 4 and "database" in res.output, res.output


# -- 8. what is hashed is what is stored and posted ------------------------------------------------
def test_negative_zero_confidence_is_stored_and_hashed_as_zero(db, alpine):
    with SignalTracker(str(db), alpine_url=alpine.url, api_key=KEY, **FAST) as t:
        for i, zero in enumerate((-0.0, Decimal("-0"), "-0", "-0.0e0")):
            t.log_signal(make_signal(i, confidence=zero))
        assert wait_for(lambda: [r["sync_status"] for r in rows(db)] == ["synced"] * 4, 10)
    assert {r["confidence"] for r in rows(db)} == {0.0}


def _num(low=0.0, high=1e6, zero=False):
    floats = st.floats(low, high, allow_nan=False, allow_infinity=False)
    extra = [st.just(-0.0), st.just(Decimal("-0")), st.just("-0")] if zero else []
    return st.one_of(floats, st.integers(int(low), int(high)), floats.map(lambda f: Decimal(repr(f))),
                     floats.map(repr), st.decimals(low, high, allow_nan=False, allow_infinity=False, places=6),
                     *extra)


_HASH_DB = {}


def _hash_db():
    """One real database file for every example (a new file each would cost most of the test)."""
    if "conn" not in _HASH_DB:
        _HASH_DB["dir"] = tempfile.TemporaryDirectory()
        conn = store.connect(os.path.join(_HASH_DB["dir"].name, "h.db"))
        store.ensure_schema(conn)
        conn.row_factory = sqlite3.Row
        _HASH_DB["conn"] = conn
    return _HASH_DB["conn"]


@settings(max_examples=150, deadline=None)
@given(entry=_num(), target=st.one_of(st.none(), _num()), stop=st.one_of(st.none(), _num()),
       confidence=_num(0, 100, zero=True), strategy=st.one_of(st.none(), st.text(max_size=10)),
       symbol=st.text(min_size=1, max_size=8), timestamp=st.one_of(st.none(), st.floats(0, 4e9)))
def test_the_stored_hash_is_the_hash_of_the_posted_body(entry, target, stop, confidence, strategy, symbol, timestamp):
    signal_ = {"symbol": symbol, "action": "BUY", "entry_price": entry, "target_price": target,
               "stop_price": stop, "confidence": confidence, "strategy": strategy, "timestamp": timestamp}
    try:
        row = finish(normalise(signal_))
    except SignalValidationError:
        return
    conn = _hash_db()
    conn.execute("DELETE FROM signals")
    store.write_batch(conn, [row])
    stored = dict(conn.execute("SELECT * FROM signals").fetchone())
    posted = json.loads(json.dumps(payload(stored)).encode())   # what the receiver parses
    assert receiver_hash(posted) == stored["sha256"] == posted["sha256"]


def test_an_outage_page_echoing_the_key_and_a_url_password_never_reach_the_output(db, alpine):
    """A proxy's 502 page that repeats the key: the breaker's reason was printed as it came."""
    seeded(db, 3)
    alpine.outage = (502, f"<html>bad gateway for X-API-Key: {KEY}</html>".encode(), {})
    url = alpine.url.replace("http://", "http://user:pw-s3cret@")
    res = CliRunner().invoke(main, ["sync", "--db", str(db), "--alpine-url", url, "--timeout", "1"],
                             env={"ARGO_API_KEY": KEY})
    stored = sqlite3.connect(str(db)).execute("SELECT error FROM sync_last_error").fetchone()[0]
    assert res.exit_code == 3, res.output
    assert "***@127.0.0.1" in res.output
    for text in (res.output, stored):
        assert "pw-s3cret" not in text and KEY[:8] not in text and KEY[-8:] not in text, text


def test_a_claim_owner_is_judged_by_host_boot_pid_and_start_time():
    from argo_signals import owner
    child = subprocess.Popen(["sleep", "30"])
    try:
        start = Path(f"/proc/{child.pid}/stat").read_text().rsplit(")", 1)[1].split()[19]
        parts = owner.new_token().split("|")   # argo1|host|boot|pid namespace|pid|start|random
        token = "|".join(parts[:4] + [str(child.pid), start, parts[6]])
        live = owner.Liveness()
        assert live.owner_alive(token) is True
        parts = token.split("|")
        assert live.owner_alive("|".join(parts[:5] + [str(int(parts[5]) + 1)] + parts[6:])) is False  # pid reused
        assert live.owner_alive("|".join(parts[:1] + ["elsewhere"] + parts[2:])) is None   # another host: the lease
        assert live.may_take("0123abcd", 10.0, 11.0) and not live.may_take("0123abcd", 12.0, 11.0)
    finally:
        child.kill()
        child.wait(10)
    assert owner.Liveness().owner_alive(token) is False
    mine = owner.new_token()
    assert owner.Liveness().owner_alive(mine) is True
    owner.forget(mine)     # (a sync of this process that stopped)
    assert owner.Liveness().owner_alive(mine) is False


def test_a_truncated_key_echoed_by_a_401_is_not_stored_or_printed(db, alpine):
    seeded(db, 2)
    alpine.fail(401, times=1000, body={"detail": f"Invalid API key '{SECRET[:12]}\u2026{SECRET[-4:]}...'"})
    res = CliRunner().invoke(main, ["sync", "--db", str(db), "--alpine-url", alpine.url, "--timeout", "2"],
                             env={"ARGO_API_KEY": SECRET})
    status = CliRunner().invoke(main, ["status", "--db", str(db)])
    assert res.exit_code == 1 and "HTTP 401" in res.output, res.output
    stored = [r["sync_error"] or "" for r in rows(db)]
    for text in [res.output, status.output] + stored:
        assert SECRET[:8] not in text and SECRET[4:12] not in text, text
