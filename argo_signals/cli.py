"""The ``argo-signals`` command line (click): demo, ingest, status, tail, export, report, sync, verify, bench,
metrics."""
from __future__ import annotations

import csv
import functools
import io
import itertools
import json
import logging
import math
import os
import signal as _signal
import re
import sqlite3
import sys
import threading
import time
import uuid
from contextlib import contextmanager
from typing import Any, Callable, Dict, Iterable, Iterator, List, Optional, Tuple, TypeVar, Union

import click

from . import spill
from .config import env_flag
from .outcomes import read_last_error
from .safetext import escape_controls
from .record import FIELDS, HASH_FIELDS, RESERVED_COLUMNS, SignalValidationError, alpine_hash, normalise, recheck
from .sink import UNSAVED_PREFIX
from .stats import percentile
from .store import SYNC_STATUSES, ForeignDatabaseError, connect_readonly
from .tracker import SignalTracker, database_state, default_db_path, sync_state

_F = TypeVar("_F", bound=Callable[..., Any])
_DB_HELP = "SQLite database file (may also come before the command)."
_DB_DEFAULT = "$ARGO_SIGNALS_DB or argo_signals.db"


def db_option(f: _F) -> _F:
    """``--db`` on a command; when absent, the group's ``--db``, then the environment."""
    @click.option("--db", "db_path", default=None, metavar="PATH", show_default=_DB_DEFAULT, help=_DB_HELP)
    @functools.wraps(f)
    def wrapper(*args: Any, db_path: Optional[str] = None, **kwargs: Any) -> Any:
        if db_path is None:
            db_path = (click.get_current_context().obj or {}).get("db_path") or default_db_path()
        return f(*args, db_path=db_path, **kwargs)
    return wrapper  # type: ignore[return-value]

class Number(click.ParamType):
    """A finite number of at least ``low`` (and at most ``high``): ``nan``, ``inf``, negative or
    huge values are refused with one line instead of hanging or overflowing later."""

    def __init__(self, kind: type, low: float = 0, high: float = 1e9) -> None:
        self.kind, self.low, self.high = kind, low, high
        self.name = "integer" if kind is int else "number"

    def convert(self, value: Any, param: Optional[click.Parameter], ctx: Optional[click.Context]) -> Any:
        number: Any
        if isinstance(value, self.kind) and not isinstance(value, bool):
            number = value
        else:
            try:
                number = self.kind(str(value).strip())
            except (TypeError, ValueError, OverflowError):
                self.fail(f"{value!r} is not a valid {self.name}", param, ctx)
        if not (isinstance(number, int) or math.isfinite(number)) or not self.low <= number <= self.high:
            self.fail(f"{value!r} is not a finite {self.name} in [{self.low:g}, {self.high:g}]", param, ctx)
        return number


SECONDS = Number(float)
COUNT = Number(int, 0, 2 ** 62)
POSITIVE = Number(int, 1, 2 ** 62)

json_option = click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
quiet_option = click.option("--quiet", "-q", is_flag=True, help="No progress bar.")


def _emit(data: Any, as_json: bool, text: Optional[str] = None) -> None:
    """Print ``data`` as JSON or ``text``; control characters that came from the database or
    the receiver are shown as escapes, line by line (the text's own line breaks stay)."""
    if as_json:
        click.echo(json.dumps(data, indent=2, default=_json_value))
    else:
        text = text if text is not None else "\n".join(f"{k}: {v}" for k, v in data.items())
        click.echo("\n".join(escape_controls(line) for line in text.split("\n")))


@contextmanager
def _progress(length: Optional[int], label: str, quiet: bool) -> Iterator[Any]:
    """click.progressbar on stderr, or a no-op when quiet or stderr is not a terminal."""
    if quiet or not sys.stderr.isatty():
        class _Null:
            def update(self, n: int) -> None:
                pass
        yield _Null()
        return
    bar: Any
    with click.progressbar(length=length, label=label, file=sys.stderr) as bar:
        yield bar


_NEEDED_COLUMNS = ("id", "signal_id", "symbol", "action", "entry_price", "target_price", "stop_price",
                   "confidence", "strategy", "timestamp", "sha256", "sync_status", "created_at")


def _json_value(value: Any) -> Any:
    """``json.dumps``' fallback: a BLOB (another program's write) as its SQL literal ``x'..'``."""
    if isinstance(value, (bytes, bytearray, memoryview)):
        return f"x'{bytes(value).hex()}'"
    return str(value)


def _open_existing(db_path: str) -> sqlite3.Connection:
    if not os.path.exists(db_path):
        raise click.ClickException(f"no database at {db_path}")
    try:
        conn = connect_readonly(db_path)
    except sqlite3.Error as exc:
        raise click.ClickException(f"cannot open {db_path} ({exc})") from None
    conn.row_factory = sqlite3.Row
    # text that is not valid UTF-8 (written by another program) is shown with U+FFFD, not raised
    conn.text_factory = lambda b: b.decode("utf-8", "replace")
    try:
        conn.execute(f"SELECT {', '.join(_NEEDED_COLUMNS)} FROM signals LIMIT 1")
    except sqlite3.Error as exc:
        conn.close()
        raise click.ClickException(f"{db_path} is not an argo-signals database ({exc})") from None
    return conn


class _Commands(click.Group):
    """The group: what ends a command early (a database of another program, an output that
    cannot be written, any message) is one line with control characters escaped, no traceback."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            result = super().invoke(ctx)
            sys.stdout.flush()  # a full disk or a closed pipe on stdout shows here, not at exit
            return result
        except click.ClickException as exc:
            exc.message = escape_controls(exc.message)  # type: ignore[misc]  # (keeps its exit code)
            raise
        except ForeignDatabaseError as exc:
            raise click.ClickException(escape_controls(exc)) from None
        except OSError as exc:
            _quiet_stdout()
            where = f" {os.fsdecode(exc.filename)}" if exc.filename else ""
            raise click.ClickException(escape_controls(f"cannot go on{where}: {exc.strerror or exc}")) from None


def _quiet_stdout() -> None:
    """After stdout failed: point it at /dev/null so that the flush at exit cannot fail again."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
    except (OSError, ValueError, io.UnsupportedOperation):
        pass


def _has_table(conn: sqlite3.Connection, name: str) -> bool:
    return conn.execute("SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = ?", (name,)).fetchone() is not None


@click.group(cls=_Commands, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="argo-signals")
@click.option("--verbose", "-v", is_flag=True, help="Log INFO messages too (default: warnings and errors).")
@click.option("--db", "db_path", default=None, metavar="PATH", show_default=_DB_DEFAULT,
              help="SQLite database file for the command (a --db after the command wins).")
@click.pass_context
def main(ctx: click.Context, verbose: bool, db_path: Optional[str]) -> None:
    """Durable trading-signal logging: SQLite first, then Alpine."""
    ctx.ensure_object(dict)["db_path"] = db_path
    logger = logging.getLogger("argo_signals")
    if not logger.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(levelname)s: %(message)s"))
        logger.addHandler(handler)
        logger.setLevel(logging.INFO if verbose else logging.WARNING)


# -- demo ---------------------------------------------------------------------------------------
@main.command()
@db_option
@click.option("--count", "-n", type=POSITIVE, default=2000, show_default=True, help="Signals to log in all.")
@click.option("--producers", "-k", type=Number(int, 1, 10_000), default=4, show_default=True, help="Producer threads.")
@click.option("--rate", type=SECONDS, default=0.0, show_default=True, help="Signals per second per producer (0: as fast as possible).")
@click.option("--alpine-url", default=None,
              help="Sync to this Alpine base URL (default $ALPINE_API_URL, else a local stand-in receiver).")
@click.option("--no-sync", is_flag=True, help="Do not sync: the rows stay pending.")
@json_option
@quiet_option
def demo(db_path: str, count: int, producers: int, rate: float, alpine_url: Optional[str],
         no_sync: bool, as_json: bool, quiet: bool) -> None:
    """Log realistic synthetic signals from several threads, close a share of them with an
    outcome (update_signal), sync them, and report what was persisted and synced.

    The signals carry simulated timestamps spread over the trading session before the run.
    Without --alpine-url or $ALPINE_API_URL they sync to a local stand-in receiver (the
    loopback one of argo_signals.testing), stopped at the end."""
    if count < 1 or producers < 1:
        raise click.BadParameter("--count and --producers must be >= 1")
    if no_sync and alpine_url is not None:
        raise click.BadParameter("--no-sync and --alpine-url exclude each other")
    stand_in = None
    if not no_sync and alpine_url is None and not os.environ.get("ALPINE_API_URL") \
            and env_flag("ALPINE_SYNC_ENABLED") is not False:
        from .testing import AlpineServer

        stand_in = AlpineServer(api_key=uuid.uuid4().hex).start()
    try:
        _demo(db_path, count, producers, rate, alpine_url, no_sync, stand_in, as_json, quiet)
    finally:
        if stand_in is not None:
            stand_in.stop()


def _demo(db_path: str, count: int, producers: int, rate: float, alpine_url: Optional[str], no_sync: bool,
          stand_in: Any, as_json: bool, quiet: bool) -> None:
    from datetime import datetime, timezone

    from .demo import outcome_picker, session_time, signals

    try:
        if stand_in is not None:
            tracker = SignalTracker(db_path, alpine_url=stand_in.url, api_key=stand_in.api_key,
                                    register_atexit=False)
        else:
            tracker = SignalTracker(db_path, alpine_url=alpine_url, sync_enabled=False if no_sync else None,
                                    register_atexit=False)
    except ValueError as exc:
        raise click.ClickException(str(exc)) from None
    session_end = datetime.now(timezone.utc)
    call_us: List[float] = []
    lock = threading.Lock()
    shares = [count // producers + (1 if k < count % producers else 0) for k in range(producers)]
    done = [0]
    closed = {"win": 0, "loss": 0}
    run_ids: List[str] = []

    def produce(k: int, n: int) -> None:
        gen = signals(seed=k)
        mine: List[float] = []
        pick = outcome_picker(seed=k)
        mine_closed = {"win": 0, "loss": 0}
        ids: List[str] = []
        gap = 1.0 / rate if rate > 0 else 0.0
        for j in range(n):
            if stop.is_set():
                break
            sig = next(gen)
            sig["timestamp"] = session_time(j * producers + k, count, session_end)
            t0 = time.perf_counter()
            sid = tracker.log_signal(sig)
            ids.append(sid)
            mine.append((time.perf_counter() - t0) * 1e6)
            fields = pick(sig)
            if fields is not None:  # the same queue: the update lands after its insert
                tracker.update_signal(sid, **fields)
                mine_closed[fields["outcome"]] += 1
            with lock:
                done[0] += 1
            if gap:
                stop.wait(gap)
        with lock:
            call_us.extend(mine)
            for key, n_closed in mine_closed.items():
                closed[key] += n_closed
            run_ids.extend(ids)

    stop = threading.Event()
    start = time.perf_counter()
    threads = [threading.Thread(target=produce, args=(k, n), daemon=True) for k, n in enumerate(shares)]
    try:
        for th in threads:
            th.start()
        with _progress(count, "logging", quiet) as bar:
            shown = 0
            while any(th.is_alive() for th in threads):
                time.sleep(0.05)
                bar.update(done[0] - shown)
                shown = done[0]
            bar.update(done[0] - shown)
        flushed = tracker.flush(60)
        elapsed = time.perf_counter() - start
        if tracker.sync_enabled:
            _wait_synced_with_bar(tracker, db_path, run_ids, quiet)
    except BaseException:  # Ctrl-C: what was logged is still committed before leaving
        stop.set()
        for th in threads:
            if th.is_alive():
                th.join(5)
        tracker.close(30)
        raise
    tracker.close(30)
    st = tracker.stats()
    call_us.sort()
    mine_sync = _run_sync_counts(db_path, run_ids)
    lag = _run_sync_lag_ms(db_path, run_ids)
    receiver = ("stand-in" if stand_in is not None else "alpine") if st["sync_enabled"] else None
    summary: Dict[str, Any] = {
        "database": db_path,
        "logged": st["logged"], "persisted": st["persisted"], "rejected": st["rejected"],
        "fallback_writes": st["fallback_writes"], "flushed": flushed,
        "rows_per_s": round(st["persisted"] / elapsed, 1) if elapsed else None,
        "log_signal_us": {"p50": _r(percentile(call_us, 0.5)), "p99": _r(percentile(call_us, 0.99))},
        "time_to_durable_ms": st["latency_ms"],
        "flushes": st["flushes"],
        "closed": {"wins": closed["win"], "losses": closed["loss"]},
        "sync": {"enabled": st["sync_enabled"], "receiver": receiver, **mine_sync, "lag_ms": lag},  # this run's
        "signal_time": {"since": session_time(0, count, session_end).isoformat(), "until": session_end.isoformat()},
    }
    sync_text = ("off (--no-sync or ALPINE_SYNC_ENABLED=false); rows stay pending" if not st["sync_enabled"] else
                 f"{mine_sync['synced']} synced, {mine_sync['pending']} pending, {mine_sync['skipped']} skipped, "
                 f"{mine_sync['rejected']} rejected, {mine_sync['failed']} failed (this run's signals); "
                 + ("nothing synced, no lag" if lag["p50"] is None else f"lag p50 {lag['p50']} ms, p99 {lag['p99']} ms"))
    if stand_in is not None:
        sync_text = (f"to a local stand-in receiver on 127.0.0.1:{stand_in.port}; pass --alpine-url for a real one"
                     f"\n    {sync_text}")
    text = (f"{summary['persisted']} of {summary['logged']} signals persisted to {db_path} "
            f"in {elapsed:.2f}s ({summary['rows_per_s']} rows/s)\n"
            f"  rejected: {summary['rejected']}   fallback writes: {summary['fallback_writes']}\n"
            f"  log_signal(): p50 {summary['log_signal_us']['p50']} us, p99 {summary['log_signal_us']['p99']} us\n"
            f"  time to durable: p50 {st['latency_ms']['p50']} ms, p99 {st['latency_ms']['p99']} ms\n"
            f"  flushes: {', '.join(f'{k} {v}' for k, v in st['flushes'].items())}\n"
            f"  signal timestamps: simulated, {summary['signal_time']['since'][:16]} to "
            f"{summary['signal_time']['until'][:16]} UTC (the session before this run)\n"
            f"  sync: " + sync_text
            + f"\n  closed with an outcome: {closed['win']} wins, {closed['loss']} losses (update_signal)"
            + f"\nsee it all on one page: argo-signals report --db {db_path} --open" + _report_extra_hint())
    _emit(summary, as_json, text)
    if summary["persisted"] + summary["rejected"] + st["duplicates"] != summary["logged"]:
        sys.exit(1)


def _report_extra_hint() -> str:
    from .report_html import EXTRA_HINT, charts_available

    return "" if charts_available() else f" (first: {EXTRA_HINT})"


_SYNC_STATES = ("synced", "pending", "skipped", "rejected", "failed")


def _run_sync_lag_ms(db_path: str, ids: List[str]) -> Dict[str, Optional[float]]:
    """p50/p99 of synced_at - created_at (ms) over the synced rows with these signal ids."""
    lags: List[float] = []
    try:
        conn = connect_readonly(db_path)
    except sqlite3.Error:
        return {"p50": None, "p99": None}
    try:
        for i in range(0, len(ids), 500):
            chunk = ids[i:i + 500]
            lags += [v for (v,) in conn.execute(
                "SELECT (julianday(synced_at) - julianday(created_at)) * 86400000.0 FROM signals WHERE "
                f"signal_id IN ({', '.join('?' * len(chunk))}) AND sync_status = 'synced' AND synced_at IS NOT NULL",
                chunk) if v is not None]
    except sqlite3.Error:
        pass
    finally:
        conn.close()
    lags.sort()
    return {"p50": _r(percentile(lags, 0.5)), "p99": _r(percentile(lags, 0.99))}


def _run_sync_counts(db_path: str, ids: List[str]) -> Dict[str, int]:
    """Counts by sync status of the rows with these signal ids."""
    out = dict.fromkeys(_SYNC_STATES, 0)
    try:
        conn = connect_readonly(db_path)
    except sqlite3.Error:
        return out
    try:
        for i in range(0, len(ids), 500):
            chunk = ids[i:i + 500]
            for status, n in conn.execute(
                    f"SELECT sync_status, count(*) FROM signals WHERE signal_id IN ({', '.join('?' * len(chunk))}) "
                    "GROUP BY sync_status", chunk):
                out[status] = out.get(status, 0) + n
    except sqlite3.Error:
        pass
    finally:
        conn.close()
    return out


def _wait_synced_with_bar(tracker: SignalTracker, db_path: str, ids: List[str], quiet: bool,
                          patience: float = 5.0) -> None:
    """The demo's sync phase: a bar over this run's signals until none is pending, or until
    nothing has moved for ``patience`` seconds."""
    last_move = time.monotonic()
    with _progress(len(ids), "syncing", quiet) as bar:
        shown = 0
        while True:
            counts = _run_sync_counts(db_path, ids)
            settled = len(ids) - counts["pending"]
            if settled > shown:
                bar.update(settled - shown)
                shown = settled
                last_move = time.monotonic()
            if counts["pending"] == 0 or time.monotonic() - last_move > patience:
                return
            tracker.wait_synced(0.1)


def _r(v: Optional[float]) -> Optional[float]:
    return None if v is None else round(v, 1)


# -- ingest -------------------------------------------------------------------------------------
@main.command()
@click.argument("source", type=click.File("rb"))
@db_option
@click.option("--csv", "as_csv", is_flag=True, help="SOURCE is CSV with a header row.")
@click.option("--dedupe", is_flag=True,
              help="Give records without a signal_id one derived from their content, so that "
                   "ingesting the same file again adds nothing.")
@click.option("--raw", is_flag=True, help="CSV: take cells literally (do not undo the ' that export adds).")
@click.option("--strict", is_flag=True, help="Stop at the first bad line.")
@click.option("--allow-rejects", is_flag=True,
              help="Exit 0 even when lines were skipped or rows refused (they are still reported).")
@json_option
@quiet_option
def ingest(source: io.BufferedIOBase, db_path: str, as_csv: bool, dedupe: bool, raw: bool, strict: bool,
           allow_rejects: bool, as_json: bool, quiet: bool) -> None:
    """Load signals from JSON Lines (or CSV) FILE, or - for stdin, through log_signal().

    Lines that close() printed as 'argo-signals-unsaved: {...}' (when neither the database
    nor the spill file could be written) are read as they are, prefix included.

    Exit 1 when a line was skipped or a row refused (unless --allow-rejects), or when not
    everything reached the database; exit 130 on Ctrl-C, after saying what was committed."""
    lines: Iterable[Tuple[int, Union[str, Exception]]] = _decoded_lines(source)
    if not as_csv:
        first, lines = _first_line(lines)
        if first is not None and _looks_like_csv_header(first[1]):
            raise click.ClickException(
                f"line {first[0]} of {getattr(source, 'name', 'SOURCE')} looks like a CSV header "
                f"({escape_controls(first[1].strip()[:60])}): pass --csv to read CSV")
    records = _csv_records(lines, raw) if as_csv else _jsonl_records(lines)
    good = bad = lineno = 0
    tracker = SignalTracker(db_path, register_atexit=False)
    try:
        with _progress(None, "ingesting", quiet) as bar:
            for lineno, record in records:
                try:
                    if isinstance(record, Exception):
                        raise record
                    if "update_of" in record:   # from an "argo-signals-unsaved:" line
                        tracker.update_signal(record["update_of"], **(record.get("fields") or {}))
                        good += 1
                        bar.update(1)
                        continue
                    signal = _strip_stored(record)
                    if dedupe and signal.get("signal_id") is None:
                        signal["signal_id"] = content_id(signal)
                    tracker.log_signal(signal)
                    good += 1
                except (SignalValidationError, TypeError, ValueError, RecursionError) as exc:
                    bad += 1
                    why = "nested too deeply; line skipped" if isinstance(exc, RecursionError) else exc
                    click.echo(f"line {lineno}: {escape_controls(why)}", err=True)
                    if strict:
                        break
                bar.update(1)
        ok = tracker.flush(60)
    except KeyboardInterrupt:
        tracker.close()  # what was handed over before Ctrl-C is committed (or spilled) now
        _interrupted(tracker.stats(), db_path, lineno, dedupe)
    finally:
        tracker.close()
    st = tracker.stats()
    summary = {"accepted": good, "bad_lines": bad, "persisted": st["persisted"],
               "already_stored": st["duplicates"], "rejected": st["rejected"], "flushed": ok}
    _emit(summary, as_json, f"{good} accepted ({st['persisted']} new, {st['duplicates']} already stored, "
                            f"{st['rejected']} rejected), {bad} bad lines")
    if not ok:
        sys.exit(1)
    if (bad or st["rejected"]) and not allow_rejects:
        click.echo(f"exit 1: {bad} lines skipped and {st['rejected']} rows refused "
                   "(see rejected_signals; --allow-rejects exits 0 for them)", err=True)
        sys.exit(1)


def _interrupted(st: Dict[str, Any], db_path: str, lineno: int, dedupe: bool) -> None:
    """Ctrl-C during ingest: say what is in the database and how to go on safely; exit 130."""
    text = (f"interrupted: {st['persisted']} rows committed to {db_path} ({st['duplicates']} were already there, "
            f"{st['rejected']} refused, {st['spill_pending']} waiting in the spill file) from lines 1-{lineno}; ")
    if dedupe:
        text += "running the same command again is safe: with --dedupe rows already stored are not added twice"
    else:
        text += (f"rows without a signal_id got new ids, so running this again would store them twice: go on from "
                 f"line {lineno + 1}, and pass --dedupe to make a rerun safe")
    click.echo(escape_controls(text), err=True)
    sys.exit(130)


_DEDUPE_NAMESPACE = uuid.uuid5(uuid.NAMESPACE_URL, "argo-signals:ingest")


def content_id(signal: Dict[str, Any]) -> str:
    """A signal_id derived from what ``log_signal()`` would store (a default timestamp left
    out): equal content, equal id.  Raises ``SignalValidationError`` like ``log_signal()``."""
    content = {name: value for name, value in zip(FIELDS, normalise(signal))
               if name != "signal_id" and not (name == "timestamp" and type(value) is float)}
    return str(uuid.uuid5(_DEDUPE_NAMESPACE, json.dumps(content, sort_keys=True)))


def _strip_stored(record: Dict[str, Any]) -> Dict[str, Any]:
    """Accept rows from `export` too: drop the columns the store computes itself."""
    out = {k: v for k, v in record.items() if k not in RESERVED_COLUMNS}
    meta = out.get("metadata")
    if isinstance(meta, str):
        try:
            out["metadata"] = json.loads(meta)
        except ValueError:
            pass
    return {k: v for k, v in out.items() if v is not None or k == "action"}


Line = Tuple[int, Union[str, Exception]]


MAX_LINE = 1 << 20  # bytes: a longer line is skipped (and read past) without holding it


def _raw_lines(source: Any) -> Iterator[Tuple[int, Union[bytes, Exception]]]:
    """(line number, bytes) per line; a line longer than ``MAX_LINE`` comes as a ValueError."""
    lineno = 0
    while True:
        data = source.readline(MAX_LINE + 1)
        if not data:
            return
        lineno += 1
        if len(data) > MAX_LINE and not data.endswith(b"\n"):
            size = len(data)
            while not data.endswith(b"\n"):
                data = source.readline(1 << 16)
                if not data:
                    break
                size += len(data)
            yield lineno, ValueError(f"longer than {MAX_LINE} bytes ({size} bytes); line skipped")
            continue
        yield lineno, data


def _decoded_lines(source: Any) -> Iterator[Line]:
    """(line number, text) per line; a line that is not UTF-8 or too long comes as a ValueError."""
    for lineno, data in _raw_lines(source):
        if isinstance(data, Exception):
            yield lineno, data
            continue
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError as exc:
            yield lineno, ValueError(f"not valid UTF-8 (byte {data[exc.start]:#04x} at column "
                                     f"{exc.start + 1}); line skipped")
            continue
        yield lineno, (text[1:] if lineno == 1 and text.startswith("\ufeff") else text)


def _first_line(lines: Iterable[Line]) -> Tuple[Optional[Tuple[int, str]], Iterator[Line]]:
    """The first non-blank decoded line (if it comes before any undecodable one), and all lines."""
    it = iter(lines)
    seen: List[Line] = []
    for item in it:
        seen.append(item)
        text = item[1]
        if isinstance(text, Exception):
            break
        if text.strip():
            return (item[0], text), itertools.chain(seen, it)
    return None, itertools.chain(seen, it)


def _looks_like_csv_header(text: str) -> bool:
    text = text.strip()
    if not text or text[0] in "{[":
        return False
    names = [n.strip().lower() for n in next(csv.reader([text]), [])]
    return len(names) > 1 and "symbol" in names


def _jsonl_records(lines: Iterable[Line]) -> Iterator[Any]:
    for lineno, line in lines:
        if isinstance(line, Exception):
            yield lineno, line
            continue
        if not line.strip():
            continue
        if line.startswith(UNSAVED_PREFIX):  # what close() printed when nothing was writable
            line = line[len(UNSAVED_PREFIX):]
        try:
            obj = json.loads(line)
        except ValueError as exc:
            yield lineno, ValueError(f"not valid JSON ({exc})")
            continue
        except RecursionError:
            yield lineno, ValueError("nested too deeply for JSON; line skipped")
            continue
        if not isinstance(obj, dict):
            yield lineno, TypeError("not a JSON object")
            continue
        yield lineno, obj


def _csv_records(lines: Iterable[Line], raw: bool) -> Iterator[Any]:
    errors: List[Line] = []
    at = [0]

    def texts() -> Iterator[str]:
        for lineno, text in lines:
            at[0] = lineno
            if isinstance(text, Exception):
                errors.append((lineno, text))
            else:
                yield text
    reader = csv.DictReader(texts())
    while True:
        try:
            rec = next(reader)
        except StopIteration:
            break
        except csv.Error as exc:  # e.g. a field over the csv module's size limit
            yield from errors
            errors.clear()
            yield at[0], ValueError(f"not valid CSV ({exc}); line skipped")
            continue
        yield from errors
        errors.clear()
        yield at[0], {k: (None if v is None or v == "" else v if raw else unescape_cell(v))
                      for k, v in rec.items() if k is not None}
    yield from errors


# A spreadsheet runs a cell starting with one of these as a formula; export puts a ' before it
# (and before a leading ' itself, so that ingest can undo exactly that).
_FORMULA_START = ("=", "+", "-", "@", "\t", "\r", "'")


def escape_cell(value: Any) -> Any:
    """A CSV cell a spreadsheet shows as text: ``'`` before text starting with = + - @ TAB CR '."""
    return "'" + value if type(value) is str and value.startswith(_FORMULA_START) else value


def unescape_cell(text: str) -> str:
    """Undo ``escape_cell()``."""
    return text[1:] if text.startswith("'") and text[1:].startswith(_FORMULA_START) else text


# -- status / tail / export -----------------------------------------------------------------------
@main.command()
@db_option
@json_option
def status(db_path: str, as_json: bool) -> None:
    """Counts by sync status, oldest/newest signal, spill file, size and journal mode."""
    conn = _open_existing(db_path)
    try:
        total = conn.execute("SELECT count(*) FROM signals").fetchone()[0]
        first = conn.execute("SELECT timestamp, created_at FROM signals ORDER BY id LIMIT 1").fetchone()
        last = conn.execute("SELECT timestamp, created_at FROM signals ORDER BY id DESC LIMIT 1").fetchone()
        journal = conn.execute("PRAGMA journal_mode").fetchone()[0]
        rejected = (conn.execute("SELECT count(*) FROM rejected_signals").fetchone()[0]
                    if _has_table(conn, "rejected_signals") else 0)  # another program's file
        last_error = read_last_error(conn)
    finally:
        conn.close()
    st = database_state(db_path)   # sync counts and waiting updates, one connection
    waiting = {k: st[k] for k in ("waiting_updates", "waiting_update_oldest_s")}
    size = sum(os.path.getsize(p) for p in (db_path, db_path + "-wal") if os.path.exists(p))
    data = {"database": db_path, "signals": total,
            "by_sync_status": {"pending": st["sync_pending"], "synced": st["synced"],
                               "rejected": st["sync_rejected"], "skipped": st["sync_skipped"],
                               "failed": st["sync_failed"]},
            "oldest_signal": first["timestamp"] if first else None,
            "newest_signal": last["timestamp"] if last else None,
            "last_written": last["created_at"] if last else None,
            "refused_rows": rejected,
            "spill_pending": spill.pending_count(spill.spill_path(db_path)),
            **waiting,
            "size_bytes": size, "journal_mode": journal, "sync_lag_s": st["sync_lag_s"],
            "last_sync_error": last_error}
    by = data["by_sync_status"]
    text = (f"{db_path}: {total} signals ({size / 1024:.0f} KiB, journal {journal})\n"
            f"  sync: {by['pending']} pending, {by['synced']} synced, {by['skipped']} skipped, "
            f"{by['rejected']} rejected, {by['failed']} failed; "
            f"lag {'-' if st['sync_lag_s'] is None else str(st['sync_lag_s']) + ' s'}\n"
            f"  oldest {data['oldest_signal']}, newest {data['newest_signal']}\n"
            f"  refused rows (rejected_signals): {rejected}; spill file lines: {data['spill_pending']}\n"
            f"  updates waiting for their insert: {waiting['waiting_updates']}"
            + (f" (oldest {waiting['waiting_update_oldest_s']:.0f} s)\n"
               if waiting["waiting_update_oldest_s"] is not None else "\n") +
            "  last sync error: " + (f"{last_error['error']} (at {last_error['at']})" if last_error else "none"))
    _emit(data, as_json, text)


MIN_INTERVAL = 0.1  # tail --follow polls no more often than this (s)
TAIL_COLUMNS = ("id", "timestamp", "symbol", "action", "entry_price", "confidence", "strategy", "sync_status")
# Starting widths, so that rows printed later by --follow line up with the header.
_TAIL_WIDTHS = (6, 32, 10, 7, 11, 10, 16, 11)


def _cell(value: Any) -> str:
    """A value as one line of plain text: control characters (ESC, CR, TAB...) are escaped."""
    text = "" if value is None else str(value)
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() else c.encode("unicode_escape").decode("ascii") for c in text)


def _line(values: List[str], widths: List[int]) -> str:
    return "  ".join(v.ljust(w) for v, w in zip(values, widths)).rstrip()


def _table(records: List[sqlite3.Row]) -> Tuple[str, List[int]]:
    cells = [[_cell(r[c]) for c in TAIL_COLUMNS] for r in records]
    widths = [max([len(c), w] + [len(row[i]) for row in cells])
              for i, (c, w) in enumerate(zip(TAIL_COLUMNS, _TAIL_WIDTHS))]
    return "\n".join([_line(list(TAIL_COLUMNS), widths)] + [_line(row, widths) for row in cells]), widths


@main.command()
@db_option
@click.option("-n", "limit", type=COUNT, default=20, show_default=True, help="How many rows.")
@click.option("--symbol", default=None, help="Only this symbol.")
@click.option("--follow", "-f", is_flag=True, help="Keep printing new rows until Ctrl-C.")
@click.option("--interval", type=SECONDS, default=1.0, show_default=True,
              help=f"Polling interval for --follow (s); at least {MIN_INTERVAL}.")
@json_option
def tail(db_path: str, limit: int, symbol: Optional[str], follow: bool, interval: float, as_json: bool) -> None:
    """The newest signals as a table."""
    conn = _open_existing(db_path)
    where, params = ("WHERE symbol = ?", [symbol]) if symbol else ("", [])
    recs = conn.execute(f"SELECT * FROM signals {where} ORDER BY id DESC LIMIT ?", params + [limit]).fetchall()
    recs.reverse()
    widths = list(_TAIL_WIDTHS)
    if as_json:
        for r in recs:
            click.echo(json.dumps(dict(r), default=_json_value))
    else:
        text, widths = _table(recs)
        click.echo(text)
    last = recs[-1]["id"] if recs else 0
    try:
        while follow:
            time.sleep(max(interval, MIN_INTERVAL))
            cond = "WHERE id > ?" + (" AND symbol = ?" if symbol else "")
            new = conn.execute(f"SELECT * FROM signals {cond} ORDER BY id", [last] + ([symbol] if symbol else [])).fetchall()
            for r in new:
                click.echo(json.dumps(dict(r), default=_json_value) if as_json else _line([_cell(r[c]) for c in TAIL_COLUMNS], widths))
                last = r["id"]
    except KeyboardInterrupt:
        pass
    finally:
        conn.close()


@main.command()
@db_option
@click.option("--format", "fmt", type=click.Choice(["jsonl", "csv"]), default="jsonl", show_default=True)
@click.option("--since", default=None, help="Signals with timestamp >= this ISO time.")
@click.option("--until", default=None, help="Signals with timestamp < this ISO time.")
@click.option("--symbol", default=None)
@click.option("--status", "sync_status", type=click.Choice(SYNC_STATUSES), default=None,
              help="Only rows with this sync status.")
@click.option("--raw", is_flag=True, help="CSV: write text exactly as stored (no ' before = + - @).")
@click.option("-o", "--output", type=click.File("w", encoding="utf-8"), default="-", help="Output file (default stdout).")
def export(db_path: str, fmt: str, since: Optional[str], until: Optional[str], symbol: Optional[str],
           sync_status: Optional[str], raw: bool, output: io.TextIOBase) -> None:
    """Write signals as JSON Lines or CSV.

    In CSV, text starting with = + - @ TAB CR or ' gets a leading ' so that a spreadsheet
    shows it instead of running it as a formula; `ingest --csv` removes it again."""
    from .record import format_timestamp

    clauses, params = [], []
    try:
        if since:
            clauses.append("timestamp >= ?")
            params.append(format_timestamp(since, "--since"))
        if until:
            clauses.append("timestamp < ?")
            params.append(format_timestamp(until, "--until"))
    except SignalValidationError as exc:
        raise click.BadParameter(str(exc)) from None
    if symbol:
        clauses.append("symbol = ?")
        params.append(symbol)
    if sync_status:
        clauses.append("sync_status = ?")
        params.append(sync_status)
    conn = _open_existing(db_path)
    where = ("WHERE " + " AND ".join(clauses)) if clauses else ""
    cur = conn.execute(f"SELECT * FROM signals {where} ORDER BY id", params)
    cols = [d[0] for d in cur.description]
    n = 0
    # to a terminal, control characters are shown escaped (JSON escapes them itself); a file
    # gets the text exactly as stored
    shown = escape_controls if _isatty(output) else (lambda v: v)
    writer = csv.writer(output) if fmt == "csv" else None
    try:
        if writer:
            writer.writerow(cols)
        for rec in cur:
            if writer:
                writer.writerow(["" if v is None else shown(v if raw else escape_cell(v)) if isinstance(v, str)
                                 else _json_value(v) if isinstance(v, bytes) else v for v in rec])
            else:
                output.write(json.dumps(dict(zip(cols, rec)), default=_json_value) + "\n")
            n += 1
        output.flush()
    except OSError as exc:
        if output is sys.stdout or getattr(output, "name", None) in ("-", "<stdout>"):
            _quiet_stdout()
        name = getattr(output, "name", "the output")
        raise click.ClickException(f"cannot write {name}: {exc.strerror or exc} (stopped after {n} signals)") from None
    finally:
        conn.close()
    click.echo(f"exported {n} signals", err=True)


def _isatty(stream: Any) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError, OSError):
        return False


# -- report -------------------------------------------------------------------------------------
@main.command()
@db_option
@click.option("--out", "out_path", default="report.html", show_default=True, type=click.Path(dir_okay=False),
              help="HTML file to write.")
@click.option("--since", default=None, help="Only signals committed since: 24h, 7d, 30m or an ISO time "
                                            "(default: the whole database).")
@click.option("--strategy", default=None, help="Only this strategy.")
@click.option("--per-symbol", is_flag=True, help="Add the per-strategy figures per symbol too.")
@click.option("--top", type=Number(int, 1, 200), default=10, show_default=True,
              help="Strategies (and symbols) drawn and listed on the page, by signal count; the rest are "
                   "summed as 'other' (--json lists them all).")
@click.option("--open", "open_it", is_flag=True, help="Open the page in the default browser.")
@click.option("--json", "as_json", is_flag=True, help="Print the aggregates (exact) instead of writing the page.")
def report(db_path: str, out_path: str, since: Optional[str], strategy: Optional[str], per_symbol: bool,
           top: int, open_it: bool, as_json: bool) -> None:
    """One self-contained HTML page: pipeline health and signal quality, with charts."""
    from .report import ReportError, collect, json_safe

    try:
        data = collect(db_path, since=since, strategy=strategy, per_symbol=per_symbol, top=top)
    except ReportError as exc:
        raise click.ClickException(escape_controls(exc)) from None
    if as_json:  # non-finite numbers as the strings "Infinity", "-Infinity", "NaN" (RFC 8259)
        click.echo(json.dumps(json_safe(data), indent=2, allow_nan=False))
        return
    from .report_html import MissingExtra, render

    try:
        page = render(data)
    except MissingExtra as exc:
        raise click.ClickException(str(exc)) from None
    try:
        with open(out_path, "w", encoding="utf-8") as f:
            f.write(page)
    except OSError as exc:
        raise click.ClickException(f"cannot write {out_path}: {exc.strerror or exc}") from None
    path = os.path.abspath(out_path)
    click.echo(escape_controls(path))
    if open_it:
        import pathlib
        import webbrowser

        if not webbrowser.open(pathlib.Path(path).as_uri()):
            click.echo("could not start a browser; open the file above yourself", err=True)


# -- sync / verify --------------------------------------------------------------------------------
@main.command()
@db_option
@click.option("--alpine-url", default=None, help="Alpine base URL (default $ALPINE_API_URL).")
@click.option("--retry-rejected", is_flag=True, help="Put rejected rows back to pending first.")
@click.option("--retry-failed", is_flag=True, help="Put failed rows back to pending first.")
@click.option("--limit", type=COUNT, default=None, help="Take at most this many rows.")
@click.option("--timeout", type=SECONDS, default=30.0, show_default=True,
              help="Give up when nothing has got through for this many seconds.")
@json_option
@quiet_option
def sync(db_path: str, alpine_url: Optional[str], retry_rejected: bool, retry_failed: bool,
         limit: Optional[int], timeout: float, as_json: bool, quiet: bool) -> None:
    """Push pending rows to Alpine now, due or not; exit 0 only if every row taken settled.

    Exit 1: some rows were rejected or not synced yet (answers that settled nothing included),
    the database is missing or another program's, or the receiver is misconfigured (a redirect,
    a refused key);
    exit 2: a bad URL or key (configuration); exit 3: nothing answered for --timeout seconds;
    exit 4: the database could not be read or written (locked, unreadable).
    """
    from . import store
    from .drain import End, drain
    from .sync import Syncer, SyncConfig

    if not os.path.exists(db_path):
        _open_existing(db_path)   # "no database at ..." (exit 1)
    try:  # another program's database is refused as the other writers refuse it (exit 1)
        ours = connect_readonly(db_path)
        try:
            store.check_ours(ours, db_path)
        finally:
            ours.close()
    except sqlite3.Error:
        pass  # not readable at all: a database problem, said just below
    try:
        _open_existing(db_path).close()
    except click.ClickException as exc:
        _database_problem(db_path, exc.message)
    url = alpine_url or os.environ.get("ALPINE_API_URL")
    if not url:
        raise click.ClickException("no Alpine URL: pass --alpine-url or set ALPINE_API_URL")
    if alpine_url is None and env_flag("ALPINE_SYNC_ENABLED") is False:
        raise click.ClickException("sync is disabled by ALPINE_SYNC_ENABLED=false (pass --alpine-url to override)")
    try:
        config = SyncConfig(url, os.environ.get("ARGO_API_KEY"), busy_timeout=max(0.1, min(5.0, timeout / 2)))
    except ValueError as exc:
        click.echo(f"Error: configuration: {escape_controls(exc)}", err=True)
        sys.exit(2)
    try:
        conn = store.connect(db_path, busy_timeout=config.busy_timeout)
        try:
            reset = store.reset_status(conn, [s for s, on in (("rejected", retry_rejected), ("failed", retry_failed))
                                              if on])
        finally:
            conn.close()
    except sqlite3.Error as exc:
        _database_problem(db_path, str(exc))
    syncer = Syncer(db_path, config)
    todo = sync_state(db_path)["sync_pending"]
    if limit is not None:
        todo = min(todo, limit)
    with _progress(todo, "syncing", quiet) as bar:
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
    _emit(data, as_json, text)
    if report.end is End.DATABASE:
        sys.exit(4)
    if report.end is End.UNREACHABLE:
        sys.exit(3)
    if unsettled:
        sys.exit(1)


def _database_problem(db_path: str, detail: str) -> None:
    """``sync``: the database cannot be read or written (exit 4, distinct from "unreachable")."""
    click.echo(f"Error: database problem: {escape_controls(detail)} (nothing was sent)", err=True)
    sys.exit(4)


@main.command()
@db_option
@json_option
def verify(db_path: str, as_json: bool) -> None:
    """Recompute every row's sha256 with the Alpine formula and re-check every row against
    log_signal()'s rules; exit 1 on any mismatch or broken rule."""
    conn = _open_existing(db_path)
    bad = []
    invalid = []
    n = 0
    for r in conn.execute("SELECT * FROM signals ORDER BY id"):
        n += 1
        for name, problem in recheck(dict(r)):
            invalid.append({"id": r["id"], "signal_id": r["signal_id"], "field": name, "problem": problem})
        try:
            want = alpine_hash(r["signal_id"], r["symbol"], r["action"], r["entry_price"], r["target_price"],
                               r["stop_price"], r["confidence"], r["strategy"], r["timestamp"])
        except (TypeError, ValueError, AttributeError):
            want = None
        if want != r["sha256"]:
            bad.append({"id": r["id"], "signal_id": r["signal_id"], "stored": r["sha256"], "expected": want})
    conn.close()
    broken = len({b["id"] for b in invalid})
    data = {"checked": n, "mismatches": len(bad), "rows": bad, "rule_breaking_rows": broken,
            "invalid": invalid, "hash_covers": list(HASH_FIELDS)}
    text = (f"{n} rows checked, {len(bad)} hash mismatches, {broken} rows break the rules of log_signal()\n"
            f"  the hash covers: {', '.join(HASH_FIELDS)} (other columns are checked against the rules only)"
            + "".join(f"\n  id {b['id']} ({b['signal_id']}): stored {b['stored']} expected {b['expected']}"
                      for b in bad)
            + "".join(f"\n  id {b['id']} {b['field']}: {_cell(b['problem'])}" for b in invalid))
    _emit(data, as_json, text)
    if bad or invalid:
        sys.exit(1)


@main.command()
@click.option("--signals", "n_signals", type=POSITIVE, default=20_000, show_default=True, help="Signals per measurement.")
@click.option("--repeat", type=POSITIVE, default=3, show_default=True, help="Repetitions (the median is reported).")
@click.option("--sync-signals", type=COUNT, default=1000, show_default=True, help="Signals per live sync measurement.")
@click.option("--backlog", type=COUNT, default=10_000, show_default=True, help="Pending rows for the backlog drain (measured once).")
@click.option("--only", multiple=True, type=click.Choice(["throughput", "producer", "stages", "slowdown", "sync"]),
              help="Run only these parts (repeatable); default: all.")
@click.option("--slowdown-pairs", type=POSITIVE, default=10, show_default=True,
              help="Alone/loaded pairs of 0.1 s spins per rate and round for the strategy slowdown.")
@json_option
@quiet_option
def bench(n_signals: int, repeat: int, sync_signals: int, backlog: int, only: Tuple[str, ...],
          slowdown_pairs: int, as_json: bool, quiet: bool) -> None:
    """Measure log_signal() cost and rows/s side by side with raw sqlite3 and the naive way."""
    from .bench import format_report, run

    report = run(n_signals=n_signals, repeat=repeat, sync_signals=sync_signals, backlog=backlog,
                 progress=None if quiet else (lambda msg: click.echo(msg, err=True)), only=only,
                 slowdown_pairs=slowdown_pairs)
    _emit(report, as_json, format_report(report))


# -- metrics --------------------------------------------------------------------------------------
PROMETHEUS_HINT = "pip install 'argo-signals[prometheus]'"


def _host_port(value: str) -> Tuple[str, int]:
    """``HOST:PORT`` (``[::1]:9100`` for IPv6) -> (host, port)."""
    host, sep, port = value.rpartition(":")
    host = host[1:-1] if host.startswith("[") and host.endswith("]") else host
    if not sep or not host or not re.fullmatch(r"[0-9]{1,5}", port) or int(port) > 65535:
        raise click.BadParameter(f"expected HOST:PORT, e.g. 127.0.0.1:9464, got {value!r}", param_hint="--serve")
    return host, int(port)


@main.command()
@db_option
@click.option("--serve", "serve_at", default=None, metavar="HOST:PORT",
              help="Serve the metrics on http://HOST:PORT/metrics until SIGTERM or Ctrl-C.")
def metrics(db_path: str, serve_at: Optional[str]) -> None:
    """The database's state in Prometheus' text format (read-only; see docs/operations.md)."""
    address = _host_port(serve_at) if serve_at is not None else None
    try:
        from .metrics import DatabaseCollector, MetricsServer, exposition
    except ImportError:
        raise click.ClickException(f"the metrics need prometheus-client: {PROMETHEUS_HINT}") from None
    from .dbstate import read_state

    if not os.path.exists(db_path):
        raise click.ClickException(f"no database at {db_path}")
    try:
        read_state(db_path)
    except sqlite3.Error as exc:
        raise click.ClickException(f"{db_path} is not a readable argo-signals database ({exc})") from None
    collector = DatabaseCollector(db_path)
    if address is None:
        click.echo(exposition(collector).decode("utf-8"), nl=False)
        return
    try:
        server = MetricsServer(address[0], address[1], collector)
    except OSError as exc:
        raise click.ClickException(f"cannot listen on {serve_at}: {exc}") from None
    stop = threading.Event()
    previous = _signal.signal(_signal.SIGTERM, lambda *_: stop.set())
    host, port = str(server.address[0]), int(server.address[1])
    shown = f"[{host}]" if ":" in host else host
    click.echo(f"serving the metrics of {db_path} on http://{shown}:{port}/metrics (Ctrl-C or SIGTERM stops)")
    sys.stdout.flush()
    server.start()
    try:
        while not stop.wait(0.2):
            pass
    except KeyboardInterrupt:
        pass
    finally:
        server.stop()
        _signal.signal(_signal.SIGTERM, previous)
    click.echo("stopped", err=True)

if __name__ == "__main__":  # pragma: no cover
    main()
