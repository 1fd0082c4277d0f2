"""Alpine sync: a durable outbox drained by a ThreadPoolExecutor (requests + tenacity).

The sync state lives in the ``signals`` table, so it survives restarts.  A *pump* task claims
due ``pending`` rows atomically (``BEGIN IMMEDIATE`` + a claim token with an expiry) and
submits one delivery per row; each delivery posts with bounded, interruptible retries and
records the outcome.  The writer nudges the pump after each commit and on every tick.
"""
from __future__ import annotations

import email.utils
import json
import logging
import socket
import sqlite3
import threading
import time
import uuid
import weakref
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Tuple

import requests
import urllib3
from requests.adapters import HTTPAdapter
from tenacity import (Retrying, retry_if_result, stop_after_attempt, stop_before_delay,
                      wait_exponential, wait_random)

from . import store
from .lifecycle import EXITING as interpreter_exiting

log = logging.getLogger("argo_signals")

SIGNAL_PATH = "/api/v1/external-signals/sync/signal"
HEALTH_PATH = "/api/v1/external-signals/sync/health"
RETRYABLE_STATUS = frozenset((408, 425, 429, 500, 502, 503, 504))


@dataclass
class SyncConfig:
    alpine_url: str
    api_key: Optional[str] = field(default=None, repr=False)
    workers: int = 4
    timeout: Tuple[float, float] = (5.0, 10.0)
    shutdown_timeout: float = 5.0
    max_attempts: int = 20             # claims without a settling answer before "failed"
    requests_per_claim: int = 5        # the tenacity budget: attempts...
    retry_budget: float = 30.0         # ...and seconds, per claim
    max_backoff: float = 5.0           # cap of one backoff sleep
    max_retry_after: float = 30.0      # a Retry-After above this is clamped
    redelivery_base: float = 5.0       # delay before a row is due again: base * 2**(attempts-1)...
    redelivery_max: float = 600.0      # ...capped
    auth_pause: float = 30.0           # after 401/403, no new claims for this long
    durability: str = "normal"
    busy_timeout: float = 5.0

    def __post_init__(self) -> None:
        self.alpine_url = self.alpine_url.rstrip("/")
        if not self.alpine_url.startswith(("http://", "https://")):
            raise ValueError("alpine_url must start with http:// or https://")
        if self.workers < 1:
            raise ValueError("sync_workers must be >= 1")


@dataclass
class Outcome:
    kind: str                      # synced | rejected | auth | transient
    detail: str = ""
    retry_after: Optional[float] = None


# -- what the receiver refuses for good (checked locally, no request) ----------------------
def precheck(row: Dict[str, Any]) -> Optional[Tuple[str, str]]:
    """(status, reason) for a row that must not be sent, or None when it may go."""
    action = (row.get("action") or "").upper()
    if action == "NEUTRAL":
        return "skipped", "NEUTRAL signals are not synced"
    if action not in ("BUY", "SELL"):
        return "rejected", f"action {row.get('action')!r} is not BUY or SELL"
    symbol = (row.get("symbol") or "").strip()
    if not symbol or len(symbol) > 20:
        return "rejected", "symbol empty or longer than 20 characters (receiver refuses it)"
    for f in ("entry_price", "target_price", "stop_price"):
        v = row.get(f)
        if (v is None and f == "entry_price") or (v is not None and v <= 0):
            return "rejected", f"{f} must be > 0 (receiver refuses it)"
    conf = row.get("confidence")
    if conf is None or not 0 <= conf <= 100:
        return "rejected", "confidence outside 0-100 (receiver refuses it)"
    reasoning = row.get("reasoning")
    if reasoning and len(reasoning.strip()) < 20:
        return "rejected", "reasoning shorter than 20 characters (receiver refuses it)"
    return None


def payload(row: Dict[str, Any]) -> Dict[str, Any]:
    """The JSON body for one signal, exactly as hashed."""
    body = {k: row.get(k) for k in ("signal_id", "symbol", "action", "entry_price", "target_price",
                                    "stop_price", "confidence", "strategy", "asset_type",
                                    "timestamp", "sha256")}
    body["action"] = str(body["action"]).upper()
    for k in ("data_source", "regime", "reasoning"):
        if row.get(k) is not None:
            body[k] = row[k]
    return body


def parse_retry_after(value: Optional[str], now: Optional[float] = None) -> Optional[float]:
    """Seconds to wait from a Retry-After header (delta-seconds or HTTP date)."""
    if not value:
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError):
        return None
    if when is None:
        return None
    return max(0.0, when.timestamp() - (time.time() if now is None else now))


# -- HTTP plumbing: sessions whose sockets can be aborted ----------------------------------
class _AbortableAdapter(HTTPAdapter):
    """Records every socket it opens so close() can shut them down mid-read."""

    def __init__(self, sockets: "weakref.WeakSet[socket.socket]") -> None:
        self._sockets = sockets
        super().__init__(max_retries=0, pool_connections=1, pool_maxsize=2)

    def init_poolmanager(self, connections: int, maxsize: int, block: bool = False, **kw: Any) -> None:
        super().init_poolmanager(connections, maxsize, block, **kw)
        sockets = self._sockets

        def tracked(base: type) -> type:
            class Conn(base):  # type: ignore[misc,valid-type]
                def _new_conn(self) -> socket.socket:  # noqa: D401
                    sock = super()._new_conn()
                    sockets.add(sock)
                    return sock
            return Conn

        class Pool(urllib3.HTTPConnectionPool):
            ConnectionCls = tracked(urllib3.connection.HTTPConnection)

        class SPool(urllib3.HTTPSConnectionPool):
            ConnectionCls = tracked(urllib3.connection.HTTPSConnection)

        self.poolmanager.pool_classes_by_scheme = {"http": Pool, "https": SPool}


_live: "weakref.WeakSet[Syncer]" = weakref.WeakSet()
_hook_lock = threading.Lock()
_hook_installed = False


def _at_threading_exit() -> None:
    """Runs before the interpreter joins executor threads: stop syncing within the budget."""
    interpreter_exiting.set()
    for s in list(_live):
        try:
            s.stop(s.config.shutdown_timeout)
        except Exception:
            log.exception("stopping the sync at exit failed")


def _install_exit_hook() -> None:
    global _hook_installed
    with _hook_lock:
        if _hook_installed:
            return
        register = getattr(threading, "_register_atexit", None)
        if register is not None:
            try:
                register(_at_threading_exit)
            except RuntimeError:  # already shutting down
                return
        _hook_installed = True


class Syncer:
    def __init__(self, db_path: str, config: SyncConfig) -> None:
        self.db_path = db_path
        self.config = config
        self.retries = 0
        self.outcomes: Dict[str, int] = {"synced": 0, "rejected": 0, "skipped": 0, "auth": 0,
                                         "transient": 0}
        self.last_error: Optional[str] = None
        self.forced_after: Optional[int] = None   # set by drain(): take rows due or not, once each
        self.claim_budget: Optional[int] = None
        self._init_runtime()
        _live.add(self)
        _install_exit_hook()

    def _init_runtime(self) -> None:
        self._lock = threading.Lock()
        self._idle = threading.Condition(self._lock)
        self._stopping = threading.Event()
        self._executor: Optional[ThreadPoolExecutor] = None
        self._local = threading.local()
        self._sessions: List[requests.Session] = []
        self._sockets: "weakref.WeakSet[socket.socket]" = weakref.WeakSet()
        self._token = uuid.uuid4().hex
        self._inflight = 0
        self._pumping = False
        self._renudge = False
        self._paused_until = 0.0
        self._auth_failing = False
        self._stopped = False
        self._settled: List[Tuple[int, str, Optional[str]]] = []   # outcomes not yet written
        self._settle_lock = threading.Lock()
        self.max_inflight = self.config.workers * 2
        self.lease = self.config.retry_budget * 3 + 60.0

    def __repr__(self) -> str:
        return f"Syncer(alpine_url={self.config.alpine_url!r}, workers={self.config.workers})"

    # -- per-thread resources ------------------------------------------------------------
    def _conn(self) -> Any:
        conn = getattr(self._local, "conn", None)
        if conn is None:
            conn = store.connect(self.db_path, self.config.durability, self.config.busy_timeout)
            store.ensure_schema(conn)
            self._local.conn = conn
        return conn

    def _session(self) -> requests.Session:
        s = getattr(self._local, "session", None)
        if s is None:
            s = requests.Session()
            # resolve proxy and CA settings from the environment once, not on every request
            env = s.merge_environment_settings(self.config.alpine_url, {}, None, None, None)
            s.trust_env = False
            s.proxies.update(env.get("proxies") or {})
            if self.config.alpine_url.startswith("https://"):
                s.verify = env.get("verify", True)
            adapter = _AbortableAdapter(self._sockets)
            s.mount("http://", adapter)
            s.mount("https://", adapter)
            s.headers.update({"Content-Type": "application/json", "User-Agent": "argo-signals"})
            if self.config.api_key:
                s.headers["X-API-Key"] = self.config.api_key
            self._local.session = s
            with self._lock:
                self._sessions.append(s)
        return s

    # -- scheduling ------------------------------------------------------------------------
    def nudge_after_commit(self, rows: int) -> None:
        """The writer's commit hook: ``rows`` were committed."""
        self.nudge()

    def nudge(self) -> None:
        """Ask for a pump (non-blocking): claim due rows and submit their deliveries."""
        if self._stopping.is_set() or interpreter_exiting.is_set():
            return
        if time.monotonic() < self._paused_until:
            return
        with self._lock:
            if self._pumping:
                self._renudge = True
                return
            self._pumping = True
            if self._executor is None:
                self._executor = ThreadPoolExecutor(self.config.workers, thread_name_prefix="argo-signals-sync")
            executor = self._executor
        try:
            executor.submit(self._pump).add_done_callback(self._report)
        except RuntimeError:  # executor shut down (interpreter exiting or stop())
            with self._lock:
                self._pumping = False

    def _pump(self) -> None:
        try:
            while not self._stopping.is_set() and time.monotonic() >= self._paused_until:
                with self._lock:
                    room = self.max_inflight - self._inflight
                if self.claim_budget is not None:
                    room = min(room, self.claim_budget)
                if room <= 0:
                    break
                try:
                    rows = store.claim_due(self._conn(), self._token, room, self.lease, self.forced_after)
                except sqlite3.OperationalError as exc:  # busy beyond the timeout: next nudge
                    self.last_error = f"claim deferred: {exc}"
                    log.warning("sync claim deferred (%s); retried on the next tick", exc)
                    break
                if not rows:
                    break
                if self.forced_after is not None:
                    self.forced_after = rows[-1]["id"]
                if self.claim_budget is not None:
                    self.claim_budget -= len(rows)
                for row in rows:
                    if not self._dispatch(row):
                        return
        finally:
            with self._lock:
                self._pumping = False
                again, self._renudge = self._renudge, False
            if again:
                self.nudge()

    def _dispatch(self, row: Dict[str, Any]) -> bool:
        refused = precheck(row)
        if refused is not None:
            store.settle(self._conn(), row["id"], self._token, *refused)
            self.outcomes[refused[0]] += 1
            if refused[0] == "rejected":
                log.warning("signal %s not synced (rejected locally): %s", row["signal_id"], refused[1])
            return True
        with self._lock:
            self._inflight += 1
        try:
            fut = self._executor.submit(self._deliver, row)  # type: ignore[union-attr]
        except RuntimeError:
            with self._lock:
                self._inflight -= 1
                self._idle.notify_all()
            return False
        fut.add_done_callback(self._delivered)
        return True

    def _delivered(self, fut: "Future[None]") -> None:
        with self._lock:
            self._inflight -= 1
            low = self._inflight <= self.max_inflight // 2
            self._idle.notify_all()
        self._report(fut)
        if low:
            self.nudge()

    def _report(self, fut: "Future[Any]") -> None:
        if fut.cancelled():
            return
        exc = fut.exception()
        if exc is not None:
            self.last_error = f"{type(exc).__name__}: {exc}"
            log.error("sync task failed: %s", self.last_error, exc_info=exc)

    # -- one delivery ----------------------------------------------------------------------
    def _deliver(self, row: Dict[str, Any]) -> None:
        conn = self._conn()
        if self._stopping.is_set():
            store.release(conn, row["id"], self._token, row.get("sync_error"), False,
                          row.get("sync_next_at"), self.config.max_attempts)
            return
        outcome = self.send(row)
        self._record(conn, row, outcome)

    def send(self, row: Dict[str, Any]) -> Outcome:
        """Post one row with bounded, interruptible retries; returns the last outcome."""
        cfg = self.config
        body = json.dumps(payload(row))
        session = self._session()
        url = cfg.alpine_url + SIGNAL_PATH
        backoff = wait_exponential(multiplier=0.2, max=cfg.max_backoff) + wait_random(0, 0.2)

        def wait(rs: Any) -> float:
            delay = backoff(rs)
            ra = rs.outcome.result().retry_after if not rs.outcome.failed else None
            if ra is not None:
                delay = max(delay, min(ra, cfg.max_retry_after))
            return delay

        def attempt() -> Outcome:
            try:
                resp = session.post(url, data=body, timeout=cfg.timeout)
            except requests.RequestException as exc:
                return Outcome("transient", type(exc).__name__)
            return classify(resp)

        retrying = Retrying(
            retry=retry_if_result(lambda o: o.kind == "transient" and not self._stopping.is_set()),
            stop=stop_after_attempt(cfg.requests_per_claim) | stop_before_delay(cfg.retry_budget),
            wait=wait, sleep=self._sleep, before_sleep=self._count_retry,
            retry_error_callback=_last_result)
        return retrying(attempt)

    def _sleep(self, seconds: float) -> None:
        """tenacity's sleep: ends at once when stop() is called."""
        self._stopping.wait(seconds)

    def _count_retry(self, rs: Any) -> None:
        self.retries += 1

    def _record(self, conn: Any, row: Dict[str, Any], outcome: Outcome) -> None:
        cfg = self.config
        rid, sid = row["id"], row["signal_id"]
        self.outcomes[outcome.kind] += 1
        if outcome.kind == "synced":
            self._settle(rid, "synced", None)
            if self._auth_failing:
                self._auth_failing = False
                log.warning("Alpine accepts the API key again")
        elif outcome.kind == "rejected":
            self._settle(rid, "rejected", outcome.detail)
            log.warning("signal %s rejected by Alpine: %s", sid, outcome.detail)
        elif outcome.kind == "auth":
            self._paused_until = time.monotonic() + cfg.auth_pause
            if not self._auth_failing:
                self._auth_failing = True
                log.error("Alpine refused the API key (%s); signals stay pending; check ARGO_API_KEY",
                          outcome.detail)
            self.last_error = outcome.detail
            store.release(conn, rid, self._token, outcome.detail, False, time.time() + cfg.auth_pause,
                          cfg.max_attempts)
        else:
            self.last_error = f"{sid}: {outcome.detail}"
            interrupted = self._stopping.is_set()
            attempts = (row.get("sync_attempts") or 0) + (0 if interrupted else 1)
            delay = min(cfg.redelivery_max, cfg.redelivery_base * 2 ** max(0, attempts - 1))
            status = store.release(conn, rid, self._token, outcome.detail, not interrupted,
                                   time.time() + delay, cfg.max_attempts)
            if status == "failed":
                log.error("signal %s failed to sync after %d attempts (%s); `argo-signals sync "
                          "--retry-failed` re-queues it", sid, attempts, outcome.detail)
            elif not interrupted:
                log.warning("signal %s not synced yet (%s); due again in %.0fs", sid, outcome.detail, delay)

    def _settle(self, row_id: int, status: str, error: Optional[str]) -> None:
        """Queue a final outcome; whoever finds the writer free writes all that wait at once."""
        self._settled.append((row_id, status, error))
        self.flush_outcomes()

    def flush_outcomes(self) -> None:
        while self._settled:
            if not self._settle_lock.acquire(blocking=False):
                return  # the holder re-checks the list after it releases
            try:
                batch, self._settled = self._settled, []
                try:
                    store.settle_many(self._conn(), self._token, batch)
                except Exception as exc:
                    self._settled[:0] = batch
                    self.last_error = f"could not record sync outcomes: {exc}"
                    log.warning("could not record %d sync outcomes yet: %s", len(batch), exc)
                    return
            finally:
                self._settle_lock.release()

    # -- offline transitions, stop ---------------------------------------------------------
    def settle_offline(self) -> int:
        """Mark pending rows that need no request: NEUTRAL -> skipped, refused -> rejected.

        Done in SQL so that close() stays quick on a large backlog; the per-row ``precheck``
        at claim time catches whatever this coarser pass leaves (e.g. Unicode whitespace).
        """
        conn = store.connect(self.db_path, self.config.durability, self.config.busy_timeout)
        try:
            return store.settle_refused(conn)
        finally:
            conn.close()

    def drain(self, limit: Optional[int] = None, timeout: float = 600.0,
              progress: Optional[Callable[[int], None]] = None) -> Dict[str, int]:
        """Push pending rows now, due or not, each once (the ``sync`` command); returns outcomes."""
        self.forced_after = 0
        self.claim_budget = limit
        deadline = time.monotonic() + timeout
        done = 0
        while time.monotonic() < deadline:
            before = self.forced_after
            self.nudge()
            self.wait_idle(max(0.0, deadline - time.monotonic()))
            total = sum(self.outcomes.values())
            if progress is not None and total > done:
                progress(total - done)
            done = total
            if self.forced_after == before or self.claim_budget == 0:
                break
        return dict(self.outcomes)

    def wait_idle(self, timeout: float) -> bool:
        """Wait until nothing is being pumped or delivered (or the timeout passes)."""
        deadline = time.monotonic() + timeout
        with self._lock:
            while self._inflight or self._pumping:
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._idle.wait(min(left, 0.05))
        while self._settled and time.monotonic() < deadline:
            self.flush_outcomes()
            if self._settled:
                time.sleep(0.01)
        return not self._settled

    def stop(self, timeout: Optional[float] = None) -> bool:
        """Stop claiming; let in-flight requests finish within ``timeout``, then abort them."""
        with self._lock:
            if self._stopped:
                return True
            self._stopped = True
        budget = self.config.shutdown_timeout if timeout is None else timeout
        self._stopping.set()
        clean = self.wait_idle(budget)
        if not clean:
            for sock in list(self._sockets):
                try:
                    sock.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
            log.warning("sync stopped with requests in flight; their sockets were aborted")
            self.wait_idle(1.0)
        if self._executor is not None:
            self._executor.shutdown(wait=False, cancel_futures=True)
        for s in list(self._sessions):
            s.close()
        try:  # rows claimed but never started go back to pending at once
            conn = store.connect(self.db_path, self.config.durability, self.config.busy_timeout)
            try:
                conn.execute("UPDATE signals SET sync_claim = NULL, sync_claim_until = NULL "
                             "WHERE sync_claim = ?", (self._token,))
            finally:
                conn.close()
        except Exception as exc:
            log.warning("could not release sync claims (%s); they expire by themselves", exc)
        _live.discard(self)
        return clean

    def after_fork_in_child(self) -> None:
        self._init_runtime()
        _live.add(self)

    # -- stats -----------------------------------------------------------------------------
    def stats(self) -> Dict[str, Any]:
        return {"sync_retries": self.retries, "sync_last_error": self.last_error}


def classify(resp: requests.Response) -> Outcome:
    """What an Alpine answer means for the row (see the contract's answer table)."""
    status = resp.status_code
    if status in (200, 201):
        try:
            state = resp.json().get("status")
        except (ValueError, AttributeError):
            state = None
        if state in ("success", "duplicate"):
            return Outcome("synced", state)
        return Outcome("transient", f"HTTP {status} with unexpected body")
    detail = _detail(resp)
    if status in (401, 403):
        return Outcome("auth", f"HTTP {status}: {detail}")
    if status in RETRYABLE_STATUS:
        return Outcome("transient", f"HTTP {status}: {detail}",
                       parse_retry_after(resp.headers.get("Retry-After")))
    if 400 <= status < 500:
        return Outcome("rejected", f"HTTP {status}: {detail}")
    return Outcome("transient", f"HTTP {status}: {detail}")


def _detail(resp: requests.Response) -> str:
    try:
        d = resp.json().get("detail")
    except (ValueError, AttributeError):
        d = None
    text = d if isinstance(d, str) else json.dumps(d) if d is not None else resp.text
    return (text or resp.reason or "").strip()[:200]


def _last_result(retry_state: Any) -> Outcome:
    """When retries run out, the answer is the last outcome (never an exception)."""
    return retry_state.outcome.result()  # type: ignore[no-any-return]
