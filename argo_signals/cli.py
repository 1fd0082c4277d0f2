"""The ``argo-signals`` command line (click): demo, ingest, status, tail, export, report, sync, verify, bench,
metrics.  Each command parses its options, calls one library function and prints what it returns."""
from __future__ import annotations

import io
import json
import logging
import os
import sys
import time
from typing import Any, Dict, Optional, Tuple

import click

from .cliparts import (COUNT, DB_DEFAULT, POSITIVE, SECONDS, Commands, Number, db_option, host_port,
                       isatty, json_option, progress_bar, quiet_option, quiet_stdout)
from .dbview import DatabaseUnavailable, json_value, open_existing
from .progress import Progress
from .safetext import escape_controls
from .store import SYNC_STATUSES


def _emit(data: Any, as_json: bool, text: Optional[str] = None) -> None:
    """Print ``data`` as JSON or ``text``; control characters that came from the database or
    the receiver are shown as escapes, line by line (the text's own line breaks stay)."""
    if as_json:
        click.echo(json.dumps(data, indent=2, default=json_value))
    else:
        text = text if text is not None else "\n".join(f"{k}: {v}" for k, v in data.items())
        click.echo("\n".join(escape_controls(line) for line in text.split("\n")))


def _say(line: str) -> None:
    """One line on stdout, at once (a pipe or a log collector sees it now)."""
    click.echo(line)
    sys.stdout.flush()


def _open_existing(db_path: str) -> Any:
    try:
        return open_existing(db_path)
    except DatabaseUnavailable as exc:
        raise click.ClickException(str(exc)) from None


@click.group(cls=Commands, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="argo-signals")
@click.option("--verbose", "-v", is_flag=True, help="Log INFO messages too (default: warnings and errors).")
@click.option("--db", "db_path", default=None, metavar="PATH", show_default=DB_DEFAULT,
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


def _bar(quiet: bool) -> Progress:
    """A progress(length, label) for the library functions: the bar, or none when quiet."""
    return lambda length, label: progress_bar(length, label, quiet)


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
    from .demo_run import DemoError, run

    if count < 1 or producers < 1:
        raise click.BadParameter("--count and --producers must be >= 1")
    if no_sync and alpine_url is not None:
        raise click.BadParameter("--no-sync and --alpine-url exclude each other")
    try:
        result = run(db_path, count, producers, rate, alpine_url, no_sync, progress=_bar(quiet))
    except DemoError as exc:
        raise click.ClickException(str(exc)) from None
    _emit(result.summary, as_json, result.text)
    if not result.complete:
        sys.exit(1)


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
    from .ingest import LooksLikeCsv, records, run

    try:
        items = records(source, as_csv, raw)
    except LooksLikeCsv as exc:
        raise click.ClickException(
            f"line {exc.lineno} of {getattr(source, 'name', 'SOURCE')} looks like a CSV header "
            f"({escape_controls(exc.text.strip()[:60])}): pass --csv to read CSV") from None
    result = run(db_path, items, dedupe=dedupe, strict=strict, progress=_bar(quiet),
                 on_bad=lambda n, why: click.echo(f"line {n}: {escape_controls(why)}", err=True))
    st = result.stats
    if result.interrupted:
        _interrupted(st, db_path, result.last_line, dedupe)
    summary = {"accepted": result.accepted, "bad_lines": result.bad_lines, "persisted": st["persisted"],
               "already_stored": st["duplicates"], "rejected": st["rejected"], "flushed": result.flushed}
    _emit(summary, as_json, f"{result.accepted} accepted ({st['persisted']} new, {st['duplicates']} already "
                            f"stored, {st['rejected']} rejected), {result.bad_lines} bad lines")
    if not result.flushed:
        sys.exit(1)
    if (result.bad_lines or st["rejected"]) and not allow_rejects:
        click.echo(f"exit 1: {result.bad_lines} lines skipped and {st['rejected']} rows refused "
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


# -- status / tail / export -----------------------------------------------------------------------
@main.command()
@db_option
@json_option
def status(db_path: str, as_json: bool) -> None:
    """Counts by sync status, oldest/newest signal, spill file, size and journal mode."""
    from . import dbview

    try:
        data = dbview.status(db_path)
    except DatabaseUnavailable as exc:
        raise click.ClickException(str(exc)) from None
    _emit(data, as_json, dbview.format_status(data))


MIN_INTERVAL = 0.1  # tail --follow polls no more often than this (s)


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
    from .dbview import TAIL_WIDTHS, newer_than, newest, row_line, table

    conn = _open_existing(db_path)
    recs = newest(conn, limit, symbol)
    widths = list(TAIL_WIDTHS)
    if as_json:
        for r in recs:
            click.echo(json.dumps(dict(r), default=json_value))
    else:
        text, widths = table(recs)
        click.echo(text)
    last = recs[-1]["id"] if recs else 0
    try:
        while follow:
            time.sleep(max(interval, MIN_INTERVAL))
            for r in newer_than(conn, last, symbol):
                click.echo(json.dumps(dict(r), default=json_value) if as_json else row_line(r, widths))
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
    from .export import ExportStopped, query, write_rows
    from .record import SignalValidationError

    try:
        sql, params = query(since, until, symbol, sync_status)
    except SignalValidationError as exc:
        raise click.BadParameter(str(exc)) from None
    conn = _open_existing(db_path)
    try:
        # to a terminal, control characters are shown escaped; a file gets the text exactly as stored
        n = write_rows(conn, sql, params, output, fmt, raw, terminal=isatty(output))  # type: ignore[arg-type]
    except ExportStopped as exc:
        if output is sys.stdout or getattr(output, "name", None) in ("-", "<stdout>"):
            quiet_stdout()
        raise click.ClickException(f"cannot write {getattr(output, 'name', 'the output')}: {exc}") from None
    finally:
        conn.close()
    click.echo(f"exported {n} signals", err=True)


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
    from .drain import SyncSetupError, push

    try:
        result = push(db_path, alpine_url, retry_rejected, retry_failed, limit, timeout, progress=_bar(quiet))
    except SyncSetupError as exc:
        if exc.exit_status == 1:
            raise click.ClickException(str(exc)) from None
        click.echo(exc.line, err=True)
        sys.exit(exc.exit_status)
    _emit(result.data, as_json, result.text)
    if result.exit_status:
        sys.exit(result.exit_status)


@main.command()
@db_option
@json_option
def verify(db_path: str, as_json: bool) -> None:
    """Recompute every row's sha256 with the Alpine formula and re-check every row against
    log_signal()'s rules; exit 1 on any mismatch or broken rule."""
    from . import dbview

    try:
        data = dbview.verify(db_path)
    except DatabaseUnavailable as exc:
        raise click.ClickException(str(exc)) from None
    _emit(data, as_json, dbview.format_verify(data))
    if data["mismatches"] or data["invalid"]:
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
@main.command()
@db_option
@click.option("--serve", "serve_at", default=None, metavar="HOST:PORT",
              help="Serve the metrics on http://HOST:PORT/metrics until SIGTERM or Ctrl-C.")
def metrics(db_path: str, serve_at: Optional[str]) -> None:
    """The database's state in Prometheus' text format (read-only; see docs/operations.md)."""
    from . import metrics_serve as served

    address = host_port(serve_at) if serve_at is not None else None
    try:
        source = served.collector(db_path)
    except served.MetricsUnavailable as exc:
        raise click.ClickException(str(exc)) from None
    if address is None:
        click.echo(served.exposition_text(source), nl=False)
        return
    try:
        server = served.listen(source, *address)
    except OSError as exc:
        raise click.ClickException(f"cannot listen on {serve_at}: {exc}") from None
    served.serve(server, db_path, on_ready=_say)
    click.echo("stopped", err=True)


if __name__ == "__main__":  # pragma: no cover
    main()
