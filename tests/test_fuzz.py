"""Arbitrary mappings from several threads: each call is accepted (and its row matches the
normalised input) or refused with SignalValidationError/TypeError; rows == accepted calls."""
import json
import math
import sqlite3
import tempfile
import threading
from datetime import timezone
from decimal import Decimal
from pathlib import Path

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from argo_signals import SignalTracker, SignalValidationError
from argo_signals.record import as_dict, finish, normalise

from test_record import independent_hash

KEYS = ["symbol", "action", "entry_price", "confidence", "target_price", "stop_price", "timestamp",
        "strategy", "asset_type", "data_source", "regime", "reasoning", "take_profit", "stop_loss",
        "exit_price", "profit_loss_pct", "outcome", "metadata", "sha256", "venue", "extra"]

values = st.one_of(
    st.none(), st.booleans(), st.integers(min_value=-10**30, max_value=10**30),
    st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=30),
    st.sampled_from(["BUY", "sell", "Neutral", "hold", "AAPL", "BTC-USD", "  ", "1e3", "nan",
                     "2026-01-02T03:04:05Z", "2026-13-01", "42.5"]),
    st.decimals(allow_nan=False, allow_infinity=False, places=4),
    st.datetimes(timezones=st.one_of(st.none(), st.just(timezone.utc))),
    st.lists(st.integers(), max_size=3), st.dictionaries(st.text(max_size=5), st.integers(), max_size=2),
)
price = st.one_of(st.floats(0.01, 1e6), st.integers(1, 10**6), st.decimals(Decimal("0.01"), 10**6, places=3),
                  st.floats(0.01, 1e6).map(str))
plausible = st.fixed_dictionaries(
    {"symbol": st.one_of(st.sampled_from(["AAPL", "BTC-USD", " msft "]), st.text(min_size=1, max_size=25)),
     "action": st.sampled_from(["BUY", "SELL", "neutral", None, "sell "]),
     "entry_price": price, "confidence": st.one_of(st.floats(0, 100), st.integers(0, 100))},
    optional={"target_price": st.one_of(st.none(), price), "stop_loss": st.one_of(st.none(), price),
              "timestamp": st.one_of(st.datetimes(timezones=st.one_of(st.none(), st.just(timezone.utc))),
                                     st.datetimes().map(lambda d: d.isoformat())),
              "strategy": st.one_of(st.none(), st.text(max_size=20)), "reasoning": st.text(max_size=40),
              "regime": st.one_of(st.none(), st.text(max_size=8)), "profit_loss_pct": st.floats(-1e3, 1e3),
              "venue": values, "metadata": st.dictionaries(st.text(max_size=5), st.integers(), max_size=2)})
anything = st.one_of(st.dictionaries(st.sampled_from(KEYS), values, max_size=10), plausible, plausible,
                     st.lists(st.integers(), max_size=2), st.none())


def expected_row(sig, stored):
    """What the stored row must hold: the normalised input (generated id/timestamp aside)."""
    want = as_dict(finish(normalise({**sig, "signal_id": stored["signal_id"],
                                     "timestamp": sig.get("timestamp") or stored["timestamp"]})))
    return want


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(anything, min_size=1, max_size=60))
def test_fuzzed_signals_from_threads(batch):
    with tempfile.TemporaryDirectory() as d:
        db = Path(d) / "fuzz.db"
        accepted, refused, unexpected = {}, [], []
        lock = threading.Lock()

        with SignalTracker(db, batch_size=7, batch_timeout=0.05, register_atexit=False) as t:
            def work(items):
                for sig in items:
                    try:
                        sid = t.log_signal(sig)
                    except (SignalValidationError, TypeError) as exc:
                        with lock:
                            refused.append(exc)
                    except Exception as exc:  # anything else is a bug
                        with lock:
                            unexpected.append((sig, exc))
                    else:
                        with lock:
                            accepted[sid] = sig
            threads = [threading.Thread(target=work, args=(batch[k::4],)) for k in range(4)]
            for th in threads:
                th.start()
            for th in threads:
                th.join()
            assert t.flush(10)
            assert t.stats()["logged"] == len(accepted)

        assert not unexpected, unexpected[:3]
        assert len(accepted) + len(refused) == len(batch)
        conn = sqlite3.connect(db) if db.exists() else None
        stored = {}
        if conn is not None:
            conn.row_factory = sqlite3.Row
            stored = {r["signal_id"]: dict(r) for r in conn.execute("SELECT * FROM signals")}
            conn.close()
        assert len(stored) == len(accepted)
        for sid, sig in accepted.items():
            row = stored[sid]
            want = expected_row(sig, row)
            for k, v in want.items():
                if k == "metadata" and v is not None:
                    assert json.loads(row[k]) == json.loads(v)
                else:
                    assert row[k] == v, (k, row[k], v)
            for k in ("entry_price", "confidence"):
                assert isinstance(row[k], float) and math.isfinite(row[k])
            assert row["sha256"] == independent_hash(row)
