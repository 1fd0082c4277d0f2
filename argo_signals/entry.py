"""What the engine's queue holds, and where a written batch of it ended.

The queue holds one entry per ``log_signal()`` or ``update_signal()`` call.

An entry is a plain tuple ``(kind, payload, logged_at)``: ``kind`` is ``INSERT`` (payload: the
validated row from ``record.normalise``) or ``UPDATE`` (payload: ``(signal_id, fields)``), and
``logged_at`` is ``time.monotonic()`` when the caller logged it (the batch timeout counts from
the oldest one; the spill keeps the order of updates by it).  The tracker makes them, the
queue (``batchqueue``) and the engine carry them, the sink writes them and answers each batch
with its ``BatchFate``.
"""
from __future__ import annotations

import enum
from typing import Any, Tuple

__all__ = ["BatchFate", "Entry", "INSERT", "UPDATE"]

INSERT, UPDATE = 0, 1
Entry = Tuple[int, Any, float]          # (kind, payload, time.monotonic() when logged)


class BatchFate(enum.Enum):
    """Where a batch handed to ``Sink.write()`` (or ``Sink.salvage()``) ended."""
    COMMITTED = "committed"   # in the database (or there was nothing to write)
    SPILLED = "spilled"       # in the spill file, replayed into the database later
    HELD = "held"             # neither took it: write() -> the engine keeps the entries queued;
    #                           salvage() -> they were printed to stderr as unsaved lines
