"""What the engine's queue holds: one entry per ``log_signal()`` or ``update_signal()`` call.

An entry is a plain tuple ``(kind, payload, logged_at)``: ``kind`` is ``INSERT`` (payload: the
validated row from ``record.normalise``) or ``UPDATE`` (payload: ``(signal_id, fields)``), and
``logged_at`` is ``time.monotonic()`` when the caller logged it (the batch timeout counts from
the oldest one; the spill keeps the order of updates by it).  The tracker makes them, the
queue (``batchqueue``) and the engine carry them, the sink writes them.
"""
from __future__ import annotations

from typing import Any, Tuple

__all__ = ["Entry", "INSERT", "UPDATE"]

INSERT, UPDATE = 0, 1
Entry = Tuple[int, Any, float]          # (kind, payload, time.monotonic() when logged)
