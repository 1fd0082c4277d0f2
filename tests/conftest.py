import os
import sqlite3
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def make_signal(i=0, **over):
    sig = {"symbol": "AAPL" if i % 2 else "BTC-USD", "action": "BUY" if i % 3 else "SELL",
           "entry_price": 100.0 + i * 0.01, "target_price": 110.0 + i * 0.01,
           "stop_price": 95.0, "confidence": 50 + i % 50, "strategy": "momentum"}
    sig.update(over)
    return sig


def rows(db, where="1", params=()):
    conn = sqlite3.connect(str(db))
    conn.row_factory = sqlite3.Row
    try:
        return [dict(r) for r in conn.execute(f"SELECT * FROM signals WHERE {where} ORDER BY id", params)]
    except sqlite3.OperationalError:
        return []
    finally:
        conn.close()


def count(db, table="signals"):
    if not Path(db).exists():
        return 0
    conn = sqlite3.connect(str(db))
    try:
        return conn.execute(f"SELECT count(*) FROM {table}").fetchone()[0]
    except sqlite3.OperationalError:
        return 0
    finally:
        conn.close()


def wait_for(pred, timeout=5.0, step=0.01):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return True
        time.sleep(step)
    return pred()


def produce_in_threads(tracker, threads, per_thread, tag):
    """`threads` producers each log `per_thread` signals tagged (strategy=tag+k, metadata seq=i)."""
    import threading

    def produce(k):
        for i in range(per_thread):
            tracker.log_signal(make_signal(i, strategy=f"{tag}{k}", metadata={"seq": i}))
    workers = [threading.Thread(target=produce, args=(k,)) for k in range(threads)]
    for w in workers:
        w.start()
    for w in workers:
        w.join()


def seqs_of(all_rows, strategy):
    import json
    return [json.loads(r["metadata"])["seq"] for r in all_rows if r["strategy"] == strategy]


class LineReader:
    """Read a subprocess's stdout lines with a timeout (a blocking readline could hang the suite)."""

    def __init__(self, stream):
        import queue
        import threading
        self._lines = queue.Queue()

        def pump():
            for line in stream:
                self._lines.put(line)
            self._lines.put(None)
        threading.Thread(target=pump, daemon=True).start()

    def readline(self, timeout=10.0):
        import queue
        try:
            line = self._lines.get(timeout=timeout)
        except queue.Empty:
            raise AssertionError(f"no output line within {timeout}s") from None
        return "" if line is None else line


def run_script(code, *args, timeout=60, env=None, **kw):
    """Run ``code`` in a fresh interpreter (real process) and return the CompletedProcess."""
    full_env = dict(os.environ)
    full_env["PYTHONPATH"] = str(ROOT) + os.pathsep + full_env.get("PYTHONPATH", "")
    full_env.update(env or {})
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code), *map(str, args)],
                          capture_output=True, text=True, timeout=timeout, env=full_env, **kw)


def spawn_script(code, *args, env=None, **kw):
    full_env = dict(os.environ)
    full_env["PYTHONPATH"] = str(ROOT) + os.pathsep + full_env.get("PYTHONPATH", "")
    full_env.update(env or {})
    return subprocess.Popen([sys.executable, "-c", textwrap.dedent(code), *map(str, args)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=full_env, **kw)


@pytest.fixture
def db(tmp_path):
    return tmp_path / "signals.db"


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch):
    for name in ("ALPINE_API_URL", "ARGO_API_KEY", "ALPINE_SYNC_ENABLED", "ARGO_SIGNALS_DB"):
        monkeypatch.delenv(name, raising=False)


# In a test script: the child's wait status, or "hung" (then killed) if it has not ended in time.
WAIT_CHILD = """
def wait_child(pid, seconds):
    import os, signal, time
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            return status
        time.sleep(0.01)
    os.kill(pid, signal.SIGKILL)
    os.waitpid(pid, 0)
    return "hung"
"""
