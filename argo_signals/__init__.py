"""argo-signals: no trading signal lost between the strategy and SQLite (and Alpine).

    >>> import argo_signals
    >>> argo_signals.log_signal({"symbol": "AAPL", "action": "BUY", "entry_price": 190.5,
    ...                          "confidence": 87})                       # doctest: +SKIP
"""
# Only the names in __all__ (and the submodules) live here: helpers are imported under
# private aliases, and there is no `from __future__ import annotations` (it binds a name).
import threading as _threading
import time as _time
import typing as _t

from . import lifecycle as _lifecycle

from .config import Config
from .record import SignalValidationError, alpine_hash, new_signal_id, normalise
from .store import ForeignDatabaseError
from .tracker import SignalTracker, default_db_path

__all__ = ["SignalTracker", "Config", "SignalValidationError", "ForeignDatabaseError", "log_signal", "update_signal", "flush",
           "close", "stats", "get_tracker", "alpine_hash", "new_signal_id", "normalise",
           "default_db_path", "__version__"]
__version__ = "0.1.0"

_default: _t.Optional[SignalTracker] = None
_default_lock = _threading.Lock()
_default_held_for_fork = False


def _before_fork(deadline: float) -> None:
    # a thread creating the module-level tracker holds the lock (and may be inside SQLite)
    global _default_held_for_fork
    _default_held_for_fork = _default_lock.acquire(timeout=max(0.0, deadline - _time.monotonic()))


def _after_fork_in_parent() -> None:
    global _default_held_for_fork
    if _default_held_for_fork:
        _default_held_for_fork = False
        _default_lock.release()


def _after_fork_in_child() -> None:
    global _default_lock, _default_held_for_fork
    _default_lock, _default_held_for_fork = _threading.Lock(), False


_lifecycle.guard_fork(_before_fork, _after_fork_in_parent, _after_fork_in_child)


def get_tracker() -> SignalTracker:
    """The module-level tracker, created on first use from the environment."""
    global _default
    tracker = _default
    if tracker is None:
        with _default_lock:
            if _default is None:
                _default = SignalTracker()
            tracker = _default
    return tracker


def log_signal(signal: _t.Mapping[str, _t.Any]) -> str:
    """``get_tracker().log_signal(signal)``."""
    return get_tracker().log_signal(signal)


def update_signal(signal_id: str, **fields: _t.Any) -> None:
    """``get_tracker().update_signal(signal_id, **fields)``."""
    get_tracker().update_signal(signal_id, **fields)


def flush(timeout: _t.Optional[float] = None) -> bool:
    """Flush the module-level tracker (True when there is none yet)."""
    return True if _default is None else _default.flush(timeout)


def close(timeout: _t.Optional[float] = None) -> bool:
    """Close the module-level tracker; a later ``log_signal()`` creates a new one."""
    global _default
    with _default_lock:
        tracker, _default = _default, None
    return True if tracker is None else tracker.close(timeout)


def stats() -> _t.Dict[str, _t.Any]:
    return get_tracker().stats()
