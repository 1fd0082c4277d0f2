"""Text that came from outside (a receiver's answer, a stored value) made safe to log or print.

``escape_controls`` turns control characters (ESC, BEL, CR, line breaks, bidi overrides...),
and every other character that ``str.isprintable()`` refuses (U+00A0 and the other spaces but
" ", private-use and unassigned code points), into visible escapes, so a hostile answer cannot
move the cursor, retitle a terminal, forge a log line or pass for other text.
``clip`` cuts a text to a length (after redaction, never before).
"""
from __future__ import annotations

from typing import Any

__all__ = ["escape_controls", "clip"]


def _visible(ch: str) -> str:
    # every character str.isprintable() refuses: controls and format characters (Cc, Cf, Cs),
    # line and paragraph separators, private-use and unassigned code points, and the spaces
    # other than " " (U+00A0, U+3000...), which would pass for a plain space or for nothing
    if ch.isprintable():
        return ch
    code = ord(ch)
    return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}" if code < 0x10000 else f"\\U{code:08x}"


def escape_controls(text: Any) -> str:
    """``text`` with every character ``str.isprintable()`` refuses written as ``\\xNN`` / ``\\uNNNN``."""
    s = "" if text is None else str(text)
    if s.isprintable():
        return s
    return "".join(_visible(ch) for ch in s)


def clip(text: str, limit: int) -> str:
    """``text`` cut to at most ``limit`` characters (an ellipsis marks the cut)."""
    if len(text) <= limit:
        return text
    return text[:limit - 3] + "..." if limit >= 3 else text[:max(0, limit)]
