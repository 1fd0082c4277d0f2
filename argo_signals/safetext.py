"""Text that came from outside (a receiver's answer, a stored value) made safe to log or print.

``escape_controls`` turns control characters (ESC, BEL, CR, line breaks, bidi overrides...)
into visible escapes, so a hostile answer cannot move the cursor, retitle a terminal or forge
a log line.  ``clip`` cuts a text to a length (after redaction, never before).
"""
from __future__ import annotations

import unicodedata
from typing import Any

__all__ = ["escape_controls", "clip"]


def _visible(ch: str) -> str:
    if ch == "\\":
        return ch
    cat = unicodedata.category(ch)
    if cat in ("Cc", "Cf", "Cs", "Zl", "Zp"):
        code = ord(ch)
        return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}" if code < 0x10000 else f"\\U{code:08x}"
    return ch


def escape_controls(text: Any) -> str:
    """``text`` with every control or format character written as ``\\xNN`` / ``\\uNNNN``."""
    s = "" if text is None else str(text)
    if s.isprintable():
        return s
    return "".join(_visible(ch) for ch in s)


def clip(text: str, limit: int) -> str:
    """``text`` cut to at most ``limit`` characters (an ellipsis marks the cut)."""
    return text if len(text) <= limit else text[:max(0, limit - 3)] + "..."
