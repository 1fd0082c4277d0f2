"""The spill file: where signals wait while the database cannot be written.

``<db>.spill.jsonl`` (or the tracker's ``spill_path``) holds one JSON object per line (a
finished signal row, or ``{"update_of": id, "fields": {...}, "boot": ..., "mono": ...}``),
appended and fsync'd under an advisory lock so that several trackers and processes can share
it.  Every append starts on a fresh line and a failed one is cut back off, so a torn write can
never glue the next record to it.

A replay reads the file in chunks of bounded size under the lock: the caller commits a
chunk, then marks it ``consumed()``, which takes the file (renames it to
``<spill>.replaying``, so that newer appends start a new file behind it) and records the
byte offset reached in ``<spill>.replaying.done``, or removes the file at its end.  A replay that stops (deadline, database unwritable) leaves the rest for the next
one, which resumes at the recorded offset.  Rows are checked again for types only: the replay
never refuses what ``log_signal()`` accepted.  A line that is not a valid entry is moved to
``<spill>.bad`` with its reason, once, when its chunk is consumed; a torn last line, left by
a crash in the middle of an append, goes to ``<spill>.torn-<time>``.
"""
from __future__ import annotations

import contextlib
import errno
import json
import logging
import math
import os
import threading
import time
import uuid
from datetime import datetime
from typing import Any, Dict, Iterator, List, NamedTuple, Optional, Sequence, Tuple

from . import lifecycle
from .record import FIELDS, FINISHED_FIELDS, finish, normalise_update

try:  # POSIX advisory locks; elsewhere a single process is assumed
    import fcntl
except ImportError:  # pragma: no cover
    fcntl = None  # type: ignore[assignment]

log = logging.getLogger("argo_signals")
Update = Tuple[str, Dict[str, Any]]

__all__ = ["spill_path", "append", "take", "pending_count", "entry_from_json", "Chunk", "replaying",
           "consumed", "CHUNK_ENTRIES"]

LOCK_TIMEOUT = 10.0  # seconds to wait for another process's append or take
CHUNK_ENTRIES = 1000          # entries per replayed chunk (one transaction each)
CHUNK_BYTES = 4 << 20         # ...or this many bytes of the file, whichever comes first
MAX_LINE = 16 << 20           # lines are read in pieces of this size (a longer one is still one entry)


def _boot_id() -> str:
    """This boot of the machine: monotonic times from one boot compare, across boots they do not."""
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            return f.read().strip()
    except OSError:   # elsewhere: one value per process (order by time within it, file order across)
        return f"process-{uuid.uuid4()}"


_BOOT = _boot_id()


def spill_path(db_path: str) -> str:
    return f"{db_path}.spill.jsonl"


# Threads of this process take this lock first: POSIX record locks (lockf) belong to the
# process, so they keep other processes out but not other threads.  Unlike flock(), a record
# lock is not inherited by a forked child, which would otherwise hold it for its whole life.
_thread_lock = threading.Lock()


def _reinit_after_fork() -> None:
    global _thread_lock
    _thread_lock = threading.Lock()


lifecycle.after_fork_in_child(_reinit_after_fork)


@contextlib.contextmanager
def _locked(path: str, timeout: Optional[float] = None) -> Iterator[None]:
    """The spill lock, waited for at most ``timeout`` seconds (``LOCK_TIMEOUT`` by default)."""
    wait = LOCK_TIMEOUT if timeout is None else max(0.0, timeout)
    deadline = time.monotonic() + wait
    if not _thread_lock.acquire(timeout=min(wait, threading.TIMEOUT_MAX)):
        raise OSError(f"spill file lock {path}.lock still busy after {wait:.1f}s")
    try:
        if fcntl is None:
            yield
            return
        fd = os.open(f"{path}.lock", os.O_RDWR | os.O_CREAT, 0o644)
        try:
            while True:
                try:
                    fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except OSError as exc:
                    if exc.errno not in (errno.EACCES, errno.EAGAIN):
                        raise
                    if time.monotonic() >= deadline:
                        raise OSError(f"spill file lock {path}.lock still busy after {wait:.1f}s") from None
                    time.sleep(0.01)
            yield
        finally:
            os.close(fd)   # releases the record lock
    finally:
        _thread_lock.release()


def append(path: str, rows: Sequence[tuple], updates: Sequence[Update] = (),
           call_times: Optional[Sequence[float]] = None, timeout: Optional[float] = None) -> None:
    """Append finished rows and updates durably (fsync'd); raises OSError when that fails.

    ``call_times`` (``time.monotonic()`` when each update was called) let a replay apply the
    updates of one signal in the order they were called, whatever order they reached the file
    in; the monotonic clock never steps back (the wall clock may).  The append starts on a
    fresh line, and one that fails part-way is cut back off the file."""
    lines = [json.dumps(dict(zip(FINISHED_FIELDS, r))) for r in rows]
    times = call_times if call_times is not None else [None] * len(updates)
    lines += [json.dumps({"update_of": sid, "fields": fields, "boot": _BOOT, "mono": at})
              for (sid, fields), at in zip(updates, times)]
    data = "".join(line + "\n" for line in lines).encode("utf-8")
    with _locked(path, timeout):
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_APPEND, 0o644)
        try:
            size = os.fstat(fd).st_size
            if size and os.pread(fd, 1, size - 1) != b"\n":
                data = b"\n" + data    # a torn tail before us (a crash mid-append) ends here
            view = memoryview(data)
            try:
                while view:
                    view = view[os.write(fd, view):]
                os.fsync(fd)
            except OSError:
                with contextlib.suppress(OSError):
                    os.ftruncate(fd, size)   # cut the torn part off: the batch is retried whole
                raise
        finally:
            os.close(fd)


def pending_count(path: str) -> int:
    """Lines waiting in the spill file and in one taken for a replay, less what a replay has
    already consumed (0 when there is none).  Counted under the spill lock when it is free."""
    names = (path, f"{path}.replaying")
    if not any(os.path.exists(p) for p in names):
        return 0
    try:
        with _locked(path, 0.5):
            return _count_lines(path) + _count_lines(names[1], _offset(names[1]))
    except OSError:
        return _count_lines(path) + _count_lines(names[1], _offset(names[1]))


def _count_lines(path: str, offset: int = 0) -> int:
    try:
        with open(path, "rb") as f:
            f.seek(offset)
            return sum(1 for line in f if line.strip())
    except FileNotFoundError:
        return 0


def _offset(taken: str) -> int:
    """How far a replay got in ``taken`` (bytes; 0 when it has not started)."""
    try:
        with open(f"{taken}.done", "rb") as f:
            return int(f.read().strip() or 0)
    except (OSError, ValueError):
        return 0


class Chunk(NamedTuple):
    path: str                  # the file this chunk was read from (the spill, or the taken one)
    rows: List[tuple]
    updates: List[Update]      # in call order
    bad: List[Tuple[bytes, str]]   # (line, why): set aside when the chunk is consumed
    end: int                   # offset just past the chunk
    last: bool                 # the chunk reaches the end of the taken file


@contextlib.contextmanager
def replaying(path: str, timeout: Optional[float] = None,
              max_entries: int = CHUNK_ENTRIES) -> Iterator[Optional[Chunk]]:
    """Hold the spill lock and yield the next chunk to replay (None when nothing waits).

    Inside, the caller commits ``Chunk.rows``/``updates`` and then calls ``consumed()``; if
    it does not, the chunk stays for the next replay.  Holding the lock from reading a chunk to
    recording its end keeps two replays (threads or processes) from committing the same lines.
    """
    with _locked(path, timeout):
        yield _next_chunk(path, max_entries)


def take(path: str, timeout: Optional[float] = None, max_entries: int = CHUNK_ENTRIES) -> Optional[Chunk]:
    """Read the next chunk waiting for replay (without consuming it); None when nothing waits."""
    with _locked(path, timeout):
        return _next_chunk(path, max_entries)


def _next_chunk(path: str, max_entries: int) -> Optional[Chunk]:
    taken = f"{path}.replaying"
    source = taken
    if not os.path.exists(taken):
        with contextlib.suppress(FileNotFoundError):
            os.remove(f"{taken}.done")      # left by a crash after the last chunk of the previous file
        if not os.path.exists(path):
            return None
        source = path        # taken (renamed) only once a first chunk of it is committed
    start = _offset(taken) if source == taken else 0
    rows: List[tuple] = []
    ordered: List[Tuple[Tuple[int, float], Update]] = []
    bad: List[Tuple[bytes, str]] = []
    boots: Dict[str, int] = {}
    groups = 0
    try:
        f = open(source, "rb")
    except FileNotFoundError:
        return None
    with f:
        size = os.fstat(f.fileno()).st_size
        f.seek(start)
        pos, read = start, 0
        while len(rows) + len(ordered) + len(bad) < max_entries and read < CHUNK_BYTES:
            line = f.readline(MAX_LINE)
            if not line:
                break
            pos += len(line)
            read += len(line)
            if len(line) >= MAX_LINE and not line.endswith(b"\n"):
                # a long line (log_signal() sets no size limit): read it whole, it is one entry
                parts = [line]
                while parts[-1] and not parts[-1].endswith(b"\n"):
                    parts.append(f.readline(MAX_LINE))
                    pos += len(parts[-1])
                    read += len(parts[-1])
                line = b"".join(parts)
            if not line.endswith(b"\n"):
                bad.append((line, "torn last line (a write was interrupted)"))
                continue
            if not line.strip():
                continue
            try:
                kind, entry = entry_from_json(line)
            except (ValueError, TypeError, AttributeError, KeyError, RecursionError, OverflowError) as exc:
                bad.append((line.rstrip(b"\n"), f"line at byte {pos - len(line)} of {source} is not a "
                                                 f"valid entry ({exc})"))
                continue
            if kind == "update":
                (boot, mono), upd = entry
                if boot is None or boot not in boots:   # a new group, after those seen so far
                    groups += 1
                    if boot is not None:
                        boots[boot] = groups
                ordered.append(((groups if boot is None else boots[boot], mono), upd))
            else:
                rows.append(entry)
    ordered.sort(key=lambda e: e[0])   # stable: the file order where no call order is known
    return Chunk(source, rows, [u for _, u in ordered], bad, pos, pos >= size)


def consumed(chunk: Chunk) -> None:
    """The chunk is committed: set its bad lines aside and record how far the replay got
    (under the lock ``replaying()`` holds)."""
    taken = chunk.path if chunk.path.endswith(".replaying") else f"{chunk.path}.replaying"
    spill = taken[:-len(".replaying")]
    tmp = f"{taken}.done.tmp"
    if not chunk.last:
        # the offset is written first: if that fails (a full disk), nothing was set aside yet,
        # so the next replay of this chunk does not set its bad lines aside a second time.
        # Not fsync'd: an offset lost in a crash only makes the next replay redo committed
        # chunks, which is harmless (rows are idempotent by signal_id, updates re-apply in order)
        with open(tmp, "wb") as f:
            f.write(str(chunk.end).encode())
    for line, why in chunk.bad:
        if why.startswith("torn"):
            _set_aside(f"{spill}.torn-{time.strftime('%Y%m%dT%H%M%S')}-{os.getpid()}", line, why)
        else:
            _set_aside(f"{spill}.bad", line, why)
    if chunk.last:
        os.remove(chunk.path)
        with contextlib.suppress(FileNotFoundError):
            os.remove(f"{taken}.done")
        return
    if chunk.path != taken:   # the first chunk of the spill file: take the file, newer appends
        os.rename(chunk.path, taken)   # start a new one behind it
    os.replace(tmp, f"{taken}.done")


_REQUIRED_TEXT = frozenset(("signal_id", "symbol", "strategy", "asset_type", "timestamp"))
_REQUIRED_NUMBERS = frozenset(("entry_price", "confidence"))
_OPTIONAL_NUMBERS = frozenset(("target_price", "stop_price", "exit_price", "profit_loss_pct"))
_ACTIONS = frozenset(("BUY", "SELL", "NEUTRAL"))


def entry_from_json(line: bytes) -> Tuple[str, Any]:
    """One spill line checked again: ("row", finished tuple) or ("update", ((boot, mono),
    (signal_id, fields))).  Rows are checked for types only (what ``log_signal()`` accepted is
    stored as it was); updates with ``update_signal()``'s rules.  Raises ValueError (or
    TypeError) naming the problem."""
    obj = json.loads(line)
    if not isinstance(obj, dict):
        raise ValueError(f"not a JSON object: {type(obj).__name__}")
    if "update_of" in obj:
        sid, fields = obj["update_of"], obj.get("fields")
        if not isinstance(sid, str) or not sid:
            raise ValueError("update_of must be a non-empty string")
        if not isinstance(fields, dict):
            raise ValueError("fields must be an object")
        boot, mono = obj.get("boot"), obj.get("mono")
        if not isinstance(boot, str) or not isinstance(mono, (int, float)) or isinstance(mono, bool):
            boot, mono = None, 0.0   # written before call order was recorded: file order
        return "update", ((boot, float(mono)), (sid, normalise_update(fields)))
    values: List[Any] = [obj.get(name) for name in FIELDS]
    for i, (name, value) in enumerate(zip(FIELDS, values)):
        kind = type(value)
        if kind is str:
            if name in _REQUIRED_NUMBERS or name in _OPTIONAL_NUMBERS:
                raise ValueError(f"{name}: expected a finite number, got {value!r}")
            if (not value and name in _REQUIRED_TEXT) or (name == "action" and value not in _ACTIONS):
                raise ValueError(f"{name}: not an accepted value: {value!r}")
            if not value.isascii():
                value.encode("utf-8")   # UnicodeEncodeError (a ValueError) for lone surrogates
        elif kind is float or kind is int:
            if name not in _REQUIRED_NUMBERS and name not in _OPTIONAL_NUMBERS:
                raise ValueError(f"{name}: expected a string, got a number")
            if not math.isfinite(value):
                raise ValueError(f"{name}: expected a finite number, got {value!r}")
            values[i] = float(value)
        elif value is None:
            if name in _REQUIRED_TEXT or name in _REQUIRED_NUMBERS or name == "action":
                raise ValueError(f"{name}: is required")
        else:
            raise ValueError(f"{name}: unexpected {kind.__name__}")
    out = dict(zip(FIELDS, values))
    datetime.fromisoformat(out["timestamp"])   # ValueError if it is not one
    meta = out["metadata"]
    if meta is not None and not isinstance(json.loads(meta), dict):
        raise ValueError("metadata must hold a JSON object")
    return "row", finish(tuple(values))   # the hash is computed again


def _set_aside(aside: str, data: bytes, why: str) -> None:
    with open(aside, "ab") as f:
        f.write(data + b"\n")
        f.flush()
        os.fsync(f.fileno())
    log.error("spill file: %s; kept aside in %s for inspection", why, aside)
