"""The engine: a bounded queue, one daemon thread, the triggers, and a named state.

Producers call ``put()``, which appends to the deque of a ``queue.Queue`` (``batchqueue``);
the thread sleeps on one wake-up channel until the earliest of: the queue reaching
``batch_size``, the oldest entry turning ``batch_timeout`` old, the next ``flush_interval``
tick, ``flush()`` or ``close()``.  Whoever
runs the sink (the thread, or a caller writing synchronously) holds the write lock and takes
entries from the head of the queue, so entries are written in queue order and ``done``
counts them: ``flush()`` and ``close()`` wait until it reaches the queue's count at their call.

States (changed only under ``_lock``)::

    OPEN ──thread dies / fork──► DEGRADED ──restart──► OPEN
      │                            │
      └────────── close() ─────────┴──► CLOSING ──► CLOSED

OPEN: the thread writes.  DEGRADED: the thread cannot run (it keeps dying, the interpreter
is exiting, or this is a forked child): callers run the sink themselves.  CLOSING and
CLOSED: the queue is sealed; every caller writes synchronously.  Entries leave the queue
only once written, so a ``BaseException`` (Ctrl-C, SystemExit) inside a write drops nothing.

A signal handler that logs while its thread is inside a synchronous write, ``flush()`` or
``close()`` (``_inside``) only appends and returns; the interrupted call writes it before it
returns (``_leave``).

Who writes which attribute, under which guard, and who reads it: see ``Engine.__init__`` and
``Engine._reset``, where each is created.
"""
from __future__ import annotations

import enum
import functools
import logging
import queue
import threading
import time
from typing import Any, Callable, Dict, Optional, Protocol, Sequence, Set

from .batchqueue import EntryQueue, Sealed
from .config import Config
from .entry import BatchFate, Entry
from .stats import Stats
from .writelock import WriteLock, seconds_until

log = logging.getLogger("argo_signals")

__all__ = ["Engine", "State", "Sink"]


class State(enum.Enum):
    OPEN = "open"
    DEGRADED = "degraded"
    CLOSING = "closing"
    CLOSED = "closed"


class _Step(enum.Enum):
    """What one batch of a caller's synchronous write left (``Engine._next_batch``)."""
    MORE = "more"        # written; the queue holds more
    EMPTY = "empty"      # written; the queue is empty
    FAILED = "failed"    # neither the database nor the spill took it


class Sink(Protocol):
    """Where the engine's entries go (``sink.SQLiteSink``; tests use fakes).

    The engine calls ``write``, ``replay``, ``tick`` and ``close`` only while it holds its
    write lock, so at most one of them runs at a time, on whichever thread holds the lock:
    the writer thread, or a caller writing synchronously (a producer whose put() fell back,
    ``flush()``, ``close()``).  ``spill_pending``, ``salvage`` and ``after_fork`` are called
    without it.  Deadlines are ``time.monotonic()`` seconds; ``max_wait`` is seconds from now."""

    def write(self, entries: Sequence[Entry], reason: Optional[str],
              stop_at: Callable[[], float]) -> BatchFate:
        """Write one batch: the head of the queue, 1 to ``max_batch`` entries in queue order.

        Called under the write lock, from the writer thread (``reason`` "size", "timeout",
        "interval" or "manual") or from a caller writing synchronously ("manual" from
        ``flush()``, "close" from ``close()``, None from a producer's fallback or from
        writing what signal handlers left).  The entries stay queued (claimed) until this
        returns: COMMITTED or SPILLED and the engine drops them and counts them done; HELD
        and they stay queued, the caller gives up for now (the writer thread waits a second).
        An exception leaves them queued too; on the writer thread it ends the thread (the
        engine degrades, then restarts it), in a synchronous write it is logged.

        ``stop_at()`` is the time by which the sink must stop retrying and spill instead: inf
        until ``close()`` sets one, so call it again at each retry rather than keeping its
        value."""
        ...

    def replay(self, max_wait: Optional[float] = None) -> bool:
        """Write back what the spill file holds, within ``max_wait`` seconds (the engine always
        passes one: what is left of its caller's deadline, never negative).  Called under the
        write lock, from the writer thread's tick when ``spill_pending()``, and from
        ``flush()``/``close()`` before they answer.  True when nothing waits in the spill any
        more; an exception is logged and counts as False."""
        ...

    def spill_pending(self) -> bool:
        """True while spilled entries wait to be replayed.  Called without the write lock, on
        any thread (the tick, ``flush()``, ``close()``): it must only look, cheaply."""
        ...

    def salvage(self, entries: Sequence[Entry], max_wait: Optional[float] = None) -> BatchFate:
        """Last resort: ``entries`` must leave memory now (spill, else somewhere a person can
        recover them).  Called *without* the write lock by a caller whose synchronous write
        or ``close()`` ran out of time with no thread left to try again; ``entries`` may
        include the batch a stuck write on another thread still holds, so it must not use
        what ``write`` uses (the connection).  ``max_wait``: seconds until half a second
        past the close's stop time, or None when no ``close()`` set one (then the sink's own
        wait applies).  The engine counts the unclaimed entries done whatever it returns."""
        ...

    def close(self) -> None:
        """Let go of the connection.  Called at the end of ``close()`` under the write lock,
        if that lock came by the close's deadline (else not at all).  A write after it (a
        caller logging after close) opens a connection again."""
        ...

    def after_fork(self) -> None:
        """In a forked child, on the forking thread (the only one there), before the engine
        resets itself; no engine lock is taken.  Never use nor close what the parent had
        open."""
        ...

    def tick(self) -> None:
        """Periodic care, every ``flush_interval``: called on the writer thread under the write
        lock, which it waits for at most 50 ms (busy: this tick is skipped).  An exception is
        logged."""
        ...


_OPEN = State.OPEN
LEAVE_GRACE = 0.5   # seconds past its deadline a call goes on taking what handlers nested in it log


class Engine:
    RESTART_GRACE = 1.0      # a thread dying this soon after a restart is not restarted again...
    BROKEN_COOLDOWN = 30.0   # ...for this long: callers write synchronously meanwhile

    def __init__(self, config: Config, sink: Sink, stats: Stats, exiting: threading.Event,
                 on_tick: Optional[Callable[[], None]] = None) -> None:
        # Shared state: what each attribute holds, who writes it (which thread or call), under
        # which guard, and who reads it.  "Any thread" means producers (put), callers of
        # flush()/close(), the writer thread, and signal handlers nested in any of them.
        # There are three guards: ``_lock`` (state transitions), ``_write_lock`` (whoever runs
        # the sink) and the queue's ``mutex``; much is deliberately read without any of them,
        # as single loads and stores under the GIL, and each such read says why it is safe.
        #
        # Set here, never written again: the configuration, the sink (called only under
        # _write_lock), the stats (counters bumped by any thread without a lock: an increment
        # may be lost in a race, they are not exact), the interpreter's exit event (set by
        # lifecycle's exit hook; read by _start_thread under _lock), the tick hook.
        self.config = config
        self.sink = sink
        self.stats = stats
        self.exiting = exiting
        self.on_tick = on_tick
        # Queue length before an append that fills a batch: put() wakes the thread there.
        # Constant.
        self._wake_len = config.batch_size - 1
        # Restarts of the writer thread so far.  Written by _restart() under _lock (a producer
        # or a synchronous writer); read by _run() under _lock (the dying thread).  Survives
        # _reset().
        self._restarts = 0
        # True while before_fork() holds the write lock for a fork.  Written by the forking
        # thread in lifecycle's fork hooks (before_fork, after_fork_in_parent) and by
        # after_fork_in_child; no guard (the hooks of one fork run in order on one thread).
        self._held_for_fork = False
        self._reset(State.OPEN)

    def _reset(self, state: State, why: Optional[str] = None) -> None:
        """Everything below is created anew here: at construction, and in a forked child
        (after_fork_in_child, with only the forking thread alive)."""
        # The queue (batchqueue.EntryQueue).  Its counters (taken, claimed) and its seal change
        # under its mutex.  Producers append to its deque without the mutex (put()'s hot path,
        # _nested: a deque append is atomic); the one who holds _write_lock claims, drops and
        # puts back its head under the mutex; _salvage takes what is unclaimed under the mutex
        # without _write_lock (the claimed head stays for its writer).
        self._q = EntryQueue(self.config.max_queue_size)
        # The queue's deque itself, for put()'s hot path and lock-free length reads (pending,
        # the thread's triggers).
        self._dq = self._q.queue
        # put()'s hot-path bound: max_queue_size, 0 once sealed.  Written once by _close()
        # (the first closer, no guard: one store); read by put() with no guard.
        #
        # The seal is kept in three places, all written by _close() in this order: this
        # _limit, then under the queue's mutex the queue's ``sealed`` and ``limit``.  Each
        # serves a reader that cannot afford another: put()'s hot path compares one engine
        # attribute (bound and seal in one test, no lookup through the queue); the queue's
        # ``limit`` is offer()'s bound (the main thread's put, under the mutex only);
        # ``sealed`` turns the stdlib's blocking put() into Sealed (via _qsize/_put) and tells
        # "queue full" from "tracker closed".  Merging them would add an attribute load to
        # every put() and change the order in which a racing producer sees the seal, so they
        # stay three copies of one fact with one writer.
        self._limit = self.config.max_queue_size
        # State transitions (_state, _thread, _why, _retry_at, _started_at, _restarts,
        # _stop_at, _flush_to) happen under this lock.  Held only for a few statements, never
        # across a write or a wait.
        self._lock = threading.Lock()
        # Whoever runs the sink holds it, always through WriteLock.call (acquire by a deadline,
        # busy marked first inside the try whose finally releases; see its docstring): the
        # writer thread, a caller writing synchronously, flush(), close(), the tick, a replay;
        # before_fork() reserves it for a fork.  A signal handler nested in a write of its own
        # thread does not get it (nested_here()): it queues and leaves its entry as owed.
        self._write_lock = WriteLock()
        # The writer thread's one wait.  Any thread puts (_wake_up); only the writer thread
        # gets (_sleep).  A C-level SimpleQueue, not a threading.Event: Event.set() runs Python
        # code under a lock, and a Ctrl-C landing there would leave that lock held.
        self._wake: "queue.SimpleQueue[None]" = queue.SimpleQueue()
        # True once someone woke the thread since it last looked at the queue.  Set by
        # _wake_up() (any thread), cleared by the writer thread at the top of each round; read
        # by put()'s hot path with no guard (a stale True costs no wake-up that matters: the
        # thread clears it before it looks at the queue's length).
        self._woken = False
        # OPEN / DEGRADED / CLOSING / CLOSED.  Written under _lock only (_start_thread,
        # _degrade, _run, _close, close, and _reset in a child); read everywhere with no guard
        # (one load: put()'s hot path tests ``is _OPEN``).
        self._state = state
        # Why DEGRADED (the synchronous-fallback cause).  Under _lock, with _state.
        self._why = why
        # When DEGRADED may try a thread again (monotonic; inf: never).  Written by _degrade()
        # under _lock; read by _restart() under _lock.
        self._retry_at = float("inf")
        # The writer thread while OPEN, else None.  Written under _lock (_start_thread,
        # _degrade); read under _lock by flush() and close().
        self._thread: Optional[threading.Thread] = None
        # When the writer thread last started (monotonic).  Under _lock (_start_thread, _run).
        self._started_at = 0.0
        # Entries handled so far, in queue order (written, spilled or salvaged).  Advanced by
        # _write_batch() under _write_lock, and by _salvage() without it (see the note on
        # _salvage); read with no guard by flush()'s poll, close(), _leave() and the thread.
        self._done = 0
        # The queue position flush() asked the thread to reach.  Raised by flush() under
        # _lock; read by the writer thread with no guard (a late look only delays a round).
        self._flush_to = 0
        # True while the thread sleeps with no entry queued: the next put() wakes it (for the
        # batch timeout).  Set and cleared by the writer thread, cleared by the put() that
        # wakes it; no guard (a missed clear costs one extra wake-up).
        self._armed = False
        # When close() wants the sink to stop retrying and spill (monotonic; inf until a
        # close).  Written once by _close() under _lock; read with no guard by the sink
        # through _stop_time() (under _write_lock) and by _salvage().
        self._stop_at = float("inf")
        # Fallback causes already warned about (one warning each).  Added to by any thread
        # in _write_to() with no guard (a race costs at most a second warning).
        self._warned_causes: set = set()
        # Threads inside a synchronous write, flush() or close(), and for each the queue
        # position up to which a signal handler nested in it left entries (see _nested).
        # Each thread adds, removes and reads only its own id (a signal handler runs on the
        # thread it interrupted), so no guard: set and dict operations are atomic under the
        # GIL.  close() also looks at its own key under _lock.
        self._inside: Set[int] = set()
        self._owed: Dict[int, int] = {}

    @property
    def state(self) -> State:
        return self._state

    def pending(self) -> int:
        return len(self._dq)

    # -- producers ----------------------------------------------------------------------------
    def put(self, entry: Entry) -> None:
        """Queue ``entry``, or take the slow path.

        The hot path appends to the queue's deque without its mutex (a deque append is atomic)
        and checks the seal *after* appending: if ``close()`` sealed the queue meanwhile, the
        entry may be behind the closer's last take, so this caller writes what is queued
        itself.  An append seen before the seal is always covered by the closer's count."""
        if self._state is _OPEN:
            dq = self._dq
            n = len(dq)
            if n < self._limit:
                dq.append(entry)
                if not self._limit:
                    self._write_queued("tracker closed")
                elif self._armed or (n >= self._wake_len and not self._woken):
                    self._armed = False
                    self._wake_up()
                return
        self._put_slow(entry)

    def _put_slow(self, entry: Entry) -> None:
        if self._nested(entry):
            return
        state = self._state
        if state is State.DEGRADED and self._restart():
            state = self._state
        if state is State.OPEN:
            # the main thread does not wait in Queue.put(): a Ctrl-C landing inside the Python
            # code of its Condition could leave the queue's mutex held
            main = threading.current_thread() is threading.main_thread()
            try:
                if main and not self._q.offer(entry):
                    raise queue.Full
                if not main:
                    self._q.put(entry, timeout=self.config.queue_full_timeout)
                self._wake_up()
                return
            except queue.Full:
                cause = "tracker closed" if self._q.sealed else "queue full"
            except Sealed:
                cause = "tracker closed"
        elif state is State.DEGRADED:
            cause = self._why or "writer thread not running"
        else:
            cause = "tracker closed"
        self._write_through(entry, cause)

    def _write_through(self, entry: Entry, cause: str) -> None:
        """The caller runs the sink: everything queued before its entry, then its entry."""
        self._write_to(self._q.force_put(entry), cause)

    def _write_queued(self, cause: str) -> None:
        self._write_to(self._q.seq, cause)

    def _nested(self, entry: Entry) -> bool:
        """A signal handler that interrupted this thread inside a synchronous write or close():
        queue ``entry`` and return at once; the interrupted call writes it before it returns.

        It neither waits (a storm of handlers would pile up, each waiting) nor takes the
        queue's mutex (the interrupted code may hold it): a deque append is atomic."""
        me = threading.get_ident()
        if me not in self._inside and not self._write_lock.nested_here():
            return False
        dq = self._dq
        dq.append(entry)
        self._owed[me] = max(self._owed.get(me, 0), self._q.taken + len(dq))
        self.stats.fallback_writes += 1
        return True

    def _write_to(self, target: int, cause: str) -> None:
        self.stats.fallback_writes += 1
        if cause not in self._warned_causes:
            self._warned_causes.add(cause)
            log.warning("synchronous fallback (%s): the calling thread writes to SQLite", cause)
        me = threading.get_ident()
        if me in self._inside or self._write_lock.nested_here():
            self._owed[me] = max(self._owed.get(me, 0), target)
            return   # a signal handler interrupted this thread's own write: that write takes it
        # With a writer thread, a caller waits two seconds for the lock, then leaves its entry
        # to the thread (an application signal handler may be waiting on this very caller).
        wait = 2.0 if self._state is _OPEN else self.config.write_retry_budget + 5.0
        deadline = time.monotonic() + wait
        try:
            self._inside.add(me)
            ok = self._run_until(target, None, deadline)
            while ok and self._state is not _OPEN and self._done < self._q.seq and not self._q.claimed:
                ok = self._run_until(self._q.seq, None, deadline)  # added meanwhile
            if ok:
                return
        except Exception:
            log.exception("synchronous write failed; the entries stay queued")
            self.stats.last_error = "synchronous write failed (see log)"
            return
        finally:
            self._leave(me, deadline)
        if self._state is _OPEN:
            log.error("synchronous write could not finish in time; %d entries stay queued for the "
                      "writer thread", len(self._dq))
        else:   # no thread will try again: the entries leave memory now (spill, else stderr)
            try:
                self._inside.add(me)
                self._salvage()
            finally:
                self._leave(me, deadline)

    def _leave(self, me: int, deadline: float) -> bool:
        """This thread leaves a synchronous write or close(): first it writes what signal
        handlers nested in it left (by ``deadline``, else spilled), also those that arrive
        meanwhile.  False if some of it could not be written to the database."""
        ok, owed = True, 0
        grace = deadline + LEAVE_GRACE
        try:
            while True:
                self._inside.discard(me)   # from here a handler on this thread writes for itself
                owed = self._owed.pop(me, 0)
                if owed <= self._done or self._state is _OPEN:
                    return ok
                now = time.monotonic()
                if now >= grace:   # stays owed: a later write or close() of this thread takes it
                    self._owed[me] = max(self._owed.get(me, 0), owed)
                    log.error("signal handlers kept logging past the deadline; %d entries stay "
                              "queued", owed - self._done)
                    return False
                self._inside.add(me)
                written = False
                try:
                    written = now < deadline and self._run_until(owed, None, deadline)
                except Exception:
                    log.exception("writing what a signal handler logged failed")
                if not written:
                    ok = False
                    self._salvage()
                owed = 0
        except BaseException:   # Ctrl-C, SystemExit: what is owed stays queued and owed
            if owed > self._done:
                self._owed[me] = max(self._owed.get(me, 0), owed)
            raise
        finally:
            self._inside.discard(me)

    # -- running the sink (whoever holds the write lock) ---------------------------------------
    def _run_until(self, target: int, reason: Optional[str], deadline: float) -> bool:
        while self._done < target:
            if deadline <= time.monotonic():
                return False
            got, step = self._write_lock.call(deadline, lambda: self._next_batch(target, reason))
            if not got or step is _Step.FAILED:
                return False
            if step is _Step.EMPTY:
                break
        return True

    def _next_batch(self, target: int, reason: Optional[str]) -> "_Step":
        """Under the write lock: the next batch towards ``target``."""
        n = min(target - self._done, self.config.max_batch)
        if n > 0 and not self._write_batch(n, reason):
            return _Step.FAILED
        return _Step.MORE if self._dq else _Step.EMPTY

    def _write_batch(self, n: int, reason: Optional[str]) -> bool:
        batch = self._q.claim(n)   # stays queued until written: Ctrl-C or a bug drops nothing
        if not batch:
            return True
        try:
            fate = self.sink.write(batch, reason, self._stop_time)
        except BaseException:
            self._q.unclaim()
            raise
        if fate is BatchFate.HELD:
            self._q.unclaim()
            return False
        self._q.drop(len(batch))
        self._advance(len(batch))
        return True

    def _advance(self, n: int) -> None:
        self._done += n   # flush() polls it: no lock a Ctrl-C could leave held

    def _wake_up(self) -> None:
        self._woken = True
        self._wake.put(None)

    def _sleep(self, seconds: float) -> None:
        """The thread's one wait: until ``seconds`` pass or someone calls ``_wake_up()``."""
        try:
            self._wake.get(timeout=seconds)
            while True:
                self._wake.get_nowait()
        except queue.Empty:
            pass

    def _stop_time(self) -> float:
        return self._stop_at

    # -- the thread ----------------------------------------------------------------------------
    def start(self) -> None:
        with self._lock:
            if self._state is State.OPEN and self._thread is None:
                self._start_thread()

    def _start_thread(self) -> None:  # under _lock
        if self.exiting.is_set():
            self._degrade("interpreter exiting", never=True)
            return
        thread = threading.Thread(target=self._run, name="argo-signals-writer", daemon=True)
        self._thread, self._started_at, self._state = thread, time.monotonic(), State.OPEN
        try:
            thread.start()
        except RuntimeError as exc:  # e.g. "can't create new thread at interpreter shutdown"
            self._degrade(f"writer thread cannot start: {exc}", never=True)

    def _degrade(self, why: str, never: bool = False, wait: float = 0.0) -> None:  # under _lock
        self._state, self._why, self._thread = State.DEGRADED, why, None
        self._retry_at = float("inf") if never else time.monotonic() + wait

    def _restart(self) -> bool:
        with self._lock:
            if self._state is not State.DEGRADED or time.monotonic() < self._retry_at:
                return self._state is State.OPEN
            self._restarts += 1
            self.stats.writer_restarts += 1
            log.warning("restarting the writer thread (restart #%d)", self._restarts)
            self._start_thread()
            return self._state is State.OPEN

    def _run(self) -> None:
        try:
            self._loop()
        except BaseException:
            log.exception("the writer thread died; callers write synchronously until it restarts")
            self.stats.last_error = "writer thread died (see log)"
            with self._lock:
                if self._state is State.OPEN:
                    again = self._restarts and time.monotonic() - self._started_at < self.RESTART_GRACE
                    if again:
                        log.error("writer thread died again right after a restart; callers write "
                                  "synchronously for %.0fs", self.BROKEN_COOLDOWN)
                    self._degrade("writer thread keeps dying" if again else "writer thread died",
                                  wait=self.BROKEN_COOLDOWN if again else 0.0)

    def _loop(self) -> None:
        cfg, dq = self.config, self._dq
        next_tick = time.monotonic() + cfg.flush_interval
        self._tick()
        while self._state is State.OPEN:
            self._woken = False
            now = time.monotonic()
            reason, n = None, cfg.max_batch
            if self._flush_to > self._done:
                reason, n = "manual", min(n, self._flush_to - self._done)
            elif len(dq) >= cfg.batch_size:
                reason = "size"
            elif dq and now - _oldest(dq, now) >= cfg.batch_timeout:
                reason = "timeout"
            if now >= next_tick:
                while next_tick <= now:
                    next_tick += cfg.flush_interval
                if reason is None and dq:
                    reason = "interval"
                self._tick()
            if reason is not None:
                # no deadline: this thread is never nested in a write of its own (signal handlers
                # run on the main thread), so it gets the lock once the holder lets go
                _, ok = self._write_lock.call(float("inf"), functools.partial(self._write_batch, n, reason))
                if not ok:   # neither the database nor the spill took it: do not spin
                    self._sleep(1.0)
                continue
            self._armed = True
            deadline = next_tick
            if dq:
                self._armed = False
                deadline = min(deadline, _oldest(dq, now) + cfg.batch_timeout)
            self._sleep(seconds_until(deadline))

    def _tick(self) -> None:
        if self.sink.spill_pending():
            self._replay(time.monotonic() + self.config.write_retry_budget)
        try:   # lock busy: the next tick does it
            self._write_lock.call(time.monotonic() + 0.05, self.sink.tick)
        except Exception:
            log.exception("periodic database check failed")
        if self.on_tick is not None:
            try:
                self.on_tick()
            except Exception:
                log.exception("tick hook failed")

    def _replay(self, deadline: float) -> bool:
        try:
            _, done = self._write_lock.call(
                deadline, lambda: self.sink.replay(max(0.0, deadline - time.monotonic())))
        except Exception:
            log.exception("replaying the spill file failed; it is tried again later")
            return False
        return bool(done)

    # -- flush and close -------------------------------------------------------------------------
    def flush(self, timeout: Optional[float]) -> bool:
        """True once everything queued before the call is in the database (not only spilled)."""
        if timeout is None:   # bounded all the same: a write gives up and spills after its budget
            timeout = self.config.write_retry_budget + 5.0
        deadline = time.monotonic() + timeout
        with self._lock:
            target = self._q.seq
            thread = self._thread if self._state is State.OPEN else None
            if thread is not None:
                self._flush_to = max(self._flush_to, target)
        if thread is not None and thread is not threading.current_thread():
            self._wake_up()
            while self._done < target and thread.is_alive():
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                time.sleep(min(left, 0.002))
        me = threading.get_ident()
        if self._write_lock.nested_here():
            return False   # a signal handler interrupted this thread's own write: it cannot wait
        outer, ok = me not in self._inside, False
        try:
            if outer:
                self._inside.add(me)
            try:
                ok = self._done >= target or self._run_until(target, "manual", deadline)
            except Exception:   # flush() answers with a bool; the entries stay queued
                log.exception("writing at flush failed; the entries stay queued")
                self.stats.last_error = "write at flush failed (see log)"
                ok = False
            ok = ok and self._done >= target and self._settle_spill(deadline)
        finally:
            if outer:
                ok = self._leave(me, deadline) and ok
        return ok

    def _settle_spill(self, deadline: float) -> bool:
        """True when nothing waits outside the database: no spill left after a replay, and
        nothing ever printed to stderr as unsaved."""
        if self.stats.unsaved:
            return False
        return not self.sink.spill_pending() or self._replay(deadline)

    def close(self, timeout: Optional[float]) -> bool:
        """Seal the queue, stop the thread, write what is left; bounded by ``timeout``.

        Any number of callers may close at once: each returns once everything queued before
        its call has been handled (or its own deadline passed)."""
        budget = self.config.write_retry_budget + 1.0
        limit = budget if timeout is None else max(0.0, min(timeout, budget))
        deadline = time.monotonic() + limit
        me = threading.get_ident()
        if self._write_lock.nested_here():   # a signal handler interrupted this thread's write
            log.warning("close() called inside a write of the same thread; that write finishes it")
            return False
        outer, ok = me not in self._inside, False
        try:
            if outer:   # a signal handler logging meanwhile leaves its entry to this close
                self._inside.add(me)
            ok = self._close(deadline, limit)
        finally:
            if outer:
                ok = self._leave(me, deadline) and ok
        with self._lock:
            if self._state is State.CLOSING and me not in self._owed and not (
                    self._thread is not None and self._thread.is_alive()):
                self._state = State.CLOSED
        if not ok:
            log.error("close() returned before everything was in the database: %d entries queued, "
                      "spill pending: %s", len(self._dq), self.sink.spill_pending())
        return ok

    def _close(self, deadline: float, limit: float) -> bool:
        with self._lock:
            if self._state in (State.OPEN, State.DEGRADED):
                self._state = State.CLOSING
                # a batch still failing near the deadline is spilled rather than left in memory
                self._stop_at = deadline - max(0.2, limit * 0.25)
            thread = self._thread
        self._limit = 0
        self._q.seal()
        self._wake_up()
        if thread is not None and thread is not threading.current_thread():
            thread.join(seconds_until(deadline))
        target = self._q.seq
        try:
            ok = self._run_until(target, "close", deadline)
        except Exception:
            log.exception("writing at close failed")
            ok = False
        if not ok:
            self._salvage()
        ok = self._settle_spill(deadline) and ok and self._done >= target
        # a later synchronous write opens one connection and keeps it
        self._write_lock.call(deadline, self.sink.close)
        return ok

    def _salvage(self) -> None:
        """close() ran out of time: what is still queued leaves memory now (spill or stderr),
        and so, as a precaution, does the batch a stuck write holds (should that write still
        succeed, the replay finds those rows stored and skips them).

        Runs without the write lock (it is the path for when that lock does not come): the
        queue's mutex guards the take, and ``_done`` is advanced here unguarded while a stuck
        write on another thread may advance it too when it finishes."""
        held = self._q.snapshot_claimed()
        entries = self._q.take_unclaimed()
        if held or entries:
            no_close = self._stop_at == float("inf")   # then the spill's own lock wait applies
            self.sink.salvage(held + entries, None if no_close else seconds_until(self._stop_at + 0.5))
            self._advance(len(entries))

    def write_directly(self, why: str) -> None:
        """No thread at all: every caller writes before its put() returns (for processes that
        may end without running exit hooks, e.g. multiprocessing workers)."""
        with self._lock:
            if self._state is State.OPEN and self._thread is None:
                self._degrade(why, never=True)

    # -- fork --------------------------------------------------------------------------------------
    def before_fork(self, deadline: float) -> None:
        """Take the write lock by ``deadline``: whoever runs the sink (the thread, or a caller
        writing synchronously) has then left SQLite and committed, so the child inherits no
        transaction in progress.  A write that cannot finish in time (a long busy wait) is not
        waited for: the child never uses the connection it inherits."""
        self._held_for_fork = self._write_lock.reserve(deadline)

    def after_fork_in_parent(self) -> None:
        if self._held_for_fork:
            self._held_for_fork = False
            self._write_lock.release()

    def after_fork_in_child(self) -> None:
        """The child starts empty and writes synchronously: a pool may end it with SIGTERM or
        os._exit() at any moment, and each log_signal() has committed before it returned."""
        state = self._state
        self._held_for_fork = False   # the child's lock is a new one (_reset)
        self.sink.after_fork()
        if state in (State.CLOSING, State.CLOSED):
            self._reset(State.CLOSED)
        else:
            self._reset(State.DEGRADED, "forked child")


def _oldest(dq: Any, default: float) -> float:
    try:
        return dq[0][2]
    except IndexError:  # emptied meanwhile by a caller writing synchronously
        return default
