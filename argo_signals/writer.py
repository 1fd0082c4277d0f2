"""The writer: a bounded queue, one daemon thread, three triggers, and the synchronous fallback.

Producers append to a deque (cheap and thread-safe in CPython) and wake the thread only
when it must act: the first entry after an idle spell, or the queue reaching ``batch_size``.
The thread sleeps on one ``threading.Event`` until the earliest of: that wake-up, the oldest
entry turning ``batch_timeout`` old, the next ``flush_interval`` tick, ``flush()`` or
``close()``.  Every write happens under ``_lock``, whoever does it, so a caller that must write
itself (queue full, writer gone, tracker closed, interpreter exiting) first writes what is
already queued: each producer's order and ``flush()`` hold on every path.
"""
from __future__ import annotations

import logging
import os
import sqlite3
import threading
import time
from collections import deque
from typing import Any, Callable, Deque, Dict, List, Optional, Tuple

from tenacity import Retrying, retry_if_exception, stop_after_delay, wait_exponential, wait_random
from tenacity.stop import stop_base

from . import spill
from .signal import finish
from .stats import Stats
from .store import BatchResult, connect, ensure_schema, is_environment_error, write_batch

log = logging.getLogger("argo_signals")

INSERT, UPDATE, MARKER = 0, 1, 2
Entry = Tuple[int, Any, float]

# Set when the interpreter starts shutting down (see tracker.py): from then on no thread is started.
interpreter_exiting = threading.Event()


class _Marker:
    """A flush() request travelling through the queue behind everything logged before it."""

    __slots__ = ("done", "ok")

    def __init__(self) -> None:
        self.done = threading.Event()
        self.ok = True


class WriterConfig:
    def __init__(self, db_path: str, *, durability: str = "normal", busy_timeout: float = 5.0,
                 batch_size: int = 50, batch_timeout: float = 5.0, flush_interval: float = 10.0,
                 max_queue_size: int = 10_000, queue_full_timeout: float = 0.1,
                 max_batch: int = 1000, write_retry_budget: float = 30.0,
                 on_connect: Optional[Callable[[sqlite3.Connection], None]] = None) -> None:
        if batch_size < 1 or max_queue_size < 1 or max_batch < 1:
            raise ValueError("batch_size, max_queue_size and max_batch must be >= 1")
        if batch_timeout <= 0 or flush_interval <= 0:
            raise ValueError("batch_timeout and flush_interval must be > 0")
        if durability not in ("normal", "full"):
            raise ValueError("durability must be 'normal' or 'full'")
        self.db_path = db_path
        self.durability = durability
        self.busy_timeout = busy_timeout
        self.batch_size = batch_size
        self.batch_timeout = batch_timeout
        self.flush_interval = flush_interval
        self.max_queue_size = max_queue_size
        self.queue_full_timeout = queue_full_timeout
        self.max_batch = max(max_batch, batch_size)
        self.write_retry_budget = write_retry_budget
        self.on_connect = on_connect


class Writer:
    RESTART_GRACE = 1.0      # a writer dying this soon after a restart is not restarted again...
    BROKEN_COOLDOWN = 30.0   # ...for this long: callers write synchronously meanwhile

    def __init__(self, config: WriterConfig, stats: Stats,
                 on_commit: Optional[Callable[[int], None]] = None,
                 on_tick: Optional[Callable[[], None]] = None) -> None:
        self.config = config
        self.stats = stats
        self.on_commit = on_commit
        self.on_tick = on_tick
        self.spill_path = spill.spill_path(config.db_path)
        self._reset_state()

    def _reset_state(self) -> None:
        self._q: Deque[Entry] = deque()
        self._lock = threading.Lock()          # held by whoever writes to SQLite
        self._lock_owner: Optional[int] = None  # thread id while a caller writes synchronously
        self._state = threading.Lock()         # start / stop / restart decisions
        self._wake = threading.Event()
        self._space = threading.Condition(threading.Lock())
        self._thread: Optional[threading.Thread] = None
        self._accepting = False                # True while the thread runs and we are open
        self._running = False
        self._closed = False
        self._stop = False
        self._armed = False
        self._flush_req = False
        self._conn: Optional[sqlite3.Connection] = None
        self._held: List[Entry] = []
        self._degraded = False
        self._started_at = 0.0
        self._restarts = 0
        self._broken_until = 0.0
        self._fallback_causes: Dict[str, bool] = {}
        self._close_ok = True
        self._deadline = float("inf")          # set by close(): stop retrying and spill by then
        self._pause_until = 0.0                # after a failed spill: do not spin
        self._inode: Optional[Tuple[int, int]] = None

    # -- producer side ------------------------------------------------------------------
    def put(self, entry: Entry) -> None:
        """Queue an entry (hot path), or hand it to the slow path."""
        if self._accepting:
            q = self._q
            if len(q) < self.config.max_queue_size:
                q.append(entry)
                if self._armed or (len(q) >= self.config.batch_size and not self._wake.is_set()):
                    self._armed = False
                    self._wake.set()
                return
        self._slow_put(entry)

    def _slow_put(self, entry: Entry) -> None:
        if self._closed:
            self._write_sync(entry, "tracker closed")
            return
        if not self._running:
            cause = self._ensure_running()
            if cause:
                self._write_sync(entry, cause)
            else:
                self.put(entry)
            return
        # queue full: wait a bounded time for room, then write in this thread
        q = self._q
        with self._space:
            self._space.wait_for(lambda: len(q) < self.config.max_queue_size or not self._accepting,
                                 self.config.queue_full_timeout)
        if self._accepting and len(q) < self.config.max_queue_size:
            q.append(entry)
            self._wake.set()
            return
        self._write_sync(entry, "queue full")

    def start(self) -> None:
        """Start the thread now instead of on the first put() (no-op if running or closed)."""
        cause = self._ensure_running()
        if cause:
            log.warning("writer thread not started: %s", cause)

    def _ensure_running(self) -> Optional[str]:
        """Start (or restart) the thread; returns why not when the caller must write itself."""
        with self._state:
            if self._running or self._closed:
                return None if self._running else "tracker closed"
            if interpreter_exiting.is_set():
                return "interpreter exiting"
            now = time.monotonic()
            if now < self._broken_until:
                return "writer thread keeps dying"
            if self._thread is not None:  # it ran before: this is a restart
                if self._restarts and now - self._started_at < self.RESTART_GRACE:
                    self._broken_until = now + self.BROKEN_COOLDOWN
                    log.error("writer thread died again %.1fs after a restart; callers write "
                              "synchronously for %.0fs", now - self._started_at, self.BROKEN_COOLDOWN)
                    return "writer thread keeps dying"
                self._restarts += 1
                self.stats.writer_restarts += 1
                log.warning("restarting the writer thread (restart #%d)", self._restarts)
            thread = threading.Thread(target=self._run, name="argo-signals-writer", daemon=True)
            self._stop = False
            try:
                thread.start()
            except RuntimeError as exc:  # e.g. "can't create new thread at interpreter shutdown"
                return f"writer thread cannot start: {exc}"
            self._thread = thread
            self._started_at = now
            self._running = self._accepting = True
            return None

    def _write_sync(self, entry: Optional[Entry], cause: str) -> bool:
        """Write ``entry`` (and everything queued before it) in the calling thread."""
        if entry is not None:
            self.stats.fallback_writes += 1
            if cause not in self._fallback_causes:
                self._fallback_causes[cause] = True
                log.warning("synchronous fallback (%s): the calling thread writes to SQLite", cause)
        if self._lock_owner == threading.get_ident():
            # re-entered from a signal handler that interrupted this thread's own write: the
            # lock can never come free here, so keep everything safe in the spill file instead
            if entry is not None:
                self._q.append(entry)
            self._spill_what_is_held()
            return False
        if not self._lock.acquire(timeout=self.config.write_retry_budget + 5.0):
            if entry is not None:
                self._q.append(entry)
            log.error("could not take the write lock within %.0fs; %d entries stay queued",
                      self.config.write_retry_budget + 5.0, len(self._q))
            return False
        self._lock_owner = threading.get_ident()
        try:
            ok = True
            if entry is not None:
                self._q.append(entry)
            todo = len(self._q)  # entries re-queued by a failed spill are not retried in this call
            while todo > 0:
                batch = self._pop(min(todo, self.config.max_batch))
                if not batch:
                    break
                todo -= len(batch)
                try:
                    ok = self._write_entries(batch, None) and ok
                except Exception:
                    held, self._held = self._held, []
                    self._q.extendleft(reversed(held))
                    log.exception("synchronous write failed; %d entries stay queued", len(self._q))
                    self.stats.last_error = "synchronous write failed (see log)"
                    return False
            if self._closed:
                self._close_connection()
            return ok
        finally:
            self._lock_owner = None
            self._lock.release()
            self._notify_space()

    # -- flush and close ----------------------------------------------------------------
    def flush(self, timeout: Optional[float]) -> bool:
        deadline = None if timeout is None else time.monotonic() + timeout
        if not self._running:
            return self._write_sync(None, "flush")
        marker = _Marker()
        self._q.append((MARKER, marker, time.monotonic()))
        self._flush_req = True
        self._wake.set()
        while True:
            step = 0.1 if deadline is None else min(0.1, deadline - time.monotonic())
            if step <= 0:
                return False
            if marker.done.wait(step):
                return marker.ok
            if not self._running:  # the writer died or was stopped: write it ourselves
                self._write_sync(None, "flush")

    def close(self, timeout: Optional[float]) -> bool:
        with self._state:
            if self._closed:
                return self._close_ok
            self._closed = True
            self._accepting = False
            thread = self._thread if self._running else None
            self._stop = True
        self._notify_space()
        if self._lock_owner == threading.get_ident():
            # called from a signal handler that interrupted this thread's own synchronous
            # write: neither that write nor the writer thread can finish before we return
            self._wake.set()
            self._spill_what_is_held()
            self._close_ok = False
            return False
        budget = self.config.write_retry_budget + 1.0
        limit = budget if timeout is None else min(timeout, budget) if timeout > 0 else 0.0
        # a batch still failing near the deadline is spilled rather than left in memory
        self._deadline = time.monotonic() + max(0.0, limit - max(0.2, limit * 0.25))
        if thread is not None:
            self._wake.set()
            thread.join(limit)
            ok = not thread.is_alive()
        else:
            ok = True
        if ok:
            ok = self._write_sync(None, "close")  # whatever a dead or absent writer left queued
        if thread is not None and thread.is_alive():
            self._spill_what_is_held()
        held = len(self._q) + len(self._held)
        if not ok or held:
            log.error("close() returned before everything was written: %d entries still held "
                      "(write lock busy or database unwritable)", held)
            ok = False
        self._close_ok = ok
        return ok

    def _spill_what_is_held(self) -> None:
        """Spill everything held, queued and in flight, when a write cannot finish before we
        return: close() ran out of time while the writer is busy, or a signal handler
        interrupted its own thread's write.  If that write then succeeds as well, the replay
        finds those rows stored and skips them."""
        entries = list(self._held) + list(self._q)
        rows = [finish(p) for kind, p, _ in entries if kind == INSERT]
        updates = [p for kind, p, _ in entries if kind == UPDATE]
        if not rows and not updates:
            return
        try:
            spill.append(self.spill_path, rows, updates)
        except OSError as exc:
            log.critical("close() timed out and the spill file %s is unwritable (%s): %d signals "
                         "are only in memory", self.spill_path, exc, len(rows))
            return
        self.stats.spilled += len(rows)
        log.error("close() timed out while the writer was still busy: %d signals and %d updates "
                  "spilled to %s as a precaution", len(rows), len(updates), self.spill_path)

    # -- the thread ----------------------------------------------------------------------
    def _run(self) -> None:
        try:
            self._loop()
        except BaseException:
            log.exception("the writer thread died; it restarts on the next log_signal()")
            self.stats.last_error = "writer thread died (see log)"
            with self._state:
                held, self._held = self._held, []
                self._q.extendleft(reversed(held))
                self._running = self._accepting = False
            self._notify_space()
        else:
            self._running = False

    def _loop(self) -> None:
        cfg = self.config
        q = self._q
        interval = cfg.flush_interval
        next_tick = time.monotonic() + interval
        self._tick()
        while True:
            self._wake.clear()
            if self._stop:
                self._drain("close", everything=True)
                return
            now = time.monotonic()
            if now < self._pause_until:
                self._wake.wait(self._pause_until - now)
                continue
            reason = None
            if self._flush_req:
                self._flush_req = False
                reason = "manual"
            elif len(q) >= cfg.batch_size:
                reason = "size"
            else:
                oldest = self._oldest()
                if oldest is not None and now - oldest >= cfg.batch_timeout:
                    reason = "timeout"
            if now >= next_tick:
                while next_tick <= now:
                    next_tick += interval
                if reason is None and q:
                    reason = "interval"
                self._tick()
            if reason is not None:
                self._drain(reason, everything=reason == "manual")
                continue
            deadline = next_tick
            self._armed = True
            oldest = self._oldest()
            if oldest is not None:
                self._armed = False
                deadline = min(deadline, oldest + cfg.batch_timeout)
            self._wake.wait(max(0.0, deadline - time.monotonic()))

    def _oldest(self) -> Optional[float]:
        try:
            return self._q[0][2]
        except IndexError:
            return None

    def _tick(self) -> None:
        if self._degraded or os.path.exists(self.spill_path) or os.path.exists(self.spill_path + ".replaying"):
            try:
                self.replay_spill()
            except Exception:
                log.exception("replaying the spill file failed; it is tried again on the next tick")
        if self.on_tick is not None:
            try:
                self.on_tick()
            except Exception:
                log.exception("tick hook failed")

    def _drain(self, reason: str, everything: bool) -> None:
        todo = len(self._q) if everything else self.config.max_batch
        while todo > 0:
            with self._lock:
                batch = self._pop(min(todo, self.config.max_batch))
                if not batch:
                    break
                todo -= len(batch)
                # room exists as soon as the batch is popped: waiting producers go on at once
                self._notify_space()
                self._write_entries(batch, reason)
            if not everything:
                break

    def _pop(self, n: int) -> List[Entry]:
        q = self._q
        out: List[Entry] = []
        try:
            for _ in range(n):
                out.append(q.popleft())
        except IndexError:
            pass
        return out

    def _notify_space(self) -> None:
        with self._space:
            self._space.notify_all()

    # -- writing (always under self._lock) -----------------------------------------------
    def _write_entries(self, entries: List[Entry], reason: Optional[str]) -> bool:
        self._held = entries
        rows, starts, updates, markers = [], [], [], []
        for kind, payload, t in entries:
            if kind == INSERT:
                rows.append(finish(payload))
                starts.append(t)
            elif kind == UPDATE:
                updates.append(payload)
            else:
                markers.append(payload)
        ok = True
        if rows or updates:
            result = self._commit(rows, updates)
            if result is None:
                ok = False
            else:
                self._account(result, starts, reason)
        self._held = []
        for m in markers:
            m.ok = ok
            m.done.set()
        return ok

    def _account(self, result: BatchResult, starts: List[float], reason: Optional[str]) -> None:
        st = self.stats
        now = time.monotonic()
        st.persisted += result.inserted
        st.duplicates += result.duplicates
        st.latencies.extend(now - t for t in starts)
        if reason is not None:
            st.flushes[reason] += 1
        for sid, why, _ in result.rejected_rows:
            st.rejected += 1
            log.warning("signal %s rejected into rejected_signals: %s", sid, why)
        for sid in result.unknown_updates:
            st.unknown_updates += 1
            log.warning("update_signal(%r): no such signal; update ignored", sid)
        for sid in result.refused_updates:
            st.rejected += 1
            log.warning("update of %r names columns that cannot be updated; ignored", sid)
        if result.inserted and self.on_commit is not None:
            try:
                self.on_commit(result.inserted)
            except Exception:
                log.exception("commit hook failed")

    def _connection(self) -> sqlite3.Connection:
        if self._conn is not None and self._inode is not None:
            # the file was deleted or replaced under us: writing on would go to an orphan inode
            try:
                st = os.stat(self.config.db_path)
                same = (st.st_dev, st.st_ino) == self._inode
            except OSError:
                same = False
            if not same:
                log.error("database file %s vanished or was replaced; reopening it", self.config.db_path)
                self._close_connection()
        if self._conn is None:
            conn = connect(self.config.db_path, self.config.durability, self.config.busy_timeout)
            try:
                if self.config.on_connect is not None:
                    self.config.on_connect(conn)
                ensure_schema(conn)
                st = os.stat(self.config.db_path)
            except BaseException:
                conn.close()
                raise
            self._conn = conn
            self._inode = (st.st_dev, st.st_ino)
        return self._conn

    def _close_connection(self) -> None:
        if self._conn is not None:
            try:
                self._conn.close()
            except sqlite3.Error:
                pass
            self._conn = None

    def _commit(self, rows: List[tuple], updates: List[Tuple[str, Dict[str, Any]]]) -> Optional[BatchResult]:
        """Write with retries; after the budget, spill.  None means spilled (or still held)."""
        budget = 0.0 if self._degraded else self.config.write_retry_budget
        failures = [0]

        def note(retry_state: Any) -> None:
            failures[0] += 1
            self.stats.write_retries += 1
            exc = retry_state.outcome.exception()
            self.stats.last_error = f"database write failed: {exc}"
            self._close_connection()  # reopen: the file or its directory may have been replaced
            if failures[0] == 1:
                log.warning("database write failed (%s); retrying for up to %.1fs", exc, budget)

        retryer = Retrying(retry=retry_if_exception(is_environment_error),
                           stop=stop_after_delay(budget) | _StopAt(lambda: self._deadline),
                           wait=wait_exponential(multiplier=0.02, max=1.0) + wait_random(0, 0.05),
                           before_sleep=note, reraise=True)
        try:
            for attempt in retryer:
                with attempt:
                    result = write_batch(self._connection(), rows, updates)
            self._degraded = False
            self.stats.transactions += 1
            return result
        except Exception as exc:
            if not is_environment_error(exc):
                raise
            self._close_connection()
            self.stats.last_error = f"database write failed: {exc}"
            self._spill(rows, updates, exc)
            return None

    def _spill(self, rows: List[tuple], updates: List[Tuple[str, Dict[str, Any]]],
               exc: BaseException) -> None:
        self._degraded = True
        try:
            spill.append(self.spill_path, rows, updates)
        except OSError as err:
            log.critical("database unwritable (%s) and spill file %s unwritable (%s): %d signals "
                         "stay in memory", exc, self.spill_path, err, len(rows))
            self._q.extendleft(reversed(self._held))
            self._held = []
            self._pause_until = time.monotonic() + 1.0
            return
        self.stats.spilled += len(rows)
        log.error("database unwritable (%s): %d signals and %d updates spilled to %s; they are "
                  "replayed when the database can be written", exc, len(rows), len(updates), self.spill_path)

    def replay_spill(self) -> int:
        """Write back what the spill file holds (idempotent by signal_id); returns rows replayed."""
        if not self._lock.acquire(timeout=self.config.write_retry_budget):
            return 0
        try:
            taken = spill.take(self.spill_path)
            if taken is None:
                self._degraded = False
                return 0
            path, rows, updates = taken
            try:
                result = write_batch(self._connection(), rows, updates)
            except Exception as exc:
                self._close_connection()
                log.debug("spill replay deferred: %s", exc)
                return 0
            self.stats.replayed += len(rows)
            self._account(result, [], None)
            try:
                os.remove(path)  # after the commit: a crash in between only replays no-ops
            except FileNotFoundError:
                pass  # another process replayed and removed the same file
            self._degraded = False
            log.warning("replayed %d spilled signals and %d updates from %s (%d new, %d already stored)",
                        len(rows), len(updates), self.spill_path, result.inserted, result.duplicates)
            return len(rows)
        finally:
            self._lock.release()

    # -- introspection and fork -----------------------------------------------------------
    def pending(self) -> int:
        return sum(1 for e in tuple(self._q) if e[0] == INSERT) + sum(1 for e in self._held if e[0] == INSERT)

    @property
    def running(self) -> bool:
        return self._running

    def after_fork_in_child(self) -> None:
        """The child starts empty: the parent's queue, locks, connection and thread stay the parent's."""
        if self._conn is not None:
            _LEAKED_AFTER_FORK.append(self._conn)  # never close the parent's connection in the child
        closed = self._closed
        self._reset_state()
        self._closed = closed


_LEAKED_AFTER_FORK: List[sqlite3.Connection] = []


class _StopAt(stop_base):
    """A tenacity stop condition: stop once the monotonic clock passes ``deadline()``."""

    def __init__(self, deadline: Callable[[], float]) -> None:
        self.deadline = deadline

    def __call__(self, retry_state: Any) -> bool:
        return time.monotonic() >= self.deadline()
