"""Who holds a sync claim, and whether that holder is still alive.

A claim token names its owner: ``argo1|<host>|<boot id>|<pid namespace>|<pid>|<process
start>|<random>``.  On the same host, boot and pid namespace (containers sharing a database
file have their own), the owner is alive exactly when a process with that pid and that start
time exists (a pid reused by another process has another start time), and, for a claim of this
very process, when the syncer that made it has not stopped.  Such a claim is never taken
over, however far the wall clock jumps; a claim whose owner is gone (``kill -9``, a reboot) is
free at once.  An owner on another host cannot be checked: its claim ends with its lease.
"""
from __future__ import annotations

import os
import socket
import threading
import uuid
from typing import Optional, Set

__all__ = ["new_token", "Liveness", "forget"]

_PREFIX = "argo1"
_live_here: Set[str] = set()      # tokens of this process's syncers that have not stopped
_lock = threading.Lock()


def _read(path: str) -> str:
    try:
        with open(path, encoding="ascii", errors="replace") as f:
            return f.read().strip()
    except OSError:
        return ""


def _boot_id() -> str:
    return _read("/proc/sys/kernel/random/boot_id")


def _start_time(pid: int) -> Optional[str]:
    """The process's start time (clock ticks since boot) from /proc, "" where /proc has none,
    None if no such process (or only its corpse: a zombie nobody reaped yet, killed or exited)."""
    stat = _read(f"/proc/{pid}/stat")
    if stat:
        fields = stat.rsplit(")", 1)[-1].split()
        if fields and fields[0] in ("Z", "X", "x"):
            return None
        return fields[19] if len(fields) > 19 else ""
    if os.path.isdir("/proc/self"):
        return None   # /proc works and has no such pid
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return None
    except OSError:   # (EPERM: it exists)
        pass
    return ""


def _host() -> str:
    return socket.gethostname().replace("|", "_")


def _pid_namespace() -> str:
    try:
        return os.readlink("/proc/self/ns/pid").replace("|", "_")
    except OSError:
        return ""


def new_token() -> str:
    """A claim token naming this process; registered as alive until ``forget()``."""
    pid = os.getpid()
    token = "|".join((_PREFIX, _host(), _boot_id(), _pid_namespace(), str(pid), _start_time(pid) or "",
                      uuid.uuid4().hex))
    with _lock:
        _live_here.add(token)
    return token


def forget(token: str) -> None:
    """The syncer that owns ``token`` stopped: its claims are free for anyone."""
    with _lock:
        _live_here.discard(token)


class Liveness:
    """Judges claim owners for one reclaim pass (each distinct owner is checked once)."""

    def __init__(self) -> None:
        self.host = _host()
        self.boot = _boot_id()
        self.pidns = _pid_namespace()
        self.pid = os.getpid()

    def owner_alive(self, token: str) -> Optional[bool]:
        """True/False for an owner on this host and boot; None when it cannot be told (another
        host, another format): the lease decides."""
        parts = token.split("|")
        if len(parts) != 7 or parts[0] != _PREFIX or parts[1] != self.host:
            return None
        _, _, boot, pidns, pid_text, start, _ = parts
        if not boot or not self.boot:
            return None
        if boot != self.boot:
            return False     # the host rebooted since: that process is gone
        if pidns != self.pidns:
            return None      # another pid namespace (container): its pids mean nothing here
        try:
            pid = int(pid_text)
        except ValueError:
            return None
        if pid == self.pid:
            with _lock:
                return token in _live_here
        now_start = _start_time(pid)
        if now_start is None:
            return False
        return not start or not now_start or now_start == start

    def may_take(self, token: str, claim_until: Optional[float], now: float) -> bool:
        """May a claim held under ``token`` (leased until ``claim_until``) be taken over now?"""
        alive = self.owner_alive(token)
        if alive is not None:
            return not alive
        return claim_until is None or claim_until < now
