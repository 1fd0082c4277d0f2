"""How a long library function reports progress without printing: the caller passes
``progress(length, label)``, a factory of context managers that yield an object with
``update(n)`` (the command line passes a click progress bar; ``no_progress`` shows nothing)."""
from __future__ import annotations

from contextlib import nullcontext
from typing import Any, Callable, ContextManager, Optional

__all__ = ["Progress", "no_progress"]

Progress = Callable[[Optional[int], str], ContextManager[Any]]


class _Silent:
    def update(self, n: int) -> None:
        pass


def no_progress(length: Optional[int], label: str) -> ContextManager[Any]:
    """A ``Progress`` that shows nothing."""
    return nullcontext(_Silent())
