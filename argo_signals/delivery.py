"""Delivery: one row's body to Alpine over HTTP, with bounded retries; and the health probe.

Each worker thread has its own ``requests.Session``.  The request is prepared once per
thread from the session (headers, proxies, TLS settings resolved once) and each body is sent
through the session's adapter on a copy of it: no redirect is ever followed, no cookie jar
or hook runs per row.  Every text that leaves this module is redacted of the API key.
"""
from __future__ import annotations

import html.entities
import socket
import threading
import time
import weakref
from dataclasses import dataclass
from typing import Any, Dict, Iterable, Iterator, List, Optional, Set, Tuple
from urllib.parse import unquote

import requests
import urllib3
from requests.adapters import HTTPAdapter
from tenacity import (Retrying, retry_if_result, stop_after_attempt, stop_before_delay,
                      wait_exponential, wait_random)

from .alpine import HEALTH_PATH, SIGNAL_PATH, Answer, Kind, classify
from .breaker import Breaker, State
from .ratelimit import Gate
from .safetext import clip, escape_controls

__all__ = ["Redactor", "safe_url", "Delivery"]


_HEX = "0123456789abcdefABCDEF"
_JSON_ESCAPES = {"/": "/", "\\": "\\", '"': '"', "'": "'", "b": "", "f": "", "n": "", "r": "", "t": ""}
BODY_LIMIT = 64 * 1024  # an answer is a few hundred bytes; more is dropped unread
SHOWN_LIMIT = 300  # characters of an answer's text kept (logged, stored), cut after redaction
MIN_PARTIAL = 4   # a cut text ending in this much of the key's start loses that end too
MIN_RATE_PAUSE = 1.0  # the shortest pause a rate limit holds the sync for
MIN_RUN = 8       # any run of this many consecutive characters of the key is redacted
_ENTITY_MAX = 32  # longest HTML entity looked at (``&CounterClockwiseContourIntegral;``)


def _canonical(text: str, decode: bool = True) -> Tuple[bytes, List[int], List[int]]:
    """``text`` decoded the ways a receiver may echo a value (percent escapes in any case,
    form ``+``, JSON backslash escapes, HTML character references) with whitespace and ``+``
    dropped, as lower-case UTF-8 bytes;
    with, for each byte, the start and end of the characters of ``text`` it came from.
    With ``decode=False`` nothing is decoded (a key may itself look like an escape)."""
    out = bytearray()
    starts: List[int] = []
    ends: List[int] = []
    i, n = 0, len(text)
    while i < n:
        ch = text[i]
        if not decode:
            b, j = ch.encode("utf-8", "surrogatepass"), i + 1
        elif ch == "%" and i + 2 < n and text[i + 1] in _HEX and text[i + 2] in _HEX:
            b, j = bytes((int(text[i + 1:i + 3], 16),)), i + 3
        elif ch == "\\" and i + 1 < n and text[i + 1] in _JSON_ESCAPES:
            b, j = _JSON_ESCAPES[text[i + 1]].encode(), i + 2
        elif ch == "\\" and i + 5 < n and text[i + 1] == "u" and all(c in _HEX for c in text[i + 2:i + 6]):
            b, j = chr(int(text[i + 2:i + 6], 16)).encode("utf-8", "surrogatepass"), i + 6
        elif ch == "&" and (ref := _html_reference(text, i)) is not None:
            b, j = ref[0].encode("utf-8", "surrogatepass"), ref[1]
        else:
            b, j = ch.encode("utf-8", "surrogatepass"), i + 1
        b = bytes(x for x in b if x not in _DROP)
        out += b
        starts += [i] * len(b)
        ends += [j] * len(b)
        i = j
    return bytes(out).lower(), starts, ends


_DROP = frozenset(b" \t\r\n\x0b\x0c+")


def _html_reference(text: str, i: int) -> Optional[Tuple[str, int]]:
    """The character of the HTML reference at ``text[i]`` (``&#115;``, ``&#x73;``, ``&amp;``)
    and the index after it, or None."""
    end = text.find(";", i + 1, i + _ENTITY_MAX)
    if end < 0:
        return None
    name = text[i + 1:end]
    try:
        if name[:2] in ("#x", "#X"):
            return chr(int(name[2:], 16)), end + 1
        if name[:1] == "#":
            return chr(int(name[1:], 10)), end + 1
    except (ValueError, OverflowError):
        return None
    value = html.entities.html5.get(name + ";")
    return None if value is None else (value, end + 1)


class Redactor:
    """Replaces every echo of the secrets with ``***``: raw, JSON-escaped (``\\/``, ``\\uXXXX``),
    percent-encoded, form-encoded (``+``), HTML-escaped, in any letter case, or broken by
    whitespace or line breaks.  Any run of ``MIN_RUN`` (8) or more consecutive characters of a
    secret (a prefix, a suffix, a truncated echo) is replaced too, and a text that ends in the
    first ``MIN_PARTIAL`` or more characters of a secret (a cut answer) loses that end."""

    def __init__(self, secrets: Iterable[Optional[str]]) -> None:
        keys: Set[bytes] = set()
        raw: Set[str] = set()
        for s in secrets:
            if s:
                raw.add(s)
                # the key as written and as decoded: an echo may decode to either
                keys.update(c for c in (_canonical(s)[0], _canonical(s, decode=False)[0]) if c)
        self._raw = sorted(raw, key=len, reverse=True)
        self._keys = sorted(keys, key=len, reverse=True)
        self._runs = frozenset(k[i:i + MIN_RUN] for k in self._keys for i in range(len(k) - MIN_RUN + 1))

    def _spans(self, text: str, canon: bytes, starts: List[int], ends: List[int]) -> List[Tuple[int, int]]:
        spans: List[Tuple[int, int]] = []
        for key in self._keys:
            at = canon.find(key)
            while at >= 0:
                spans.append((starts[at], ends[at + len(key) - 1]))
                at = canon.find(key, at + 1)
            for k in range(min(len(key) - 1, len(canon)), MIN_PARTIAL - 1, -1):
                if canon.endswith(key[:k]):
                    spans.append((starts[len(canon) - k], len(text)))
                    break
        runs = self._runs
        if runs:
            for at in range(len(canon) - MIN_RUN + 1):
                if canon[at:at + MIN_RUN] in runs:
                    spans.append((starts[at], ends[at + MIN_RUN - 1]))
        return spans

    def __call__(self, text: Optional[str]) -> str:
        text = "" if text is None else str(text)
        for r in self._raw:
            text = text.replace(r, "***")
        if not self._keys:
            return text
        spans: List[Tuple[int, int]] = []
        for decode in (True, False):   # an echo read decoded, and as written
            spans += self._spans(text, *_canonical(text, decode))
        if not spans:
            return text
        spans.sort()
        merged: List[List[int]] = []
        for a, b in spans:
            if merged and a <= merged[-1][1]:
                merged[-1][1] = max(merged[-1][1], b)
            else:
                merged.append([a, b])
        parts, pos = [], 0
        for a, b in merged:
            parts += [text[pos:a], "***"]
            pos = b
        parts.append(text[pos:])
        return "".join(parts)


def safe_url(url: str) -> str:
    """``url`` without credentials: ``http://user:pw@host/`` becomes ``http://***@host/``.

    Everything between ``scheme://`` and the last ``@`` is hidden, so a password holding
    ``#``, ``/`` or ``?`` (which a URL parser would split elsewhere) is hidden too."""
    head, sep, rest = url.partition("://")
    if not sep or "@" not in rest:
        return url
    return f"{head}://***@{rest.rsplit('@', 1)[1]}"


def url_secrets(url: str) -> List[str]:
    """The password written in ``url`` (raw and percent-decoded, 4 characters or more), to be
    redacted wherever an answer or an error might echo it."""
    _, sep, rest = url.partition("://")
    if not sep or "@" not in rest or ":" not in rest.rsplit("@", 1)[0]:
        return []
    password = rest.rsplit("@", 1)[0].split(":", 1)[1]
    return [s for s in {password, unquote(password)} if len(s) >= 4]


class _AbortableAdapter(HTTPAdapter):
    """Records every socket it opens so a stop can shut them down mid-read."""

    def __init__(self, *sockets: "weakref.WeakSet[socket.socket]") -> None:
        self._sockets = sockets
        super().__init__(max_retries=0, pool_connections=1, pool_maxsize=2)

    def init_poolmanager(self, connections: int, maxsize: int, block: bool = False, **kw: Any) -> None:
        super().init_poolmanager(connections, maxsize, block, **kw)
        sets = self._sockets

        def tracked(base: type) -> type:
            class Conn(base):  # type: ignore[misc,valid-type]
                def _new_conn(self) -> socket.socket:  # noqa: D401
                    sock = super()._new_conn()
                    for known in sets:
                        known.add(sock)
                    return sock
            return Conn

        class Pool(urllib3.HTTPConnectionPool):
            ConnectionCls = tracked(urllib3.connection.HTTPConnection)

        class SPool(urllib3.HTTPSConnectionPool):
            ConnectionCls = tracked(urllib3.connection.HTTPSConnection)

        self.poolmanager.pool_classes_by_scheme = {"http": Pool, "https": SPool}


def _shutdown(sockets: Iterable[socket.socket]) -> None:
    for sock in list(sockets):
        try:
            sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass


class _Alarm:
    """One armed deadline: ``expired`` once the watchdog has shut its sockets down."""

    __slots__ = ("deadline", "sockets", "expired")

    def __init__(self, deadline: float, sockets: "weakref.WeakSet[socket.socket]") -> None:
        self.deadline = deadline
        self.sockets = sockets
        self.expired = False


class Watchdog:
    """Ends a request that passes its overall deadline (a body trickled one byte at a time
    never trips the read timeout): one daemon thread shuts the worker's sockets down.  The
    thread starts on demand and ends after a while with nothing armed."""

    IDLE = 30.0

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._alarms: Set[_Alarm] = set()
        self._running = False

    def arm(self, seconds: float, sockets: "weakref.WeakSet[socket.socket]") -> _Alarm:
        alarm = _Alarm(time.monotonic() + seconds, sockets)
        with self._cond:
            self._alarms.add(alarm)
            if not self._running:
                self._running = True
                threading.Thread(target=self._loop, name="argo-signals-deadline", daemon=True).start()
            else:
                self._cond.notify()
        return alarm

    def disarm(self, alarm: _Alarm) -> None:
        with self._cond:
            self._alarms.discard(alarm)

    def _loop(self) -> None:
        while True:
            with self._cond:
                now = time.monotonic()
                due = [a for a in self._alarms if a.deadline <= now]
                for a in due:
                    a.expired = True
                    self._alarms.discard(a)
                if not due:
                    if not self._alarms:
                        if not self._cond.wait(self.IDLE) and not self._alarms:
                            self._running = False
                            return
                    else:
                        self._cond.wait(min(a.deadline for a in self._alarms) - now)
                    continue
            for a in due:
                _shutdown(a.sockets)


class _TooLarge(Exception):
    pass


def _read_capped(resp: requests.Response, limit: int) -> bytes:
    """The body, read in pieces; more than ``limit`` bytes raises ``_TooLarge``."""
    parts: List[bytes] = []
    size = 0
    for chunk in resp.iter_content(8192):  # (read to the end, the connection is kept alive)
        size += len(chunk)
        if size > limit:
            raise _TooLarge
        parts.append(chunk)
    return b"".join(parts)


@dataclass
class _ThreadState:
    session: requests.Session
    adapter: HTTPAdapter
    post: requests.PreparedRequest      # the signal request, body left out
    health: requests.PreparedRequest
    send_kw: Dict[str, Any]
    sockets: "weakref.WeakSet[socket.socket]"   # this worker's own (for its deadline)


class Delivery:
    def __init__(self, config: Any, breaker: Breaker, stopping: threading.Event, redact: Redactor,
                 gate: Optional[Gate] = None) -> None:
        self.config = config
        self.breaker = breaker
        self.gate = gate if gate is not None else Gate()
        self.stopping = stopping
        self.redact = redact
        self.retries = 0
        self.answered = 0       # HTTP answers received (any status)
        self._local = threading.local()
        self._lock = threading.Lock()
        self._sessions: List[requests.Session] = []
        self._sockets: "weakref.WeakSet[socket.socket]" = weakref.WeakSet()
        self.watchdog = Watchdog()
        self.deadline = float(sum(config.timeout)) if isinstance(config.timeout, (tuple, list)) \
            else float(config.timeout)

    # -- per-thread session and prepared requests --------------------------------------------
    def _state(self) -> _ThreadState:
        st: Optional[_ThreadState] = getattr(self._local, "state", None)
        if st is not None:
            return st
        cfg = self.config
        s = requests.Session()
        # resolve proxy and CA settings from the environment once, not on every request
        env = s.merge_environment_settings(cfg.alpine_url, {}, None, None, None)
        s.trust_env = False
        s.max_redirects = 0
        mine: "weakref.WeakSet[socket.socket]" = weakref.WeakSet()
        adapter = _AbortableAdapter(self._sockets, mine)
        s.mount("http://", adapter)
        s.mount("https://", adapter)
        s.headers.update({"Content-Type": "application/json", "User-Agent": "argo-signals"})
        if cfg.api_key:
            s.headers["X-API-Key"] = cfg.api_key
        post = s.prepare_request(requests.Request("POST", cfg.alpine_url + SIGNAL_PATH, data=b"{}"))
        health = s.prepare_request(requests.Request("GET", cfg.alpine_url + HEALTH_PATH))
        send_kw = {"stream": True, "timeout": cfg.timeout, "cert": None,
                   "verify": env.get("verify", True) if cfg.alpine_url.lower().startswith("https://") else True,
                   "proxies": dict(env.get("proxies") or {})}
        st = self._local.state = _ThreadState(s, adapter, post, health, send_kw, mine)
        with self._lock:
            self._sessions.append(s)
        return st

    def _exchange(self, req: requests.PreparedRequest, st: _ThreadState) -> Answer:
        """One request through the adapter (never follows a redirect); never raises.

        The whole exchange (connect, headers, body) must end within ``deadline`` seconds and
        the body may not exceed ``BODY_LIMIT`` bytes: past either it counts as a transient
        attempt (the connection is dropped)."""
        alarm = self.watchdog.arm(self.deadline, st.sockets)
        answered = False
        try:
            resp = st.adapter.send(req, **st.send_kw)
            try:
                content = _read_capped(resp, BODY_LIMIT)
            finally:
                resp.close()
            answer = classify(resp.status_code, resp.headers, content, resp.reason or "")
            answered = True
        except _TooLarge:
            answer = Answer(Kind.TRANSIENT, f"answer larger than {BODY_LIMIT // 1024} KiB (dropped)")
        except Exception as exc:
            if alarm.expired:  # a timeout: the receiver (or the way to it) is not answering
                answer = Answer(Kind.UNREACHABLE, f"no complete answer within {self.deadline:g} s")
            elif isinstance(exc, (requests.ConnectionError, requests.Timeout, urllib3.exceptions.TimeoutError,
                                  urllib3.exceptions.ProtocolError)):
                answer = Answer(Kind.UNREACHABLE, type(exc).__name__ + _cause(exc))
            else:  # anything else we could not read is an attempt that counts
                answer = Answer(Kind.TRANSIENT, f"unusable answer ({type(exc).__name__})")
        finally:
            self.watchdog.disarm(alarm)
        # redacted before anything keeps it (the breaker's reason is printed by `sync`)
        answer.detail = clip(escape_controls(self.redact(answer.detail)), SHOWN_LIMIT)
        if answered:
            self.answered += 1
            self._heed(answer)
            if answer.kind is Kind.UNREACHABLE:   # a proxy's 502/503/504: the receiver is down
                self.breaker.failure(answer.detail)
            else:
                self.breaker.success()
        else:
            self.gate.no_answer()
            if answer.kind is Kind.UNREACHABLE or self.breaker.state is State.HALF_OPEN:
                self.breaker.failure(answer.detail)  # (a trial without a usable answer opens it again)
        return answer

    def _heed(self, answer: Answer) -> None:
        """A rate limit (429, or a Retry-After on a 503) holds every request of the sync."""
        if answer.kind is Kind.RATE_LIMITED or (answer.kind is Kind.UNREACHABLE and answer.retry_after is not None):
            wait = self.config.max_backoff if answer.retry_after is None else answer.retry_after
            # "retry now" (0, or a date already past: the receiver's clock is behind) still waits
            self.gate.hold(min(max(wait, MIN_RATE_PAUSE), self.config.max_retry_after))
        else:
            self.gate.answered()

    def post(self, body: bytes, trial: bool = False) -> Answer:
        """Post one body once (``trial``: the one row let through while the breaker is half open)."""
        if self.breaker.is_open and not trial:
            return Answer(Kind.UNREACHABLE, self.breaker.reason)
        if not trial and not self.gate.admit():
            wait = self.gate.remaining()
            return Answer(Kind.RATE_LIMITED, f"rate limited by the receiver: waiting {wait:.0f} s", wait)
        st = self._state()
        req = st.post.copy()
        req.body = body
        req.headers["Content-Length"] = str(len(body))
        return self._exchange(req, st)

    def probe(self) -> Optional[str]:
        """Ask the health endpoint once: None if the receiver answered, else why not (no answer,
        a proxy's 502/503/504, or a rate limit, which also holds the whole sync)."""
        st = self._state()
        alarm = self.watchdog.arm(self.deadline, st.sockets)
        try:
            resp = st.adapter.send(st.health.copy(), **st.send_kw)
            try:
                content = _read_capped(resp, BODY_LIMIT)
            finally:
                resp.close()
        except Exception as exc:
            if alarm.expired:
                return f"no answer within {self.deadline:g} s"
            return escape_controls(self.redact(type(exc).__name__ + _cause(exc)))
        finally:
            self.watchdog.disarm(alarm)
        answer = classify(resp.status_code, resp.headers, content, resp.reason or "")
        if answer.kind not in (Kind.UNREACHABLE, Kind.RATE_LIMITED):
            return None
        self._heed(answer)
        return clip(escape_controls(self.redact(answer.detail)), SHOWN_LIMIT)

    # -- one row, with retries -------------------------------------------------------------------
    def _again(self, answer: Answer) -> bool:
        return (answer.kind in (Kind.TRANSIENT, Kind.UNREACHABLE) and not self.stopping.is_set()
                and not self.breaker.is_open)

    def _wait(self, rs: Any) -> float:
        backoff = wait_exponential(multiplier=0.2, max=self.config.max_backoff) + wait_random(0, 0.2)
        delay = float(backoff(rs))
        ra = rs.outcome.result().retry_after if not rs.outcome.failed else None
        if ra is not None:
            delay = max(delay, min(ra, self.config.max_retry_after))
        return delay

    def _sleep(self, seconds: float) -> None:
        """tenacity's sleep: ends at once when the sync stops."""
        self.stopping.wait(seconds)

    def _count_retry(self, rs: Any) -> None:
        self.retries += 1

    def send(self, body: bytes, trial: bool = False) -> Answer:
        """Post with bounded, interruptible retries; returns the last answer (never raises).

        The first request goes straight out; only a transient answer builds the retry loop.
        """
        first = self.post(body, trial)
        if trial or not self._again(first):
            return first
        cfg = self.config
        answers: Iterator[Answer] = iter((first,))

        def attempt() -> Answer:
            return next(answers, None) or self.post(body)

        retrying = Retrying(
            retry=retry_if_result(self._again),
            stop=stop_after_attempt(cfg.requests_per_claim) | stop_before_delay(cfg.retry_budget),
            wait=self._wait, sleep=self._sleep, before_sleep=self._count_retry,
            retry_error_callback=_last_result)
        return retrying(attempt)  # type: ignore[no-any-return]

    # -- stop ------------------------------------------------------------------------------------
    def abort(self) -> None:
        """Shut down every socket (a request hanging in a read ends at once)."""
        _shutdown(self._sockets)

    def close(self) -> None:
        with self._lock:
            sessions, self._sessions = self._sessions, []
        for s in sessions:
            s.close()


def _cause(exc: BaseException) -> str:
    """A short reason from a requests exception, without URLs (which may carry credentials)."""
    text = str(exc)
    for marker in ("Connection refused", "timed out", "Name or service not known", "Connection reset",
                   "No route to host", "Network is unreachable", "Remote end closed", "certificate"):
        if marker.lower() in text.lower():
            return f" ({marker.lower()})"
    return ""


def _last_result(retry_state: Any) -> Answer:
    """When retries run out, the answer is the last one (never an exception)."""
    return retry_state.outcome.result()  # type: ignore[no-any-return]
