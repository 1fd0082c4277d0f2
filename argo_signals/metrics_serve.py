"""``argo-signals metrics``: a database's state in Prometheus' text format, printed once or
served on ``/metrics`` until SIGTERM or Ctrl-C (the collector and server are ``metrics``')."""
from __future__ import annotations

import os
import signal
import sqlite3
import threading
from typing import Any, Callable

from .dbstate import read_state

__all__ = ["PROMETHEUS_HINT", "MetricsUnavailable", "collector", "exposition_text", "listen", "serve"]

PROMETHEUS_HINT = "pip install 'argo-signals[prometheus]'"


class MetricsUnavailable(Exception):
    """prometheus-client is not installed, or the database is missing or unreadable."""


def collector(db_path: str) -> Any:
    """A ``DatabaseCollector`` for ``db_path``, once the database was read."""
    try:
        from .metrics import DatabaseCollector
    except ImportError:
        raise MetricsUnavailable(f"the metrics need prometheus-client: {PROMETHEUS_HINT}") from None
    if not os.path.exists(db_path):
        raise MetricsUnavailable(f"no database at {db_path}")
    try:
        read_state(db_path)
    except sqlite3.Error as exc:
        raise MetricsUnavailable(f"{db_path} is not a readable argo-signals database ({exc})") from None
    return DatabaseCollector(db_path)


def exposition_text(source: Any) -> str:
    """The collector's metrics as Prometheus' text exposition."""
    from .metrics import exposition

    return exposition(source).decode("utf-8")


def listen(source: Any, host: str, port: int) -> Any:
    """A ``MetricsServer`` bound to ``host:port`` (not started); OSError when it cannot listen."""
    from .metrics import MetricsServer

    return MetricsServer(host, port, source)


def serve(server: Any, db_path: str, on_ready: Callable[[str], None], poll: float = 0.2) -> None:
    """Start ``server`` and serve until SIGTERM or Ctrl-C (the previous SIGTERM handler is put
    back); ``on_ready`` gets the line that says where, once the handler is in place."""
    stop = threading.Event()
    previous = signal.signal(signal.SIGTERM, lambda *_: stop.set())
    host, port = str(server.address[0]), int(server.address[1])
    shown = f"[{host}]" if ":" in host else host
    on_ready(f"serving the metrics of {db_path} on http://{shown}:{port}/metrics (Ctrl-C or SIGTERM stops)")
    server.start()
    try:
        while not stop.wait(poll):
            pass
    except KeyboardInterrupt:
        pass
    finally:
        server.stop()
        signal.signal(signal.SIGTERM, previous)
