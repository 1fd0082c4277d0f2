"""spill.py on its own: append, take, give back, line checks, counting, the lock (real files)."""
import json
import os
import time

import pytest

from argo_signals import spill
from argo_signals.record import FINISHED_FIELDS, finish, normalise

from conftest import make_signal


def finished(i, **over):
    return finish(normalise(make_signal(i, **over)))


@pytest.fixture
def path(tmp_path):
    return str(tmp_path / "s.db.spill.jsonl")


def test_append_then_take_returns_checked_rows_and_updates(path):
    rows = [finished(i) for i in range(3)]
    spill.append(path, rows, [(rows[0][0], {"outcome": "win"})], [time.time()])
    assert spill.pending_count(path) == 4
    taken = spill.take(path)
    assert taken.rows == rows
    assert taken.updates == [(rows[0][0], {"outcome": "win"})]
    assert taken.bad == [] and taken.last
    assert spill.pending_count(path) == 4   # still waiting until consumed
    spill.consumed(taken)
    assert spill.take(path) is None and spill.pending_count(path) == 0


def test_a_chunk_not_consumed_stays_and_a_consumed_one_is_not_read_again(path):
    rows = [finished(i) for i in range(5)]
    spill.append(path, rows, [])
    first = spill.take(path, max_entries=2)
    assert [r[0] for r in first.rows] == [r[0] for r in rows[:2]] and not first.last
    assert spill.take(path, max_entries=2).rows == first.rows      # not consumed: read again
    spill.consumed(first)
    assert spill.pending_count(path) == 3 and not os.path.exists(path)   # taken: new appends go behind
    second = spill.take(path, max_entries=10)
    assert [r[0] for r in second.rows] == [r[0] for r in rows[2:]] and second.last


def test_updates_come_back_in_the_order_they_were_made(path):
    sid = finished(0)[0]
    spill.append(path, [], [(sid, {"outcome": "loss"})], [200.0])
    spill.append(path, [], [(sid, {"outcome": "win"})], [100.0])    # older, written later
    assert [f["outcome"] for _, f in spill.take(path).updates] == ["win", "loss"]


def test_taken_lines_replay_before_newer_ones(path):
    first, second, third = finished(1), finished(2), finished(3)
    spill.append(path, [first, third], [])
    spill.consumed(spill.take(path, max_entries=1))                   # a replay got one row in...
    assert spill.take(path).rows[0][0] == third[0]                    # ...then failed
    spill.append(path, [second], [])                                  # spilled meanwhile
    again = spill.take(path)
    assert [r[0] for r in again.rows] == [third[0]]
    spill.consumed(again)
    assert [r[0] for r in spill.take(path).rows] == [second[0]]


@pytest.mark.parametrize("line, why", [
    ("123", "not a JSON object"), ("null", "not a JSON object"),
    (json.dumps({"update_of": "x"}), "fields must be an object"),
    (json.dumps({"update_of": "x", "fields": {"symbol": "X"}}), "cannot be updated"),
])
def test_a_bad_line_is_set_aside_with_its_reason(path, line, why, caplog):
    good = dict(zip(FINISHED_FIELDS, finished(1)))
    with open(path, "w") as f:
        f.write(line + "\n" + json.dumps(good) + "\n")
    taken = spill.take(path)
    assert len(taken.bad) == 1 and [r[0] for r in taken.rows] == [good["signal_id"]]
    spill.consumed(taken)   # set aside once the chunk is committed
    assert open(f"{path}.bad").read() == line + "\n"
    assert why in caplog.text


def test_rows_are_checked_again_with_log_signal_rules(path):
    row = dict(zip(FINISHED_FIELDS, finished(1)), entry_price="abc")
    with pytest.raises(ValueError):
        spill.entry_from_json(json.dumps(row).encode())
    good = finished(2)
    kind, back = spill.entry_from_json(json.dumps(dict(zip(FINISHED_FIELDS, good))).encode())
    assert kind == "row" and back == good   # same text, same hash


def test_torn_last_line_is_kept_aside(path):
    with open(path, "w") as f:
        f.write(json.dumps(dict(zip(FINISHED_FIELDS, finished(1)))) + '\n{"signal_id": "to')
    taken = spill.take(path)
    assert len(taken.rows) == 1
    spill.consumed(taken)
    torn = [n for n in os.listdir(os.path.dirname(path)) if ".torn-" in n]
    assert len(torn) == 1


def test_lock_wait_is_bounded_by_the_callers_timeout(path):
    import threading
    held = threading.Event()
    release = threading.Event()

    def holder():
        with spill._locked(path):
            held.set()
            release.wait(5)

    t = threading.Thread(target=holder)
    t.start()
    assert held.wait(5)
    start = time.monotonic()
    with pytest.raises(OSError, match="still busy"):
        spill.append(path, [finished(1)], [], timeout=0.2)
    assert time.monotonic() - start < 1.0
    release.set()
    t.join()
    spill.append(path, [finished(1)], [], timeout=0.2)
    assert spill.pending_count(path) == 1


def test_an_append_after_a_torn_tail_starts_on_a_fresh_line(path):
    with open(path, "w") as f:
        f.write('{"signal_id": "to')                     # a crash in the middle of an append
    row = finished(1)
    spill.append(path, [row], [])
    taken = spill.take(path)
    assert [r[0] for r in taken.rows] == [row[0]] and len(taken.bad) == 1
