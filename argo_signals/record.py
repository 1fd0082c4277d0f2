"""A signal record: validation and normalisation (caller's thread), ids, and the Alpine hash.

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
import re
import time
from datetime import datetime, timezone
from decimal import Decimal
from typing import Any, Dict, List, Mapping, Optional, Tuple

from . import lifecycle

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
    "DefaultTimestamp",
    "HASH_FIELDS",
    "RESERVED_COLUMNS",
    "recheck",
    "MAX_METADATA_DEPTH",
    "default_timestamp",
    "hash_row",
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
# The fields the Alpine verification hash (``sha256``) covers.
HASH_FIELDS: Tuple[str, ...] = ("signal_id", "symbol", "action", "entry_price", "target_price",
                                "stop_price", "confidence", "strategy", "timestamp")
# Columns added by finish(): the row written to SQLite is FIELDS + these.
FINISHED_FIELDS: Tuple[str, ...] = FIELDS + ("sha256",)

_TEXT_FIELDS = ("regime", "reasoning", "service_type", "executor_id", "generated_by",
                "order_id", "outcome", "data_source")
# Columns the store computes itself: a signal may not carry them (``ingest`` drops them).
RESERVED_COLUMNS: Tuple[str, ...] = (
    "id", "sha256", "verification_hash", "created_at", "sync_status", "sync_attempts",
    "synced_at", "sync_error", "sync_next_at", "sync_claim", "sync_claim_until")
_RESERVED = frozenset(RESERVED_COLUMNS)
_ALIASES = (("take_profit", "target_price"), ("stop_loss", "stop_price"))
_KNOWN = (frozenset(FIELDS) - {"metadata"}) | {alias for alias, _ in _ALIASES}
# Keys a signal on the plain path carries: anything else (aliases, metadata, extra keys)
# takes the rarer path that also checks for conflicts between them.
_PLAIN = frozenset(FIELDS) - {"metadata"}
# Deeper metadata is refused (it could not be encoded without exhausting the stack).
MAX_METADATA_DEPTH = 64
# A number written as text: ASCII digits only (no other scripts, no "_" separators).
_NUMBER_TEXT = re.compile(r"[+-]?(?:[0-9]+\.?[0-9]*|\.[0-9]+)(?:[eE][+-]?[0-9]+)?", re.ASCII)
_SPACE = " \t\n\r\f\v"
_ACTIONS = {"BUY": "BUY", "SELL": "SELL", "NEUTRAL": "NEUTRAL"}
# Fields update_signal() may change: none of them is part of the hash.
UPDATABLE = frozenset(("order_id", "outcome", "exit_price", "profit_loss_pct", "executor_id"))
_UTC = timezone.utc
_esc = json.encoder.encode_basestring_ascii  # what json.dumps uses for str with ensure_ascii
_sha256 = hashlib.sha256


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
        text = value.strip(_SPACE)
        if not _NUMBER_TEXT.fullmatch(text):
            raise SignalValidationError(field, f"not a number (ASCII decimal text): {value!r}")
        f = float(text)
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


class DefaultTimestamp(str):
    """A timestamp ``finish()`` filled in because the caller gave none.

    It is stored as plain text; the type only tells the store that, when the same
    ``signal_id`` comes again, this timestamp is not part of what must match.
    """

    __slots__ = ()


def format_timestamp(value: Any, field: str = "timestamp") -> str:
    """Return ``value`` as UTC ISO-8601 with an explicit offset (naive is taken as UTC).

    Accepted: a ``datetime``, an ISO-8601 string, or seconds since the epoch as an int or
    float within years 1-9999 (anything else raises ``SignalValidationError``).
    """
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
    elif isinstance(value, (float, int)) and not isinstance(value, bool):
        try:
            return datetime.fromtimestamp(float(value), _UTC).isoformat()
        except (OverflowError, ValueError, OSError):
            raise SignalValidationError(field, f"not a finite epoch time within years 1-9999: "
                                               f"{value!r}") from None
    else:
        raise SignalValidationError(field, f"expected an ISO-8601 string, datetime or epoch "
                                           f"seconds, got {type(value).__name__}")
    if dt.tzinfo is None or dt.utcoffset() is None:
        dt = dt.replace(tzinfo=_UTC)
    try:
        return dt.astimezone(_UTC).isoformat()
    except (OverflowError, ValueError):
        raise SignalValidationError(field, f"out of range: {value!r}") from None


# -- ids ---------------------------------------------------------------------------------
# UUIDv7 layout: 48-bit unix milliseconds, version 7, then 26 random bits fixed per process
# (re-drawn after fork) that keep processes apart, then a 48-bit per-process counter that
# starts at a random value, so ids from one process are strictly increasing.
_id_counter = itertools.count(int.from_bytes(os.urandom(6), "big"))
_id_node = ""
_id_prefix: Tuple[int, str] = (-1, "")


def _reseed_ids() -> None:
    global _id_counter, _id_node, _id_prefix
    rnd = int.from_bytes(os.urandom(4), "big")
    _id_node = f"{rnd >> 20 & 0xFFF:03x}-{0x8000 | (rnd & 0x3FFF):04x}-"
    _id_counter = itertools.count(int.from_bytes(os.urandom(6), "big"))
    _id_prefix = (-1, "")


_reseed_ids()
lifecycle.after_fork_in_child(_reseed_ids)


def new_signal_id(now: Optional[float] = None) -> str:
    """A time-ordered, collision-free id in UUIDv7 format."""
    global _id_prefix
    ms = int((time.time() if now is None else now) * 1000)
    c = next(_id_counter) & 0xFFFFFFFFFFFF
    prefix = _id_prefix
    if prefix[0] != ms:
        prefix = _id_prefix = (ms, f"{ms >> 16:08x}-{ms & 0xFFFF:04x}-7{_id_node}")
    return f"{prefix[1]}{c:012x}"


# -- normalisation -----------------------------------------------------------------------
def normalise(signal: Mapping[str, Any]) -> tuple:
    """Validate ``signal`` and return it as a tuple in ``FIELDS`` order.

    Raises ``TypeError`` when ``signal`` is not a mapping and ``SignalValidationError``
    (naming the field) for any bad value.  The timestamp slot holds a float when the
    caller gave none; ``finish()`` formats it.  Common types take inline fast paths; every
    other value goes through the general checks.
    """
    if type(signal) is not dict and not isinstance(signal, Mapping):
        raise TypeError(f"a signal must be a mapping, got {type(signal).__name__}")
    get = signal.get
    symbol = get("symbol")
    if type(symbol) is not str or not (symbol := symbol.strip()):
        raise SignalValidationError("symbol", f"must be a non-empty string, got {get('symbol')!r}")
    if not symbol.isascii():
        _text("symbol", symbol)
    action = get("action")
    if action is None:
        action = "NEUTRAL"
    else:
        action = (_ACTIONS.get(action) or (action.isascii() and _ACTIONS.get(action.strip(_SPACE).upper()))
                  or None) if type(action) is str else None
        if action is None:
            raise SignalValidationError("action", f"must be BUY, SELL or NEUTRAL, got {get('action')!r}")
    entry = get("entry_price")
    if type(entry) is not float or not 0.0 < entry < math.inf:
        entry = _number("entry_price", entry)
        if entry <= 0.0:
            raise SignalValidationError("entry_price", f"must be > 0, got {get('entry_price')!r}")
    confidence = get("confidence")
    if type(confidence) is not float or not 0.0 <= confidence <= 100.0:
        confidence = _number("confidence", confidence)
        if not 0.0 <= confidence <= 100.0:
            raise SignalValidationError("confidence", f"must be within 0-100, got {get('confidence')!r}")
    confidence += 0.0   # -0.0 becomes 0.0: the hash must see what the database stores

    sid = get("signal_id")
    now = time.time()
    if sid is None:
        sid = new_signal_id(now)
    elif type(sid) is not str or not sid.strip() or len(sid) > 128:
        raise SignalValidationError("signal_id", "must be a non-empty string of at most 128 characters")
    elif not sid.isascii():
        _text("signal_id", sid)
    ts = get("timestamp")
    ts = now if ts is None else format_timestamp(ts)

    target = get("target_price")
    if target is not None and (type(target) is not float or not 0.0 < target < math.inf):
        target = _price("target_price", target)
    stop = get("stop_price")
    if stop is not None and (type(stop) is not float or not 0.0 < stop < math.inf):
        stop = _price("stop_price", stop)
    strategy = get("strategy")
    if strategy is None:
        strategy = "unknown"
    elif type(strategy) is not str or not strategy.isascii():
        _text("strategy", strategy)
    asset_type = get("asset_type")
    if asset_type is None:
        asset_type = "crypto" if "-USD" in symbol else "stock"
    elif type(asset_type) is not str or not asset_type.isascii():
        _text("asset_type", asset_type)

    texts = tuple(map(get, _TEXT_FIELDS))
    for v in texts:   # None or ASCII str passes; anything else is checked naming its field
        if v is not None and (type(v) is not str or not v.isascii()):
            for name, value in zip(_TEXT_FIELDS, texts):
                _text(name, value)
            break
    regime, reasoning, service_type, executor_id, generated_by, order_id, outcome, data_source = texts
    exit_price = get("exit_price")
    if exit_price is not None:
        exit_price = _price("exit_price", exit_price)
    pnl = get("profit_loss_pct")
    if pnl is not None:
        pnl = _number("profit_loss_pct", pnl)
    metadata = None
    if not _PLAIN.issuperset(signal):
        if "take_profit" in signal:
            target = _alias(signal, "take_profit", "target_price", target)
        if "stop_loss" in signal:
            stop = _alias(signal, "stop_loss", "stop_price", stop)
        if not _KNOWN.issuperset(signal):
            metadata = _metadata(signal)
    return (sid, symbol, action, entry, target, stop, confidence, strategy, asset_type,
            data_source, ts, regime, reasoning, service_type, executor_id, generated_by,
            order_id, outcome, exit_price, pnl, metadata)


def _alias(signal: Mapping[str, Any], alias: str, field: str, value: Optional[float]) -> Optional[float]:
    """``alias`` (e.g. ``take_profit``) stands for ``field``: it must be valid, and agree with
    ``field`` (already validated as ``value``) when both are given."""
    raw = signal[alias]
    if raw is None:
        return value
    if value is None:
        return _price(field, raw) if field not in signal else _price(alias, raw)
    other = _price(alias, raw)
    if other != value:
        raise SignalValidationError(field, f"{field}={signal[field]!r} and {alias}={raw!r} disagree "
                                           f"(give one, or equal values)")
    return value


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
        for key, value in base.items():
            if type(key) is not str:
                raise SignalValidationError("metadata", f"keys must be strings, got {key!r}")
            if key in signal and key != "metadata" and not _same(signal[key], value):
                raise SignalValidationError(key, "given both at the top level and inside metadata, "
                                                 "with different values")
        extra = {**base, **extra}
    if not extra:
        return None
    _check_nesting(extra, 1)
    try:
        return json.dumps(extra, allow_nan=False, sort_keys=True)
    except (TypeError, ValueError) as exc:
        raise SignalValidationError("metadata", f"extra fields must be JSON-serialisable: {exc}") from None


def _same(a: Any, b: Any) -> bool:
    try:
        return a is b or bool(a == b)
    except Exception:  # e.g. an array, whose == is elementwise
        return False


def _check_nesting(value: Any, depth: int) -> None:
    """Mapping keys must be strings (JSON would turn 1 into "1"); depth is bounded.
    Circular containers are left to json.dumps, which names them."""
    if depth > MAX_METADATA_DEPTH:
        raise SignalValidationError("metadata", f"nested deeper than {MAX_METADATA_DEPTH} levels")
    if isinstance(value, Mapping):
        for key, item in value.items():
            if type(key) is not str:
                raise SignalValidationError("metadata", f"keys must be strings, got {key!r}")
            if isinstance(item, (Mapping, list, tuple)):
                _check_nesting(item, depth + 1)
    elif isinstance(value, (list, tuple)):
        for item in value:
            if isinstance(item, (Mapping, list, tuple)):
                _check_nesting(item, depth + 1)


def recheck(stored: Mapping[str, Any]) -> List[Tuple[str, str]]:
    """Apply ``log_signal()``'s rules to a stored row: one ``(field, problem)`` per way the
    row differs from what ``log_signal()`` would have stored (empty when it conforms)."""
    sig: Dict[str, Any] = {name: stored.get(name) for name in FIELDS}
    meta = sig.pop("metadata")
    if meta is not None:
        try:
            meta = json.loads(meta)
        except (TypeError, ValueError):
            return [("metadata", "not JSON text")]
        if not isinstance(meta, dict):
            return [("metadata", "not a JSON object")]
        sig["metadata"] = meta
    if sig["timestamp"] is None:
        return [("timestamp", "missing")]
    try:
        norm = normalise(sig)
    except SignalValidationError as exc:
        return [(exc.field, exc.problem)]
    except TypeError as exc:  # e.g. an unhashable value where a key is looked up
        return [("row", str(exc))]
    out = []
    for name, want in zip(FIELDS, norm):
        have = stored.get(name)
        if name == "metadata":
            if (None if want is None else json.loads(want)) != meta:
                out.append((name, "not what log_signal() stores for it"))
        elif name == "timestamp" and isinstance(want, str) and isinstance(have, str):
            if have != want and not (have.endswith("+00:00") and datetime.fromisoformat(have) ==
                                     datetime.fromisoformat(want)):  # default ones keep ".000000"
                out.append((name, f"stored {have!r}, log_signal() stores {want!r}"))
        elif have != want or type(have) is not type(want):
            out.append((name, f"stored {have!r}, log_signal() stores {want!r}"))
    return out


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
    """The verification hash exactly as the Alpine receiver recomputes it.

    That is ``sha256(json.dumps(fields, sort_keys=True, default=str))`` with numbers as
    floats; for the usual types the JSON text is assembled directly (same bytes, faster).
    """
    entry_price = float(entry_price)
    confidence = float(confidence)
    target_price = None if target_price is None else float(target_price)
    stop_price = None if stop_price is None else float(stop_price)
    action = action.upper()
    if (type(signal_id) is str and type(symbol) is str and type(strategy) is str
            and type(timestamp) is str):
        text = _hash_text(signal_id, symbol, action, entry_price, target_price, stop_price,
                          confidence, strategy, timestamp)
    else:
        text = json.dumps({
            "signal_id": signal_id, "symbol": symbol, "action": action, "entry_price": entry_price,
            "target_price": target_price, "stop_price": stop_price, "confidence": confidence,
            "strategy": strategy, "timestamp": timestamp}, sort_keys=True, default=str)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def _hash_text(signal_id: str, symbol: str, action: str, entry_price: float,
               target_price: Optional[float], stop_price: Optional[float], confidence: float,
               strategy: str, timestamp: str) -> str:
    """``json.dumps(fields, sort_keys=True)`` for str fields and float numbers, built directly."""
    return (f'{{"action": {_ACTION_JSON.get(action) or _esc(action)}, "confidence": {confidence!r}, '
            f'"entry_price": {entry_price!r}, "signal_id": {_esc(signal_id)}, '
            f'"stop_price": {"null" if stop_price is None else repr(stop_price)}, '
            f'"strategy": {_esc(strategy)}, "symbol": {_esc(symbol)}, '
            f'"target_price": {"null" if target_price is None else repr(target_price)}, '
            f'"timestamp": {_esc(timestamp)}}}')


_ACTION_JSON = {a: _esc(a) for a in _ACTIONS.values()}
_ts_cache: Tuple[int, str] = (-1, "")


def _utc_iso(ts: float) -> str:
    """Epoch seconds as ``YYYY-MM-DDTHH:MM:SS.ffffff+00:00`` (the seconds part is cached)."""
    global _ts_cache
    sec, us = divmod(round(ts * 1_000_000), 1_000_000)
    cached = _ts_cache
    if cached[0] != sec:
        cached = _ts_cache = (sec, time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(sec)))
    return f"{cached[1]}.{us:06d}+00:00"


def default_timestamp(ts: float) -> DefaultTimestamp:
    """The timestamp ``finish()`` fills in for a signal logged at ``ts`` (epoch seconds)."""
    return DefaultTimestamp(_utc_iso(ts))


def hash_row(row: tuple) -> str:
    """The sha256 ``finish()`` appends: ``row`` is normalised, its timestamp already text."""
    sid, symbol, action, entry, target, stop, confidence, strategy = row[:8]
    text = _hash_text(sid, symbol, action, entry, target, stop, confidence, strategy, row[10])
    return _sha256(text.encode()).hexdigest()


def finish(row: tuple) -> tuple:
    """Complete a normalised tuple for storage: format the timestamp, append the sha256.

    ``row`` comes from ``normalise()`` (floats, upper-case action, str fields), so the hash
    text is built directly; ``alpine_hash()`` is the general form and the tests hold the two equal.
    """
    sid, symbol, action, entry, target, stop, confidence, strategy, _, _, ts = row[:11]
    if type(ts) is float:
        ts = DefaultTimestamp(_utc_iso(ts))
        text = _hash_text(sid, symbol, action, entry, target, stop, confidence, strategy, ts)
        return (*row[:10], ts, *row[11:], _sha256(text.encode()).hexdigest())
    text = _hash_text(sid, symbol, action, entry, target, stop, confidence, strategy, ts)
    return row + (_sha256(text.encode()).hexdigest(),)


def as_dict(row: tuple) -> Dict[str, Any]:
    """A normalised (or finished) tuple as a dict keyed by column name."""
    return dict(zip(FINISHED_FIELDS, row))
