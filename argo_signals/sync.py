"""Alpine sync: a durable outbox drained by a ThreadPoolExecutor (requests + tenacity).

The sync state lives in the ``signals`` table, so it survives restarts.  A *pump* task claims
due ``pending`` rows atomically (``BEGIN IMMEDIATE`` + a claim token with an expiry) and
submits one delivery per row (``delivery.py``); each outcome is written by ``outcomes.py``.
A circuit breaker (``breaker.py``) stops per-row sending while the receiver is unreachable;
a rate limit holds the whole sync (``ratelimit.py``).  A claim names its owner process
(``owner.py``): a live owner's claims are never taken over, a dead one's are freed at once.
The writer nudges the pump after each commit and on every tick.  The contract itself (body,
refusals, answers) is ``alpine.py``; the ``sync`` command's drain mode is ``drain.py``.
"""
from __future__ import annotations

import json
import logging
import math
import os
import sqlite3
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Dict, Optional, Tuple

from . import lifecycle, owner, store
from .alpine import (HEALTH_PATH, SIGNAL_PATH, Answer, Kind, check_alpine_url, check_api_key, fraction_warning,
                     parse_retry_after, payload, refusal, refusal_sql, register_sql_functions)
from .breaker import Breaker, Prober
from .delivery import Delivery, Redactor, safe_url, url_secrets
from .fileid import FileId, identity_of
from .outcomes import Outcomes
from .ratelimit import Gate
from .lifecycle import EXITING as interpreter_exiting

__all__ = ["SyncConfig", "Syncer", "SIGNAL_PATH", "HEALTH_PATH", "payload", "parse_retry_after",
           "safe_url"]

log = logging.getLogger("argo_signals")


@dataclass
class SyncConfig:
    alpine_url: str = field(repr=False)
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
    auth_pause: float = 30.0           # after 401/403 or a redirect, no new claims for this long
    breaker_threshold: int = 3         # consecutive connection failures/timeouts that open the breaker
    probe_base: float = 0.25           # first probe after this, then doubling...
    probe_max: float = 30.0            # ...up to this
    durability: str = "normal"
    busy_timeout: float = 5.0

    def __post_init__(self) -> None:
        self.alpine_url = check_alpine_url(self.alpine_url)
        if self.workers < 1:
            raise ValueError("sync_workers must be >= 1")
        check_api_key(self.api_key)

    @property
    def public_url(self) -> str:
        """The receiver's URL without credentials, for logs and reprs."""
        return safe_url(self.alpine_url)

    def __repr__(self) -> str:
        return f"SyncConfig(alpine_url={self.public_url!r}, workers={self.workers})"


class Syncer:
    def __init__(self, db_path: str, config: SyncConfig) -> None:
        self.db_path = db_path
        self.config = config
        self.redact = Redactor([config.api_key, *url_secrets(config.alpine_url)])
        self.forced_after: Optional[int] = None   # drain mode: take rows due or not, once each
        self.claim_budget: Optional[int] = None
        self._init_runtime()
        # stopped (bounded) before the interpreter joins threads, so no executor thread hangs exit
        self._watch = lifecycle.watch(None, self._stop_at_exit, None)

    def _init_runtime(self) -> None:
        self._lock = threading.Lock()
        self._idle = threading.Condition(self._lock)
        self._stopping = threading.Event()
        self._executor: Optional[ThreadPoolExecutor] = None
        self._local = threading.local()
        self._token = owner.new_token()
        self.reclaimed = 0             # rows freed from claims of owners that are gone
        self._claimed_any = False      # (nothing to release at stop otherwise)
        self.db_error: Optional[str] = None   # the last claim's database error, until one succeeds
        self._reclaim_at = 0.0         # (monotonic) next look for claims of dead owners
        self._wake: Optional[threading.Timer] = None
        self._inflight = 0
        self._pumping = False
        self._renudge = False
        self._paused_until = 0.0
        self._stopped = False
        self._file_id: Optional[FileId] = None
        self._generation = 0
        self._warned_confidence = False
        self.max_inflight = self.config.workers * 4
        cfg = self.config
        # A claim must outlive its rows' deliveries, or a second claimer re-posts a row still in
        # flight.  One delivery: a first request (bounded by the overall deadline), then retries
        # started within the retry budget, the last one again bounded by the deadline; a row
        # may wait in the executor behind max_inflight / workers such deliveries.
        one = 2 * sum(cfg.timeout) + cfg.retry_budget + cfg.max_backoff + cfg.max_retry_after
        self.lease = math.ceil(self.max_inflight / cfg.workers) * one + 60.0
        # the furthest a row's next attempt is ever set ahead; further means the clock went back
        self.horizon = max(cfg.redelivery_max, cfg.redelivery_base, cfg.max_retry_after) + 60.0
        self.breaker = Breaker(cfg.breaker_threshold, cfg.probe_base, cfg.probe_max)
        self.gate = Gate()
        self.delivery = Delivery(cfg, self.breaker, self._stopping, self.redact, self.gate)
        self.prober = Prober(self.breaker, self.delivery.probe, self._stopping, self._unreachable,
                             self._reachable, self.nudge, hold=self.gate.remaining)
        self.outcomes = Outcomes(cfg, self._token, self._conn, self.redact, cfg.public_url)

    def __repr__(self) -> str:
        return f"Syncer(alpine_url={self.config.public_url!r}, workers={self.config.workers})"

    # compatibility: counters read by the tracker and the CLI
    @property
    def retries(self) -> int:
        return self.delivery.retries

    @property
    def last_error(self) -> Optional[str]:
        return self.outcomes.last_error

    # -- the database file, per thread -----------------------------------------------------------
    def _conn(self) -> sqlite3.Connection:
        conn = getattr(self._local, "conn", None)
        if conn is not None and self._local.generation != self._generation:
            try:
                conn.close()
            except sqlite3.Error:
                pass
            conn = None
        if conn is None:
            conn = store.connect(self.db_path, self.config.durability, self.config.busy_timeout)
            store.ensure_schema(conn)
            self._local.conn = conn
            self._local.generation = self._generation
        return conn

    def _follow_file(self) -> bool:
        """False while the database file is missing or still empty (the writer sets it up: two
        connections switching a new file to WAL at once collide); a replaced file is reopened
        by every thread."""
        try:
            st = os.stat(self.db_path)
        except OSError:
            return False
        if st.st_size == 0:
            return False
        ident = identity_of(st)
        with self._lock:
            if self._file_id is None or ident == self._file_id:
                self._file_id = ident
                return True
            self._file_id = ident
            self._generation += 1
        log.warning("database file %s was replaced; the sync reopens it", self.db_path)
        return True

    # -- scheduling ------------------------------------------------------------------------------
    def nudge_after_commit(self, rows: int) -> None:
        """The writer's commit hook: ``rows`` were committed."""
        self.nudge()

    def nudge(self) -> None:
        """Ask for a pump (non-blocking): claim due rows and submit their deliveries."""
        if self._stopping.is_set() or interpreter_exiting.is_set() or (
                self.breaker.is_open and not self.breaker.trial_free):
            return
        if time.monotonic() < self._paused_until:
            return
        if self.gate.closed:
            held = self.gate.remaining()
            if held > 0:
                self._wake_after(held)
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
                self._idle.notify_all()

    def _may_claim(self) -> bool:
        return (not self._stopping.is_set() and (not self.breaker.is_open or self.breaker.trial_free)
                and time.monotonic() >= self._paused_until and not self.gate.closed)

    RECLAIM_EVERY = 5.0   # seconds between looks for claims of owners that are gone

    def _reclaim(self) -> None:
        """Free the claims of owners that are gone (at the first pump, then now and then)."""
        now = time.monotonic()
        if now < self._reclaim_at:
            return
        self._reclaim_at = now + self.RECLAIM_EVERY
        freed = store.reclaim(self._conn(), self._token, owner.Liveness().owner_alive)
        if freed:
            with self._lock:
                self.reclaimed += freed
            log.warning("took back %d sync claims left by a process that is gone", freed)

    def _pump(self) -> None:
        with lifecycle.sqlite_work():   # a fork waits until the claim has committed
            self._pump_once()

    def _pump_once(self) -> None:
        try:
            if not self._follow_file():
                return  # the writer recreates it; the next nudge finds it
            generation = self._generation
            while self._may_claim():
                with self._lock:
                    room = self.max_inflight - self._inflight
                if self.claim_budget is not None:
                    room = min(room, self.claim_budget)
                if room <= 0:
                    break
                trial = self.breaker.is_open  # half open: one row, due or not, as the trial
                if trial and not self.breaker.take_trial():
                    break
                testing = self.gate.testing_next  # a rate limit just ended: one row tests it
                if testing:
                    room = 1
                try:
                    self._reclaim()
                    rows = store.claim_due(self._conn(), self._token, 1 if trial else room, self.lease,
                                           0 if trial else self.forced_after, horizon=self.horizon)
                    self.db_error = None
                    self._claimed_any = self._claimed_any or bool(rows)
                except sqlite3.Error as exc:  # busy beyond the timeout, unreadable: next nudge
                    if trial:
                        self.breaker.return_trial()
                    self.db_error = f"{type(exc).__name__}: {exc}"
                    self.outcomes.error(f"claim deferred (database): {exc}", persist=False)
                    log.warning("sync claim deferred (database: %s); retried on the next tick", exc)
                    break
                if not rows:
                    if trial:  # nothing to try: the health check's answer is all there is
                        self.breaker.success()
                    break
                with self._lock:
                    if self.forced_after is not None:
                        self.forced_after = max(self.forced_after, rows[-1]["id"])
                    if self.claim_budget is not None:
                        self.claim_budget -= len(rows)
                for row in rows:
                    if not self._dispatch(generation, row, trial):
                        return
                if testing:
                    break
        finally:
            with self._lock:
                self._pumping = False
                again, self._renudge = self._renudge, False
                idle = self._inflight == 0
                self._idle.notify_all()
            if idle:
                self.outcomes.flush()  # rows settled without a request, with no delivery to follow
            if again:
                self.nudge()

    def _dispatch(self, generation: int, row: Dict[str, Any], trial: bool = False) -> bool:
        refused = refusal(row)
        if refused is not None:
            self.outcomes.refused(row, *refused)
            if trial:
                self.breaker.return_trial()
            return True
        self._check_confidence(row)
        with self._lock:
            self._inflight += 1
        try:
            fut = self._executor.submit(self._deliver, generation, row, trial)  # type: ignore[union-attr]
        except RuntimeError:
            with self._lock:
                self._inflight -= 1
                self._idle.notify_all()
            return False
        fut.add_done_callback(self._delivered)
        return True

    def _check_confidence(self, row: Dict[str, Any]) -> None:
        if not self._warned_confidence:
            warning = fraction_warning(row)
            if warning is not None:
                self._warned_confidence = True
                log.warning("%s (this warning is given once per tracker)", warning)

    def _delivered(self, fut: "Future[None]") -> None:
        with self._lock:
            self._inflight -= 1
            idle = self._inflight == 0
            low = self._inflight <= self.max_inflight // 2
            self._idle.notify_all()
        self._report(fut)
        if idle:
            with lifecycle.sqlite_work():
                self.outcomes.flush()  # nothing else will come to push the batch out
        if low:
            self.nudge()

    def _report(self, fut: "Future[Any]") -> None:
        if fut.cancelled():
            return
        exc = fut.exception()
        if exc is not None:
            text = self.redact(f"{type(exc).__name__}: {exc}")
            with lifecycle.sqlite_work():
                self.outcomes.error(f"sync task failed: {text}")
            log.error("sync task failed: %s", text)

    # -- one delivery ----------------------------------------------------------------------------
    def _deliver(self, generation: int, row: Dict[str, Any], trial: bool = False) -> None:
        if self._stopping.is_set():
            if generation == self._generation:
                with lifecycle.sqlite_work():
                    self.outcomes.interrupted(row)
            return
        try:
            answer = self.delivery.send(json.dumps(payload(row)).encode(), trial)
        except Exception as exc:  # never strand a claim: whatever happened counts as an attempt
            answer = Answer(Kind.TRANSIENT, f"could not deliver ({type(exc).__name__}: {exc})")
        if generation != self._generation:
            return  # claimed from a database file that has been replaced since
        if answer.kind is Kind.UNREACHABLE and self._stopping.is_set():
            with lifecycle.sqlite_work():
                self.outcomes.interrupted(row)  # (an answer that did come is recorded, even now)
            return
        held = self.gate.remaining()
        with lifecycle.sqlite_work():
            self.outcomes.record(row, answer, self.breaker.is_open, self.forced_after is not None,
                                 time.time() + held if held > 0 else None)
        if answer.kind in (Kind.AUTH, Kind.REDIRECT, Kind.ENDPOINT):
            self._paused_until = time.monotonic() + self.config.auth_pause
        elif answer.kind is Kind.RATE_LIMITED or (answer.kind is Kind.UNREACHABLE and self.breaker.is_open):
            with self._lock:  # the drain takes it again once the receiver answers
                if self.forced_after is not None:
                    self.forced_after = min(self.forced_after, row["id"] - 1)
                if self.claim_budget is not None:
                    self.claim_budget += 1
            if answer.kind is Kind.RATE_LIMITED:
                self._wake_after(held)
            else:
                self.prober.ensure()

    def _wake_after(self, seconds: float) -> None:
        """Pump again when the rate limit ends (nothing else may come to nudge)."""
        with self._lock:  # one timer at a time (a nudge per commit must not start one each)
            if self._stopping.is_set() or self._wake is not None:
                return
            self._wake = threading.Timer(seconds + 0.01, self._woken)
            self._wake.daemon = True
            self._wake.start()

    def _woken(self) -> None:
        with self._lock:
            self._wake = None
        self.nudge()   # (still held: it sets the next timer)

    @property
    def rate_limited(self) -> bool:
        return self.gate.closed

    # -- the breaker's two ends ---------------------------------------------------------------------
    def _unreachable(self, reason: str) -> None:
        reason = self.redact(reason)
        self.outcomes.error(f"Alpine unreachable at {self.config.public_url}: {reason}")
        log.warning("Alpine unreachable at %s: %s; signals stay pending; probing until it answers",
                    self.config.public_url, reason)

    def _reachable(self, down: float) -> None:
        log.info("Alpine at %s answers again after %.1fs; sending everything pending now",
                 self.config.public_url, down)
        try:
            with lifecycle.sqlite_work():
                self._conn().execute("UPDATE signals SET sync_next_at = NULL WHERE sync_status = 'pending' "
                                     "AND sync_claim IS NULL")
        except sqlite3.Error as exc:
            log.warning("could not make pending rows due at once (%s); they follow their backoff", exc)
        self.nudge()

    # -- offline transitions, waiting, stop ------------------------------------------------------
    def settle_offline(self) -> int:
        """Mark pending rows that need no request: NEUTRAL -> skipped, refused -> rejected.

        Done in SQL (the same rules as the per-row check, from ``alpine.REFUSALS``) so that
        close() stays quick on a large backlog.
        """
        with lifecycle.sqlite_work():
            conn = store.connect(self.db_path, self.config.durability, self.config.busy_timeout)
            try:
                register_sql_functions(conn)
                return store.settle_refused(conn, refusal_sql())
            finally:
                conn.close()

    def busy(self) -> bool:
        """Something is being pumped or delivered."""
        with self._lock:
            return bool(self._inflight or self._pumping)

    def wait_idle(self, timeout: float) -> bool:
        """Wait until nothing is being pumped or delivered (or the timeout passes)."""
        deadline = time.monotonic() + timeout
        with self._lock:
            while self._inflight or self._pumping:
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._idle.wait(min(left, 0.05))
        while True:  # a worker may be writing outcomes right now: wait for it, then write the rest
            self.outcomes.flush(wait=max(0.01, deadline - time.monotonic()))
            if not self.outcomes.unwritten or time.monotonic() >= deadline:
                return not self.outcomes.unwritten
            time.sleep(0.01)

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
            self.delivery.abort()
            log.warning("sync stopped with requests in flight; their sockets were aborted")
            self.wait_idle(1.0)
        if self._wake is not None:
            self._wake.cancel()
        if self._executor is not None:
            self._executor.shutdown(wait=False, cancel_futures=True)
        self.delivery.close()
        try:
            with lifecycle.sqlite_work():   # a fork waits for these last writes too
                self.outcomes.flush(wait=1.0)  # whatever is still queued, before the claims are released
                if self._claimed_any:  # rows claimed but never started go back to pending at once
                    conn = store.connect(self.db_path, self.config.durability, self.config.busy_timeout)
                    try:
                        conn.execute("UPDATE signals SET sync_claim = NULL, sync_claim_until = NULL "
                                     "WHERE sync_claim = ?", (self._token,))
                    finally:
                        conn.close()
        except Exception as exc:
            log.warning("could not release sync claims (%s); the next run takes them back", exc)
        owner.forget(self._token)
        lifecycle.unwatch(self._watch)
        return clean

    def _stop_at_exit(self) -> None:
        self.stop(self.config.shutdown_timeout)

    def after_fork_in_child(self) -> None:
        self._init_runtime()

    # -- stats -----------------------------------------------------------------------------------
    def stats(self) -> Dict[str, Any]:
        return {"sync_retries": self.retries, "sync_last_error": self.last_error,
                "sync_outcomes": dict(self.outcomes.counts), "sync_breaker": self.breaker.state.value,
                "sync_delivery_lag_s": self.outcomes.lag.snapshot()}
