import hashlib
import json
import math
from datetime import datetime, timedelta, timezone
from decimal import Decimal

import pytest
from hypothesis import given
from hypothesis import strategies as st

from argo_signals import SignalValidationError, alpine_hash, new_signal_id
from argo_signals.record import as_dict, finish, normalise, normalise_update

GOOD = {"symbol": "AAPL", "action": "BUY", "entry_price": 190.5, "confidence": 80}


def independent_hash(d):
    fields = {
        "signal_id": d["signal_id"], "symbol": d["symbol"], "action": d["action"].upper(),
        "entry_price": float(d["entry_price"]),
        "target_price": None if d.get("target_price") is None else float(d["target_price"]),
        "stop_price": None if d.get("stop_price") is None else float(d["stop_price"]),
        "confidence": float(d["confidence"]), "strategy": d["strategy"], "timestamp": d["timestamp"],
    }
    return hashlib.sha256(json.dumps(fields, sort_keys=True, default=str).encode("utf-8")).hexdigest()


BAD = [
    ({"symbol": ""}, "symbol"), ({"symbol": "   "}, "symbol"), ({"symbol": None}, "symbol"),
    ({"symbol": 12}, "symbol"), ({"action": "HOLD"}, "action"), ({"action": 1}, "action"), ({"action": ["BUY"]}, "action"),
    ({"entry_price": 0}, "entry_price"), ({"entry_price": -1}, "entry_price"),
    ({"entry_price": float("nan")}, "entry_price"), ({"entry_price": "inf"}, "entry_price"),
    ({"entry_price": True}, "entry_price"), ({"entry_price": "abc"}, "entry_price"),
    ({"entry_price": None}, "entry_price"), ({"entry_price": [1]}, "entry_price"),
    ({"confidence": 101}, "confidence"), ({"confidence": -0.1}, "confidence"),
    ({"confidence": False}, "confidence"), ({"target_price": 0}, "target_price"),
    ({"stop_price": -5}, "stop_price"), ({"stop_loss": "x"}, "stop_price"),
    ({"signal_id": ""}, "signal_id"), ({"signal_id": "x" * 129}, "signal_id"),
    ({"signal_id": 5}, "signal_id"), ({"timestamp": "yesterday"}, "timestamp"),
    ({"timestamp": [12345]}, "timestamp"), ({"strategy": 3}, "strategy"),
    ({"reasoning": b"bytes"}, "reasoning"), ({"symbol": "A\ud800"}, "symbol"),
    ({"sha256": "abc"}, "sha256"), ({"sync_status": "synced"}, "sync_status"),
    ({"extra": object()}, "metadata"), ({"extra": float("nan")}, "metadata"),
    ({"metadata": [1, 2]}, "metadata"), ({"exit_price": 0}, "exit_price"),
    ({"profit_loss_pct": "x"}, "profit_loss_pct"),
]


@pytest.mark.parametrize("override,field", BAD)
def test_bad_input_names_the_field(override, field):
    with pytest.raises(SignalValidationError) as info:
        normalise({**GOOD, **override})
    assert info.value.field == field
    assert field in str(info.value)
    assert isinstance(info.value, ValueError)


@pytest.mark.parametrize("missing", ["symbol", "entry_price", "confidence"])
def test_required_fields(missing):
    sig = dict(GOOD)
    del sig[missing]
    with pytest.raises(SignalValidationError, match=missing):
        normalise(sig)


def test_not_a_mapping_is_a_type_error():
    with pytest.raises(TypeError):
        normalise([("symbol", "AAPL")])


@pytest.mark.parametrize("price", [190, 190.0, Decimal("190"), "190", " 190.0 "])
def test_numbers_become_floats_and_hash_as_floats(price):
    d = as_dict(finish(normalise({**GOOD, "entry_price": price, "signal_id": "s1",
                                  "timestamp": "2026-01-02T03:04:05+00:00"})))
    assert d["entry_price"] == 190.0 and type(d["entry_price"]) is float
    assert d["sha256"] == independent_hash({**d, "entry_price": 190.0})
    assert d["sha256"] == alpine_hash("s1", "AAPL", "BUY", 190.0, None, None, 80.0, "unknown",
                                      "2026-01-02T03:04:05+00:00")


def test_defaults_and_normalisation():
    d = as_dict(finish(normalise({"symbol": " BTC-USD ", "action": "sell", "entry_price": 1,
                                  "confidence": "99.5", "take_profit": 2, "stop_loss": Decimal("0.5")})))
    assert d["symbol"] == "BTC-USD" and d["action"] == "SELL"
    assert d["asset_type"] == "crypto" and d["strategy"] == "unknown"
    assert d["target_price"] == 2.0 and d["stop_price"] == 0.5
    ts = datetime.fromisoformat(d["timestamp"])
    assert ts.utcoffset() == timedelta(0)
    assert abs((datetime.now(timezone.utc) - ts).total_seconds()) < 5
    assert d["sha256"] == independent_hash(d)
    assert as_dict(normalise({**GOOD, "action": None}))["action"] == "NEUTRAL"
    assert as_dict(normalise(GOOD))["asset_type"] == "stock"


@pytest.mark.parametrize("given,expected", [
    ("2026-01-02T03:04:05Z", "2026-01-02T03:04:05+00:00"),
    ("2026-01-02T05:04:05+02:00", "2026-01-02T03:04:05+00:00"),
    ("2026-01-02T03:04:05", "2026-01-02T03:04:05+00:00"),
    (datetime(2026, 1, 2, 3, 4, 5), "2026-01-02T03:04:05+00:00"),
    (datetime(2026, 1, 2, 4, 4, 5, 120, tzinfo=timezone(timedelta(hours=1))), "2026-01-02T03:04:05.000120+00:00"),
])
def test_timestamps_normalised_to_utc_with_offset(given, expected):
    d = as_dict(finish(normalise({**GOOD, "timestamp": given})))
    assert d["timestamp"] == expected
    assert d["sha256"] == independent_hash(d)


def test_extra_keys_kept_in_metadata():
    d = as_dict(normalise({**GOOD, "venue": "XNAS", "metadata": {"a": 1}, "tags": ["x"]}))
    assert json.loads(d["metadata"]) == {"a": 1, "venue": "XNAS", "tags": ["x"]}
    assert as_dict(normalise(GOOD))["metadata"] is None


def test_generated_ids_are_unique_and_time_ordered():
    ids = [new_signal_id() for _ in range(10_000)]
    assert len(set(ids)) == len(ids)
    assert ids == sorted(ids)
    assert all(len(i) == 36 and i[14] == "7" for i in ids)


def test_update_fields_validated():
    assert normalise_update({"outcome": "win", "exit_price": "195"}) == {"outcome": "win", "exit_price": 195.0}
    with pytest.raises(SignalValidationError, match="symbol"):
        normalise_update({"symbol": "X"})
    with pytest.raises(SignalValidationError, match="exit_price"):
        normalise_update({"exit_price": -1})
    with pytest.raises(SignalValidationError):
        normalise_update({})


def test_huge_int_refused():
    with pytest.raises(SignalValidationError, match="entry_price"):
        normalise({**GOOD, "entry_price": 10 ** 400})
    assert math.isfinite(as_dict(normalise({**GOOD, "entry_price": 10 ** 300}))["entry_price"])


@given(sid=st.text(min_size=1), symbol=st.text(min_size=1), strategy=st.text(), ts=st.text(),
       action=st.sampled_from(["BUY", "sell", "Neutral"]),
       nums=st.tuples(*[st.floats(allow_nan=False, allow_infinity=False)] * 2),
       opt=st.tuples(*[st.one_of(st.none(), st.floats(allow_nan=False, allow_infinity=False))] * 2))
def test_fast_hash_is_byte_for_byte_the_receivers_json_dumps(sid, symbol, strategy, ts, action, nums, opt):
    d = {"signal_id": sid, "symbol": symbol, "action": action, "entry_price": nums[0],
         "confidence": nums[1], "target_price": opt[0], "stop_price": opt[1], "strategy": strategy,
         "timestamp": ts}
    assert alpine_hash(sid, symbol, action, nums[0], opt[0], opt[1], nums[1], strategy, ts) == independent_hash(d)


@given(st.floats(min_value=0, max_value=4102444800))
def test_default_timestamp_format_is_exact_utc_iso(ts):
    from argo_signals.record import _utc_iso
    text = _utc_iso(ts)
    parsed = datetime.fromisoformat(text)
    assert parsed.utcoffset() == timedelta(0) and text.endswith("+00:00") and len(text) == 32
    assert abs(parsed.timestamp() - ts) <= 1e-6


# -- hostile input: stored exactly, or refused naming the field ---------------------------------
@pytest.mark.parametrize("ts", [float("nan"), float("inf"), -float("inf"), 1e20, -1e13, 10 ** 400, True])
def test_bad_epoch_timestamps_name_the_field(ts):
    with pytest.raises(SignalValidationError) as info:
        normalise({**GOOD, "timestamp": ts})
    assert info.value.field == "timestamp"


def test_integer_epoch_timestamp_is_accepted_like_the_float():
    as_int = as_dict(finish(normalise({**GOOD, "signal_id": "s", "timestamp": 1764300000})))
    as_float = as_dict(finish(normalise({**GOOD, "signal_id": "s", "timestamp": 1764300000.0})))
    assert as_int["timestamp"] == as_float["timestamp"] == "2025-11-28T03:20:00+00:00"
    assert as_int["sha256"] == as_float["sha256"]


def test_deeply_nested_metadata_is_refused_not_a_recursion_error():
    deep = inner = {}
    for _ in range(10_000):
        inner["x"] = {}
        inner = inner["x"]
    for sig in ({**GOOD, "metadata": deep}, {**GOOD, "venue": deep}):
        with pytest.raises(SignalValidationError) as info:
            normalise(sig)
        assert info.value.field == "metadata"
    nested = inner = {}
    for _ in range(30):
        inner["x"] = [{}]
        inner = inner["x"][0]
    assert json.loads(as_dict(normalise({**GOOD, "metadata": nested}))["metadata"]) == nested


@pytest.mark.parametrize("canonical,alias", [("target_price", "take_profit"), ("stop_price", "stop_loss")])
def test_alias_and_field_must_agree(canonical, alias):
    with pytest.raises(SignalValidationError) as info:
        normalise({**GOOD, canonical: 200, alias: 210})
    assert info.value.field == canonical
    assert as_dict(normalise({**GOOD, canonical: 200, alias: "200.0"}))[canonical] == 200.0
    assert as_dict(normalise({**GOOD, canonical: 200, alias: None}))[canonical] == 200.0
    assert as_dict(normalise({**GOOD, canonical: None, alias: 210}))[canonical] == 210.0
    assert as_dict(normalise({**GOOD, alias: 210}))[canonical] == 210.0


@pytest.mark.parametrize("canonical,alias", [("target_price", "take_profit"), ("stop_price", "stop_loss")])
@pytest.mark.parametrize("garbage", ["garbage", -1, float("nan"), True, [1]])
def test_garbage_alias_next_to_a_valid_value_is_refused(canonical, alias, garbage):
    with pytest.raises(SignalValidationError) as info:
        normalise({**GOOD, canonical: 95.0, alias: garbage})
    assert info.value.field == alias


@pytest.mark.parametrize("key", ["venue", "symbol", "strategy"])
def test_a_key_both_top_level_and_in_metadata_is_refused(key):
    with pytest.raises(SignalValidationError) as info:
        normalise({**GOOD, key: "XNAS", "metadata": {key: "ARCX"}})
    assert info.value.field == key
    same = as_dict(normalise({**GOOD, key: "XNAS", "metadata": {key: "XNAS"}}))
    assert json.loads(same["metadata"])[key] == "XNAS"


@pytest.mark.parametrize("meta", [{1: "a"}, {"a": {2: "b"}}, {"a": [{None: 1}]}, {("t",): 1}])
def test_non_string_metadata_keys_are_refused(meta):
    with pytest.raises(SignalValidationError) as info:
        normalise({**GOOD, "metadata": meta})
    assert info.value.field == "metadata"


@pytest.mark.parametrize("override,field", [
    ({"action": "\u017fell"}, "action"),            # long s: upper() makes it SELL
    ({"action": "\u0299uy"}, "action"),
    ({"action": "\u2003BUY"}, "action"),             # em space
    ({"entry_price": "\u0661\u0662\u0663"}, "entry_price"),  # Arabic-Indic 123
    ({"entry_price": "\uff11\uff12"}, "entry_price"),        # full-width 12
    ({"confidence": "\u0665\u0660"}, "confidence"),
    ({"target_price": "1_000"}, "target_price"),
    ({"stop_loss": "\u0669"}, "stop_price"),
    ({"entry_price": "0x10"}, "entry_price"),
    ({"exit_price": "\u0967"}, "exit_price"),
])
def test_only_ascii_actions_and_numbers(override, field):
    with pytest.raises(SignalValidationError) as info:
        normalise({**GOOD, **override})
    assert info.value.field == field


@pytest.mark.parametrize("text,value", [("190", 190.0), (" 190.5\t", 190.5), ("+1e2", 100.0),
                                        (".5", 0.5), ("5.", 5.0), ("1E-2", 0.01)])
def test_ascii_number_text_forms(text, value):
    assert as_dict(normalise({**GOOD, "entry_price": text}))["entry_price"] == value


@pytest.mark.parametrize("action,want", [("buy", "BUY"), (" Sell ", "SELL"), ("neutral", "NEUTRAL")])
def test_ascii_action_forms(action, want):
    assert as_dict(normalise({**GOOD, "action": action}))["action"] == want


def test_recheck_accepts_what_log_signal_stores_and_names_what_differs():
    from argo_signals.record import recheck
    from argo_signals.demo import signals
    import itertools
    for sig in itertools.islice(signals(3), 200):
        assert recheck(as_dict(finish(normalise(sig)))) == []
    whole_second = as_dict(finish(normalise({**GOOD, "venue": "X"}) [:10] + (1764300000.0,)
                                  + normalise(GOOD)[11:]))
    assert whole_second["timestamp"].endswith(".000000+00:00") and recheck(whole_second) == []
    row = as_dict(finish(normalise({**GOOD, "metadata": {"k": [1]}})))
    assert [f for f, _ in recheck({**row, "action": "buy"})] == ["action"]
    assert [f for f, _ in recheck({**row, "symbol": " AAPL"})] == ["symbol"]
    assert [f for f, _ in recheck({**row, "exit_price": -1.0})] == ["exit_price"]
    assert [f for f, _ in recheck({**row, "metadata": "{bad"})] == ["metadata"]
    assert [f for f, _ in recheck({**row, "timestamp": "2026-01-02T05:04:05+02:00"})] == ["timestamp"]
    assert [f for f, _ in recheck({**row, "entry_price": "190.5"})] == ["entry_price"]


def test_metadata_conflict_check_survives_values_whose_equality_raises():
    class Elementwise:
        def __eq__(self, other):
            raise ValueError("truth value is ambiguous")
        __hash__ = object.__hash__
    with pytest.raises(SignalValidationError) as info:
        normalise({**GOOD, "venue": Elementwise(), "metadata": {"venue": Elementwise()}})
    assert info.value.field == "venue"
