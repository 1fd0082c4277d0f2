"""Prometheus metrics: a collector for a live tracker, one for a database read from outside.

Needs the ``prometheus`` extra (``pip install 'argo-signals[prometheus]'``); ``import
argo_signals`` does not import this module.  One line exposes a running tracker::

    prometheus_client.REGISTRY.register(TrackerCollector(tracker))

Each scrape takes one ``tracker.stats()`` snapshot and reports it as it is (the values are
those ``stats()`` gives at that moment).  Nothing here takes a lock that ``log_signal()``
takes.  The names are a public interface: docs/operations.md lists them.
"""
from __future__ import annotations

import logging
import socket
import sqlite3
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Dict, Iterator, List, Optional, Tuple

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from .dbstate import read_state
from .stats import PERSIST_TRIGGERS
from .store import SYNC_STATUSES   # label order of argo_signals_signals: the store's own

__all__ = ["TrackerCollector", "DatabaseCollector", "exposition", "MetricsServer",
           "TRACKER_METRICS", "DATABASE_METRICS", "SYNC_FAILURES"]

log = logging.getLogger("argo_signals")

# Delivery attempts that left the row unsettled, by what the receiver (or the network) said.
SYNC_FAILURES = ("transient", "unreachable", "auth", "redirect", "endpoint")
WRITER_STATES = ("open", "degraded", "closing", "closed")
REQUEST_TIMEOUT = 10.0   # seconds a scrape connection may stay silent before it is dropped

# name -> (type, help, label); the stats() key each one reports is in TrackerCollector.collect
TRACKER_METRICS: Dict[str, Tuple[str, str, Optional[str]]] = {
    "argo_signals_database_up": ("gauge", "1 when the database could be read at this scrape.", None),
    "argo_signals_logged_total": ("counter", "Signals accepted by log_signal().", None),
    "argo_signals_persisted_total": ("counter", "Rows committed to SQLite, by what wrote them.", "trigger"),
    "argo_signals_duplicates_total": ("counter", "Re-logged signals identical to a stored one (no-ops).", None),
    "argo_signals_rejected_total": ("counter", "Signals and updates refused at write (rejected_signals).", None),
    "argo_signals_fallback_writes_total": ("counter", "Writes made synchronously by a calling thread.", None),
    "argo_signals_write_retries_total": ("counter", "Failed write attempts that were retried.", None),
    "argo_signals_transactions_total": ("counter", "Write transactions committed.", None),
    "argo_signals_flushes_total": ("counter", "Writer-thread transactions, by trigger.", "trigger"),
    "argo_signals_writer_restarts_total": ("counter", "Times the writer thread was restarted.", None),
    "argo_signals_unknown_updates_total": ("counter", "Updates whose signal_id was not found.", None),
    "argo_signals_spilled_total": ("counter", "Signals written to the spill file.", None),
    "argo_signals_replayed_total": ("counter", "Signals replayed from the spill file.", None),
    "argo_signals_spill_bad_lines_total": ("counter", "Spill lines set aside to <spill>.bad at replay.", None),
    "argo_signals_unsaved_total": ("counter", "Signals printed to stderr: neither database nor spill took them.", None),
    "argo_signals_queue_depth": ("gauge", "Entries (signals and updates) waiting in the queue.", None),
    "argo_signals_writer_state": ("gauge", "1 for the writer's current state.", "state"),
    "argo_signals_spill_lines": ("gauge", "Lines waiting in the spill file.", None),
    "argo_signals_time_to_durable_seconds": ("histogram", "Seconds from log_signal() to commit.", None),
    "argo_signals_sync_enabled": ("gauge", "1 when this tracker syncs to Alpine.", None),
    "argo_signals_sync_delivered_total": ("counter", "Rows the receiver accepted (synced).", None),
    "argo_signals_sync_rejected_total": ("counter", "Rows refused for good (by the receiver or locally).", None),
    "argo_signals_sync_skipped_total": ("counter", "Rows not sent by design (NEUTRAL).", None),
    "argo_signals_sync_failed_total": ("counter", "Delivery attempts that left the row unsettled, by reason.", "reason"),
    "argo_signals_sync_retries_total": ("counter", "HTTP retries within deliveries.", None),
    "argo_signals_sync_lag_seconds": ("histogram", "Seconds from commit to the receiver's accepting answer.", None),
    "argo_signals_sync_pending": ("gauge", "Rows waiting to be synced (whole database).", None),
    "argo_signals_signals": ("gauge", "Rows in the database by sync status.", "status"),
    "argo_signals_oldest_pending_age_seconds": ("gauge", "Age of the oldest pending row by commit time (0: none).", None),
    "argo_signals_sync_breaker_open": ("gauge", "1 while the sync's circuit breaker is open or half open.", None),
}

DATABASE_METRICS: Dict[str, Tuple[str, str, Optional[str]]] = {
    "argo_signals_database_up": TRACKER_METRICS["argo_signals_database_up"],
    "argo_signals_signals": TRACKER_METRICS["argo_signals_signals"],
    "argo_signals_oldest_pending_age_seconds": TRACKER_METRICS["argo_signals_oldest_pending_age_seconds"],
    "argo_signals_refused_rows": ("gauge", "Rows in rejected_signals.", None),
    "argo_signals_spill_lines": TRACKER_METRICS["argo_signals_spill_lines"],
    "argo_signals_waiting_updates": ("gauge", "Updates waiting for the insert they refer to.", None),
    "argo_signals_last_commit_timestamp_seconds": ("gauge", "Commit time of the newest row (epoch s; 0: none).", None),
    "argo_signals_last_sync_error_timestamp_seconds": ("gauge", "When the last sync error was recorded (epoch s; 0: never).", None),
}


class _Families:
    """Builds metric families from a definition table; ``add`` fills one."""

    def __init__(self, table: Dict[str, Tuple[str, str, Optional[str]]]) -> None:
        self.table = table
        self.out: List[Metric] = []

    def add(self, name: str, value: Any = None, by: Optional[Dict[str, Any]] = None) -> None:
        kind, doc, label = self.table[name]
        if kind == "counter":
            fam: Metric = CounterMetricFamily(name, doc, labels=[label] if label else None)
        else:
            fam = GaugeMetricFamily(name, doc, labels=[label] if label else None)
        if by is not None:
            for key, v in by.items():
                fam.add_metric([key], float(v or 0))  # type: ignore[attr-defined]
        elif value is not None:
            fam.add_metric([], float(value))  # type: ignore[attr-defined]
        self.out.append(fam)

    def histogram(self, name: str, hist: Dict[str, Any]) -> None:
        self.out.append(HistogramMetricFamily(name, self.table[name][1], buckets=list(hist["buckets"].items()),
                                              sum_value=hist["sum"]))


def _describe(table: Dict[str, Tuple[str, str, Optional[str]]]) -> Iterator[Metric]:
    for name, (kind, doc, label) in table.items():
        labels = [label] if label else None
        if kind == "histogram":
            yield HistogramMetricFamily(name, doc, labels=labels)
        elif kind == "counter":
            yield CounterMetricFamily(name, doc, labels=labels)
        else:
            yield GaugeMetricFamily(name, doc, labels=labels)


class TrackerCollector:
    """A ``prometheus_client`` collector for one live ``SignalTracker``."""

    def __init__(self, tracker: Any) -> None:
        self.tracker = tracker

    def describe(self) -> Iterator[Metric]:
        return _describe(TRACKER_METRICS)

    def collect(self) -> Iterator[Metric]:
        return iter(self.families(self.tracker.stats()))

    @staticmethod
    def families(st: Dict[str, Any]) -> List[Metric]:
        """The metric families for one ``stats()`` snapshot."""
        f = _Families(TRACKER_METRICS)
        f.add("argo_signals_logged_total", st["logged"])
        f.add("argo_signals_persisted_total", by={t: st["persisted_by"].get(t, 0) for t in PERSIST_TRIGGERS})
        for key in ("duplicates", "rejected", "fallback_writes", "write_retries", "transactions",
                    "writer_restarts", "unknown_updates", "spilled", "replayed", "unsaved"):
            f.add(f"argo_signals_{key}_total", st[key])
        f.add("argo_signals_spill_bad_lines_total", st["spill_bad"])
        f.add("argo_signals_flushes_total", by=st["flushes"])
        f.add("argo_signals_queue_depth", st["pending"])
        f.add("argo_signals_writer_state", by={s: s == st["state"] for s in WRITER_STATES})
        f.add("argo_signals_spill_lines", st["spill_pending"])
        f.histogram("argo_signals_time_to_durable_seconds", st["time_to_durable_s"])
        outcomes = st["sync_outcomes"]
        f.add("argo_signals_sync_enabled", st["sync_enabled"])
        f.add("argo_signals_sync_delivered_total", outcomes.get("synced", 0))
        f.add("argo_signals_sync_rejected_total", outcomes.get("rejected", 0))
        f.add("argo_signals_sync_skipped_total", outcomes.get("skipped", 0))
        f.add("argo_signals_sync_failed_total", by={r: outcomes.get(r, 0) for r in SYNC_FAILURES})
        f.add("argo_signals_sync_retries_total", st["sync_retries"])
        f.histogram("argo_signals_sync_lag_seconds", st["sync_delivery_lag_s"])
        # read from the database: when it could not be read, no sample (unknown, not 0)
        readable = st.get("database_readable", True)
        f.add("argo_signals_database_up", readable)
        f.add("argo_signals_sync_pending", st["sync_pending"] if readable else None)
        f.add("argo_signals_signals", by={s: st["synced" if s == "synced" else f"sync_{s}"] for s in SYNC_STATUSES}
              if readable else None)
        f.add("argo_signals_oldest_pending_age_seconds", max(0.0, st["sync_lag_s"] or 0.0) if readable else None)
        f.add("argo_signals_sync_breaker_open", st["sync_breaker"] in ("open", "half_open"))
        return f.out


class DatabaseCollector:
    """A collector reading a database's state at each scrape (``dbstate.read_state``)."""

    def __init__(self, db_path: str) -> None:
        self.db_path = db_path

    def describe(self) -> Iterator[Metric]:
        return _describe(DATABASE_METRICS)

    def collect(self) -> Iterator[Metric]:
        f = _Families(DATABASE_METRICS)
        try:
            state = read_state(self.db_path)
        except (sqlite3.Error, OSError) as exc:
            log.warning("cannot read %s for metrics: %s", self.db_path, exc)
            f.add("argo_signals_database_up", 0)
            return iter(f.out)
        f.add("argo_signals_database_up", 1)
        f.add("argo_signals_signals", by=state.by_status)
        f.add("argo_signals_oldest_pending_age_seconds", state.oldest_pending_age_s)
        f.add("argo_signals_refused_rows", state.refused_rows)
        f.add("argo_signals_spill_lines", state.spill_lines)
        f.add("argo_signals_waiting_updates", state.waiting_updates)
        f.add("argo_signals_last_commit_timestamp_seconds", state.last_commit_at or 0)
        f.add("argo_signals_last_sync_error_timestamp_seconds", state.last_sync_error_at or 0)
        return iter(f.out)


def exposition(*collectors: Any) -> bytes:
    """The text exposition format of these collectors (a registry of their own)."""
    registry = CollectorRegistry(auto_describe=True)
    for c in collectors:
        registry.register(c)
    return generate_latest(registry)


class MetricsServer:
    """Serves ``exposition(*collectors)`` on ``GET /metrics`` from a background thread."""

    def __init__(self, host: str, port: int, *collectors: Any) -> None:
        registry = CollectorRegistry(auto_describe=True)
        for c in collectors:
            registry.register(c)

        class Handler(BaseHTTPRequestHandler):
            timeout = REQUEST_TIMEOUT   # an idle connection must not hold a thread for ever

            def do_GET(self) -> None:
                if self.path.split("?")[0] != "/metrics":
                    body, status, ctype = b"see /metrics\n", 404, "text/plain; charset=utf-8"
                else:
                    body, status, ctype = generate_latest(registry), 200, CONTENT_TYPE_LATEST
                self.send_response(status)
                self.send_header("Content-Type", ctype)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: Any) -> None:
                pass

        class Server(ThreadingHTTPServer):
            daemon_threads = True
            address_family = socket.AF_INET6 if ":" in host else socket.AF_INET

        self.httpd = Server((host, port), Handler)
        self.address = self.httpd.server_address
        self._thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.2},
                                        name="argo-signals-metrics", daemon=True)

    def start(self) -> "MetricsServer":
        self._thread.start()
        return self

    def stop(self, timeout: float = 5.0) -> None:
        if self._thread.is_alive():
            self.httpd.shutdown()
        self.httpd.server_close()
        self._thread.join(timeout)
