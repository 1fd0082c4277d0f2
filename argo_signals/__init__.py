"""argo-signals: no trading signal lost between the strategy and SQLite (and Alpine).

    >>> import argo_signals
    >>> argo_signals.log_signal({"symbol": "AAPL", "action": "BUY", "entry_price": 190.5,
    ...                          "confidence": 87})                       # doctest: +SKIP
"""
from __future__ import annotations

import threading
from typing import Any, Dict, Mapping, Optional

from .config import Config
from .signal import SignalValidationError, alpine_hash, new_signal_id, normalise
from .tracker import SignalTracker, default_db_path

__all__ = ["SignalTracker", "Config", "SignalValidationError", "log_signal", "update_signal", "flush",
           "close", "stats", "get_tracker", "alpine_hash", "new_signal_id", "normalise",
           "default_db_path", "__version__"]
__version__ = "0.1.0"

_default: Optional[SignalTracker] = None
_default_lock = threading.Lock()


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


def log_signal(signal: Mapping[str, Any]) -> str:
    """``get_tracker().log_signal(signal)``."""
    return get_tracker().log_signal(signal)


def update_signal(signal_id: str, **fields: Any) -> None:
    """``get_tracker().update_signal(signal_id, **fields)``."""
    get_tracker().update_signal(signal_id, **fields)


def flush(timeout: Optional[float] = None) -> bool:
    """Flush the module-level tracker (True when there is none yet)."""
    return True if _default is None else _default.flush(timeout)


def close(timeout: Optional[float] = None) -> bool:
    """Close the module-level tracker; a later ``log_signal()`` creates a new one."""
    global _default
    with _default_lock:
        tracker, _default = _default, None
    return True if tracker is None else tracker.close(timeout)


def stats() -> Dict[str, Any]:
    return get_tracker().stats()
