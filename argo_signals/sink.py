"""The SQLite sink: connecting, one transaction per batch, retries, the spill file and its replay.

The engine calls ``write``, ``replay``, ``tick`` and ``close`` under its write lock, from its
thread or from a caller writing synchronously, so the sink itself holds no lock; ``salvage``
may run beside a stuck write on another thread, and only appends to the spill file (which
has a lock of its own) or to stderr.  ``write()`` answers with a ``BatchFate``:
committed, spilled (the database stayed unwritable past the retry budget, or a spill is still
waiting and must be replayed first so that order holds), or held (neither the database nor
the spill file took the batch: the engine keeps it).  ``salvage()`` is the last resort at
close: spill, else print the signals to stderr as ``argo-signals-unsaved: {json}`` lines that
``argo-signals ingest`` reads back.
"""
from __future__ import annotations

import json
import logging
import os
import sqlite3
import sys
import time
from typing import Any, Callable, Dict, List, Optional, Sequence, Set, Tuple

from tenacity import Retrying, retry_if_exception, stop_after_delay, wait_exponential, wait_random
from tenacity.stop import stop_base

from . import spill
from .config import Config
from .entry import INSERT, UPDATE, BatchFate, Entry
from .fileid import FileId, file_identity, identity_of
from .record import FIELDS, finish
from .stats import Stats
from .store import (BatchResult, ForeignDatabaseError, connect, connect_readonly, ensure_schema,
                    is_environment_error, overdue_waiting, write_batch)

log = logging.getLogger("argo_signals")

__all__ = ["SQLiteSink", "UNSAVED_PREFIX"]

Update = Tuple[str, Dict[str, Any]]
UNSAVED_PREFIX = "argo-signals-unsaved: "

# Connections inherited from a parent process: never used nor closed in the child.
_INHERITED: List[sqlite3.Connection] = []
# Database files (FileId) this process inherited with a write transaction open: never writable here.
_LOCKED_IN_THIS_PROCESS: Set[FileId] = set()
# A batch write replays a waiting spill first for at most this long; the rest replays on ticks.
REPLAY_SLICE = 2.0
# How long letting go of a moved database waits for other connections to let a checkpoint finish.
MOVED_CHECKPOINT_WAIT = 2.0

class SQLiteSink:
    def __init__(self, config: Config, stats: Stats,
                 on_commit: Optional[Callable[[int], None]] = None) -> None:
        self.config = config
        self.stats = stats
        self.on_commit = on_commit
        self.spill_path = config.spill_path
        self._conn: Optional[sqlite3.Connection] = None
        self._db_file_id: Optional[FileId] = None   # the database file _conn has open
        self._journal: Tuple[Optional[FileId], Optional[FileId]] = (None, None)   # our -wal and -shm files
        self._busy = config.busy_timeout   # the lock wait the open connection has now
        self._warned_seq = 0               # waiting updates reported overdue up to this seq

    # -- connection ---------------------------------------------------------------------
    def open(self) -> None:
        """Connect and create the schema now; OSError naming the path when that is impossible."""
        for what, path in (("database", self.config.db_path), ("spill file", self.spill_path)):
            folder = os.path.dirname(os.path.abspath(path))
            if not os.path.isdir(folder):
                raise FileNotFoundError(f"cannot use {what} {path}: directory {folder} does not exist")
        try:
            self._connection()
        except ForeignDatabaseError:
            raise  # names the file already; never retried into a spill at the start
        except (sqlite3.Error, OSError) as exc:
            raise OSError(f"cannot open database {self.config.db_path}: {exc}") from exc

    def _connection(self) -> sqlite3.Connection:
        path = self.config.db_path
        if self._conn is not None and self._db_file_id is not None and file_identity(path) != self._db_file_id:
            # the file was moved, deleted or replaced: writing on would go to the old inode
            log.warning("database file %s was moved, deleted or replaced; what this tracker "
                        "committed is checkpointed into the old file, new rows go to a new file "
                        "at the path", path)
            self.close()
        if self._conn is None:
            conn = connect(path, self.config.durability, self.config.busy_timeout)
            try:
                if self.config.on_connect is not None:
                    self.config.on_connect(conn)
                ensure_schema(conn, max(5.0, self.config.busy_timeout))
                st = os.stat(path)
            except BaseException:
                conn.close()
                raise
            if self._db_file_id != identity_of(st):
                self._warned_seq = 0    # another file: its waiting_updates count seq from 1 again
            self._conn, self._db_file_id = conn, identity_of(st)
            self._journal = (file_identity(path + "-wal"), file_identity(path + "-shm"))
        return self._conn

    def close(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            if self._db_file_id is not None and file_identity(self.config.db_path) != self._db_file_id:
                self._let_go_of_moved(conn)
            else:
                try:
                    conn.close()
                except sqlite3.Error:
                    pass
        self._busy = self.config.busy_timeout

    def _let_go_of_moved(self, conn: sqlite3.Connection) -> None:
        """The database was renamed away (or deleted): SQLite does not checkpoint a moved file
        on close, and its WAL is found by the old name, where a new database would take it
        over.  So: checkpoint through this connection (it still refers to the moved file), close
        it, and take our -wal/-shm files away from the path (a WAL that could not be
        checkpointed is kept aside, never deleted)."""
        path = self.config.db_path
        complete = False
        give_up = time.monotonic() + MOVED_CHECKPOINT_WAIT
        try:   # other processes' transactions on the moved file end soon: wait for them a little
            conn.execute("PRAGMA busy_timeout = 200")
            while not complete and time.monotonic() < give_up:
                complete = conn.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone()[0] == 0
                if not complete:
                    time.sleep(0.02)
        except sqlite3.Error as exc:
            log.error("could not checkpoint the moved database: %s", exc)
        try:
            conn.close()
        except sqlite3.Error:
            pass
        for name, ours in zip((path + "-wal", path + "-shm"), self._journal):
            if ours is None or file_identity(name) != ours:
                continue   # not there, or already a new database's
            try:
                if complete or name.endswith("-shm"):
                    os.remove(name)
                else:
                    aside = f"{name}.moved-{time.strftime('%Y%m%dT%H%M%S')}-{os.getpid()}"
                    os.replace(name, aside)
                    log.critical("rows committed to the moved database could not be checkpointed "
                                 "into it: its WAL is kept as %s; place it next to the moved file "
                                 "as <moved name>-wal to recover them", aside)
            except OSError as exc:
                log.error("could not take %s away from the database path: %s", name, exc)
        self._journal = (None, None)

    def tick(self) -> None:
        """Periodic care (the engine's tick, under its write lock): notice a moved database
        file, and report waiting updates older than ``waiting_update_max_age``, once each.
        The write connection is used only when the file has moved (the report reads through
        a read-only connection of its own)."""
        if self._conn is None:
            return
        path = self.config.db_path
        try:
            if file_identity(path) != self._db_file_id:
                self._connection()
            conn = connect_readonly(path, timeout=1.0)
            try:
                overdue = overdue_waiting(conn, time.time() - self.config.waiting_update_max_age,
                                          self._warned_seq)
            finally:
                conn.close()
        except (sqlite3.Error, OSError) as exc:
            log.debug("periodic database check failed: %s", exc)
            return
        for seq, sid, queued_at in overdue:
            self._warned_seq = max(self._warned_seq, seq)
            self.stats.waiting_updates_overdue += 1
            log.warning("an update of %r has been waiting %.0fs for its insert (waiting_updates "
                        "seq %d); it is kept and applied if that insert lands", sid,
                        time.time() - queued_at, seq)

    def after_fork(self) -> None:
        if self._conn is not None:
            _INHERITED.append(self._conn)
            if self._conn.in_transaction and self._db_file_id is not None:
                # a write of the parent's was open at the fork (a signal handler forked inside
                # it, or it outlasted the fork's bound): SQLite's in-process lock state keeps
                # that lock for this child's whole life, so nothing here can write this file
                _LOCKED_IN_THIS_PROCESS.add(self._db_file_id)
        self._conn = None

    def _locked_for_good(self) -> bool:
        return bool(_LOCKED_IN_THIS_PROCESS) and file_identity(self.config.db_path) in _LOCKED_IN_THIS_PROCESS

    # -- writing ------------------------------------------------------------------------
    def write(self, entries: Sequence[Entry], reason: Optional[str],
              stop_at: Callable[[], float]) -> BatchFate:
        rows, starts, updates = [], [], []
        for kind, payload, t in entries:
            if kind == INSERT:
                rows.append(finish(payload))
                starts.append(t)
            else:
                updates.append(payload)
        if not rows and not updates:
            return BatchFate.COMMITTED
        left = _left(stop_at)
        if self._locked_for_good():
            return self._spill(entries, rows, updates, "this process was forked inside a write to the "
                               "database, which stays locked here", left)
        if self.spill_pending() and not self.replay(REPLAY_SLICE if left is None else min(left, REPLAY_SLICE)):
            # what waits in the spill came first: go behind it so that order holds
            return self._spill(entries, rows, updates, "a spill is still waiting for the database",
                               _left(stop_at))
        budget = self.config.write_retry_budget
        tries = [0]

        def note(state: Any) -> None:
            tries[0] += 1
            self.stats.write_retries += 1
            exc = state.outcome.exception()
            self.stats.last_error = f"database write failed: {exc}"
            self.close()  # reopen: the file or its directory may have been replaced
            if tries[0] == 1:
                log.warning("database write failed (%s); retrying for up to %.1fs", exc, budget)

        retrying = Retrying(retry=retry_if_exception(is_environment_error),
                            stop=stop_after_delay(budget) | _StopAt(stop_at),
                            wait=wait_exponential(multiplier=0.02, max=1.0) + wait_random(0, 0.05),
                            before_sleep=note, reraise=True)
        try:
            for attempt in retrying:
                with attempt:
                    result = write_batch(self._bounded(_left(stop_at)), rows, updates)
        except Exception as exc:
            if not is_environment_error(exc):
                raise
            self.close()
            self.stats.last_error = f"database write failed: {exc}"
            return self._spill(entries, rows, updates, str(exc), _left(stop_at))
        self.stats.transactions += 1
        self._account(result, starts, reason)
        return BatchFate.COMMITTED

    def _account(self, result: BatchResult, starts: List[float], reason: Optional[str]) -> None:
        st = self.stats
        now = time.monotonic()
        st.persisted += result.inserted
        st.persisted_by[reason or "fallback"] += result.inserted
        st.duplicates += result.duplicates
        st.record_durable(now - t for t in starts)
        if reason in st.flushes:
            st.flushes[reason] += 1
        for sid, why, _ in result.rejected_rows:
            st.rejected += 1
            log.warning("signal %s rejected into rejected_signals: %s", sid, why)
        for sid in result.unknown_updates:
            st.unknown_updates += 1
            log.info("update_signal(%r): no such signal yet; kept in waiting_updates until its "
                     "insert lands", sid)
        if result.applied_waiting:
            log.info("applied %d waiting updates to signals inserted now", result.applied_waiting)
        for sid in result.refused_updates:
            st.rejected += 1
            log.warning("update of %r names columns that cannot be updated; ignored", sid)
        if result.unstored_rejections:
            log.critical("%d refused rows could not be recorded in rejected_signals even shortened",
                         result.unstored_rejections)
        if result.inserted and self.on_commit is not None:
            try:
                self.on_commit(result.inserted)
            except Exception:
                log.exception("commit hook failed")

    # -- spill and replay -----------------------------------------------------------------
    def spill_pending(self) -> bool:
        return os.path.exists(self.spill_path) or os.path.exists(self.spill_path + ".replaying")

    def _spill(self, entries: Sequence[Entry], rows: List[tuple], updates: List[Update], why: str,
               max_wait: Optional[float] = None) -> BatchFate:
        times = [t for k, _, t in entries if k == UPDATE]   # monotonic: the order of the calls
        try:
            spill.append(self.spill_path, rows, updates, times, max_wait)
        except OSError as err:
            log.critical("database unwritable (%s) and spill file %s unwritable (%s): %d signals "
                         "stay in memory", why, self.spill_path, err, len(rows))
            return BatchFate.HELD
        self.stats.spilled += len(rows)
        log.error("database unwritable (%s): %d signals and %d updates spilled to %s; they are "
                  "replayed when the database can be written", why, len(rows), len(updates),
                  self.spill_path)
        return BatchFate.SPILLED

    def _bounded(self, max_wait: Optional[float]) -> sqlite3.Connection:
        """The connection, its lock wait cut to ``max_wait`` seconds (None: the configured one)."""
        conn = self._connection()
        wait = self.config.busy_timeout if max_wait is None else min(max_wait, self.config.busy_timeout)
        if wait != self._busy:
            conn.execute(f"PRAGMA busy_timeout = {int(wait * 1000)}")
            self._busy = wait
        return conn

    def replay(self, max_wait: Optional[float] = None) -> bool:
        """Write back what the spill holds, chunk by chunk (one transaction each, memory bounded
        by the chunk); True when nothing waits any more.

        ``max_wait`` bounds the whole replay (lock waits included): what it did not reach stays
        for the next replay, which resumes where this one stopped."""
        if self._locked_for_good():
            return False   # left for a process that can write the file
        deadline = None if max_wait is None else time.monotonic() + max_wait
        rows = updates = inserted = duplicates = 0
        try:
            while True:
                left = None if deadline is None else max(0.0, deadline - time.monotonic())
                with spill.replaying(self.spill_path, left) as chunk:
                    if chunk is None:
                        break
                    try:
                        result = write_batch(self._bounded(left), chunk.rows, chunk.updates)
                    except Exception as exc:
                        if not is_environment_error(exc):
                            raise
                        self.close()
                        log.debug("spill replay deferred: %s", exc)
                        return False
                    spill.consumed(chunk)   # after the commit: a crash in between replays no-ops
                self.stats.spill_bad += len(chunk.bad)
                self.stats.replayed += len(chunk.rows)
                self._account(result, [], "replay")
                rows, updates = rows + len(chunk.rows), updates + len(chunk.updates)
                inserted, duplicates = inserted + result.inserted, duplicates + result.duplicates
                if deadline is not None and time.monotonic() >= deadline:
                    break
        except OSError as exc:
            log.warning("spill file %s cannot be replayed now: %s", self.spill_path, exc)
            return False
        finally:
            if rows or updates:
                log.warning("replayed %d spilled signals and %d updates from %s (%d new, %d already "
                            "stored)", rows, updates, self.spill_path, inserted, duplicates)
        return not self.spill_pending()

    def salvage(self, entries: Sequence[Entry], max_wait: Optional[float] = None) -> BatchFate:
        """Last resort for entries that must leave memory now: spill, else stderr."""
        rows = [finish(p) for k, p, _ in entries if k == INSERT]
        updates = [p for k, p, _ in entries if k == UPDATE]
        if not rows and not updates:
            return BatchFate.COMMITTED
        if self._spill(entries, rows, updates, "no time left to write", max_wait) is BatchFate.SPILLED:
            return BatchFate.SPILLED
        lines = [UNSAVED_PREFIX + json.dumps(_as_signal(r)) for r in rows]
        lines += [UNSAVED_PREFIX + json.dumps({"update_of": s, "fields": f}) for s, f in updates]
        try:
            sys.stderr.write("".join(line + "\n" for line in lines))
            sys.stderr.flush()
        except (OSError, ValueError, AttributeError) as exc:
            log.critical("%d signals could not be saved anywhere (stderr too: %s)", len(rows), exc)
        self.stats.unsaved += len(rows)
        log.critical("neither the database nor the spill file %s can be written: %d signals and "
                     "%d updates printed to stderr as '%s' lines; recover them with "
                     "`argo-signals ingest`", self.spill_path, len(rows), len(updates),
                     UNSAVED_PREFIX.strip())
        return BatchFate.HELD


def _left(stop_at: Callable[[], float]) -> Optional[float]:
    """Seconds until ``stop_at()``, or None when there is no deadline."""
    at = stop_at()
    return None if at == float("inf") else max(0.0, at - time.monotonic())


def _as_signal(row: tuple) -> Dict[str, Any]:
    """A finished row as the dict ``log_signal()`` takes back (same id, timestamp, hash)."""
    out = {k: v for k, v in zip(FIELDS, row) if v is not None and k != "metadata"}
    meta = row[FIELDS.index("metadata")]
    if meta is not None:
        out["metadata"] = json.loads(meta)
    return out


class _StopAt(stop_base):
    """A tenacity stop condition: stop once the monotonic clock passes ``deadline()``."""

    def __init__(self, deadline: Callable[[], float]) -> None:
        self.deadline = deadline

    def __call__(self, retry_state: Any) -> bool:
        return time.monotonic() >= self.deadline()
