"""``argo-signals ingest``: signals read from JSON Lines or CSV and handed to ``log_signal()``.

The readers yield ``(line number, record or exception)``: a line that cannot be used (not
UTF-8, longer than ``MAX_LINE``, not JSON, not an object, not CSV) comes as the exception that
says why, and reading goes on.  ``run`` hands every record to a tracker and counts.
"""
from __future__ import annotations

import csv
import itertools
import json
import uuid
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Iterable, Iterator, List, Optional, Tuple, Union

from .export import unescape_cell
from .progress import Progress, no_progress
from .record import FIELDS, RESERVED_COLUMNS, SignalValidationError, normalise
from .sink import UNSAVED_PREFIX
from .tracker import SignalTracker

__all__ = ["MAX_LINE", "Line", "raw_lines", "decoded_lines", "first_line", "looks_like_csv_header",
           "jsonl_records", "csv_records", "content_id", "strip_stored", "LooksLikeCsv", "records",
           "IngestResult", "run"]

Line = Tuple[int, Union[str, Exception]]

MAX_LINE = 1 << 20  # bytes: a longer line is skipped (and read past) without holding it

_DEDUPE_NAMESPACE = uuid.uuid5(uuid.NAMESPACE_URL, "argo-signals:ingest")


def content_id(signal: Dict[str, Any]) -> str:
    """A signal_id derived from what ``log_signal()`` would store (a default timestamp left
    out): equal content, equal id.  Raises ``SignalValidationError`` like ``log_signal()``."""
    content = {name: value for name, value in zip(FIELDS, normalise(signal))
               if name != "signal_id" and not (name == "timestamp" and type(value) is float)}
    return str(uuid.uuid5(_DEDUPE_NAMESPACE, json.dumps(content, sort_keys=True)))


def strip_stored(record: Dict[str, Any]) -> Dict[str, Any]:
    """Accept rows from `export` too: drop the columns the store computes itself."""
    out = {k: v for k, v in record.items() if k not in RESERVED_COLUMNS}
    meta = out.get("metadata")
    if isinstance(meta, str):
        try:
            out["metadata"] = json.loads(meta)
        except ValueError:
            pass
    return {k: v for k, v in out.items() if v is not None or k == "action"}


def raw_lines(source: Any) -> Iterator[Tuple[int, Union[bytes, Exception]]]:
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


def decoded_lines(source: Any) -> Iterator[Line]:
    """(line number, text) per line; a line that is not UTF-8 or too long comes as a ValueError."""
    for lineno, data in raw_lines(source):
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


def first_line(lines: Iterable[Line]) -> Tuple[Optional[Tuple[int, str]], Iterator[Line]]:
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


def looks_like_csv_header(text: str) -> bool:
    text = text.strip()
    if not text or text[0] in "{[":
        return False
    names = [n.strip().lower() for n in next(csv.reader([text]), [])]
    return len(names) > 1 and "symbol" in names


def jsonl_records(lines: Iterable[Line]) -> Iterator[Any]:
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


def csv_records(lines: Iterable[Line], raw: bool) -> Iterator[Any]:
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


class LooksLikeCsv(ValueError):
    """JSON Lines were expected but the first line (``lineno``, ``text``) is a CSV header."""

    def __init__(self, lineno: int, text: str) -> None:
        super().__init__(f"line {lineno} looks like a CSV header")
        self.lineno, self.text = lineno, text


def records(source: Any, as_csv: bool = False, raw: bool = False) -> Iterator[Any]:
    """``(line number, record or exception)`` from a binary ``source``: CSV with a header row
    (``as_csv``; cells taken literally with ``raw``), else JSON Lines, where a first line that
    is a CSV header raises ``LooksLikeCsv`` at once, before anything is read further."""
    lines: Iterable[Line] = decoded_lines(source)
    if not as_csv:
        first, lines = first_line(lines)
        if first is not None and looks_like_csv_header(first[1]):
            raise LooksLikeCsv(*first)
    return csv_records(lines, raw) if as_csv else jsonl_records(lines)


@dataclass
class IngestResult:
    accepted: int = 0
    bad_lines: int = 0
    last_line: int = 0                # the number of the last line read
    flushed: bool = False
    interrupted: bool = False         # Ctrl-C: what was handed over is committed (or spilled)
    stats: Dict[str, Any] = field(default_factory=dict)   # the tracker's, after close()


def run(db_path: str, items: Iterable[Any], dedupe: bool = False, strict: bool = False,
        on_bad: Optional[Callable[[int, Union[Exception, str]], None]] = None,
        progress: Progress = no_progress) -> IngestResult:
    """Hand each record of ``items`` (from ``records()``) to ``log_signal()`` (an
    ``argo-signals-unsaved`` update to ``update_signal()``), flush, close.

    A record ``log_signal()`` refuses, and a line a reader could not use, is counted and given
    to ``on_bad(line number, why)``; ``strict`` stops there.  With ``dedupe`` a record without
    a signal_id gets ``content_id()``.  ``progress(None, label)`` gives a context manager
    yielding an object with ``update(n)``, advanced per line.  Ctrl-C ends the run early: the
    result says so."""
    result = IngestResult()
    tracker = SignalTracker(db_path, register_atexit=False)
    try:
        with progress(None, "ingesting") as bar:
            _feed(tracker, items, result, bar.update, dedupe, strict, on_bad)
        result.flushed = tracker.flush(60)
    except KeyboardInterrupt:
        result.interrupted = True  # what was handed over before Ctrl-C is committed (or spilled) by close()
    finally:
        tracker.close()
    result.stats = tracker.stats()
    return result


def _feed(tracker: SignalTracker, items: Iterable[Any], result: IngestResult, step: Callable[[int], None],
          dedupe: bool, strict: bool, on_bad: Optional[Callable[[int, Union[Exception, str]], None]]) -> None:
    for result.last_line, record in items:
        try:
            if isinstance(record, Exception):
                raise record
            if "update_of" in record:   # from an "argo-signals-unsaved:" line
                tracker.update_signal(record["update_of"], **(record.get("fields") or {}))
                result.accepted += 1
                step(1)
                continue
            signal = strip_stored(record)
            if dedupe and signal.get("signal_id") is None:
                signal["signal_id"] = content_id(signal)
            tracker.log_signal(signal)
            result.accepted += 1
        except (SignalValidationError, TypeError, ValueError, RecursionError) as exc:
            result.bad_lines += 1
            if on_bad is not None:
                on_bad(result.last_line, "nested too deeply; line skipped" if isinstance(exc, RecursionError) else exc)
            if strict:
                break
        step(1)
