"""SignalTracker: the public object and its lifecycle (start, flush, close, atexit, fork, signals)."""
from __future__ import annotations

import atexit
import itertools
import logging
import os
import signal as _signal
import multiprocessing.util
import sqlite3
import threading
import time
import weakref
from datetime import datetime
from typing import Any, Callable, Dict, Mapping, Optional, Tuple

from . import spill, store
from .signal import normalise, normalise_update
from .stats import Stats
from .alpine import check_api_key
from .sync import Syncer, SyncConfig
from .writer import INSERT, UPDATE, Writer, WriterConfig, interpreter_exiting

log = logging.getLogger("argo_signals")

DEFAULT_DB = "argo_signals.db"


def default_db_path() -> str:
    return os.environ.get("ARGO_SIGNALS_DB") or DEFAULT_DB


def _env_flag(name: str) -> Optional[bool]:
    value = os.environ.get(name)
    if value is None or not value.strip():
        return None
    return value.strip().lower() not in ("0", "false", "no", "off")


class SignalTracker:
    """Logs trading signals durably to SQLite and (optionally) syncs them to Alpine.

    ``log_signal()`` validates on the caller's thread and queues; a daemon writer thread
    commits batches.  See ``docs/guide.md`` for every option.
    """

    def __init__(
        self,
        db_path: Optional[str] = None,
        *,
        batch_size: int = 50,
        batch_timeout: float = 5.0,
        flush_interval: float = 10.0,
        max_queue_size: int = 10_000,
        register_atexit: bool = True,
        atexit_timeout: float = 10.0,
        durability: str = "normal",
        busy_timeout: float = 5.0,
        queue_full_timeout: float = 0.1,
        max_batch: int = 1000,
        write_retry_budget: float = 30.0,
        alpine_url: Optional[str] = None,
        api_key: Optional[str] = None,
        sync_enabled: Optional[bool] = None,
        sync_workers: int = 4,
        sync_timeout: Tuple[float, float] = (5.0, 10.0),
        sync_shutdown_timeout: float = 5.0,
        sync_retry_budget: float = 30.0,
        max_sync_attempts: int = 20,
        handle_signals: bool = False,
        on_connect: Optional[Callable[[sqlite3.Connection], None]] = None,
    ) -> None:
        self.db_path = os.fspath(db_path) if db_path is not None else default_db_path()
        self.atexit_timeout = atexit_timeout
        self._stats = Stats()
        self._logged = itertools.count()  # next() is atomic: no lock on the hot path
        self._pid = os.getpid()
        self._closed = False
        self._close_lock = threading.Lock()
        self._prev_handlers: Dict[int, Any] = {}

        url = alpine_url if alpine_url is not None else os.environ.get("ALPINE_API_URL") or None
        enabled = sync_enabled if sync_enabled is not None else _env_flag("ALPINE_SYNC_ENABLED")
        if alpine_url is not None and sync_enabled is None:
            enabled = True  # an explicit URL wins over the environment switch
        self._syncer: Optional[Syncer] = None
        if url and enabled is not False:
            key = check_api_key(api_key if api_key is not None else os.environ.get("ARGO_API_KEY"))
            self._syncer = Syncer(self.db_path, SyncConfig(
                url, key, workers=sync_workers, timeout=tuple(sync_timeout),  # type: ignore[arg-type]
                shutdown_timeout=sync_shutdown_timeout, retry_budget=sync_retry_budget,
                max_attempts=max_sync_attempts, durability=durability, busy_timeout=busy_timeout))

        self._writer = Writer(
            WriterConfig(self.db_path, durability=durability, busy_timeout=busy_timeout,
                         batch_size=batch_size, batch_timeout=batch_timeout,
                         flush_interval=flush_interval, max_queue_size=max_queue_size,
                         queue_full_timeout=queue_full_timeout, max_batch=max_batch,
                         write_retry_budget=write_retry_budget, on_connect=on_connect),
            self._stats,
            on_commit=None if self._syncer is None else self._syncer.nudge_after_commit,
            on_tick=None if self._syncer is None else self._syncer.nudge)
        self._put = self._writer.put

        self._atexit_fn: Optional[Callable[[], None]] = None
        if register_atexit:
            self._atexit_fn = _exit_hook(weakref.ref(self), self._writer, self._syncer, atexit_timeout)
            atexit.register(self._atexit_fn)
        if hasattr(os, "register_at_fork"):
            os.register_at_fork(after_in_child=_fork_hook(weakref.ref(self)))
        if register_atexit:
            # multiprocessing ends its children with os._exit(), which runs no atexit hook;
            # its own finalizers do run first, so a child closes its copy there
            multiprocessing.util.register_after_fork(self, SignalTracker._in_multiprocessing_child)
        if handle_signals:
            self.install_signal_handlers()
        if self._syncer is not None:
            # the writer's tick drives the outbox: start it now so rows left pending by an
            # earlier run are picked up even if this tracker never logs a signal
            self._writer.start()

    def __repr__(self) -> str:
        state = "closed" if self._closed else "open"
        sync = self._syncer.config.public_url if self._syncer else None
        return f"SignalTracker({self.db_path!r}, {state}, alpine_url={sync!r})"

    # -- logging -------------------------------------------------------------------------
    def log_signal(self, signal: Mapping[str, Any]) -> str:
        """Validate ``signal`` on this thread, queue it, and return its ``signal_id``.

        Raises ``TypeError`` if ``signal`` is not a mapping and ``SignalValidationError``
        (a ``ValueError``) naming the field for bad values; nothing is queued then.
        """
        if self._pid != os.getpid():
            self._after_fork()
        row = normalise(signal)
        self._put((INSERT, row, time.monotonic()))
        next(self._logged)
        return row[0]

    def update_signal(self, signal_id: str, **fields: Any) -> None:
        """Queue an update (order_id, outcome, exit_price, profit_loss_pct, executor_id).

        It travels the same queue, so it lands after the insert it refers to.
        """
        if self._pid != os.getpid():
            self._after_fork()
        if not isinstance(signal_id, str) or not signal_id:
            raise TypeError("signal_id must be a non-empty string")
        self._put((UPDATE, (signal_id, normalise_update(fields)), time.monotonic()))

    def flush(self, timeout: Optional[float] = None) -> bool:
        """True once everything logged before the call is committed; False on timeout."""
        if self._pid != os.getpid():
            self._after_fork()
        return self._writer.flush(timeout)

    def close(self, timeout: Optional[float] = None) -> bool:
        """Flush, stop the writer and the sync, release resources.  Idempotent.

        Later ``log_signal()`` calls still persist (written synchronously).  With
        ``timeout=None`` it waits no longer than the write-retry budget plus the sync
        shutdown budget.
        """
        with self._close_lock:
            first = not self._closed
            self._closed = True
        if first and self._atexit_fn is not None:
            atexit.unregister(self._atexit_fn)
        return _close_parts(self._writer, self._syncer, timeout)

    def __enter__(self) -> "SignalTracker":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    # -- introspection -----------------------------------------------------------------------
    def stats(self) -> Dict[str, Any]:
        """Counters of this tracker plus the sync state of the database (see docs/api.md)."""
        out: Dict[str, Any] = {"logged": _count_value(self._logged), "pending": self._writer.pending()}
        out.update(self._stats.snapshot())
        out["spill_pending"] = spill.pending_count(self._writer.spill_path)
        out.update(sync_state(self.db_path))
        if self._syncer is not None:
            out.update(self._syncer.stats())
        else:
            out.update({"sync_retries": 0, "sync_last_error": None})
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
        """On SIGTERM/SIGINT: close within the budget, then chain to the previous handler.

        Must be called from the main thread (Python delivers signals only there).
        """
        if threading.current_thread() is not threading.main_thread():
            raise RuntimeError("install_signal_handlers() must be called from the main thread")
        ref = weakref.ref(self)
        for signum in signals:
            previous = _signal.getsignal(signum)
            self._prev_handlers[signum] = previous

            def handler(num: int, frame: Any, previous: Any = previous) -> None:
                tracker = ref()
                if tracker is not None:
                    log.warning("received %s: closing the signal tracker", _signal.Signals(num).name)
                    tracker.close(tracker.atexit_timeout)
                if callable(previous):
                    previous(num, frame)
                elif previous == _signal.SIG_IGN:
                    return
                else:  # SIG_DFL (or unknown): die the conventional way for this signal
                    _signal.signal(num, _signal.SIG_DFL)
                    os.kill(os.getpid(), num)

            _signal.signal(signum, handler)

    def _in_multiprocessing_child(self) -> None:
        self._after_fork()
        multiprocessing.util.Finalize(None, _exit_hook(weakref.ref(self), self._writer, self._syncer,
                                                       self.atexit_timeout), exitpriority=10)

    def _after_fork(self) -> None:
        """In a forked child: start empty, with fresh locks, connection, sessions and executor."""
        if self._pid == os.getpid():
            return
        self._pid = os.getpid()
        self._stats.__init__()  # type: ignore[misc]
        self._logged = itertools.count()
        self._close_lock = threading.Lock()
        self._writer.after_fork_in_child()
        if self._syncer is not None:
            self._syncer.after_fork_in_child()


def _count_value(counter: "itertools.count[int]") -> int:
    """The next value of an itertools.count without consuming it (its repr is ``count(N)``)."""
    return int(repr(counter)[6:-1])


def _close_parts(writer: Writer, syncer: Optional[Syncer], timeout: Optional[float]) -> bool:
    start = time.monotonic()
    ok = writer.close(timeout)
    if syncer is not None:
        try:
            syncer.settle_offline()
        except (sqlite3.Error, OSError) as exc:
            log.warning("could not mark NEUTRAL/refused rows at close: %s", exc)
        left = syncer.config.shutdown_timeout
        if timeout is not None:
            left = max(0.0, min(left, timeout - (time.monotonic() - start)))
        ok = syncer.stop(left) and ok
    return ok


def _fork_hook(ref: "weakref.ref[SignalTracker]") -> Callable[[], None]:
    """The after-fork callback: it holds the tracker only weakly."""
    def in_child() -> None:
        tracker = ref()
        if tracker is not None:
            tracker._after_fork()
    return in_child


def _exit_hook(ref: "weakref.ref[SignalTracker]", writer: Writer, syncer: Optional[Syncer],
               timeout: float) -> Callable[[], None]:
    """The atexit callback: a bounded close.  It holds the tracker only weakly."""
    def at_exit() -> None:
        interpreter_exiting.set()
        tracker = ref()
        if tracker is not None and tracker._pid != os.getpid():
            return  # a forked child that never logged: nothing of its own to close
        _close_parts(writer, syncer, timeout)
    return at_exit


def sync_state(db_path: str) -> Dict[str, Any]:
    """Counts by sync status and the sync lag, read from the database (zeros if it is absent)."""
    out: Dict[str, Any] = {"synced": 0, "sync_pending": 0, "sync_rejected": 0, "sync_skipped": 0,
                           "sync_failed": 0, "sync_lag_s": None}
    if not os.path.exists(db_path):
        return out
    try:
        conn = sqlite3.connect(f"file:{db_path}?mode=ro", uri=True, timeout=1.0)
    except sqlite3.Error:
        return out
    try:
        counts = store.status_counts(conn)
        oldest = conn.execute("SELECT created_at FROM signals WHERE sync_status = 'pending' "
                              "ORDER BY id LIMIT 1").fetchone()
    except sqlite3.Error:
        return out
    finally:
        conn.close()
    for status in ("synced", "pending", "rejected", "skipped", "failed"):
        key = "synced" if status == "synced" else f"sync_{status}"
        out[key] = counts.get(status, 0)
    if oldest:
        try:
            out["sync_lag_s"] = round(time.time() - datetime.fromisoformat(oldest[0]).timestamp(), 3)
        except ValueError:
            pass
    return out
