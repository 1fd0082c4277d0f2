"""The Alpine ingest contract: paths, the request body, the receiver's hash, what it refuses for
good, what its answers mean, and what may go in the ``X-API-Key`` header.

The refusal rules are written once, in ``REFUSALS``; the pre-send check (``refusal``) and the
SQL that settles refused rows without a request (``refusal_sql``) are both derived from it.
Lengths are measured as the receiver measures them: after ``.upper()`` for the symbol, after
stripping (Python's ``str.strip``, Unicode whitespace included) for both.
"""
from __future__ import annotations

import email.utils
import enum
import hashlib
import json
import re
import sqlite3
import time
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Mapping, Optional, Tuple
from urllib.parse import urlsplit

__all__ = ["SIGNAL_PATH", "HEALTH_PATH", "payload", "hash_fields", "receiver_hash", "Refusal",
           "REFUSALS", "refusal", "refusal_sql", "register_sql_functions", "fraction_warning", "check_api_key",
           "check_alpine_url", "parse_retry_after", "Kind", "Answer", "classify", "RETRYABLE_STATUS",
           "OUTAGE_STATUS", "KEY_VARIABLE"]

SIGNAL_PATH = "/api/v1/external-signals/sync/signal"
HEALTH_PATH = "/api/v1/external-signals/sync/health"
RETRYABLE_STATUS = frozenset((408, 425, 429, 500, 502, 503, 504))
# What a proxy answers for a receiver that is down: the receiver itself, not the signal.
OUTAGE_STATUS = frozenset((502, 503, 504))
KEY_VARIABLE = "ARGO_API_KEY"
DEFAULT_STRATEGY = "weighted_consensus_v6"

_BODY_FIELDS = ("signal_id", "symbol", "action", "entry_price", "target_price", "stop_price",
                "confidence", "strategy", "asset_type", "timestamp", "sha256")
_OPTIONAL_FIELDS = ("data_source", "regime", "reasoning")


def payload(row: Mapping[str, Any]) -> Dict[str, Any]:
    """The JSON body for one stored row, exactly as hashed (the action upper-cased)."""
    body = {k: row.get(k) for k in _BODY_FIELDS}
    body["action"] = str(body["action"]).upper()
    for k in _OPTIONAL_FIELDS:
        if row.get(k) is not None:
            body[k] = row[k]
    return body


def hash_fields(body: Mapping[str, Any]) -> Dict[str, Any]:
    """The fields the receiver hashes, built from a parsed request body as it builds them."""
    target = body.get("target_price") if body.get("target_price") is not None else body.get("take_profit")
    stop = body.get("stop_price") if body.get("stop_price") is not None else body.get("stop_loss")
    return {
        "signal_id": body["signal_id"], "symbol": body["symbol"], "action": str(body["action"]).upper(),
        "entry_price": float(body["entry_price"]),
        "target_price": float(target) if target is not None else None,
        "stop_price": float(stop) if stop is not None else None,
        "confidence": float(body["confidence"]),
        "strategy": body["strategy"] if "strategy" in body else DEFAULT_STRATEGY,
        "timestamp": body["timestamp"],
    }


def receiver_hash(body: Mapping[str, Any]) -> str:
    """The verification hash as the receiver recomputes it from a parsed request body."""
    text = json.dumps(hash_fields(body), sort_keys=True, default=str)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


# -- what the receiver refuses for good ----------------------------------------------------------
def _given_text_length(value: Any) -> Optional[int]:
    """The stripped length of a text that is given and not empty (the receiver's
    ``if reasoning and len(reasoning.strip()) < 20``); None when absent or ``""``."""
    return None if value is None or str(value) == "" else len(str(value).strip())


def _upper_text_length(value: Any) -> Optional[int]:
    return None if value is None else len(str(value).upper().strip())


def _upper(value: Any) -> Optional[str]:
    return None if value is None else str(value).upper()


# How a column is measured before its test: the same function in Python and (registered) in SQL.
_MEASURES: Dict[str, Callable[[Any], Any]] = {
    "upper": _upper, "upper_text_length": _upper_text_length, "given_text_length": _given_text_length,
}


class Test(str, enum.Enum):
    EQUALS = "equals"              # measured value == args[0]
    NOT_IN = "not_in"              # missing, or measured value not in args
    NOT_POSITIVE = "not_positive"  # missing, or <= 0 (a required number)
    NEGATIVE = "negative"          # present and < 0 (an optional price: 0 counts as absent)
    OUTSIDE = "outside"            # missing, or outside [args[0], args[1]]
    BETWEEN = "between"            # present and within [args[0], args[1]]


@dataclass(frozen=True)
class Refusal:
    status: str                    # skipped | rejected
    reason: str
    column: str
    test: Test
    args: Tuple[Any, ...] = ()
    measure: Optional[str] = None  # a key of _MEASURES, or None for the raw value

    def matches(self, row: Mapping[str, Any]) -> bool:
        v = row.get(self.column)
        if self.measure is not None:
            v = _MEASURES[self.measure](v)
        t, a = self.test, self.args
        try:
            if t is Test.EQUALS:
                return bool(v == a[0])
            if t is Test.NOT_IN:
                return v is None or v not in a
            if t is Test.NOT_POSITIVE:
                return v is None or v <= 0
            if t is Test.NEGATIVE:
                return v is not None and v < 0
            if t is Test.OUTSIDE:
                return v is None or not a[0] <= v <= a[1]
            return v is not None and a[0] <= v <= a[1]
        except TypeError:  # not comparable (e.g. text where a number belongs): refused
            return t is not Test.EQUALS

    def sql(self) -> Tuple[str, List[Any]]:
        """The same test as an SQL condition with its parameters."""
        v = self.column if self.measure is None else f"alpine_{self.measure}({self.column})"
        t, a = self.test, list(self.args)
        if t is Test.EQUALS:
            return f"{v} = ?", a[:1]
        if t is Test.NOT_IN:
            return f"({v} IS NULL OR {v} NOT IN ({', '.join('?' * len(a))}))", a
        if t is Test.NOT_POSITIVE:
            return f"({v} IS NULL OR {v} <= 0)", []
        if t is Test.NEGATIVE:
            return f"{v} < 0", []
        if t is Test.OUTSIDE:
            return f"({v} IS NULL OR {v} < ? OR {v} > ?)", a[:2]
        return f"{v} BETWEEN ? AND ?", a[:2]


_RECEIVER = " (the receiver refuses it)"
REFUSALS: Tuple[Refusal, ...] = (
    Refusal("skipped", "NEUTRAL signals are not synced", "action", Test.EQUALS, ("NEUTRAL",), "upper"),
    Refusal("rejected", "action is not BUY or SELL" + _RECEIVER, "action", Test.NOT_IN, ("BUY", "SELL"), "upper"),
    Refusal("rejected", "symbol empty or longer than 20 characters once upper-cased" + _RECEIVER,
            "symbol", Test.OUTSIDE, (1, 20), "upper_text_length"),
    Refusal("rejected", "entry_price must be > 0" + _RECEIVER, "entry_price", Test.NOT_POSITIVE),
    Refusal("rejected", "target_price must not be negative" + _RECEIVER, "target_price", Test.NEGATIVE),
    Refusal("rejected", "stop_price must not be negative" + _RECEIVER, "stop_price", Test.NEGATIVE),
    Refusal("rejected", "confidence outside 0-100" + _RECEIVER, "confidence", Test.OUTSIDE, (0, 100)),
    Refusal("rejected", "reasoning shorter than 20 characters once stripped" + _RECEIVER, "reasoning",
            Test.BETWEEN, (0, 19), "given_text_length"),
)


def refusal(row: Mapping[str, Any]) -> Optional[Tuple[str, str]]:
    """(status, reason) for a row that must not be sent, or None when it may go."""
    for rule in REFUSALS:
        if rule.matches(row):
            return rule.status, rule.reason
    return None


def register_sql_functions(conn: sqlite3.Connection) -> None:
    """Make the measures available to ``refusal_sql`` conditions on ``conn``."""
    for name, fn in _MEASURES.items():
        try:
            conn.create_function(f"alpine_{name}", 1, fn, deterministic=True)
        except (TypeError, sqlite3.NotSupportedError):  # SQLite < 3.8.3
            conn.create_function(f"alpine_{name}", 1, fn)


def refusal_sql() -> List[Tuple[str, str, str, List[Any]]]:
    """[(status, reason, condition, params)] in rule order (needs ``register_sql_functions``)."""
    return [(r.status, r.reason, *r.sql()) for r in REFUSALS]


def fraction_warning(row: Mapping[str, Any]) -> Optional[str]:
    """Why a confidence in (0, 1] will be misread by Alpine (it reads values <= 1 as fractions),
    or None."""
    c = row.get("confidence")
    if not isinstance(c, (int, float)) or not 0 < c <= 1:
        return None
    return (f"signal {row.get('signal_id')} has confidence {c:g}: argo-signals takes confidence on the "
            f"0-100 scale ({c:g} %), but Alpine reads a value <= 1 as a fraction and will show "
            f"{c * 100:g} %; pass {c * 100:g} for {c * 100:g} %")


# -- what may be sent as the key, and where ------------------------------------------------------
def check_api_key(key: Optional[str]) -> Optional[str]:
    """Return ``key`` if the receiver can compare it; else raise ``ValueError`` naming the
    variable (``ARGO_API_KEY``), never repeating the key.

    The receiver compares keys as ``str`` with ``hmac.compare_digest``, which refuses anything
    but ASCII (a bare 500, never 401): a key must be printable ASCII, without surrounding
    whitespace.
    """
    if key is None:
        return None
    if not isinstance(key, str):
        raise ValueError(f"{KEY_VARIABLE}: the API key must be a string, not {type(key).__name__}")
    if not (key.isascii() and key.isprintable()):
        raise ValueError(f"{KEY_VARIABLE}: the API key must be printable ASCII (it has a non-ASCII, "
                         f"control or line-break character); check {KEY_VARIABLE}")
    if key != key.strip(" "):
        raise ValueError(f"{KEY_VARIABLE}: the API key starts or ends with whitespace, which an HTTP header "
                         f"would drop; check {KEY_VARIABLE}")
    return key


def check_alpine_url(url: str) -> str:
    """Return the base URL without a trailing ``/``, its scheme in lower case, if requests can be
    built on it; else raise
    ``ValueError`` with a clear message (credentials in the URL are never repeated)."""
    if not isinstance(url, str):
        raise ValueError(f"ALPINE_API_URL must be a string, not {type(url).__name__}")
    url = url.strip().rstrip("/")
    shown = _hide_credentials(url)
    if not url.lower().startswith(("http://", "https://")):
        raise ValueError(f"ALPINE_API_URL must start with http:// or https:// (got {shown!r})")
    if any(c in url for c in "\r\n\t ") or not url.isprintable():
        raise ValueError(f"ALPINE_API_URL has whitespace or control characters (got {shown!r})")
    try:
        parts = urlsplit(url)
    except ValueError as exc:
        raise ValueError(f"ALPINE_API_URL cannot be parsed ({exc}): {shown!r}") from None
    if parts.fragment or "#" in url:
        raise ValueError(f"ALPINE_API_URL has a fragment ('#...'), which would cut the signal path off "
                         f"(a '#' in a password must be written %23): {shown!r}")
    if parts.query or "?" in url:
        raise ValueError(f"ALPINE_API_URL has a query ('?...'), which would send the posts to another "
                         f"path: give the base URL only: {shown!r}")
    try:
        port = parts.port
    except ValueError:
        raise ValueError(f"ALPINE_API_URL has a bad port (a number 1-65535 expected): {shown!r}") from None
    if port == 0:
        raise ValueError(f"ALPINE_API_URL has a bad port (a number 1-65535 expected): {shown!r}")
    if not parts.hostname:
        raise ValueError(f"ALPINE_API_URL has no host: {shown!r}")
    return parts.scheme + url[len(parts.scheme):]   # the scheme in lower case ("HTTPS://" is "https://")


def _hide_credentials(url: str) -> str:
    """``url`` with everything between ``scheme://`` and the last ``@`` shown as ``***``."""
    head, sep, rest = url.partition("://")
    if not sep or "@" not in rest:
        return url
    return f"{head}://***@{rest.rsplit('@', 1)[1]}"


# -- what the receiver's answers mean ------------------------------------------------------------
class Kind(str, enum.Enum):
    SYNCED = "synced"            # stored (success or duplicate)
    REJECTED = "rejected"        # refused for good for this payload
    AUTH = "auth"                # the key is refused: configuration
    REDIRECT = "redirect"        # a 3xx: configuration (never followed)
    ENDPOINT = "endpoint"        # 404/405: no such endpoint at that URL: configuration
    TRANSIENT = "transient"      # try again later (capped)
    RATE_LIMITED = "rate_limited"  # 429: the whole sync waits (not this row's fault)
    UNREACHABLE = "unreachable"  # no answer (connection refused, timeout), or a proxy's 502/503/504
    #                              or a 5xx without the receiver's JSON body: the receiver is down


@dataclass
class Answer:
    kind: Kind
    detail: str = ""
    retry_after: Optional[float] = None


DETAIL_LIMIT = 4000   # characters of an answer kept for redaction (the shown text is shorter)
_DIGITS = re.compile(r"[0-9]{1,9}")


def parse_retry_after(value: Optional[str], now: Optional[float] = None) -> Optional[float]:
    """Seconds to wait from a Retry-After header (delta-seconds or HTTP date); None if unusable."""
    if not value:
        return None
    value = value.strip()
    if _DIGITS.fullmatch(value):  # ASCII digits only: "²".isdigit() is True but float() refuses it
        return float(value)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except Exception:
        return None
    if when is None:
        return None
    try:
        return max(0.0, when.timestamp() - (time.time() if now is None else now))
    except (OverflowError, ValueError, OSError):
        return None


def _json(content: bytes) -> Any:
    """The decoded body, or None when it cannot be decoded (bad text, too deep, not JSON)."""
    try:
        return json.loads(content)
    except Exception:  # ValueError, RecursionError, UnicodeDecodeError...
        return None


def _receivers_own(content: bytes) -> bool:
    """The body is the receiver's own error answer (a JSON object with ``detail``), not a
    proxy's page or a bare server error."""
    body = _json(content)
    return isinstance(body, dict) and "detail" in body


def _detail(status: int, reason: str, content: bytes) -> str:
    body = _json(content)
    d = body.get("detail") if isinstance(body, dict) else None
    if isinstance(d, str):
        text = d
    elif d is not None:
        try:
            text = json.dumps(d)
        except Exception:
            text = "(unreadable detail)"
    else:
        text = content[:DETAIL_LIMIT].decode("utf-8", "replace")
    # cut generously here; the sender redacts the key and only then cuts to what it shows
    return f"HTTP {status}: " + (text.strip() or reason or "").strip()[:DETAIL_LIMIT]


def classify(status: int, headers: Mapping[str, str], content: bytes, reason: str = "") -> Answer:
    """What one Alpine answer means for the row (the contract's answer table).  Never raises."""
    if status in (200, 201):
        body = _json(content)
        state = body.get("status") if isinstance(body, dict) else None
        if state in ("success", "duplicate"):
            return Answer(Kind.SYNCED, state)
        return Answer(Kind.TRANSIENT, f"HTTP {status} with a body that is not the contract's answer")
    if 300 <= status < 400:
        return Answer(Kind.REDIRECT, f"HTTP {status} redirect to {headers.get('Location') or '(no Location)'}")
    detail = _detail(status, reason, content)
    if status in (401, 403):
        return Answer(Kind.AUTH, detail)
    if status in (404, 405):  # the receiver answers 400/422 about a payload, never these
        return Answer(Kind.ENDPOINT, detail)
    retry_after = parse_retry_after(headers.get("Retry-After"))
    if status == 429:
        return Answer(Kind.RATE_LIMITED, detail, retry_after)
    if status in OUTAGE_STATUS or (status >= 500 and not _receivers_own(content)):
        return Answer(Kind.UNREACHABLE, detail, retry_after)
    if status in RETRYABLE_STATUS:
        return Answer(Kind.TRANSIENT, detail, retry_after)
    if 400 <= status < 500:
        return Answer(Kind.REJECTED, detail)
    return Answer(Kind.TRANSIENT, detail)
