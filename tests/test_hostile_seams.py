"""Hostile checks of the spill's framing and replay at their edges (real files)."""
from argo_signals import spill
from argo_signals.signal import finish, normalise

from conftest import make_signal


def test_a_spilled_signal_longer_than_the_readers_line_buffer_is_replayed_not_set_aside(tmp_path, monkeypatch):
    monkeypatch.setattr(spill, "MAX_LINE", 4096)   # the buffer, made small; log_signal() has no such limit
    path = str(tmp_path / "s.db.spill.jsonl")
    big = finish(normalise(make_signal(1, metadata={"note": "x" * 10_000})))
    small = finish(normalise(make_signal(2)))
    spill.append(path, [small, big, small], [])
    chunk = spill.take(path)
    assert chunk.bad == []
    assert [r[0] for r in chunk.rows] == [small[0], big[0], small[0]]
    assert chunk.rows[1] == big


def test_a_spill_holding_only_a_torn_fragment_is_set_aside_and_cleared(tmp_path):
    path = str(tmp_path / "s.db.spill.jsonl")
    with open(path, "wb") as f:
        f.write(b'{"signal_id": "abc", "sym')
    chunk = spill.take(path)
    assert chunk.rows == [] and len(chunk.bad) == 1 and chunk.last
    spill.consumed(chunk)
    assert spill.take(path) is None and spill.pending_count(path) == 0
