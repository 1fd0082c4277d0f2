"""One frozen configuration shared by the tracker, the engine, the SQLite sink and the sync.

The environment is read here and nowhere else (``Config.resolve``).
"""
from __future__ import annotations

import os
import sqlite3
from dataclasses import dataclass, field
from typing import Callable, Optional, Tuple

from .alpine import check_alpine_url, check_api_key

__all__ = ["Config", "DEFAULT_DB", "default_db_path", "env_flag", "alpine_target"]

DEFAULT_DB = "argo_signals.db"


def default_db_path() -> str:
    """``$ARGO_SIGNALS_DB``, else ``argo_signals.db`` in the current directory."""
    return os.environ.get("ARGO_SIGNALS_DB") or DEFAULT_DB


def env_flag(name: str) -> Optional[bool]:
    """An on/off environment switch: None when unset or blank; false for 0/false/no/off."""
    value = os.environ.get(name)
    if value is None or not value.strip():
        return None
    return value.strip().lower() not in ("0", "false", "no", "off")


def alpine_target() -> Tuple[Optional[str], Optional[str]]:
    """``($ALPINE_API_URL, $ARGO_API_KEY)`` as set: the URL None when unset or empty, the key
    as it is (None when unset), for a command that picks its receiver itself."""
    return os.environ.get("ALPINE_API_URL") or None, os.environ.get("ARGO_API_KEY")


@dataclass(frozen=True)
class Config:
    """Every option of a tracker (see README's configuration table)."""

    db_path: str = DEFAULT_DB
    spill_path: str = ""                 # "" = "<db_path>.spill.jsonl"
    batch_size: int = 50
    batch_timeout: float = 5.0
    flush_interval: float = 10.0
    max_queue_size: int = 10_000
    queue_full_timeout: float = 0.1
    max_batch: int = 1000
    durability: str = "normal"
    busy_timeout: float = 5.0
    write_retry_budget: float = 30.0
    on_connect: Optional[Callable[[sqlite3.Connection], None]] = None
    waiting_update_max_age: float = 86400.0   # an update waiting longer for its insert is reported
    register_atexit: bool = True
    atexit_timeout: float = 10.0
    handle_signals: bool = False
    alpine_url: Optional[str] = field(default=None, repr=False)   # None: sync off (may hold credentials)
    api_key: Optional[str] = field(default=None, repr=False)
    sync_workers: int = 4
    sync_timeout: Tuple[float, float] = (5.0, 10.0)
    sync_shutdown_timeout: float = 5.0
    sync_retry_budget: float = 30.0
    max_sync_attempts: int = 20

    def __post_init__(self) -> None:
        if self.batch_size < 1 or self.max_queue_size < 1 or self.max_batch < 1:
            raise ValueError("batch_size, max_queue_size and max_batch must be >= 1")
        if self.batch_timeout <= 0 or self.flush_interval <= 0:
            raise ValueError("batch_timeout and flush_interval must be > 0")
        if self.durability not in ("normal", "full"):
            raise ValueError("durability must be 'normal' or 'full'")
        if self.waiting_update_max_age <= 0:
            raise ValueError("waiting_update_max_age must be > 0")
        if self.queue_full_timeout < 0 or self.write_retry_budget < 0 or self.atexit_timeout < 0:
            raise ValueError("timeouts and budgets must be >= 0")
        check_api_key(self.api_key)   # ValueError (never repeating the key) if the receiver cannot compare it
        if self.alpine_url:           # checked once, here: not a per-row retry later
            object.__setattr__(self, "alpine_url", check_alpine_url(self.alpine_url))
        if not self.spill_path:
            object.__setattr__(self, "spill_path", f"{self.db_path}.spill.jsonl")
        object.__setattr__(self, "max_batch", max(self.max_batch, self.batch_size))
        object.__setattr__(self, "sync_timeout", tuple(self.sync_timeout))

    @property
    def sync_enabled(self) -> bool:
        return bool(self.alpine_url)

    @classmethod
    def resolve(cls, db_path: Optional[str] = None, *, alpine_url: Optional[str] = None,
                api_key: Optional[str] = None, sync_enabled: Optional[bool] = None,
                spill_path: Optional[str] = None, **options: object) -> "Config":
        """Fill what the caller left out from the environment.

        ``ARGO_SIGNALS_DB`` gives the database, ``ALPINE_API_URL`` and ``ARGO_API_KEY`` the
        sync target, ``ALPINE_SYNC_ENABLED=false`` turns sync off (an explicit ``alpine_url``
        wins over that switch; an explicit ``sync_enabled=False`` wins over everything).
        """
        path = os.fspath(db_path) if db_path is not None else default_db_path()
        url = alpine_url if alpine_url is not None else os.environ.get("ALPINE_API_URL") or None
        enabled = sync_enabled
        if enabled is None:
            enabled = True if alpine_url is not None else env_flag("ALPINE_SYNC_ENABLED")
        if enabled is False:
            url = None
        key = api_key if api_key is not None else os.environ.get("ARGO_API_KEY")
        return cls(db_path=path, spill_path=os.fspath(spill_path) if spill_path else "",
                   alpine_url=url, api_key=key if url else None, **options)  # type: ignore[arg-type]
