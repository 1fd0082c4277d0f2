"""The contract module: one table of refusals behind both the per-row check and the SQL pass,
answers that never raise, the key's header rules and redaction (the breaker: test_breaker.py)."""
import sqlite3

import pytest
from hypothesis import given, settings, strategies as st

from argo_signals import store
from argo_signals.alpine import (REFUSALS, Kind, check_api_key, classify, parse_retry_after, refusal,
                                 refusal_sql, register_sql_functions)
from argo_signals.delivery import Redactor, safe_url

texts = st.one_of(st.none(), st.text(max_size=30), st.sampled_from(["ß" * 10, "ß" * 11, " ﬃ ", "\u2003x\u2003", "   ", "\u3000\u3000", ""]))
numbers = st.one_of(st.none(), st.floats(-5, 120, allow_nan=False), st.sampled_from([0.0, 1.0, 100.0]))
rows = st.fixed_dictionaries({
    "action": st.sampled_from(["BUY", "SELL", "NEUTRAL", "buy", "HOLD"]),
    "symbol": texts, "entry_price": numbers, "target_price": numbers, "stop_price": numbers,
    "confidence": numbers, "reasoning": texts,
})


def _sql_verdict(row):
    conn = sqlite3.connect(":memory:", isolation_level=None)
    conn.execute("CREATE TABLE signals (id INTEGER PRIMARY KEY, action, symbol, entry_price, target_price, "
                 "stop_price, confidence, reasoning, sync_status DEFAULT 'pending', sync_error, sync_claim)")
    conn.execute("INSERT INTO signals (action, symbol, entry_price, target_price, stop_price, confidence, "
                 "reasoning) VALUES (:action, :symbol, :entry_price, :target_price, :stop_price, :confidence, "
                 ":reasoning)", row)
    register_sql_functions(conn)
    store.settle_refused(conn, refusal_sql())
    status, error = conn.execute("SELECT sync_status, sync_error FROM signals").fetchone()
    return None if status == "pending" else (status, error)


@settings(max_examples=300, deadline=None)
@given(rows)
def test_the_sql_pass_and_the_row_check_agree(row):
    assert _sql_verdict(row) == refusal(row)


def test_the_receivers_limits_after_upper_casing_and_stripping():
    ok = {"action": "BUY", "symbol": "AAPL", "entry_price": 1.0, "confidence": 50.0}
    assert refusal(ok) is None
    assert refusal({**ok, "symbol": "ß" * 10}) is None          # 20 once upper-cased
    assert refusal({**ok, "symbol": "ß" * 11})[0] == "rejected"  # 22
    assert refusal({**ok, "symbol": "\u2003"})[0] == "rejected"  # only (Unicode) whitespace
    assert refusal({**ok, "reasoning": ""}) is None and refusal({**ok, "reasoning": " x " * 3})[0] == "rejected"
    assert refusal({**ok, "target_price": 0.0}) is None          # zero counts as absent for the receiver
    assert refusal({**ok, "action": "NEUTRAL"})[0] == "skipped"
    assert len({r.reason for r in REFUSALS}) == len(REFUSALS)


@pytest.mark.parametrize("value,expected", [("3", 3.0), (" 7 ", 7.0), ("\u00b2", None), ("\u0663", None),
                                            ("soon", None), ("", None), (None, None),
                                            ("Wed, 21 Oct 2015 07:28:00 GMT", 10.0), ("Mon, 99 Foo 9999", None)])
def test_retry_after_never_raises(value, expected):
    got = parse_retry_after(value, now=1445412470.0)
    assert got == (pytest.approx(expected) if expected is not None else None)


@pytest.mark.parametrize("status,headers,body,kind", [
    (201, {}, b'{"status": "success"}', Kind.SYNCED),
    (201, {}, b'{"status": "duplicate"}', Kind.SYNCED),
    (201, {}, b"[" * 100_000 + b"]" * 100_000, Kind.TRANSIENT),
    (201, {}, b"\xff\xfe not json", Kind.TRANSIENT),
    (307, {"Location": "http://elsewhere/x"}, b"", Kind.REDIRECT),
    (401, {}, b'{"detail": "Invalid API key"}', Kind.AUTH),
    (503, {"Retry-After": "\u00b2"}, b"{}", Kind.UNREACHABLE),       # a proxy's 503: the receiver is down
    (500, {"Retry-After": "\u00b2"}, b'{"detail": "x"}', Kind.TRANSIENT),
    (422, {}, b'{"detail": ' + b"[" * 100_000 + b"]" * 100_000 + b"}", Kind.REJECTED),
    (500, {}, b"<html>oops</html>", Kind.UNREACHABLE),                # no receiver's JSON body: an outage
    (429, {"Retry-After": "x"}, b"{}", Kind.RATE_LIMITED),
])
def test_classify_never_raises(status, headers, body, kind):
    answer = classify(status, headers, body)
    assert answer.kind is kind
    if kind is Kind.REDIRECT:
        assert "http://elsewhere/x" in answer.detail


@pytest.mark.parametrize("key", ["s3crêt-ключ", "s3cret\r\nX: y", "s3cret\n", "s3cret\x00",
                                 " s3cret", "s3cret\t"])
def test_a_key_that_cannot_be_a_header_is_refused_without_repeating_it(key):
    with pytest.raises(ValueError) as err:
        check_api_key(key)
    assert "s3cr" not in str(err.value)


def test_a_good_key_passes():
    assert check_api_key("abc-DEF_123.~ +/=") == "abc-DEF_123.~ +/=" and check_api_key(None) is None


def test_redaction_covers_raw_escaped_and_percent_encoded_forms():
    key = 'k"ey/+1'
    r = Redactor([key, None])
    text = "raw " + key + ' json k\\"ey/+1 url k%22ey%2F%2B1 path k%22ey/%2B1'
    out = r(text)
    assert "k\"ey" not in out and "k\\\"ey" not in out and "k%22ey" not in out and out.count("***") == 4


def test_safe_url_hides_credentials():
    assert safe_url("https://u:p@alpine.example:8443/base") == "https://***@alpine.example:8443/base"
    assert safe_url("http://alpine.example") == "http://alpine.example"
