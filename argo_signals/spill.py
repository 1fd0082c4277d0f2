"""The spill file: where signals wait while the database cannot be written.

``<db>.spill.jsonl`` (or the tracker's ``spill_path``) holds one JSON object per line (a
finished signal row, or ``{"update_of": id, "fields": {...}}``), appended and fsync'd under an
advisory lock so that several trackers and processes can share it.  A replay takes the file
whole (rename under the lock), checks every line again with the rules of ``log_signal()``,
hands the valid entries back, and the caller deletes the taken file once they are committed.
A line that is not a valid entry is moved to ``<spill>.bad`` with its reason logged; a torn
last line, left by a crash in the middle of an append, goes to ``<spill>.torn-<time>``.
"""
from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import threading
import time
from datetime import datetime
from typing import Any, Dict, Iterator, List, NamedTuple, Optional, Sequence, Tuple

from .signal import FIELDS, FINISHED_FIELDS, finish, normalise, normalise_update

try:  # POSIX advisory locks; elsewhere a single process is assumed
    import fcntl
except ImportError:  # pragma: no cover
    fcntl = None  # type: ignore[assignment]

log = logging.getLogger("argo_signals")
Update = Tuple[str, Dict[str, Any]]

__all__ = ["spill_path", "append", "take", "pending_count", "entry_from_json", "Taken", "give_back",
           "give_back_locked", "replaying"]

LOCK_TIMEOUT = 10.0  # seconds to wait for another process's append or take


def spill_path(db_path: str) -> str:
    return f"{db_path}.spill.jsonl"


# Threads of this process take this lock first: POSIX record locks (lockf) belong to the
# process, so they keep other processes out but not other threads.  Unlike flock(), a record
# lock is not inherited by a forked child, which would otherwise hold it for its whole life.
_thread_lock = threading.Lock()


def _reinit_after_fork() -> None:
    global _thread_lock
    _thread_lock = threading.Lock()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_reinit_after_fork)


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
           update_times: Optional[Sequence[float]] = None, timeout: Optional[float] = None) -> None:
    """Append finished rows and updates durably (fsync'd); raises OSError when that fails.

    ``update_times`` (epoch seconds each update was made) let a replay apply the updates of
    one signal in the order they were made, whatever order they reached the file in."""
    lines = [json.dumps(dict(zip(FINISHED_FIELDS, r))) for r in rows]
    times = update_times if update_times is not None else [None] * len(updates)
    lines += [json.dumps({"update_of": sid, "fields": fields, "at": at})
              for (sid, fields), at in zip(updates, times)]
    data = "".join(line + "\n" for line in lines)
    with _locked(path, timeout):
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        try:
            view = memoryview(data.encode("utf-8"))
            while view:
                view = view[os.write(fd, view):]
            os.fsync(fd)
        finally:
            os.close(fd)


def pending_count(path: str) -> int:
    """Lines waiting in the spill file and in one taken for a replay (0 when there is none).

    Counted under the spill lock, so that a replay renaming the file meanwhile is not
    counted twice."""
    names = (path, f"{path}.replaying")
    if not any(os.path.exists(p) for p in names):
        return 0
    try:
        with _locked(path, 0.5):
            return sum(_count_lines(p) for p in names)
    except OSError:
        return sum(_count_lines(p) for p in names)


def _count_lines(path: str) -> int:
    try:
        with open(path, "rb") as f:
            return sum(1 for line in f if line.strip())
    except FileNotFoundError:
        return 0


class Taken(NamedTuple):
    path: str                  # the taken file: remove it once ``rows`` and ``updates`` are committed
    rows: List[tuple]
    updates: List[Update]
    bad: int                   # lines moved to ``<spill>.bad``


@contextlib.contextmanager
def replaying(path: str, timeout: Optional[float] = None) -> Iterator[Optional["Taken"]]:
    """Hold the spill lock for a whole replay and yield what waits (None when nothing does).

    Inside, the caller commits ``Taken.rows``/``updates`` and then removes ``Taken.path``, or
    calls ``give_back_locked()``.  Holding the lock throughout keeps two replays (threads or
    processes) from taking the same lines, so an old update can never be re-applied after a
    newer one, nor a newer taken file removed by a slower replay.
    """
    with _locked(path, timeout):
        yield _take_locked(path)


def take(path: str, timeout: Optional[float] = None) -> Optional[Taken]:
    """Read what waits for replay (the file is renamed to ``.replaying``); None when nothing."""
    with _locked(path, timeout):
        return _take_locked(path)


def _take_locked(path: str) -> Optional[Taken]:
    taken = f"{path}.replaying"
    if not os.path.exists(taken):
        try:
            os.rename(path, taken)
        except FileNotFoundError:
            return None
    with open(taken, "rb") as f:
        data = f.read()
    rows: List[tuple] = []
    timed: List[Tuple[float, Update]] = []
    bad = 0
    lines = data.split(b"\n")
    tail = lines.pop()  # b"" when the file ends with a newline
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            kind, entry = entry_from_json(line)
        except (ValueError, TypeError, AttributeError, KeyError, RecursionError) as exc:
            bad += 1
            _set_aside(f"{path}.bad", line, f"line {n} of {taken} is not a valid entry ({exc})")
            continue
        if kind == "update":
            timed.append(entry)
        else:
            rows.append(entry)
    if tail.strip():
        _set_aside(f"{path}.torn-{time.strftime('%Y%m%dT%H%M%S')}-{os.getpid()}", tail,
                   "torn last line (a write was interrupted)")
    timed.sort(key=lambda e: e[0])   # stable: lines without a time keep their file order
    return Taken(taken, rows, [u for _, u in timed], bad)


def give_back(taken: Taken, path: str) -> None:
    """A replay that could not commit: the taken lines go back in front of any newer spill."""
    with _locked(path):
        give_back_locked(taken, path)


def give_back_locked(taken: Taken, path: str) -> None:
    """``give_back`` for a caller already holding the lock (inside ``replaying()``)."""
    try:
        with open(path, "rb") as f:
            newer = f.read()
    except FileNotFoundError:
        newer = b""
    if newer:
        with open(taken.path, "ab") as f:
            f.write(newer)
            f.flush()
            os.fsync(f.fileno())
    os.replace(taken.path, path)




def entry_from_json(line: bytes) -> Tuple[str, Any]:
    """One spill line checked again with ``log_signal()``'s rules: ("row", finished tuple) or
    ("update", (signal_id, fields)).  Raises ValueError (or TypeError) naming the problem."""
    obj = json.loads(line)
    if not isinstance(obj, dict):
        raise ValueError(f"not a JSON object: {type(obj).__name__}")
    if "update_of" in obj:
        sid, fields = obj["update_of"], obj.get("fields")
        if not isinstance(sid, str) or not sid:
            raise ValueError("update_of must be a non-empty string")
        if not isinstance(fields, dict):
            raise ValueError("fields must be an object")
        at = obj.get("at")
        return "update", (at if isinstance(at, (int, float)) and not isinstance(at, bool) else 0.0,
                          (sid, normalise_update(fields)))
    signal: Dict[str, Any] = {k: v for k, v in obj.items() if k in FIELDS and v is not None}
    meta = signal.pop("metadata", None)
    if meta is not None:
        meta = json.loads(meta)
        if not isinstance(meta, dict):
            raise ValueError("metadata must hold a JSON object")
        signal["metadata"] = meta
    row = normalise(signal)
    stamp = obj.get("timestamp")
    if isinstance(stamp, str) and datetime.fromisoformat(stamp) == datetime.fromisoformat(row[10]):
        row = row[:10] + (stamp,) + row[11:]   # keep the text that was hashed
    return "row", finish(row)   # the hash is computed again from the checked content


def _set_aside(aside: str, data: bytes, why: str) -> None:
    with open(aside, "ab") as f:
        f.write(data + b"\n")
        f.flush()
        os.fsync(f.fileno())
    log.error("spill file: %s; kept aside in %s for inspection", why, aside)
