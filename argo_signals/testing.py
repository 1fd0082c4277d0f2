"""A loopback receiver that behaves like the Alpine ingest endpoint, for tests and the benchmark.

It checks the API key, decodes and validates the body, detects duplicates by hash before
verifying the hash, applies the receiver's storage checks, and stores in memory.  Faults can be
injected: queued answers (e.g. 500s, 429 with Retry-After, 401), a delay before answering, and
going down (connections refused until ``start()`` again).

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

from .sync import HEALTH_PATH, SIGNAL_PATH

__all__ = ["AlpineServer", "receiver_hash", "free_port", "SIGNAL_PATH", "HEALTH_PATH"]


def receiver_hash(body: Dict[str, Any]) -> str:
    """The hash as the receiver recomputes it from a parsed request body."""
    target = body.get("target_price") if body.get("target_price") is not None else body.get("take_profit")
    stop = body.get("stop_price") if body.get("stop_price") is not None else body.get("stop_loss")
    fields = {
        "signal_id": body["signal_id"], "symbol": body["symbol"], "action": body["action"].upper(),
        "entry_price": float(body["entry_price"]),
        "target_price": float(target) if target is not None else None,
        "stop_price": float(stop) if stop is not None else None,
        "confidence": float(body["confidence"]),
        "strategy": body["strategy"] if "strategy" in body else "weighted_consensus_v6",
        "timestamp": body["timestamp"],
    }
    return hashlib.sha256(json.dumps(fields, sort_keys=True, default=str).encode("utf-8")).hexdigest()


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    disable_nagle_algorithm = True  # headers and body are separate writes: avoid 40 ms ACK stalls

    def log_message(self, *args: Any) -> None:  # keep test output quiet
        pass

    def _answer(self, status: int, body: Any, headers: Optional[Dict[str, str]] = None) -> None:
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self) -> None:
        if self.path == HEALTH_PATH:
            return self._answer(200, {"status": "healthy"})
        self._answer(404, {"detail": "Not Found"})

    def do_POST(self) -> None:
        srv: AlpineServer = self.server.alpine  # type: ignore[attr-defined]
        length = int(self.headers.get("Content-Length") or 0)
        raw = self.rfile.read(length)
        if self.path != SIGNAL_PATH:
            return self._answer(404, {"detail": "Not Found"})
        srv.record_request(self.headers, raw)
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
        symbol = str(body["symbol"]).strip()
        reasoning = body.get("reasoning")
        bad = (not symbol or len(symbol) > 20 or float(body["entry_price"]) <= 0
               or any(body.get(f) is not None and float(body[f]) <= 0 for f in ("target_price", "stop_price"))
               or (reasoning and len(reasoning.strip()) < 20))
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

    def record_request(self, headers: Any, raw: bytes) -> None:
        with self.lock:
            self.requests.append({"time": time.monotonic(), "headers": dict(headers), "raw": raw})

    def fail(self, status: int, times: int = 1, body: Any = None,
             headers: Optional[Dict[str, str]] = None) -> None:
        """Answer the next ``times`` requests with ``status`` (before any check)."""
        with self.lock:
            for _ in range(times):
                self.faults.append((status, body or {"detail": f"injected {status}"}, headers or {}))

    def next_fault(self) -> Optional[Tuple[int, Any, Dict[str, str]]]:
        with self.lock:
            return self.faults.pop(0) if self.faults else None

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
