"""The ``argo-signals`` command line (click): demo, ingest, status, tail, export, sync, verify, bench."""
from __future__ import annotations

import csv
import io
import json
import logging
import os
import sqlite3
import sys
import threading
import time
from contextlib import contextmanager
from typing import Any, Dict, Iterator, List, Optional

import click

from . import spill
from .outcomes import read_last_error
from .signal import SignalValidationError, alpine_hash
from .stats import percentile
from .tracker import SignalTracker, default_db_path, sync_state

db_option = click.option("--db", "db_path", default=default_db_path, show_default="$ARGO_SIGNALS_DB or argo_signals.db",
                         help="SQLite database file.")
json_option = click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
quiet_option = click.option("--quiet", "-q", is_flag=True, help="No progress bar.")


def _emit(data: Any, as_json: bool, text: Optional[str] = None) -> None:
    if as_json:
        click.echo(json.dumps(data, indent=2, default=str))
    else:
        click.echo(text if text is not None else "\n".join(f"{k}: {v}" for k, v in data.items()))


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


def _open_existing(db_path: str) -> sqlite3.Connection:
    if not os.path.exists(db_path):
        raise click.ClickException(f"no database at {db_path}")
    conn = sqlite3.connect(f"file:{db_path}?mode=ro", uri=True, timeout=5.0)
    conn.row_factory = sqlite3.Row
    try:
        conn.execute("SELECT 1 FROM signals LIMIT 1")
    except sqlite3.Error as exc:
        conn.close()
        raise click.ClickException(f"{db_path} is not an argo-signals database ({exc})") from None
    return conn


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="argo-signals")
@click.option("--verbose", "-v", is_flag=True, help="Log INFO messages too (default: warnings and errors).")
def main(verbose: bool) -> None:
    """Durable trading-signal logging: SQLite first, then Alpine."""
    logger = logging.getLogger("argo_signals")
    if not logger.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(levelname)s: %(message)s"))
        logger.addHandler(handler)
        logger.setLevel(logging.INFO if verbose else logging.WARNING)


# -- demo ---------------------------------------------------------------------------------------
@main.command()
@db_option
@click.option("--count", "-n", default=2000, show_default=True, help="Signals to log in all.")
@click.option("--producers", "-k", default=4, show_default=True, help="Producer threads.")
@click.option("--rate", default=0.0, show_default=True, help="Signals per second per producer (0: as fast as possible).")
@click.option("--alpine-url", default=None, help="Also sync to this Alpine base URL.")
@json_option
@quiet_option
def demo(db_path: str, count: int, producers: int, rate: float, alpine_url: Optional[str],
         as_json: bool, quiet: bool) -> None:
    """Log realistic synthetic signals from several threads and report what was persisted."""
    from .demo import signals

    if count < 1 or producers < 1:
        raise click.BadParameter("--count and --producers must be >= 1")
    tracker = SignalTracker(db_path, alpine_url=alpine_url, register_atexit=False)
    call_us: List[float] = []
    lock = threading.Lock()
    shares = [count // producers + (1 if k < count % producers else 0) for k in range(producers)]
    done = [0]
    run_ids: List[str] = []

    def produce(k: int, n: int) -> None:
        gen = signals(seed=k)
        mine: List[float] = []
        ids: List[str] = []
        gap = 1.0 / rate if rate > 0 else 0.0
        for _ in range(n):
            sig = next(gen)
            t0 = time.perf_counter()
            ids.append(tracker.log_signal(sig))
            mine.append((time.perf_counter() - t0) * 1e6)
            with lock:
                done[0] += 1
            if gap:
                time.sleep(gap)
        with lock:
            call_us.extend(mine)
            run_ids.extend(ids)

    start = time.perf_counter()
    threads = [threading.Thread(target=produce, args=(k, n), daemon=True) for k, n in enumerate(shares)]
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
    tracker.close(30)
    st = tracker.stats()
    call_us.sort()
    mine_sync = _run_sync_counts(db_path, run_ids)
    summary: Dict[str, Any] = {
        "database": db_path,
        "logged": st["logged"], "persisted": st["persisted"], "rejected": st["rejected"],
        "fallback_writes": st["fallback_writes"], "flushed": flushed,
        "rows_per_s": round(st["persisted"] / elapsed, 1) if elapsed else None,
        "log_signal_us": {"p50": _r(percentile(call_us, 0.5)), "p99": _r(percentile(call_us, 0.99))},
        "time_to_durable_ms": st["latency_ms"],
        "flushes": st["flushes"],
        "sync": {"enabled": st["sync_enabled"], **mine_sync},   # this run's signals only
    }
    sync_text = ("off (no --alpine-url / ALPINE_API_URL); rows stay pending" if not st["sync_enabled"] else
                 f"{mine_sync['synced']} synced, {mine_sync['pending']} pending, {mine_sync['skipped']} skipped, "
                 f"{mine_sync['rejected']} rejected, {mine_sync['failed']} failed (this run's signals)")
    text = (f"{summary['persisted']} of {summary['logged']} signals persisted to {db_path} "
            f"in {elapsed:.2f}s ({summary['rows_per_s']} rows/s)\n"
            f"  rejected: {summary['rejected']}   fallback writes: {summary['fallback_writes']}\n"
            f"  log_signal(): p50 {summary['log_signal_us']['p50']} us, p99 {summary['log_signal_us']['p99']} us\n"
            f"  time to durable: p50 {st['latency_ms']['p50']} ms, p99 {st['latency_ms']['p99']} ms\n"
            f"  flushes: {', '.join(f'{k} {v}' for k, v in st['flushes'].items())}\n"
            f"  sync: " + sync_text)
    _emit(summary, as_json, text)
    if summary["persisted"] + summary["rejected"] + st["duplicates"] != summary["logged"]:
        sys.exit(1)


_SYNC_STATES = ("synced", "pending", "skipped", "rejected", "failed")


def _run_sync_counts(db_path: str, ids: List[str]) -> Dict[str, int]:
    """Counts by sync status of the rows with these signal ids."""
    out = dict.fromkeys(_SYNC_STATES, 0)
    try:
        conn = sqlite3.connect(f"file:{db_path}?mode=ro", uri=True, timeout=5.0)
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
@click.argument("source", type=click.File("r", encoding="utf-8"))
@db_option
@click.option("--csv", "as_csv", is_flag=True, help="SOURCE is CSV with a header row.")
@click.option("--strict", is_flag=True, help="Stop at the first bad line.")
@json_option
@quiet_option
def ingest(source: io.TextIOBase, db_path: str, as_csv: bool, strict: bool, as_json: bool, quiet: bool) -> None:
    """Load signals from JSON Lines (or CSV) FILE, or - for stdin, through log_signal()."""
    records = _csv_records(source) if as_csv else _jsonl_records(source)
    good = bad = 0
    with SignalTracker(db_path, register_atexit=False) as tracker:
        with _progress(None, "ingesting", quiet) as bar:
            for lineno, record in records:
                try:
                    if isinstance(record, Exception):
                        raise record
                    tracker.log_signal(_strip_stored(record))
                    good += 1
                except (SignalValidationError, TypeError, ValueError) as exc:
                    bad += 1
                    click.echo(f"line {lineno}: {exc}", err=True)
                    if strict:
                        break
                bar.update(1)
        ok = tracker.flush(60)
        st = tracker.stats()
    summary = {"accepted": good, "bad_lines": bad, "persisted": st["persisted"],
               "already_stored": st["duplicates"], "rejected": st["rejected"], "flushed": ok}
    _emit(summary, as_json, f"{good} accepted ({st['persisted']} new, {st['duplicates']} already stored, "
                            f"{st['rejected']} rejected), {bad} bad lines")
    if bad or not ok:
        sys.exit(1)


_STORED_ONLY = ("id", "sha256", "verification_hash", "created_at", "sync_status", "sync_attempts",
                "synced_at", "sync_error", "sync_next_at", "sync_claim", "sync_claim_until")


def _strip_stored(record: Dict[str, Any]) -> Dict[str, Any]:
    """Accept rows from `export` too: drop the columns the store computes itself."""
    out = {k: v for k, v in record.items() if k not in _STORED_ONLY}
    meta = out.get("metadata")
    if isinstance(meta, str):
        try:
            out["metadata"] = json.loads(meta)
        except ValueError:
            pass
    return {k: v for k, v in out.items() if v is not None or k == "action"}


def _jsonl_records(source: io.TextIOBase) -> Iterator[Any]:
    for lineno, line in enumerate(source, 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except ValueError as exc:
            yield lineno, ValueError(f"not valid JSON ({exc})")
            continue
        if not isinstance(obj, dict):
            yield lineno, TypeError("not a JSON object")
            continue
        yield lineno, obj


def _csv_records(source: io.TextIOBase) -> Iterator[Any]:
    for lineno, rec in enumerate(csv.DictReader(source), 2):
        yield lineno, {k: (v if v != "" else None) for k, v in rec.items() if k is not None}


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
        rejected = conn.execute("SELECT count(*) FROM rejected_signals").fetchone()[0]
        last_error = read_last_error(conn)
    finally:
        conn.close()
    st = sync_state(db_path)
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
            "size_bytes": size, "journal_mode": journal, "sync_lag_s": st["sync_lag_s"],
            "last_sync_error": last_error}
    by = data["by_sync_status"]
    text = (f"{db_path}: {total} signals ({size / 1024:.0f} KiB, journal {journal})\n"
            f"  sync: {by['pending']} pending, {by['synced']} synced, {by['skipped']} skipped, "
            f"{by['rejected']} rejected, {by['failed']} failed; "
            f"lag {'-' if st['sync_lag_s'] is None else str(st['sync_lag_s']) + ' s'}\n"
            f"  oldest {data['oldest_signal']}, newest {data['newest_signal']}\n"
            f"  refused rows (rejected_signals): {rejected}; spill file lines: {data['spill_pending']}\n"
            f"  last sync error: " + (f"{last_error['error']} (at {last_error['at']})" if last_error else "none"))
    _emit(data, as_json, text)


TAIL_COLUMNS = ("id", "timestamp", "symbol", "action", "entry_price", "confidence", "strategy", "sync_status")


def _table(records: List[sqlite3.Row]) -> str:
    cells = [[("" if r[c] is None else str(r[c])) for c in TAIL_COLUMNS] for r in records]
    widths = [max([len(c)] + [len(row[i]) for row in cells]) for i, c in enumerate(TAIL_COLUMNS)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(TAIL_COLUMNS, widths)).rstrip()]
    lines += ["  ".join(v.ljust(w) for v, w in zip(row, widths)).rstrip() for row in cells]
    return "\n".join(lines)


@main.command()
@db_option
@click.option("-n", "limit", default=20, show_default=True, help="How many rows.")
@click.option("--symbol", default=None, help="Only this symbol.")
@click.option("--follow", "-f", is_flag=True, help="Keep printing new rows until Ctrl-C.")
@click.option("--interval", default=1.0, show_default=True, help="Polling interval for --follow (s).")
@json_option
def tail(db_path: str, limit: int, symbol: Optional[str], follow: bool, interval: float, as_json: bool) -> None:
    """The newest signals as a table."""
    conn = _open_existing(db_path)
    where, params = ("WHERE symbol = ?", [symbol]) if symbol else ("", [])
    recs = conn.execute(f"SELECT * FROM signals {where} ORDER BY id DESC LIMIT ?", params + [limit]).fetchall()
    recs.reverse()
    if as_json:
        for r in recs:
            click.echo(json.dumps(dict(r)))
    else:
        click.echo(_table(recs))
    last = recs[-1]["id"] if recs else 0
    try:
        while follow:
            time.sleep(interval)
            cond = "WHERE id > ?" + (" AND symbol = ?" if symbol else "")
            new = conn.execute(f"SELECT * FROM signals {cond} ORDER BY id", [last] + ([symbol] if symbol else [])).fetchall()
            for r in new:
                click.echo(json.dumps(dict(r)) if as_json else
                           "  ".join("" if r[c] is None else str(r[c]) for c in TAIL_COLUMNS))
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
@click.option("--status", "sync_status", default=None, help="Only rows with this sync status.")
@click.option("-o", "--output", type=click.File("w", encoding="utf-8"), default="-", help="Output file (default stdout).")
def export(db_path: str, fmt: str, since: Optional[str], until: Optional[str], symbol: Optional[str],
           sync_status: Optional[str], output: io.TextIOBase) -> None:
    """Write signals as JSON Lines or CSV."""
    from .signal import format_timestamp

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
    writer = csv.writer(output) if fmt == "csv" else None
    if writer:
        writer.writerow(cols)
    for rec in cur:
        if writer:
            writer.writerow(["" if v is None else v for v in rec])
        else:
            output.write(json.dumps(dict(zip(cols, rec))) + "\n")
        n += 1
    conn.close()
    click.echo(f"exported {n} signals", err=True)


# -- sync / verify --------------------------------------------------------------------------------
@main.command()
@db_option
@click.option("--alpine-url", default=None, help="Alpine base URL (default $ALPINE_API_URL).")
@click.option("--retry-rejected", is_flag=True, help="Put rejected rows back to pending first.")
@click.option("--retry-failed", is_flag=True, help="Put failed rows back to pending first.")
@click.option("--limit", type=int, default=None, help="Take at most this many rows.")
@click.option("--timeout", type=float, default=30.0, show_default=True,
              help="Give up when nothing has got through for this many seconds.")
@json_option
@quiet_option
def sync(db_path: str, alpine_url: Optional[str], retry_rejected: bool, retry_failed: bool,
         limit: Optional[int], timeout: float, as_json: bool, quiet: bool) -> None:
    """Push pending rows to Alpine now, due or not; exit 0 only if every row taken settled.

    Exit 1: some rows were rejected or not synced yet, or the receiver is misconfigured (a
    redirect, a refused key); exit 3: the receiver was unreachable for --timeout seconds.
    """
    from . import store
    from .drain import End, drain
    from .sync import Syncer, SyncConfig

    url = alpine_url or os.environ.get("ALPINE_API_URL")
    if not url:
        raise click.ClickException("no Alpine URL: pass --alpine-url or set ALPINE_API_URL")
    if alpine_url is None and os.environ.get("ALPINE_SYNC_ENABLED", "").strip().lower() in ("0", "false", "no", "off"):
        raise click.ClickException("sync is disabled by ALPINE_SYNC_ENABLED=false (pass --alpine-url to override)")
    _open_existing(db_path).close()
    try:
        config = SyncConfig(url, os.environ.get("ARGO_API_KEY"))
    except ValueError as exc:
        raise click.ClickException(str(exc)) from None
    conn = store.connect(db_path)
    try:
        reset = store.reset_status(conn, [s for s, on in (("rejected", retry_rejected), ("failed", retry_failed)) if on])
    finally:
        conn.close()
    syncer = Syncer(db_path, config)
    todo = sync_state(db_path)["sync_pending"]
    if limit is not None:
        todo = min(todo, limit)
    with _progress(todo, "syncing", quiet) as bar:
        report = drain(syncer, limit=limit, patience=timeout, progress=bar.update)
    syncer.stop(5.0)
    outcomes = report.outcomes
    st = sync_state(db_path)
    taken = sum(outcomes[k] for k in ("synced", "skipped", "rejected", "transient"))
    unsettled = outcomes["rejected"] > 0 or outcomes["transient"] > 0 or report.end is not End.DONE
    data = {"taken": taken, "synced": outcomes["synced"], "skipped": outcomes["skipped"],
            "rejected": outcomes["rejected"], "not_synced_yet": outcomes["transient"],
            "reset_to_pending": reset, "still_pending": st["sync_pending"], "failed": st["sync_failed"],
            "end": report.end.value, "last_error": syncer.last_error}
    text = (f"took {taken}: {data['synced']} synced, {data['skipped']} skipped, "
            f"{data['rejected']} rejected, {data['not_synced_yet']} not synced yet; "
            f"{st['sync_pending']} pending in all")
    if report.end is End.UNREACHABLE:
        text += (f"\ngave up: Alpine unreachable at {config.public_url} for {report.waited:.0f} s "
                 f"({report.detail}); {st['sync_pending']} rows stay pending")
    elif report.end is End.STALLED:
        text += f"\ngave up: nothing got through for {report.waited:.0f} s; {st['sync_pending']} rows stay pending"
    elif report.end is End.CONFIGURATION:
        text += f"\nstopped: {report.detail}; {st['sync_pending']} rows stay pending"
    elif unsettled and syncer.last_error:
        text += f"\n  last error: {syncer.last_error}"
    _emit(data, as_json, text)
    if report.end in (End.UNREACHABLE, End.STALLED):
        sys.exit(3)
    if unsettled:
        sys.exit(1)


@main.command()
@db_option
@json_option
def verify(db_path: str, as_json: bool) -> None:
    """Recompute every row's sha256 with the Alpine formula; exit 1 on any mismatch."""
    conn = _open_existing(db_path)
    bad = []
    n = 0
    for r in conn.execute("SELECT id, signal_id, symbol, action, entry_price, target_price, stop_price, "
                          "confidence, strategy, timestamp, sha256 FROM signals ORDER BY id"):
        n += 1
        try:
            want = alpine_hash(r["signal_id"], r["symbol"], r["action"], r["entry_price"], r["target_price"],
                               r["stop_price"], r["confidence"], r["strategy"], r["timestamp"])
        except (TypeError, ValueError, AttributeError):
            want = None
        if want != r["sha256"]:
            bad.append({"id": r["id"], "signal_id": r["signal_id"], "stored": r["sha256"], "expected": want})
    conn.close()
    data = {"checked": n, "mismatches": len(bad), "rows": bad}
    text = f"{n} rows checked, {len(bad)} hash mismatches" + "".join(
        f"\n  id {b['id']} ({b['signal_id']}): stored {b['stored']} expected {b['expected']}" for b in bad)
    _emit(data, as_json, text)
    if bad:
        sys.exit(1)


@main.command()
@click.option("--signals", "n_signals", default=20_000, show_default=True, help="Signals per measurement.")
@click.option("--repeat", default=3, show_default=True, help="Repetitions (the median is reported).")
@click.option("--sync-signals", default=1000, show_default=True, help="Signals per live sync measurement.")
@click.option("--backlog", default=10_000, show_default=True, help="Pending rows for the backlog drain (measured once).")
@json_option
@quiet_option
def bench(n_signals: int, repeat: int, sync_signals: int, backlog: int, as_json: bool, quiet: bool) -> None:
    """Measure log_signal() cost and rows/s side by side with raw sqlite3 and the naive way."""
    from .bench import format_report, run

    report = run(n_signals=n_signals, repeat=repeat, sync_signals=sync_signals, backlog=backlog,
                 progress=None if quiet else (lambda msg: click.echo(msg, err=True)))
    _emit(report, as_json, format_report(report))


if __name__ == "__main__":  # pragma: no cover
    main()
