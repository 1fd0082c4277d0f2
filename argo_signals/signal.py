"""The signal: validation and normalisation (caller's thread), ids, and the Alpine hash.

``normalise()`` runs on the producer's thread, so it is kept lean: it checks every field,
converts numbers to float and returns a tuple in ``FIELDS`` order.  Work that cannot fail
(formatting a default timestamp, the sha256) is left to ``finish()``, which the writer
thread runs just before the insert.
"""
from __future__ import annotations

import hashlib
import itertools
import json
import math
import os
import time
from datetime import datetime, timezone
from decimal import Decimal
from typing import Any, Dict, Mapping, Optional, Tuple

__all__ = [
    "SignalValidationError",
    "FIELDS",
    "UPDATABLE",
    "normalise",
    "normalise_update",
    "finish",
    "as_dict",
    "alpine_hash",
    "new_signal_id",
    "format_timestamp",
]


class SignalValidationError(ValueError):
    """A signal (or an update) was refused at the call; ``field`` names the culprit."""

    def __init__(self, field: str, problem: str) -> None:
        super().__init__(f"{field}: {problem}")
        self.field = field
        self.problem = problem


# Columns a normalised signal carries, in order.  ``timestamp`` may still be a float
# (seconds since the epoch) until ``finish()`` formats it.
FIELDS: Tuple[str, ...] = (
    "signal_id", "symbol", "action", "entry_price", "target_price", "stop_price",
    "confidence", "strategy", "asset_type", "data_source", "timestamp", "regime",
    "reasoning", "service_type", "executor_id", "generated_by", "order_id",
    "outcome", "exit_price", "profit_loss_pct", "metadata",
)
# Columns added by finish(): the row written to SQLite is FIELDS + these.
FINISHED_FIELDS: Tuple[str, ...] = FIELDS + ("sha256",)

_TEXT_FIELDS = ("regime", "reasoning", "service_type", "executor_id", "generated_by",
                "order_id", "outcome", "data_source")
_RESERVED = frozenset(("id", "sha256", "verification_hash", "created_at", "sync_status",
                       "sync_attempts", "synced_at", "sync_error", "sync_next_at",
                       "sync_claim", "sync_claim_until"))
_KNOWN = (frozenset(FIELDS) - {"metadata"}) | {"take_profit", "stop_loss"}
_ACTIONS = {"BUY": "BUY", "SELL": "SELL", "NEUTRAL": "NEUTRAL"}
# Fields update_signal() may change: none of them is part of the hash.
UPDATABLE = frozenset(("order_id", "outcome", "exit_price", "profit_loss_pct", "executor_id"))
_UTC = timezone.utc


def _number(field: str, value: Any) -> float:
    t = type(value)
    if t is float:
        f = value
    elif t is int:
        try:
            f = float(value)
        except OverflowError:
            raise SignalValidationError(field, "number out of range") from None
    elif t is bool or value is None:
        raise SignalValidationError(field, f"expected a number, got {value!r}")
    elif isinstance(value, (int, float, Decimal)) and not isinstance(value, bool):
        try:
            f = float(value)
        except (OverflowError, ValueError):
            raise SignalValidationError(field, f"not a finite number: {value!r}") from None
    elif isinstance(value, str):
        try:
            f = float(value.strip())
        except ValueError:
            raise SignalValidationError(field, f"not a number: {value!r}") from None
    else:
        raise SignalValidationError(field, f"expected a number, got {type(value).__name__}")
    if f != f or f in (math.inf, -math.inf):
        raise SignalValidationError(field, f"must be finite, got {value!r}")
    return f


def _price(field: str, value: Any) -> Optional[float]:
    if value is None:
        return None
    f = _number(field, value)
    if f <= 0.0:
        raise SignalValidationError(field, f"must be > 0, got {value!r}")
    return f


def _text(field: str, value: Any, required: bool = False) -> Optional[str]:
    if value is None:
        if required:
            raise SignalValidationError(field, "is required")
        return None
    if type(value) is not str:
        raise SignalValidationError(field, f"expected a string, got {type(value).__name__}")
    if not value.isascii():
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            raise SignalValidationError(field, "is not valid Unicode text") from None
    return value


def format_timestamp(value: Any, field: str = "timestamp") -> str:
    """Return ``value`` as UTC ISO-8601 with an explicit offset (naive is taken as UTC)."""
    if isinstance(value, datetime):
        dt = value
    elif isinstance(value, str):
        text = value.strip()
        if text.endswith(("Z", "z")):
            text = text[:-1] + "+00:00"
        try:
            dt = datetime.fromisoformat(text)
        except ValueError:
            raise SignalValidationError(field, f"not an ISO-8601 timestamp: {value!r}") from None
    elif isinstance(value, float) and not isinstance(value, bool):
        return datetime.fromtimestamp(value, _UTC).isoformat()
    else:
        raise SignalValidationError(field, f"expected an ISO-8601 string or datetime, "
                                           f"got {type(value).__name__}")
    if dt.tzinfo is None or dt.utcoffset() is None:
        dt = dt.replace(tzinfo=_UTC)
    try:
        return dt.astimezone(_UTC).isoformat()
    except (OverflowError, ValueError):
        raise SignalValidationError(field, f"out of range: {value!r}") from None


# -- ids ---------------------------------------------------------------------------------
# UUIDv7 layout: 48-bit unix milliseconds, version 7, then a 42-bit per-process counter
# (monotonic, so ids from one process are strictly increasing) and 32 random bits fixed
# per process (re-drawn after fork) that keep processes apart.
_id_counter = itertools.count(int.from_bytes(os.urandom(4), "big"))
_id_node = os.urandom(4).hex()


def _reseed_ids() -> None:
    global _id_counter, _id_node
    _id_counter = itertools.count(int.from_bytes(os.urandom(4), "big"))
    _id_node = os.urandom(4).hex()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_reseed_ids)


def new_signal_id(now: Optional[float] = None) -> str:
    """A time-ordered, collision-free id in UUIDv7 format."""
    ms = int((time.time() if now is None else now) * 1000)
    c = next(_id_counter) & 0x3FFFFFFFFFF
    return (f"{ms >> 16:08x}-{ms & 0xFFFF:04x}-7{c >> 30:03x}-"
            f"{0x8000 | ((c >> 16) & 0x3FFF):04x}-{c & 0xFFFF:04x}{_id_node}")


# -- normalisation -----------------------------------------------------------------------
def normalise(signal: Mapping[str, Any]) -> tuple:
    """Validate ``signal`` and return it as a tuple in ``FIELDS`` order.

    Raises ``TypeError`` when ``signal`` is not a mapping and ``SignalValidationError``
    (naming the field) for any bad value.  The timestamp slot holds a float when the
    caller gave none; ``finish()`` formats it.
    """
    if not isinstance(signal, Mapping):
        raise TypeError(f"a signal must be a mapping, got {type(signal).__name__}")
    get = signal.get
    symbol = get("symbol")
    if type(symbol) is not str or not symbol.strip():
        raise SignalValidationError("symbol", f"must be a non-empty string, got {symbol!r}")
    symbol = _text("symbol", symbol.strip())
    action = get("action")
    if action is None:
        action = "NEUTRAL"
    elif type(action) is str:
        action = _ACTIONS.get(action.strip().upper())
        if action is None:
            raise SignalValidationError("action", f"must be BUY, SELL or NEUTRAL, got {get('action')!r}")
    else:
        raise SignalValidationError("action", f"must be BUY, SELL or NEUTRAL, got {action!r}")
    entry = _number("entry_price", get("entry_price"))
    if entry <= 0.0:
        raise SignalValidationError("entry_price", f"must be > 0, got {get('entry_price')!r}")
    confidence = _number("confidence", get("confidence"))
    if not 0.0 <= confidence <= 100.0:
        raise SignalValidationError("confidence", f"must be within 0-100, got {get('confidence')!r}")

    sid = get("signal_id")
    if sid is None:
        now = time.time()
        sid = new_signal_id(now)
    else:
        if type(sid) is not str or not sid.strip() or len(sid) > 128:
            raise SignalValidationError("signal_id", "must be a non-empty string of at most 128 characters")
        _text("signal_id", sid)
        now = None
    ts = get("timestamp")
    if ts is None:
        ts = time.time() if now is None else now
    else:
        ts = format_timestamp(ts)

    target = get("target_price")
    if target is None:
        target = get("take_profit")
    stop = get("stop_price")
    if stop is None:
        stop = get("stop_loss")
    strategy = get("strategy")
    strategy = "unknown" if strategy is None else _text("strategy", strategy)
    asset_type = get("asset_type")
    if asset_type is None:
        asset_type = "crypto" if "-USD" in symbol else "stock"
    else:
        _text("asset_type", asset_type)

    texts = [v if v is None else _text(f, v) for f, v in zip(_TEXT_FIELDS, map(get, _TEXT_FIELDS))]
    exit_price = _price("exit_price", get("exit_price"))
    pnl = get("profit_loss_pct")
    if pnl is not None:
        pnl = _number("profit_loss_pct", pnl)

    metadata = None
    if not _KNOWN.issuperset(signal):
        metadata = _metadata(signal)
    regime, reasoning, service_type, executor_id, generated_by, order_id, outcome, data_source = texts
    return (sid, symbol, action, entry, _price("target_price", target), _price("stop_price", stop),
            confidence, strategy, asset_type, data_source, ts, regime, reasoning, service_type,
            executor_id, generated_by, order_id, outcome, exit_price, pnl, metadata)


def _metadata(signal: Mapping[str, Any]) -> Optional[str]:
    extra: Dict[str, Any] = {}
    base = signal.get("metadata")
    for key, value in signal.items():
        if type(key) is not str:
            raise SignalValidationError(repr(key), "field names must be strings")
        if key in _RESERVED:
            raise SignalValidationError(key, "is set by argo-signals and cannot be passed in")
        if key not in _KNOWN and key != "metadata":
            extra[key] = value
    if base is not None:
        if not isinstance(base, Mapping):
            raise SignalValidationError("metadata", "must be a mapping")
        extra = {**base, **extra}
    if not extra:
        return None
    try:
        return json.dumps(extra, allow_nan=False, sort_keys=True)
    except (TypeError, ValueError) as exc:
        raise SignalValidationError("metadata", f"extra fields must be JSON-serialisable: {exc}") from None


def normalise_update(fields: Mapping[str, Any]) -> Dict[str, Any]:
    """Validate the keyword arguments of ``update_signal()``."""
    if not fields:
        raise SignalValidationError("update", "nothing to update")
    out: Dict[str, Any] = {}
    for key, value in fields.items():
        if key not in UPDATABLE:
            raise SignalValidationError(key, f"cannot be updated (allowed: {', '.join(sorted(UPDATABLE))})")
        if key == "exit_price":
            out[key] = _price(key, value)
        elif key == "profit_loss_pct":
            out[key] = None if value is None else _number(key, value)
        else:
            out[key] = _text(key, value)
    return out


def alpine_hash(signal_id: str, symbol: str, action: str, entry_price: float,
                target_price: Optional[float], stop_price: Optional[float],
                confidence: float, strategy: str, timestamp: str) -> str:
    """The verification hash exactly as the Alpine receiver recomputes it."""
    fields = {
        "signal_id": signal_id, "symbol": symbol, "action": action.upper(),
        "entry_price": float(entry_price),
        "target_price": None if target_price is None else float(target_price),
        "stop_price": None if stop_price is None else float(stop_price),
        "confidence": float(confidence), "strategy": strategy, "timestamp": timestamp,
    }
    return hashlib.sha256(json.dumps(fields, sort_keys=True, default=str).encode("utf-8")).hexdigest()


def finish(row: tuple) -> tuple:
    """Complete a normalised tuple for storage: format the timestamp, append the sha256."""
    ts = row[10]
    if type(ts) is float:
        ts = datetime.fromtimestamp(ts, _UTC).isoformat()
        row = row[:10] + (ts,) + row[11:]
    return row + (alpine_hash(row[0], row[1], row[2], row[3], row[4], row[5], row[6], row[7], ts),)


def as_dict(row: tuple) -> Dict[str, Any]:
    """A normalised (or finished) tuple as a dict keyed by column name."""
    return dict(zip(FINISHED_FIELDS, row))
