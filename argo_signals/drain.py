"""Drain mode (the ``sync`` command): push every pending row now, due or not, each once.

``push`` is the command's whole run: it checks the database, the receiver's URL and key, puts
rows back to pending when asked, then drains; it raises ``SyncSetupError`` (with the command's
exit status) for what stops it before anything is sent and returns a ``SyncResult`` otherwise.

It drives a ``Syncer`` from outside: forced claims in id order, progress per handled row, and
an end when everything taken is handled, when the receiver is misconfigured (a redirect, a
refused key), or when nothing has got through for ``patience`` seconds: *database* when the
rows could not be claimed (locked, unreadable), *unreachable* when nothing answered (or the
breaker is open), *stalled* when answers came but settled no row (their outcomes are
recorded when the syncer stops; a rate limit in force counts as answers).  Rows not handled
stay ``pending``.
"""
from __future__ import annotations

import enum
import os
import sqlite3
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Optional

from . import store
from .config import alpine_target, env_flag
from .dbview import DatabaseUnavailable, open_existing
from .progress import Progress, no_progress
from .safetext import escape_controls
from .sync import Syncer, SyncConfig
from .tracker import sync_state

__all__ = ["End", "DrainReport", "drain", "SyncSetupError", "SyncResult", "push"]


class End(str, enum.Enum):
    DONE = "done"                    # every row taken was handled
    CONFIGURATION = "configuration"  # a redirect or a refused key: fix the URL or the key
    UNREACHABLE = "unreachable"      # no answer for `patience` seconds (or the breaker is open)
    DATABASE = "database"            # the database could not be read or written (locked, unreadable)
    STALLED = "stalled"              # answers, but no row handled for `patience` seconds


@dataclass
class DrainReport:
    end: End
    outcomes: Dict[str, int] = field(default_factory=dict)
    detail: str = ""
    waited: float = 0.0              # seconds without progress when it gave up


def drain(syncer: Syncer, limit: Optional[int] = None, patience: float = 30.0,
          progress: Optional[Callable[[int], None]] = None, poll: float = 0.05) -> DrainReport:
    syncer.forced_after = 0
    syncer.claim_budget = limit
    shown = 0
    last_progress = time.monotonic()

    def advance() -> None:
        nonlocal shown, last_progress
        handled = syncer.outcomes.handled
        if handled > shown:
            if progress is not None:
                progress(handled - shown)
            shown = handled
            last_progress = time.monotonic()

    def stuck() -> Optional[End]:
        if syncer.outcomes.config_error is not None:
            return End.CONFIGURATION
        if time.monotonic() - last_progress >= patience:
            if syncer.db_error is not None:
                return End.DATABASE
            answered = syncer.delivery.answered > 0
            return End.UNREACHABLE if syncer.breaker.is_open or not answered else End.STALLED
        return None

    end: Optional[End] = None
    while end is None:
        before = syncer.forced_after
        syncer.nudge()
        while end is None and (syncer.busy() or syncer.breaker.is_open or syncer.rate_limited):
            time.sleep(poll)
            advance()
            end = stuck()
        if end is not None:
            break
        syncer.wait_idle(poll)
        advance()
        end = stuck()
        if end is None and syncer.db_error is None and (syncer.forced_after == before or syncer.claim_budget == 0):
            end = End.DONE
        elif end is None and syncer.db_error is not None:
            time.sleep(poll)   # the database refused the claim: try again until `patience`
    waited = time.monotonic() - last_progress
    detail = syncer.outcomes.config_error or ((syncer.breaker.reason or "no answer")
                                              if end is End.UNREACHABLE else "") or ""
    if end is End.DATABASE:
        detail = syncer.db_error or ""
    return DrainReport(end, dict(syncer.outcomes.counts), detail, waited)

# exit statuses of the command
UNSETTLED, CONFIGURATION, UNREACHABLE, DATABASE = 1, 2, 3, 4


class SyncSetupError(Exception):
    """What stops ``push`` before anything is sent; ``exit_status`` 1 (no database, no URL,
    sync disabled), 2 (a bad URL or key) or 4 (the database cannot be read or written).
    ``line`` is the whole error line (``Error: ...``), control characters escaped."""

    def __init__(self, message: str, exit_status: int) -> None:
        super().__init__(message)
        self.exit_status = exit_status

    @property
    def line(self) -> str:
        if self.exit_status == CONFIGURATION:
            return f"Error: configuration: {escape_controls(self)}"
        if self.exit_status == DATABASE:
            return f"Error: database problem: {escape_controls(self)} (nothing was sent)"
        return f"Error: {escape_controls(self)}"


@dataclass
class SyncResult:
    data: Dict[str, Any]
    text: str
    exit_status: int   # 0: every row taken settled; 1 unsettled; 3 unreachable; 4 database


def _check_database(db_path: str) -> None:
    if not os.path.exists(db_path):
        raise SyncSetupError(f"no database at {db_path}", UNSETTLED)
    try:  # another program's database is refused as the other writers refuse it (exit 1)
        ours = store.connect_readonly(db_path)
        try:
            store.check_ours(ours, db_path)   # ForeignDatabaseError
        finally:
            ours.close()
    except sqlite3.Error:
        pass  # not readable at all: a database problem, said just below
    try:
        open_existing(db_path).close()
    except DatabaseUnavailable as exc:
        raise SyncSetupError(str(exc), DATABASE) from None


def push(db_path: str, alpine_url: Optional[str] = None, retry_rejected: bool = False,
         retry_failed: bool = False, limit: Optional[int] = None, timeout: float = 30.0,
         progress: Progress = no_progress) -> SyncResult:
    """Push the pending rows of ``db_path`` to ``alpine_url`` (default ``$ALPINE_API_URL``,
    with ``$ARGO_API_KEY``); give up when nothing has got through for ``timeout`` seconds."""
    _check_database(db_path)
    env_url, api_key = alpine_target()
    url = alpine_url or env_url
    if not url:
        raise SyncSetupError("no Alpine URL: pass --alpine-url or set ALPINE_API_URL", UNSETTLED)
    if alpine_url is None and env_flag("ALPINE_SYNC_ENABLED") is False:
        raise SyncSetupError("sync is disabled by ALPINE_SYNC_ENABLED=false (pass --alpine-url to override)",
                             UNSETTLED)
    try:
        config = SyncConfig(url, api_key, busy_timeout=max(0.1, min(5.0, timeout / 2)))
    except ValueError as exc:
        raise SyncSetupError(str(exc), CONFIGURATION) from None
    try:
        conn = store.connect(db_path, busy_timeout=config.busy_timeout)
        try:
            reset = store.reset_status(conn, [s for s, on in (("rejected", retry_rejected), ("failed", retry_failed))
                                              if on])
        finally:
            conn.close()
    except sqlite3.Error as exc:
        raise SyncSetupError(str(exc), DATABASE) from None
    syncer = Syncer(db_path, config)
    todo = sync_state(db_path)["sync_pending"]
    if limit is not None:
        todo = min(todo, limit)
    with progress(todo, "syncing") as bar:
        report = drain(syncer, limit=limit, patience=timeout, progress=bar.update)
    syncer.stop(5.0)
    outcomes = dict(syncer.outcomes.counts)  # (answers in flight at the end are recorded by stop())
    st = sync_state(db_path)
    taken = sum(outcomes[k] for k in ("synced", "skipped", "rejected", "transient"))
    unsettled = outcomes["rejected"] > 0 or outcomes["transient"] > 0 or report.end is not End.DONE
    data = {"taken": taken, "synced": outcomes["synced"], "skipped": outcomes["skipped"],
            "rejected": outcomes["rejected"], "not_synced_yet": outcomes["transient"],
            "reset_to_pending": reset, "reclaimed": syncer.reclaimed, "still_pending": st["sync_pending"],
            "failed": st["sync_failed"], "end": report.end.value, "last_error": syncer.last_error}
    text = (f"took {taken}: {data['synced']} synced, {data['skipped']} skipped, "
            f"{data['rejected']} rejected, {data['not_synced_yet']} not synced yet; "
            f"{st['sync_pending']} pending in all")
    if syncer.reclaimed:
        text += f"\n  reclaimed {syncer.reclaimed} rows claimed by a sync process that is gone"
    if report.end is End.DATABASE:
        text += (f"\ngave up: database problem in {db_path} for {report.waited:.0f} s ({report.detail}); "
                 f"Alpine got no request for those rows; {st['sync_pending']} rows stay pending")
    elif report.end is End.UNREACHABLE:
        text += (f"\ngave up: Alpine unreachable at {config.public_url} for {report.waited:.0f} s "
                 f"({report.detail}); {st['sync_pending']} rows stay pending")
    elif report.end is End.STALLED:
        text += (f"\ngave up: Alpine answered but no row settled for {report.waited:.0f} s; "
                 f"{st['sync_pending']} rows stay pending; last error: {syncer.last_error}")
    elif report.end is End.CONFIGURATION:
        text += f"\nstopped: {report.detail}; {st['sync_pending']} rows stay pending"
    elif unsettled and syncer.last_error:
        text += f"\n  last error: {syncer.last_error}"
    status = (DATABASE if report.end is End.DATABASE else UNREACHABLE if report.end is End.UNREACHABLE
              else UNSETTLED if unsettled else 0)
    return SyncResult(data, text, status)
