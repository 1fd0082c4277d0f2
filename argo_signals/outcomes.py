"""Outcomes: what became of each claimed row, written to the database, counted and logged.

Final outcomes (synced, rejected, skipped) are queued and written in batches by whichever
thread finds the database free; a row given back (transient, unreachable, rate limited, auth,
redirect) is released at once.  Only an answer about the row itself (``transient``: a 500 of
the receiver's own, an unreadable answer) spends one of its attempts: an outage or a rate
limit is the receiver's state, not the row's.  Every write names the row as it was claimed
(its id, hash and database file: see ``store``), so an outcome lands on that row only.  The last error is kept in memory for ``stats()`` and in the
``sync_last_error`` table for ``argo-signals status``.  Every text is redacted of the key.
"""
from __future__ import annotations

import logging
import sqlite3
import threading
import time
from datetime import datetime
from typing import Any, Callable, Dict, List, Optional, Tuple

from . import store
from .alpine import Answer, Kind
from .safetext import escape_controls
from .stats import SYNC_LAG_BUCKETS, Histogram

__all__ = ["Outcomes", "read_last_error", "LAST_ERROR_TABLE"]

log = logging.getLogger("argo_signals")

LAST_ERROR_TABLE = "sync_last_error"
_CREATE = (f"CREATE TABLE IF NOT EXISTS {LAST_ERROR_TABLE} "
           "(id INTEGER PRIMARY KEY CHECK (id = 1), error TEXT NOT NULL, at TEXT NOT NULL)")


def read_last_error(conn: sqlite3.Connection) -> Optional[Dict[str, str]]:
    """{"error", "at"} of the last sync error recorded in this database, or None."""
    try:
        rec = conn.execute(f"SELECT error, at FROM {LAST_ERROR_TABLE} WHERE id = 1").fetchone()
    except sqlite3.Error:  # no such table: no sync error was ever recorded
        return None
    return None if rec is None else {"error": rec[0], "at": rec[1]}


class Outcomes:
    def __init__(self, config: Any, token: str, conn: Callable[[], sqlite3.Connection],
                 redact: Callable[[Optional[str]], str], where: str) -> None:
        self.config = config
        self.token = token
        self._conn = conn
        self.redact = redact
        self.where = where                      # the receiver's URL, without credentials
        self.counts: Dict[str, int] = {"synced": 0, "rejected": 0, "skipped": 0, "auth": 0,
                                       "redirect": 0, "endpoint": 0, "transient": 0, "unreachable": 0,
                                       "rate_limited": 0}
        self._transient_warned = False         # one WARNING per streak of transient answers
        self.handled = 0                        # rows done with for now (for progress bars)
        self.lag = Histogram(SYNC_LAG_BUCKETS)  # commit -> accepting answer, synced rows
        self.last_error: Optional[str] = None
        self.config_error: Optional[str] = None  # a 3xx or 401/403 answer, until a row syncs again
        self._settled: List[Tuple[Dict[str, Any], str, Optional[str]]] = []  # (claimed row, status, error)
        self._settle_lock = threading.Lock()   # one writer of outcomes at a time
        self._queue_lock = threading.Lock()    # guards the list itself (append and swap)
        self._count_lock = threading.Lock()
        self._written_at = 0.0
        self._oldest = 0.0
        self.batch = 32            # final outcomes written together...
        self.max_wait = 0.05       # ...or once the oldest has waited this long

    # -- errors ----------------------------------------------------------------------------------
    def error(self, text: str, persist: bool = True) -> None:
        """Remember ``text`` as the last error (redacted); also in the database, at most once a
        second unless ``persist`` is forced by a configuration or outage error."""
        text = escape_controls(self.redact(text))
        self.last_error = text
        now = time.monotonic()
        if not persist and now - self._written_at < 1.0:
            return
        self._written_at = now
        try:
            conn = self._conn()
            conn.execute(_CREATE)
            conn.execute(f"INSERT OR REPLACE INTO {LAST_ERROR_TABLE} (id, error, at) VALUES (1, ?, ?)",
                         (text, store.utc_now()))
        except sqlite3.Error as exc:
            log.debug("could not record the last sync error: %s", exc)

    def _count(self, kind: str, handled: bool = True) -> None:
        with self._count_lock:
            self.counts[kind] += 1
            if handled:
                self.handled += 1

    def _note_lag(self, created_at: Any) -> None:
        """Seconds from the row's commit to now (its accepting answer), into the lag histogram."""
        try:
            lag = time.time() - datetime.fromisoformat(created_at).timestamp()
        except (TypeError, ValueError):
            return  # a created_at written by another program: no figure
        with self._count_lock:
            self.lag.observe((max(0.0, lag),))

    # -- rows ------------------------------------------------------------------------------------
    def refused(self, row: Dict[str, Any], status: str, reason: str) -> None:
        """A row the receiver would refuse for good: settled without a request."""
        self._count(status)
        if status == "rejected":
            log.warning("signal %s not synced (rejected locally): %s", row["signal_id"], reason)
        self._settle(row, status, reason)

    def record(self, row: Dict[str, Any], answer: Answer, breaker_open: bool, forced: bool,
               paused_until: Optional[float] = None) -> None:
        """Write what ``answer`` means for ``row`` (``paused_until``: the wall-clock end of a rate
        limit in force, before which a row given back is not due)."""
        cfg = self.config
        sid, kind = row["signal_id"], answer.kind
        detail = escape_controls(self.redact(answer.detail))
        if kind is Kind.SYNCED:
            self._count("synced")
            self._note_lag(row.get("created_at"))
            self._settle(row, "synced", None)
            with self._count_lock:
                was, self.config_error = self.config_error, None
                self._transient_warned = False
            if was is not None:
                log.warning("Alpine at %s accepts the signals again", self.where)
        elif kind is Kind.REJECTED:
            self._count("rejected")
            self._settle(row, "rejected", detail)
            log.warning("signal %s rejected by Alpine: %s", sid, detail)
        elif kind in (Kind.AUTH, Kind.REDIRECT, Kind.ENDPOINT):
            self._count(kind.value, handled=False)
            with self._count_lock:  # several workers get the same answer at once: one ERROR
                first, self.config_error = self.config_error is None, detail
            if first:
                if kind is Kind.AUTH:
                    log.error("Alpine at %s refused the API key (%s); signals stay pending; check ARGO_API_KEY",
                              self.where, detail)
                elif kind is Kind.ENDPOINT:
                    log.error("Alpine at %s has no signal endpoint there (%s); set ALPINE_API_URL to the "
                              "receiver's base URL (without /api/...); signals stay pending", self.where, detail)
                else:
                    log.error("Alpine at %s answered %s; redirects are not followed (the key must not go "
                              "elsewhere): set ALPINE_API_URL to the final address; signals stay pending",
                              self.where, detail)
            self.error(detail)
            store.release(self._conn(), row, self.token, detail, False, time.time() + cfg.auth_pause,
                          cfg.max_attempts)
        elif kind is Kind.RATE_LIMITED:
            # the whole sync waits (see ratelimit.py); the row goes back untouched, due after it
            self._count("rate_limited", handled=False)
            self.error(f"rate limited: {detail}", persist=False)
            with self._count_lock:  # one WARNING per streak, until a row syncs again
                first, self._transient_warned = not self._transient_warned, True
            (log.warning if first else log.debug)(
                "Alpine at %s is rate limiting (%s); the whole sync waits, signals stay pending", self.where, detail)
            store.release(self._conn(), row, self.token, f"rate limited: {detail}", False,
                          None if forced else paused_until, cfg.max_attempts)
        elif kind is Kind.UNREACHABLE:
            # the receiver is down: the breaker speaks for the outage once; the row goes back
            # untouched (due at once when the breaker is open: the probe decides when)
            self._count("unreachable", handled=False)
            if not breaker_open:
                self.error(f"{sid}: {detail}", persist=False)
            due = row.get("sync_next_at")
            if not breaker_open and not forced:
                due = time.time() + min(cfg.redelivery_max, cfg.redelivery_base)
            store.release(self._conn(), row, self.token, f"unreachable: {detail}", False,
                          None if forced else due, cfg.max_attempts)
        else:
            self._count("transient")
            self.error(f"{sid}: {detail}", persist=False)
            attempts = (row.get("sync_attempts") or 0) + 1
            delay = min(cfg.redelivery_max, cfg.redelivery_base * 2 ** max(0, attempts - 1))
            if answer.retry_after is not None:  # the receiver's own wait is a floor (clamped)
                delay = max(delay, min(answer.retry_after, cfg.max_retry_after))
            status = store.release(self._conn(), row, self.token, detail, True, time.time() + delay,
                                   cfg.max_attempts)
            if status == "failed":
                self.error(f"{sid}: {detail}")
                log.error("signal %s failed to sync after %d attempts (%s); `argo-signals sync "
                          "--retry-failed` re-queues it", sid, attempts, detail)
            else:
                with self._count_lock:  # a flood of 429/503: one WARNING until a row syncs again
                    first, self._transient_warned = not self._transient_warned, True
                if first:
                    log.warning("signal %s not synced yet (%s); due again in %.0fs (until a signal syncs, "
                                "further ones are logged at DEBUG)", sid, detail, delay)
                else:
                    log.debug("signal %s not synced yet (%s); due again in %.0fs", sid, detail, delay)

    def interrupted(self, row: Dict[str, Any]) -> None:
        """A row claimed but not sent (stopping): back to pending as it was."""
        store.release(self._conn(), row, self.token, row.get("sync_error"), False,
                      row.get("sync_next_at"), self.config.max_attempts)

    # -- batched final outcomes ------------------------------------------------------------------
    def _settle(self, row: Dict[str, Any], status: str, error: Optional[str]) -> None:
        """Queue a final outcome; written once a batch has gathered or it has waited a little
        (and always when the sync goes idle or stops: see ``Syncer``)."""
        now = time.monotonic()
        with self._queue_lock:
            if not self._settled:
                self._oldest = now
            self._settled.append((row, status, error))
            due = len(self._settled) >= self.batch or now - self._oldest >= self.max_wait
        if due:
            self.flush()

    def flush(self, wait: float = 0.0) -> None:
        """Write queued final outcomes; whoever finds the writer free writes all that wait.

        With ``wait`` it waits that long for a flush in progress on another thread to end
        (so that what that thread holds is written when this returns).  Outcomes of rows
        claimed from a database file that has since been replaced match no row (``store``).
        """
        while True:
            if not (self._settle_lock.acquire(timeout=wait) if wait > 0 else self._settle_lock.acquire(False)):
                return  # the holder takes what was queued meanwhile on its next round
            try:
                with self._queue_lock:
                    batch, self._settled = self._settled, []
                if not batch:
                    return
                try:
                    store.settle_many(self._conn(), self.token, batch)
                except Exception as exc:
                    with self._queue_lock:
                        self._settled[:0] = batch
                    self.error(f"could not record sync outcomes: {exc}", persist=False)
                    log.warning("could not record %d sync outcomes yet: %s", len(batch), exc)
                    return
            finally:
                self._settle_lock.release()

    @property
    def unwritten(self) -> int:
        return len(self._settled)
