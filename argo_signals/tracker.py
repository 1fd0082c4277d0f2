"""SignalTracker: the public object.  It builds the configuration, the SQLite sink, the engine
and the sync, and hands its process events to ``lifecycle``."""
from __future__ import annotations

import itertools
import multiprocessing
import logging
import os
import signal as _signal
import sqlite3
import time
from datetime import datetime
from typing import Any, Callable, Dict, Mapping, Optional, Tuple

from . import lifecycle, spill, store
from .config import Config, default_db_path
from .engine import Engine, State
from .record import normalise, normalise_update
from .entry import INSERT, UPDATE
from .sink import SQLiteSink
from .stats import SYNC_LAG_BUCKETS, Histogram, Stats
from .sync import Syncer, SyncConfig

log = logging.getLogger("argo_signals")

__all__ = ["SignalTracker", "default_db_path", "sync_state", "database_state"]


class SignalTracker:
    """Logs trading signals durably to SQLite and (optionally) syncs them to Alpine.

    ``log_signal()`` validates on the caller's thread and queues; a daemon writer thread
    commits batches.  Options are the fields of ``argo_signals.Config`` (README's table);
    a ready ``config=`` may be passed instead.  The database (and its directory) must be
    writable: otherwise ``OSError`` naming the path is raised here.
    """

    def __init__(self, db_path: Optional[str] = None, *, config: Optional[Config] = None,
                 sync_enabled: Optional[bool] = None, **options: Any) -> None:
        if config is None:
            config = Config.resolve(db_path, sync_enabled=sync_enabled, **options)
        elif db_path is not None or options or sync_enabled is not None:
            raise TypeError("pass either config= or options, not both")
        self.config = config
        self.db_path = config.db_path
        self.atexit_timeout = config.atexit_timeout
        self._stats = Stats()
        self._logged = itertools.count()  # next() is atomic: no lock on the hot path
        self._pid = os.getpid()

        self._sink = SQLiteSink(config, self._stats)
        with lifecycle.sqlite_work():   # a fork waits until the schema is there
            self._sink.open()   # fail fast; the schema exists before any thread uses it
        self._syncer: Optional[Syncer] = None
        if config.alpine_url:
            self._syncer = Syncer(self.db_path, SyncConfig(
                config.alpine_url, config.api_key, workers=config.sync_workers,
                timeout=config.sync_timeout, shutdown_timeout=config.sync_shutdown_timeout,
                retry_budget=config.sync_retry_budget, max_attempts=config.max_sync_attempts,
                durability=config.durability, busy_timeout=config.busy_timeout))
            self._sink.on_commit = self._syncer.nudge_after_commit
        self._engine = Engine(config, self._sink, self._stats, lifecycle.EXITING,
                              on_tick=None if self._syncer is None else self._syncer.nudge)
        self._put = self._engine.put
        self._parts = _Parts(config, self._stats, self._engine, self._syncer)
        self._watch: Optional[int] = lifecycle.watch(
            self._parts.close_at_exit if config.register_atexit else None, None, self._parts.after_fork,
            self._engine.before_fork, self._engine.after_fork_in_parent)
        if config.handle_signals:
            self.install_signal_handlers()
        if multiprocessing.parent_process() is not None or lifecycle.forked_child():
            # a pool may end this process with SIGTERM or os._exit(), which run no exit hook,
            # and a forked child usually ends by os._exit() (e.g. in a finally:)
            self._engine.write_directly("forked child" if lifecycle.forked_child()
                                        else "multiprocessing child")
        self._engine.start()

    def __repr__(self) -> str:
        sync = self._syncer.config.public_url if self._syncer else None
        return f"SignalTracker({self.db_path!r}, {self._engine.state.value}, alpine_url={sync!r})"

    # -- logging -------------------------------------------------------------------------
    def log_signal(self, signal: Mapping[str, Any]) -> str:
        """Validate ``signal`` on this thread, queue it, and return its ``signal_id``.

        Raises ``TypeError`` if ``signal`` is not a mapping and ``SignalValidationError``
        (a ``ValueError``) naming the field for bad values; nothing is queued then.
        """
        if _forked_since(self._pid):
            self._after_fork()
        row = normalise(signal)
        self._put((INSERT, row, time.monotonic()))
        next(self._logged)
        return row[0]

    def update_signal(self, signal_id: str, **fields: Any) -> None:
        """Queue an update (order_id, outcome, exit_price, profit_loss_pct, executor_id).

        It travels the same queue, so it lands after the insert it refers to (also when that
        insert had to be spilled: the update then waits behind it in the spill file).  An
        update of a signal not in the database yet (logged by another process, say) waits in
        the database and is applied when that signal's insert is committed.
        """
        if _forked_since(self._pid):
            self._after_fork()
        if not isinstance(signal_id, str) or not signal_id:
            raise TypeError("signal_id must be a non-empty string")
        self._put((UPDATE, (signal_id, normalise_update(fields)), time.monotonic()))

    def flush(self, timeout: Optional[float] = None) -> bool:
        """True once everything logged before the call is in the database.

        False on timeout, or while some of it is only in the spill file (``stats()
        ["spill_pending"]``); a flush replays the spill first when the database is writable.
        """
        if _forked_since(self._pid):
            self._after_fork()
        return self._engine.flush(timeout)

    def close(self, timeout: Optional[float] = None) -> bool:
        """Write what is queued, stop the writer thread and the sync.  Safe from any thread,
        any number of times, at once.

        True once everything logged before the call is in the database.  Later
        ``log_signal()`` calls still persist (written synchronously).  With ``timeout=None``
        it waits no longer than the write-retry budget plus the sync shutdown budget.
        """
        ok = self._parts.close(timeout)
        if self._engine.state is State.CLOSED and self._watch is not None:
            lifecycle.unwatch(self._watch)
            self._watch = None
        return ok

    def __enter__(self) -> "SignalTracker":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    # -- introspection -----------------------------------------------------------------------
    def stats(self) -> Dict[str, Any]:
        """Counters of this tracker plus the sync state of the database (see docs/api.md)."""
        out: Dict[str, Any] = {"logged": _count_value(self._logged), "pending": self._engine.pending(),
                               "state": self._engine.state.value}
        out.update(self._stats.snapshot())
        out["spill_pending"] = spill.pending_count(self.config.spill_path)
        out.update(database_state(self.db_path))   # one read-only connection for both
        if self._syncer is not None:
            out.update(self._syncer.stats())
        else:
            out.update({"sync_retries": 0, "sync_last_error": None, "sync_outcomes": {}, "sync_breaker": None,
                        "sync_delivery_lag_s": Histogram(SYNC_LAG_BUCKETS).snapshot()})
        out["sync_enabled"] = self._syncer is not None
        return out

    @property
    def sync_enabled(self) -> bool:
        return self._syncer is not None

    def wait_synced(self, timeout: float) -> bool:
        """Wait until the sync has nothing claimable in flight (for scripts and tests)."""
        if self._syncer is None:
            return True
        self._syncer.nudge()
        return self._syncer.wait_idle(timeout)

    # -- process events ------------------------------------------------------------------------
    def install_signal_handlers(self, signals: Tuple[int, ...] = (_signal.SIGTERM, _signal.SIGINT)) -> None:
        """On SIGTERM/SIGINT: exit in an orderly way; trackers close at exit within budget.

        Must be called from the main thread (Python delivers signals only there).  See
        ``argo_signals.lifecycle`` for what the handler does.
        """
        lifecycle.install_signal_handlers(signals)

    def _after_fork(self) -> None:
        """In a forked child (found by the pid check): reset this tracker's own counters."""
        self._parts.after_fork()
        self._pid = os.getpid()
        self._logged = itertools.count()


class _Parts:
    """A tracker's working parts, held by the lifecycle hooks instead of the tracker: one
    dropped without ``close()`` is still closed at exit, and a forked child resets them once."""

    def __init__(self, config: Config, stats: Stats, engine: Engine, syncer: Optional[Syncer]) -> None:
        self.config, self.stats, self.engine, self.syncer = config, stats, engine, syncer
        self.pid = os.getpid()

    def close(self, timeout: Optional[float]) -> bool:
        start = time.monotonic()
        with lifecycle.closing():
            ok = self.engine.close(timeout)
            if self.syncer is not None:
                try:
                    self.syncer.settle_offline()
                except (sqlite3.Error, OSError) as exc:
                    log.warning("could not mark NEUTRAL/refused rows at close: %s", exc)
                left = self.syncer.config.shutdown_timeout
                if timeout is not None:
                    left = max(0.0, min(left, timeout - (time.monotonic() - start)))
                ok = self.syncer.stop(left) and ok
        return ok

    def close_at_exit(self) -> None:
        if not _forked_since(self.pid):
            self.close(self.config.atexit_timeout)

    def after_fork(self) -> None:
        """In a forked child: start empty, writing synchronously, with a fresh connection."""
        if not _forked_since(self.pid):
            return
        self.pid = os.getpid()
        self.stats.__init__()  # type: ignore[misc]
        self.engine.after_fork_in_child()
        if self.syncer is not None:
            self.syncer.after_fork_in_child()


def _forked_since(pid: int) -> bool:
    """True when the object that noted ``pid`` (its process at creation or last reset) was made
    before a fork: this process is a child that inherited it and has not reset it yet."""
    return pid != os.getpid()


def _count_value(counter: "itertools.count[int]") -> int:
    """The next value of an itertools.count without consuming it (its repr is ``count(N)``)."""
    return int(repr(counter)[6:-1])


def _read_db(db_path: str, read: Callable[[sqlite3.Connection], Any]) -> Optional[Any]:
    """``read(conn)`` on a read-only connection; None if the database is absent or unreadable."""
    if not os.path.exists(db_path):
        return None
    try:
        conn = store.connect_readonly(db_path, timeout=1.0)
    except sqlite3.Error:
        return None
    try:
        return read(conn)
    except sqlite3.Error:
        return None
    finally:
        conn.close()


def _sync_and_waiting(conn: sqlite3.Connection) -> Tuple[Dict[str, int], Any, Tuple[int, Optional[float]]]:
    """Rows per sync status, the oldest pending row's created_at, and the waiting updates."""
    oldest = conn.execute("SELECT created_at FROM signals WHERE sync_status = 'pending' "
                          "ORDER BY id LIMIT 1").fetchone()
    return store.status_counts(conn), oldest, store.waiting_summary(conn)


def sync_state(db_path: str) -> Dict[str, Any]:
    """Counts by sync status and the sync lag, read from the database (zeros if it is absent)."""
    return database_state(db_path, waiting=False)


def database_state(db_path: str, waiting: bool = True) -> Dict[str, Any]:
    """``sync_state`` plus (with ``waiting``) the updates waiting for their insert: how many,
    and the oldest's age in seconds; all from one read-only connection."""
    out: Dict[str, Any] = {"synced": 0, "sync_pending": 0, "sync_rejected": 0, "sync_skipped": 0,
                           "sync_failed": 0, "sync_lag_s": None, "database_readable": False}
    if waiting:
        out.update(waiting_updates=0, waiting_update_oldest_s=None)
    got = _read_db(db_path, _sync_and_waiting)
    if got is None:
        return out
    counts, oldest, (n_waiting, oldest_waiting) = got
    out["database_readable"] = True
    for status in store.SYNC_STATUSES:
        key = "synced" if status == "synced" else f"sync_{status}"
        out[key] = counts.get(status, 0)
    if oldest:
        try:
            out["sync_lag_s"] = round(time.time() - datetime.fromisoformat(oldest[0]).timestamp(), 3)
        except ValueError:
            pass
    if waiting:
        out["waiting_updates"] = n_waiting
        if oldest_waiting is not None:
            out["waiting_update_oldest_s"] = round(max(0.0, time.time() - oldest_waiting), 3)
    return out
