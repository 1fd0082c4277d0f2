"""The spill file: where signals wait while the database cannot be written.

``<db>.spill.jsonl`` holds one JSON object per line (a finished signal row), appended and
fsync'd under an advisory lock so that several trackers and processes can share it.  A
replay takes the file whole (rename under the lock), hands its rows back, and the caller
deletes the taken file once they are committed.  A torn last line, left by a crash in the
middle of an append, is moved aside to ``<db>.spill.jsonl.torn-<time>`` and reported.
"""
from __future__ import annotations

import contextlib
import json
import logging
import os
import time
from typing import Any, Dict, Iterator, List, Optional, Sequence, Tuple

from .signal import FINISHED_FIELDS

try:  # POSIX advisory locks; elsewhere a single process is assumed
    import fcntl
except ImportError:  # pragma: no cover
    fcntl = None  # type: ignore[assignment]

log = logging.getLogger("argo_signals")
Update = Tuple[str, Dict[str, Any]]

__all__ = ["spill_path", "append", "take", "pending_count"]

LOCK_TIMEOUT = 10.0  # seconds to wait for another process's append or take


def spill_path(db_path: str) -> str:
    return f"{db_path}.spill.jsonl"


@contextlib.contextmanager
def _locked(path: str) -> Iterator[None]:
    if fcntl is None:
        yield
        return
    fd = os.open(f"{path}.lock", os.O_RDWR | os.O_CREAT, 0o644)
    try:
        deadline = time.monotonic() + LOCK_TIMEOUT
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    raise OSError(f"spill file lock {path}.lock still busy after {LOCK_TIMEOUT:.0f}s") from None
                time.sleep(0.01)
        yield
    finally:
        os.close(fd)


def append(path: str, rows: Sequence[tuple], updates: Sequence[Update] = ()) -> None:
    """Append finished rows and updates durably (fsync'd); raises OSError when that fails."""
    lines = [json.dumps(dict(zip(FINISHED_FIELDS, r))) for r in rows]
    lines += [json.dumps({"update_of": sid, "fields": fields}) for sid, fields in updates]
    data = "".join(line + "\n" for line in lines)
    with _locked(path):
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
        with _locked(path):
            return sum(_count_lines(p) for p in names)
    except OSError:
        return sum(_count_lines(p) for p in names)


def _count_lines(path: str) -> int:
    try:
        with open(path, "rb") as f:
            return sum(1 for line in f if line.strip())
    except FileNotFoundError:
        return 0


def take(path: str) -> Optional[Tuple[str, List[tuple], List[Update]]]:
    """Claim the spill file for replay: (taken_path, rows, updates), or None when there is none.

    The caller commits the rows and then removes ``taken_path``; if it cannot, the next
    ``take`` finds the taken file again (it is replayed before any newer spill).
    """
    taken = f"{path}.replaying"
    with _locked(path):
        if not os.path.exists(taken):
            try:
                os.rename(path, taken)
            except FileNotFoundError:
                return None
        with open(taken, "rb") as f:
            data = f.read()
    rows: List[tuple] = []
    updates: List[Update] = []
    lines = data.split(b"\n")
    tail = lines.pop()  # b"" when the file ends with a newline
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
            if "update_of" in obj:
                updates.append((obj["update_of"], obj["fields"]))
            else:
                rows.append(tuple(obj.get(k) for k in FINISHED_FIELDS))
        except (ValueError, AttributeError):
            _set_aside(path, line, f"line {n} is not a JSON object")
    if tail.strip():
        _set_aside(path, tail, "torn last line (a write was interrupted)")
    return taken, rows, updates


def _set_aside(path: str, data: bytes, why: str) -> None:
    aside = f"{path}.torn-{time.strftime('%Y%m%dT%H%M%S')}-{os.getpid()}"
    with open(aside, "ab") as f:
        f.write(data + b"\n")
        f.flush()
        os.fsync(f.fileno())
    log.error("spill file %s: %s; kept aside in %s for inspection", path, why, aside)
