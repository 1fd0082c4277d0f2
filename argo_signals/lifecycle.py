"""The one owner of process events: interpreter exit, fork, SIGTERM/SIGINT.

Trackers and syncs register callbacks here (``watch``).  The engine and the sync are handed the
``EXITING`` event; neither imports the other.

- Before the interpreter joins non-daemon threads (``threading`` exit hook): ``EXITING`` is
  set and each sync stops within its budget, so executor threads never hang exit.
- At exit (``atexit``): each tracker still open closes, bounded by its ``atexit_timeout``.
- Around a fork (``os.register_at_fork``): before it, every thread of ours is brought out of
  SQLite and our locks are taken, waiting at most ``FORK_WAIT`` seconds in all (``guard_fork``
  and the trackers' ``before_fork`` hooks); after it, the parent releases them and the child
  re-creates them, and each tracker starts empty.  A child never starts with a lock, nor a
  SQLite transaction, that a thread of the parent held at the fork, unless that thread could
  not leave within the bound; even then the child never uses nor closes an inherited
  connection.  Our SQLite work outside the engines' write locks (the sync's claims and
  outcomes, a tracker's creation) runs inside ``sqlite_work()``, which a fork waits for too.
  ``forked_child()`` tells whether this process was made by such a fork.  Module state a child
  must draw or create again (the id seed, the spill file's thread lock) is registered with
  ``after_fork_in_child()``: no other module calls ``os.register_at_fork``.
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
import time
from typing import Any, Callable, Dict, Iterator, List, Optional, Set, Tuple

log = logging.getLogger("argo_signals")

__all__ = ["EXITING", "FORK_WAIT", "watch", "unwatch", "guard_fork", "after_fork_in_child", "forked_child",
           "sqlite_work", "install_signal_handlers", "closing"]

EXITING = threading.Event()
FORK_WAIT = 1.0   # seconds a fork waits, at most, for our threads to leave SQLite and our locks

Hook = Optional[Callable[[], Any]]
BeforeFork = Callable[[float], Any]   # called with the monotonic deadline of the whole wait
_watched: Dict[int, Tuple[Callable[..., Any], ...]] = {}
_guards: List[Tuple[BeforeFork, Callable[[], Any], Callable[[], Any]]] = []
_forked = False                       # this process is a child made by os.fork()
_in_parent: List[Callable[[], Any]] = []   # what a fork in progress must release in the parent
_child_resets: List[Callable[[], Any]] = []   # after_fork_in_child(), in registration order
_watch_lock = threading.Lock()
_installed = False

_previous: Dict[int, Any] = {}
_closing_depth = 0                    # close() calls in progress on the main thread
_deferred: Optional[Tuple[int, Any]] = None
_exit_signal: Optional[int] = None    # re-raise with the default action once closed


def watch(at_exit: Hook, before_join: Hook, in_child: Hook,
          before_fork: Optional[BeforeFork] = None, after_fork_in_parent: Hook = None) -> int:
    """Register a tracker's hooks; returns a handle for ``unwatch``.

    ``before_fork(deadline)`` takes what a fork must not split (waiting until ``deadline`` at
    most); ``after_fork_in_parent`` releases it; ``in_child`` re-creates it in the child.
    The hooks are held strongly: pass callables that hold the tracker's working parts, not
    the tracker, so that a tracker dropped without ``close()`` is still closed at exit."""
    global _installed
    refs = tuple(_none if m is None else m
                 for m in (at_exit, before_join, in_child, before_fork, after_fork_in_parent))
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
    return handle


def guard_fork(before: BeforeFork, after_in_parent: Callable[[], Any],
               after_in_child: Callable[[], Any]) -> None:
    """Module-level fork hooks (for a module's own locks), run before every tracker's."""
    _guards.append((before, after_in_parent, after_in_child))


def after_fork_in_child(fn: Callable[[], Any]) -> None:
    """Call ``fn()`` in every child made by ``os.fork()`` (trackers or not), after this module's
    own reset and every tracker's, in the order of registration: for module state that a child
    must draw or create again (an id seed, a lock nothing takes across a fork).  This module is
    the only one that registers with ``os.register_at_fork``."""
    _child_resets.append(fn)


# Threads of ours doing SQLite work outside an engine's write lock (the sync's claims and
# outcomes, a tracker being created) are in ``_gate_inside``; a fork closes the gate and waits
# until none is (bounded), so that no child inherits a SQLite mutex or transaction.  A set of
# thread idents, not a counter: discarding is idempotent, so a Ctrl-C at any point of entering
# cannot leave a count that makes every later fork wait its full bound.
_gate_lock = threading.Lock()
_gate_inside: Set[int] = set()
_gate_closed_until = 0.0


@contextlib.contextmanager
def sqlite_work() -> Iterator[None]:
    """Around a piece of SQLite work of ours that no engine write lock covers: a fork waits
    for it to end (``FORK_WAIT`` at most), and it does not start while a fork is prepared."""
    me = threading.get_ident()
    outer = me not in _gate_inside
    try:
        while outer:
            with _gate_lock:
                if time.monotonic() >= _gate_closed_until:
                    _gate_inside.add(me)
                    break
            time.sleep(0.0005)
        yield
    finally:
        if outer:
            _gate_inside.discard(me)


def _close_gate(deadline: float) -> None:
    global _gate_closed_until
    with _gate_lock:
        _gate_closed_until = deadline
    me = {threading.get_ident()}   # a fork from inside a piece of work does not wait for itself
    while _gate_inside - me and time.monotonic() < deadline:
        time.sleep(0.0005)


def _open_gate() -> None:
    global _gate_closed_until
    with _gate_lock:
        _gate_closed_until = 0.0


def forked_child() -> bool:
    """True in a process made by ``os.fork()`` (bare, or a fork-context pool's worker) after
    this module was imported: such a process usually ends by ``os._exit()``, without atexit."""
    return _forked


def _none(*_: Any) -> None:
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


# -- fork ---------------------------------------------------------------------------------------
def _before_fork() -> None:
    """Bring our threads out of SQLite and take our locks, all within ``FORK_WAIT`` seconds.
    What could not be taken by then is not waited for: the child re-creates it anyway."""
    deadline = time.monotonic() + FORK_WAIT
    held = _watch_lock.acquire(timeout=FORK_WAIT)
    try:
        hooks = [(refs[3], refs[4]) for refs in _watched.values()]
    finally:
        if held:
            _watch_lock.release()
    # The module guards first (a thread creating the module-level tracker holds its lock and
    # enters the gate), then the engines' write locks (the sync's transactions may wait for a
    # writer's), then the gate.
    gate = [(_close_gate, _open_gate)]
    for before, after in [(g[0], g[1]) for g in _guards] + hooks + gate:
        try:
            before(deadline)
        except Exception:
            log.exception("preparing for a fork failed")
            continue
        _in_parent.append(after)


def _after_fork_in_parent() -> None:
    pending, _in_parent[:] = list(_in_parent), []
    for after in reversed(pending):
        try:
            after()
        except Exception:
            log.exception("resuming after a fork failed")


def _in_child() -> None:
    global _closing_depth, _deferred, _watch_lock, _forked
    global _gate_lock, _gate_closed_until
    _forked = True
    _in_parent.clear()
    _gate_lock, _gate_closed_until = threading.Lock(), 0.0
    _gate_inside.clear()   # the threads that were inside do not exist here
    _watch_lock = threading.Lock()
    EXITING.clear()   # a child forked while its parent exits has its own life ahead
    _closing_depth, _deferred = 0, None
    try:
        for _, _, after_in_child in _guards:
            try:
                after_in_child()
            except Exception:
                log.exception("resetting after fork failed")
        _call_all(2, "resetting after fork")
    finally:
        # last, and even when a tracker's hook raised: as when each module registered its own
        # at-fork hook after this one (the package imports this module first)
        for reset in list(_child_resets):
            try:
                reset()
            except Exception:
                log.exception("resetting after fork failed")


if hasattr(os, "register_at_fork"):
    os.register_at_fork(before=_before_fork, after_in_parent=_after_fork_in_parent,
                        after_in_child=_in_child)


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

