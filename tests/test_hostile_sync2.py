"""The sync attacked again: keys that look like escapes, claims of a zombie, URLs and rate limits
of odd shapes."""
import html
import json
import os
import shutil
import signal
import sqlite3
import ssl
import subprocess
import time
import urllib.parse
from pathlib import Path

import pytest

from argo_signals import SignalTracker
from argo_signals.delivery import Redactor
from argo_signals.drain import drain
from argo_signals.sync import Syncer, SyncConfig
from argo_signals.testing import AlpineServer
from conftest import make_signal, run_script, wait_for

KEY = "test-key-123"


@pytest.mark.parametrize("key", ["sk_%41%42%43%44%45_live9", "abcd&amp;efgh&lt;ijkl", "abc\\ndefg\\u0041hijk"])
def test_a_key_that_looks_like_an_escape_is_redacted_in_its_encoded_echoes(key):
    redact = Redactor([key])
    for echo in (key, urllib.parse.quote(key, safe=""), html.escape(key), json.dumps(key)[1:-1]):
        for cut in (len(echo), 14):   # whole, and truncated to a prefix of 14 characters
            shown = redact(f"bad key {echo[:cut]} here")
            assert echo[:cut] not in shown, (echo[:cut], shown)


def test_a_claim_of_a_killed_owner_nobody_reaped_yet_is_free():
    # kill -9 of a sync whose parent has not waited for it (a container whose PID 1 does not
    # reap): /proc still lists the pid, as a zombie, with its start time
    from argo_signals import owner
    child = subprocess.Popen(["sleep", "30"])
    try:
        start = Path(f"/proc/{child.pid}/stat").read_text().rsplit(")", 1)[1].split()[19]
        parts = owner.new_token().split("|")
        token = "|".join(parts[:4] + [str(child.pid), start, parts[6]])
        os.kill(child.pid, signal.SIGKILL)
        deadline = time.monotonic() + 10
        while Path(f"/proc/{child.pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z":
            assert time.monotonic() < deadline
            time.sleep(0.01)
        assert owner.Liveness().owner_alive(token) is False
    finally:
        child.kill()
        child.wait(10)


@pytest.mark.parametrize("retry_after", ["0", "Thu, 01 Jan 1970 00:00:00 GMT"])
def test_a_rate_limit_that_says_retry_now_is_not_a_request_storm(tmp_path, retry_after):
    """A 429 whose Retry-After is 0 or a date already past (the receiver's clock is behind)."""
    db = tmp_path / "s.db"
    with SignalTracker(str(db), sync_enabled=False, register_atexit=False) as t:
        for i in range(10):
            t.log_signal(make_signal(i))
    alpine = AlpineServer(KEY).start()
    alpine.fail(429, times=10_000, headers={"Retry-After": retry_after})
    syncer = Syncer(str(db), SyncConfig(alpine.url, KEY, workers=4, timeout=(1.0, 1.0)))
    try:
        report = drain(syncer, patience=0.5)
    finally:
        syncer.stop(1.0)
        alpine.stop()
    n = len([r for r in alpine.requests if r["method"] == "POST"])
    assert n <= 4 + 1, f"{n} POSTs in {report.waited:.1f} s under a rate limit"


def seeded(db, n):
    with SignalTracker(str(db), sync_enabled=False, register_atexit=False) as t:
        return [t.log_signal(make_signal(i)) for i in range(n)]


@pytest.mark.skipif(shutil.which("openssl") is None, reason="needs the openssl tool to make a certificate")
def test_an_upper_case_https_url_keeps_the_configured_ca_bundle(tmp_path, monkeypatch):
    cert, key = tmp_path / "c.pem", tmp_path / "k.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
                    "-nodes", "-keyout", str(key), "-out", str(cert), "-days", "1", "-subj", "/CN=127.0.0.1",
                    "-addext", "subjectAltName=IP:127.0.0.1"], check=True, capture_output=True, timeout=30)
    monkeypatch.setenv("REQUESTS_CA_BUNDLE", str(cert))
    alpine = AlpineServer(KEY).start()
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(str(cert), str(key))
    alpine._httpd.socket = ctx.wrap_socket(alpine._httpd.socket, server_side=True)
    seeded(tmp_path / "s.db", 2)
    syncer = Syncer(str(tmp_path / "s.db"), SyncConfig(alpine.url.replace("http", "HTTPS"), KEY, timeout=(1.0, 1.0)))
    try:
        report = drain(syncer, patience=1.0)
    finally:
        syncer.stop(1.0)
        alpine.stop()
    assert report.end.value == "done", report


def test_ctrl_c_during_the_demo_loses_no_logged_signal(tmp_path):
    db = tmp_path / "demo.db"
    r = run_script("""
        import _thread, sys, threading
        import argo_signals.cli as cli
        from argo_signals.tracker import SignalTracker
        logged = [0]
        log_signal = SignalTracker.log_signal
        def counted(self, *a, **k):
            sid = log_signal(self, *a, **k)
            logged[0] += 1
            return sid
        SignalTracker.log_signal = counted
        threading.Timer(0.5, _thread.interrupt_main).start()   # Ctrl-C
        try:
            cli.main(["demo", "--db", sys.argv[1], "-q", "--count", "5000", "--producers", "2", "--rate", "40"],
                     standalone_mode=False)
        except BaseException as exc:
            print(type(exc).__name__, logged[0])
    """, db)
    assert r.returncode == 0 and r.stdout.startswith("Abort"), (r.stdout, r.stderr[-2000:])
    logged = int(r.stdout.split()[1])
    conn = sqlite3.connect(str(db))
    stored = conn.execute("SELECT count(*) FROM signals").fetchone()[0]
    conn.close()
    assert logged > 0 and stored >= logged, f"{logged} logged, {stored} stored"


def test_a_wall_clock_stepped_back_does_not_hold_rows_for_the_step(tmp_path):
    """A row due again in 5 s, then the clock is set back an hour (a VM resumed, NTP): its
    due time now lies an hour ahead, past anything the sync ever sets (redelivery_max)."""
    db = tmp_path / "s.db"
    seeded(db, 3)
    conn = sqlite3.connect(str(db))
    conn.execute("UPDATE signals SET sync_attempts = 1, sync_next_at = ?", (time.time() + 5 + 3600,))
    conn.commit()
    conn.close()
    alpine = AlpineServer(KEY).start()
    try:
        with SignalTracker(str(db), alpine_url=alpine.url, api_key=KEY, register_atexit=False,
                           sync_timeout=(1.0, 1.0), sync_shutdown_timeout=1.0) as t:
            assert wait_for(lambda: len(alpine.stored_ids()) == 3, 4), t.stats()["sync_pending"]
    finally:
        alpine.stop()
