"""Which file a path names: the one rule for noticing a database file moved or replaced.

A file is the same file while its ``(st_dev, st_ino)`` stays the same.  The sink compares the
identity of the file it has open (and of its ``-wal``/``-shm`` files) with what the path names
now; the sync compares the file its threads have open with what the path names now.  When they
differ, the file was moved, deleted or replaced, and writing on would go to the old file.
"""
from __future__ import annotations

import os
from typing import Optional, Tuple

__all__ = ["FileId", "file_identity", "identity_of"]

FileId = Tuple[int, int]   # (st_dev, st_ino)


def identity_of(st: os.stat_result) -> FileId:
    """The identity of the file ``st`` (an ``os.stat()`` result) describes."""
    return st.st_dev, st.st_ino


def file_identity(path: str) -> Optional[FileId]:
    """The identity of the file at ``path`` now; None when there is none (or it cannot be
    stat'ed)."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    return identity_of(st)
