"""The one owner of process events: interpreter exit, fork, SIGTERM/SIGINT.

Trackers and syncs register callbacks here (``watch``).  The engine and the sync are handed the
``EXITING`` event; neither imports the other.

- Before the interpreter joins non-daemon threads (``threading`` exit hook): ``EXITING`` is
  set and each sync stops within its budget, so executor threads never hang exit.
- At exit (``atexit``): each tracker still open closes, bounded by its ``atexit_timeout``.
- In a forked child: each tracker starts empty (``os.register_at_fork``).
- On SIGTERM/SIGINT (when asked): the handler never writes.  It turns the signal into an
  exception in the main thread (``KeyboardInterrupt`` through Python's own SIGINT handler,
  ``SystemExit`` for SIGTERM), so the stack unwinds and every lock is released; the bounded
  close then runs at exit.  A signal that arrives while the main thread is inside
  ``close()`` waits until that close has finished.  When the signal's previous disposition
  was the default, the process ends by that signal once the trackers are closed.
"""
from __future__ import annotations

import atexit
import contextlib
import logging
import os
import signal as _signal
import threading
from typing import Any, Callable, Dict, Iterator, Optional, Tuple

log = logging.getLogger("argo_signals")

__all__ = ["EXITING", "watch", "unwatch", "install_signal_handlers", "closing"]

EXITING = threading.Event()

Hook = Optional[Callable[[], Any]]
_watched: Dict[int, Tuple[Callable[[], Any], ...]] = {}
_watch_lock = threading.Lock()
_installed = False

_previous: Dict[int, Any] = {}
_closing_depth = 0                    # close() calls in progress on the main thread
_deferred: Optional[Tuple[int, Any]] = None
_exit_signal: Optional[int] = None    # re-raise with the default action once closed


def watch(at_exit: Hook, before_join: Hook, in_child: Hook) -> int:
    """Register a tracker's hooks; returns a handle for ``unwatch``.

    The hooks are held strongly: pass callables that hold the tracker's working parts, not
    the tracker, so that a tracker dropped without ``close()`` is still closed at exit."""
    global _installed
    refs = tuple(_none if m is None else m for m in (at_exit, before_join, in_child))
    with _watch_lock:
        handle = id(refs)
        _watched[handle] = refs
        if not _installed:
            _installed = True
            atexit.register(_at_exit)
            register = getattr(threading, "_register_atexit", None)
            if register is not None:
                with contextlib.suppress(RuntimeError):  # already shutting down
                    register(_before_join)
            if hasattr(os, "register_at_fork"):
                os.register_at_fork(after_in_child=_in_child)
    return handle


def _none() -> None:
    return None


def unwatch(handle: int) -> None:
    with _watch_lock:
        _watched.pop(handle, None)


def _call_all(slot: int, what: str) -> None:
    """Run every watched hook of one kind.  An exception from one (even ``SystemExit`` from an
    application's signal handler chained during a close) does not skip the others: the first
    ``BaseException`` is raised again once all have run."""
    with _watch_lock:
        hooks = [refs[slot] for refs in _watched.values()]
    pending: Optional[BaseException] = None
    for hook in hooks:
        try:
            hook()
        except Exception:
            log.exception("%s failed", what)
        except BaseException as exc:
            if pending is None:
                pending = exc
    if pending is not None:
        raise pending


def _before_join() -> None:
    EXITING.set()
    _call_all(1, "stopping the sync at exit")


def _at_exit() -> None:
    EXITING.set()
    _call_all(0, "closing at exit")
    num = _exit_signal
    if num is not None and _previous.get(num) in (_signal.SIG_DFL, None):
        logging.shutdown()
        _signal.signal(num, _signal.SIG_DFL)
        os.kill(os.getpid(), num)


def _in_child() -> None:
    global _closing_depth, _deferred, _watch_lock
    _watch_lock = threading.Lock()
    EXITING.clear()   # a child forked while its parent exits has its own life ahead
    _closing_depth, _deferred = 0, None
    _call_all(2, "resetting after fork")


# -- signals ----------------------------------------------------------------------------------
def install_signal_handlers(signals: Tuple[int, ...]) -> None:
    """Turn ``signals`` into an orderly exit (see the module text).  Main thread only."""
    if threading.current_thread() is not threading.main_thread():
        raise RuntimeError("install_signal_handlers() must be called from the main thread")
    for num in signals:
        if num in _previous:
            continue  # installed once per process, whatever the number of trackers
        _previous[num] = _signal.getsignal(num)
        _signal.signal(num, _handler)


def _handler(num: int, frame: Any) -> None:
    global _deferred
    log.warning("received %s: exiting; open trackers close within their budget",
                _signal.Signals(num).name)
    if _closing_depth > 0:
        _deferred = (num, frame)   # a close() is running on this thread: let it finish first
        return
    _chain(num, frame)


def _chain(num: int, frame: Any) -> None:
    global _exit_signal
    previous = _previous.get(num)
    if EXITING.is_set() and previous is _signal.default_int_handler:
        return                        # already exiting: no KeyboardInterrupt inside atexit
    if callable(previous):
        previous(num, frame)          # e.g. SIGINT's default: raise KeyboardInterrupt here
    elif previous == _signal.SIG_IGN:
        return
    else:
        _exit_signal = num
        if EXITING.is_set():
            return                    # already exiting: _at_exit ends by the signal
        raise SystemExit(128 + num)


@contextlib.contextmanager
def closing() -> Iterator[None]:
    """Wrap a close(): a signal arriving on the main thread meanwhile acts when it is done."""
    global _closing_depth, _deferred
    main = threading.current_thread() is threading.main_thread()
    if main:
        _closing_depth += 1
    try:
        yield
    finally:
        if main:
            _closing_depth -= 1
            if _closing_depth == 0 and _deferred is not None:
                pending, _deferred = _deferred, None
                _chain(*pending)

