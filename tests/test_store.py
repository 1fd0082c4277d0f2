"""argo_signals.store on real SQLite files: connections, schema, batch writes, duplicates and
conflicts, the outbox queries; and the round trip any accepted signal makes through it."""
import json
import math
import sqlite3
import time
from datetime import datetime, timezone

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from argo_signals import SignalTracker, SignalValidationError
from argo_signals import store
from argo_signals.record import FINISHED_FIELDS, as_dict, finish, normalise

from conftest import make_signal, rows

GOOD = {"symbol": "AAPL", "action": "BUY", "entry_price": 190.5, "confidence": 80}


@pytest.fixture
def conn(db):
    c = store.connect(str(db))
    store.ensure_schema(c)
    yield c
    c.close()


def finished(sig):
    return finish(normalise(sig))


# -- connect / schema ------------------------------------------------------------------------------
def test_connect_sets_the_pragmas(conn):
    assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert conn.execute("PRAGMA synchronous").fetchone()[0] == 1  # NORMAL
    assert conn.execute("PRAGMA busy_timeout").fetchone()[0] == 5000
    full = store.connect(conn.execute("PRAGMA database_list").fetchone()[2], durability="full")
    assert full.execute("PRAGMA synchronous").fetchone()[0] == 2
    full.close()


def test_ensure_schema_is_idempotent(conn):
    store.ensure_schema(conn)
    cols = [r[1] for r in conn.execute("PRAGMA table_info(signals)")]
    assert cols == list(store.SIGNAL_COLUMNS)
    assert {r[1] for r in conn.execute("PRAGMA index_list(signals)")} >= {"idx_signals_signal_id"}


@pytest.mark.parametrize("name", ["p%41.db", "c?mode=rw.db", "h#x.db", "sp ace.db", "q%3Fmode=ro.db",
                                  "caf\u00e9.db", "x\udcff.db"])  # the last: the undecodable byte 0xff
def test_paths_with_uri_characters_open_that_exact_file(tmp_path, name):
    path = tmp_path / name
    c = store.connect(str(path))
    store.ensure_schema(c)
    store.write_batch(c, [finished({**GOOD, "signal_id": "one"})])
    c.close()
    assert path.exists() and sorted(p.name for p in tmp_path.iterdir() if p.suffix == ".db") == [name]
    ro = store.connect_readonly(str(path))
    assert ro.execute("SELECT signal_id FROM signals").fetchall() == [("one",)]
    with pytest.raises(sqlite3.OperationalError):
        ro.execute("DELETE FROM signals")
    ro.close()


def test_connect_readonly_does_not_create_a_file(tmp_path):
    with pytest.raises(sqlite3.OperationalError):
        store.connect_readonly(str(tmp_path / "absent.db"))
    assert list(tmp_path.iterdir()) == []


# -- write_batch: inserts, duplicates, conflicts ------------------------------------------------------
def test_same_content_is_a_duplicate_other_content_is_rejected(conn, db):
    row = finished({**GOOD, "signal_id": "a", "timestamp": "2026-01-02T03:04:05Z"})
    assert store.write_batch(conn, [row]).inserted == 1
    again = store.write_batch(conn, [row])
    assert (again.inserted, again.duplicates, again.rejected_rows) == (0, 1, [])
    other = finished({**GOOD, "signal_id": "a", "timestamp": "2026-01-02T03:04:06Z"})
    res = store.write_batch(conn, [other])
    assert res.duplicates == 0 and [r[1] for r in res.rejected_rows] == [
        "signal_id already stored with different content"]
    assert len(rows(db)) == 1


def test_a_retry_with_a_defaulted_timestamp_is_a_duplicate(conn, db):
    first = finished({**GOOD, "signal_id": "retry-me"})
    time.sleep(0.002)
    second = finished({**GOOD, "signal_id": "retry-me"})
    assert first[FINISHED_FIELDS.index("timestamp")] != second[FINISHED_FIELDS.index("timestamp")]
    store.write_batch(conn, [first])
    res = store.write_batch(conn, [second])
    assert (res.duplicates, res.rejected_rows) == (1, [])
    # the defaulted timestamp does not hide a real difference
    changed = finished({**GOOD, "signal_id": "retry-me", "entry_price": 191})
    assert len(store.write_batch(conn, [changed]).rejected_rows) == 1
    # nor does it excuse a stored row whose own timestamp the caller gave
    store.write_batch(conn, [finished({**GOOD, "signal_id": "given", "timestamp": "2026-01-01T00:00:00Z"})])
    res = store.write_batch(conn, [finished({**GOOD, "signal_id": "given"})])
    assert (res.duplicates, len(res.rejected_rows)) == (1, 0)
    assert [r["timestamp"] for r in rows(db, "signal_id = 'given'")] == ["2026-01-01T00:00:00+00:00"]


def test_a_caller_id_without_timestamp_logged_twice_is_not_a_conflict(db):
    sig = {**GOOD, "signal_id": "caller-1", "metadata": {"k": 1}}
    with SignalTracker(db, register_atexit=False, batch_timeout=0.01) as t:
        t.log_signal(sig)
        assert t.flush(10)
        time.sleep(0.002)
        t.log_signal(sig)
        assert t.flush(10)
        st_ = t.stats()
    assert (st_["persisted"], st_["duplicates"], st_["rejected"]) == (1, 1, 0)
    conn = sqlite3.connect(db)
    assert conn.execute("SELECT count(*) FROM rejected_signals").fetchone()[0] == 0
    conn.close()


def test_a_row_the_database_refuses_is_rejected_alone(conn):
    good = [finished(make_signal(i)) for i in range(5)]
    bad = list(finished(make_signal(9)))
    bad[FINISHED_FIELDS.index("symbol")] = None  # NOT NULL
    res = store.write_batch(conn, good[:2] + [tuple(bad)] + good[2:])
    assert res.inserted == 5 and len(res.rejected_rows) == 1
    assert "refused by the database" in res.rejected_rows[0][1]


def test_missing_values_are_stored_as_null_also_under_an_application_float_adapter(conn):
    row = finished({**GOOD, "signal_id": "plain"})  # target, stop, regime, metadata... missing
    optional = "target_price, stop_price, regime, reasoning, exit_price, metadata"
    store.write_batch(conn, [row])
    seen = []
    sqlite3.register_adapter(float, lambda x: seen.append(x) or x)
    try:
        store.write_batch(conn, [finished({**GOOD, "signal_id": "adapted"})])
    finally:
        del sqlite3.adapters[(float, sqlite3.PrepareProtocol)]
    assert seen and not any(math.isnan(x) for x in seen)
    for sid in ("plain", "adapted"):
        types = conn.execute(f"SELECT {', '.join(f'typeof({c})' for c in optional.split(', '))}, "
                             "typeof(timestamp) FROM signals WHERE signal_id = ?", (sid,)).fetchone()
        assert types == ("null",) * 6 + ("text",), sid


def test_a_row_without_timestamp_is_refused_not_stored_as_text(conn):
    row = list(finished({**GOOD, "signal_id": "no-ts"}))
    row[FINISHED_FIELDS.index("timestamp")] = None  # NOT NULL
    res = store.write_batch(conn, [finished({**GOOD, "signal_id": "ok"}), tuple(row)])
    assert res.inserted == 1 and [r[0] for r in res.rejected_rows] == ["no-ts"]
    assert conn.execute("SELECT count(*) FROM signals WHERE signal_id = 'no-ts'").fetchone() == (0,)


def test_updates_apply_only_to_updatable_columns(conn):
    row = finished({**GOOD, "signal_id": "u"})
    res = store.write_batch(conn, [row], [("u", {"outcome": "win"}), ("nope", {"outcome": "x"}),
                                          ("u", {"symbol": "MSFT"})])
    assert res.unknown_updates == ["nope"] and res.refused_updates == ["u"]
    assert conn.execute("SELECT outcome, symbol FROM signals").fetchone() == ("win", "AAPL")


def test_is_environment_error():
    assert store.is_environment_error(sqlite3.OperationalError("locked"))
    assert store.is_environment_error(OSError())
    assert store.is_environment_error(sqlite3.DatabaseError("file is not a database"))
    assert not store.is_environment_error(sqlite3.IntegrityError("NOT NULL"))


# -- outbox queries -------------------------------------------------------------------------------
def test_claim_settle_release_and_reset(conn):
    store.write_batch(conn, [finished(make_signal(i, signal_id=f"s{i}")) for i in range(4)])
    claimed = store.claim_due(conn, "me", limit=3, lease=60)
    assert [r["signal_id"] for r in claimed] == ["s0", "s1", "s2"]
    assert store.claim_due(conn, "other", limit=10, lease=60)[0]["signal_id"] == "s3"
    assert store.settle(conn, claimed[0], "me", "synced") == 1
    store.settle_many(conn, "me", [(claimed[1], "rejected", "400")])
    assert store.release(conn, claimed[2], "me", "timeout", True, None, max_attempts=1) == "failed"
    assert store.release(conn, claimed[2], "me", "x", True, None, 1) == "lost-claim"
    assert store.status_counts(conn) == {"synced": 1, "rejected": 1, "failed": 1, "pending": 1}
    assert store.reset_status(conn, ["rejected", "failed"]) == 2
    assert store.status_counts(conn) == {"synced": 1, "pending": 3}


def test_settle_refused_applies_the_offline_rules(conn):
    store.write_batch(conn, [finished({**GOOD, "signal_id": "n", "action": "NEUTRAL"}),
                             finished({**GOOD, "signal_id": "r", "reasoning": "too short"}),
                             finished({**GOOD, "signal_id": "ok"})])
    from argo_signals.alpine import refusal_sql, register_sql_functions
    register_sql_functions(conn)
    assert store.settle_refused(conn, refusal_sql()) == 2
    got = dict(conn.execute("SELECT signal_id, sync_status FROM signals"))
    assert got == {"n": "skipped", "r": "rejected", "ok": "pending"}


# -- any accepted signal reads back exactly as normalise() returned it -----------------------------------
finite = st.floats(allow_nan=False, allow_infinity=False)
hostile = st.one_of(
    st.none(), st.booleans(), st.integers(-10 ** 25, 10 ** 25), st.floats(), finite.map(str),
    st.text(max_size=12), st.decimals(allow_nan=True, allow_infinity=True, places=3),
    st.sampled_from(["BUY", "sell", " neutral ", "\u017fell", "\u0661\u0662", "1_0", "\uff11", "nan",
                     "2026-01-02T03:04:05Z", "1e400", "+5", ".5", "\u2003BUY"]),
    st.datetimes(timezones=st.one_of(st.none(), st.just(timezone.utc))),
)
json_leaf = st.one_of(st.none(), st.booleans(), st.integers(-10 ** 6, 10 ** 6), finite, st.text(max_size=5))
meta_key = st.one_of(st.text(max_size=4), st.integers(0, 3))


def _nest(kids):
    return st.one_of(st.lists(kids, max_size=3), st.dictionaries(meta_key, kids, max_size=3))


metadata = st.recursive(json_leaf, _nest, max_leaves=8)
signal = st.fixed_dictionaries(
    {"symbol": st.one_of(st.just("AAPL"), st.text(max_size=6)),
     "entry_price": st.one_of(st.floats(0.01, 1e6), hostile),
     "confidence": st.one_of(st.floats(0, 100), hostile)},
    optional={k: hostile for k in ("action", "target_price", "take_profit", "stop_price", "stop_loss",
                                    "timestamp", "exit_price", "profit_loss_pct", "strategy", "venue",
                                    "signal_id")}
    | {"metadata": metadata, "epoch": st.one_of(st.integers(-10 ** 14, 10 ** 14), st.floats())})


def _with_epoch(sig):
    if "epoch" in sig:  # epoch seconds as the timestamp (int or float, hostile or not)
        sig = dict(sig)
        sig["timestamp"] = sig.pop("epoch")
    return sig


ALLOWED_FIELDS = set(FINISHED_FIELDS) | {"take_profit", "stop_loss", "venue"}


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                                  HealthCheck.function_scoped_fixture])
@given(sigs=st.lists(signal.map(_with_epoch), min_size=1, max_size=8))
def test_accepted_signals_read_back_exactly_and_the_rest_name_a_field(tmp_path_factory, sigs):
    path = tmp_path_factory.mktemp("prop") / "p.db"
    conn = store.connect(str(path))
    store.ensure_schema(conn)
    want = {}
    try:
        for k, sig in enumerate(sigs):
            sig = {**sig, "signal_id": f"id{k}"}
            try:
                norm = normalise(sig)
            except SignalValidationError as exc:
                assert isinstance(exc.field, str) and exc.field in ALLOWED_FIELDS, exc
                continue
            want[norm[0]] = as_dict(finish(norm))
        res = store.write_batch(conn, [tuple(want[s][c] for c in FINISHED_FIELDS) for s in want])
        assert res.inserted == len(want) and not res.rejected_rows
        conn.row_factory = sqlite3.Row
        got = {r["signal_id"]: dict(r) for r in conn.execute("SELECT * FROM signals")}
    finally:
        conn.close()
    assert set(got) == set(want)
    for sid, w in want.items():
        for col, v in w.items():
            assert got[sid][col] == v, col
            assert type(got[sid][col]) is (str if isinstance(v, str) else type(v)), col
        for col in ("entry_price", "confidence"):
            assert math.isfinite(got[sid][col])
        if w["metadata"] is not None:
            assert json.dumps(json.loads(got[sid]["metadata"]), sort_keys=True) == w["metadata"]
        datetime.fromisoformat(got[sid]["timestamp"])
