"""spill.py on its own: append, take, give back, line checks, counting, the lock (real files)."""
import json
import os
import time

import pytest

from argo_signals import spill
from argo_signals.signal import FINISHED_FIELDS, finish, normalise

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
    assert taken.bad == 0 and taken.path.endswith(".replaying")
    assert not os.path.exists(path) and spill.pending_count(path) == 4   # still waiting, taken
    os.remove(taken.path)
    assert spill.take(path) is None and spill.pending_count(path) == 0


def test_updates_come_back_in_the_order_they_were_made(path):
    sid = finished(0)[0]
    spill.append(path, [], [(sid, {"outcome": "loss"})], [200.0])
    spill.append(path, [], [(sid, {"outcome": "win"})], [100.0])    # older, written later
    assert [f["outcome"] for _, f in spill.take(path).updates] == ["win", "loss"]


def test_give_back_puts_taken_lines_before_newer_ones(path):
    first, second = finished(1), finished(2)
    spill.append(path, [first], [])
    taken = spill.take(path)
    spill.append(path, [second], [])                                  # spilled meanwhile
    spill.give_back(taken, path)
    again = spill.take(path)
    assert [r[0] for r in again.rows] == [first[0], second[0]]


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
    assert taken.bad == 1 and [r[0] for r in taken.rows] == [good["signal_id"]]
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
