"""The command line's building blocks: option types that refuse what would hang or overflow
later, the ``--db`` option, the progress bar, and the group that turns what ends a command early
into one line without a traceback."""
from __future__ import annotations

import functools
import io
import itertools
import math
import os
import re
import sys
from contextlib import contextmanager
from typing import Any, Callable, Iterator, Optional, Tuple, TypeVar

import click

from .config import default_db_path
from .progress import no_progress
from .safetext import escape_controls
from .store import ForeignDatabaseError

__all__ = ["db_option", "Number", "SECONDS", "COUNT", "POSITIVE", "json_option", "quiet_option", "progress_bar",
           "Commands", "quiet_stdout", "isatty", "host_port", "DB_DEFAULT"]

_F = TypeVar("_F", bound=Callable[..., Any])
_DB_HELP = "SQLite database file (may also come before the command)."
DB_DEFAULT = "$ARGO_SIGNALS_DB or argo_signals.db"


def db_option(f: _F) -> _F:
    """``--db`` on a command; when absent, the group's ``--db``, then the environment."""
    @click.option("--db", "db_path", default=None, metavar="PATH", show_default=DB_DEFAULT, help=_DB_HELP)
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


@contextmanager
def progress_bar(length: Optional[int], label: str, quiet: bool) -> Iterator[Any]:
    """click.progressbar on stderr, or a no-op when quiet or stderr is not a terminal.  With no
    ``length`` (a stream of unknown size) the bar counts without a percentage."""
    if quiet or not isatty(sys.stderr):
        with no_progress(length, label) as silent:
            yield silent
        return
    bar: Any
    # click wants a length or an iterable: for an unknown length, an endless one (never iterated)
    with click.progressbar(itertools.repeat(None) if length is None else None, length=length, label=label,
                           file=sys.stderr) as bar:
        yield bar


class Commands(click.Group):
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
            quiet_stdout()
            where = f" {os.fsdecode(exc.filename)}" if exc.filename else ""
            raise click.ClickException(escape_controls(f"cannot go on{where}: {exc.strerror or exc}")) from None


def quiet_stdout() -> None:
    """After stdout failed: point it at /dev/null so that the flush at exit cannot fail again."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
    except (OSError, ValueError, io.UnsupportedOperation):
        pass


def isatty(stream: Any) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError, OSError):
        return False


def host_port(value: str) -> Tuple[str, int]:
    """``HOST:PORT`` (``[::1]:9100`` for IPv6) -> (host, port)."""
    host, sep, port = value.rpartition(":")
    host = host[1:-1] if host.startswith("[") and host.endswith("]") else host
    if not sep or not host or not re.fullmatch(r"[0-9]{1,5}", port) or int(port) > 65535:
        raise click.BadParameter(f"expected HOST:PORT, e.g. 127.0.0.1:9464, got {value!r}", param_hint="--serve")
    return host, int(port)
