"""A loopback receiver that behaves like the Alpine ingest endpoint, for tests and the benchmark.

It checks the API key, decodes and validates the body, detects duplicates by hash before
verifying the hash, applies the receiver's storage checks (from ``alpine.REFUSALS``, symbol
length after upper-casing), and stores in memory.  Faults can be injected: queued answers
(e.g. 500s, 429 with Retry-After, 401, raw unparseable bodies), redirects (``redirect()``), a
receiver that echoes the key it was sent in its error answers (``echo_key = True``), a delay
before answering, going down (connections refused until ``start()`` again), and a proxy in
front of a down backend (``outage = (502, b"<html>...", {})``: every request, health checks
included, gets that answer until ``outage = None``).

    >>> from argo_signals.testing import AlpineServer
    >>> server = AlpineServer(api_key="k").start()
    >>> server.url.startswith("http://127.0.0.1:")
    True
    >>> server.stop()

``python -m argo_signals.testing [--port N] [--api-key K]`` serves until killed and prints its
URL on the first line of stdout.
"""
import argparse
import hashlib
import json
import sys
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from typing import Any, Dict, List, Optional, Tuple

from .alpine import HEALTH_PATH, SIGNAL_PATH, hash_fields, refusal

__all__ = ["AlpineServer", "receiver_hash", "free_port", "SIGNAL_PATH", "HEALTH_PATH"]


def receiver_hash(body: Dict[str, Any]) -> str:
    """The hash as the receiver recomputes it from a parsed request body."""
    return hashlib.sha256(json.dumps(hash_fields(body), sort_keys=True, default=str).encode("utf-8")).hexdigest()


def storage_refuses(body: Dict[str, Any]) -> bool:
    """The receiver's checks after the hash (its storage model), answered with a 500."""
    stored = {**body, "symbol": str(body["symbol"]),
              "target_price": body.get("target_price") or body.get("take_profit"),   # the receiver uses `or`
              "stop_price": body.get("stop_price") or body.get("stop_loss")}
    for k in ("entry_price", "target_price", "stop_price"):
        if stored[k] is not None:
            stored[k] = float(stored[k])
    return refusal(stored) is not None


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    disable_nagle_algorithm = True  # headers and body are separate writes: avoid 40 ms ACK stalls

    def log_message(self, *args: Any) -> None:  # keep test output quiet
        pass

    def _answer(self, status: int, body: Any, headers: Optional[Dict[str, str]] = None) -> None:
        srv: AlpineServer = self.server.alpine  # type: ignore[attr-defined]
        if srv.echo_key and status >= 300 and isinstance(body, dict):
            # a hostile or careless receiver: repeat the key it was sent in its error answer
            body = {**body, "detail": f"{body.get('detail')} (X-API-Key: {self.headers.get('X-API-Key')})"}
        data = body if isinstance(body, bytes) else json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self) -> None:
        srv: AlpineServer = self.server.alpine  # type: ignore[attr-defined]
        outage = srv.outage
        if outage is not None:
            srv.outage_answers += 1
            return self._answer(*outage)
        if self.path == HEALTH_PATH:
            srv.health_checks += 1
            return self._answer(200, {"status": "healthy"})
        srv.record_request(self.headers, b"", "GET")
        self._answer(404, {"detail": "Not Found"})

    def do_POST(self) -> None:
        srv: AlpineServer = self.server.alpine  # type: ignore[attr-defined]
        length = int(self.headers.get("Content-Length") or 0)
        raw = self.rfile.read(length)
        if self.path != SIGNAL_PATH:
            return self._answer(404, {"detail": "Not Found"})
        srv.record_request(self.headers, raw, "POST")
        outage = srv.outage
        if outage is not None:
            srv.outage_answers += 1
            return self._answer(*outage)
        if srv.delay:
            time.sleep(srv.delay)
        fault = srv.next_fault()
        if fault is not None:
            status, body, headers = fault
            return self._answer(status, body, headers)
        if self.headers.get("Content-Type", "").split(";")[0].strip() != "application/json":
            return self._answer(422, {"detail": "body not parsed: Content-Type must be application/json"})
        try:
            body = json.loads(raw)
            assert isinstance(body, dict)
        except (ValueError, AssertionError):
            return self._answer(422, {"detail": [{"msg": "invalid JSON"}]})
        key = self.headers.get("X-API-Key")
        if not key:
            return self._answer(401, {"detail": "Missing X-API-Key header"})
        if key != srv.api_key:
            return self._answer(401, {"detail": "Invalid API key"})
        problems = []
        for f in ("signal_id", "symbol", "action", "entry_price", "confidence", "timestamp", "sha256"):
            if f not in body or body[f] is None:
                problems.append({"loc": ["body", f], "msg": "Field required"})
        if problems:
            return self._answer(422, {"detail": problems})
        if str(body["action"]).upper() not in ("BUY", "SELL"):
            return self._answer(422, {"detail": [{"loc": ["body", "action"], "msg": "BUY or SELL"}]})
        try:
            conf = float(body["confidence"])
            float(body["entry_price"])
        except (TypeError, ValueError):
            return self._answer(422, {"detail": [{"msg": "not a number"}]})
        if not 0 <= conf <= 100:
            return self._answer(422, {"detail": [{"loc": ["body", "confidence"], "msg": "0-100"}]})
        sent = body.get("verification_hash") or body["sha256"]
        with srv.lock:
            if sent in srv.stored:
                srv.duplicates += 1
                return self._answer(201, {"status": "duplicate", "signal_id": srv.stored[sent]["id"]})
        if receiver_hash(body) != sent:
            return self._answer(400, {"detail": "Signal hash verification failed"})
        bad = storage_refuses(body)
        if bad:
            return self._answer(500, {"detail": "Failed to store signal: check constraint"})
        with srv.lock:
            if sent in srv.stored:
                return self._answer(201, {"status": "duplicate", "signal_id": srv.stored[sent]["id"]})
            rid = len(srv.stored) + 1
            srv.stored[sent] = {"id": rid, "body": body}
            srv.stored_order.append(body["signal_id"])
        self._answer(201, {"status": "success", "signal_id": rid, "external_signal_id": body["signal_id"]})


class AlpineServer:
    def __init__(self, api_key: str = "test-key-123", port: int = 0) -> None:
        self.api_key = api_key
        self.lock = threading.Lock()
        self.stored: Dict[str, Dict[str, Any]] = {}
        self.stored_order: List[str] = []
        self.requests: List[Dict[str, Any]] = []
        self.duplicates = 0
        self.faults: List[Tuple[int, Any, Dict[str, str]]] = []
        self.delay = 0.0
        self.echo_key = False
        self.health_checks = 0
        self.outage: Optional[Tuple[int, Any, Dict[str, str]]] = None   # a proxy answering for a down backend
        self.outage_answers = 0
        self.port = port
        self._httpd: Optional[ThreadingHTTPServer] = None
        self._thread: Optional[threading.Thread] = None

    def __repr__(self) -> str:
        return f"AlpineServer({self.url!r})"

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> "AlpineServer":
        class Server(ThreadingHTTPServer):  # noqa: D401
            daemon_threads = True
            allow_reuse_address = True
        self._httpd = Server(("127.0.0.1", self.port), _Handler)
        self._httpd.alpine = self  # type: ignore[attr-defined]
        self.port = self._httpd.server_address[1]
        self._thread = threading.Thread(target=self._httpd.serve_forever, kwargs={"poll_interval": 0.05},
                                        daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        """Go down: stop accepting; connections are refused until start() again."""
        if self._httpd is not None:
            self._httpd.shutdown()
            self._httpd.server_close()
            self._httpd = None

    def record_request(self, headers: Any, raw: bytes, method: str = "POST") -> None:
        with self.lock:
            self.requests.append({"time": time.monotonic(), "headers": dict(headers), "raw": raw,
                                  "method": method})

    def fail(self, status: int, times: int = 1, body: Any = None,
             headers: Optional[Dict[str, str]] = None) -> None:
        """Answer the next ``times`` requests with ``status`` (before any check).

        ``body`` is sent as JSON, or as is when it is ``bytes`` (e.g. an unparseable answer).
        """
        with self.lock:
            for _ in range(times):
                self.faults.append((status, body or {"detail": f"injected {status}"}, headers or {}))

    def next_fault(self) -> Optional[Tuple[int, Any, Dict[str, str]]]:
        with self.lock:
            return self.faults.pop(0) if self.faults else None

    def redirect(self, location: str, status: int = 307, times: int = 1) -> None:
        """Answer the next ``times`` requests with a redirect to ``location``."""
        self.fail(status, times, body={"detail": "moved"}, headers={"Location": location})

    def stored_ids(self) -> List[str]:
        with self.lock:
            return list(self.stored_order)


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _serve() -> None:  # pragma: no cover - exercised by the benchmark
    parser = argparse.ArgumentParser(description="A loopback Alpine-contract receiver.")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--api-key", default="bench-key")
    args = parser.parse_args()
    server = AlpineServer(args.api_key, port=args.port).start()
    sys.stdout.write(server.url + "\n")
    sys.stdout.flush()
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        server.stop()


if __name__ == "__main__":  # pragma: no cover
    _serve()
