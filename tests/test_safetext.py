"""escape_controls and clip (argo_signals/safetext.py), on their own.

The escapes are checked against Python's own ``unicode_escape`` codec, which writes every
code point as ``\\xNN`` / ``\\uNNNN`` / ``\\UNNNNNNNN`` by the same widths (it spells tab, line
feed and carriage return ``\\t``, ``\\n``, ``\\r``; the module writes them as ``\\x09``...).
"""
import sys

import pytest

from argo_signals.safetext import clip, escape_controls

NAMED = {"\t": "\\x09", "\n": "\\x0a", "\r": "\\x0d"}


def by_codec(ch):
    return NAMED.get(ch) or ch.encode("unicode_escape").decode("ascii")


# every code point of the planes where assigned characters live (0-2: letters, symbols,
# emoji, CJK), then samples of the rest (tags and variation selectors, private use, the last)
SWEPT = [*range(0x30000), *range(0xE0000, 0xE0200), 0x30000, 0xF0000, 0xFFFFD, 0x100000, sys.maxunicode]


def test_every_code_point_is_kept_or_escaped_by_its_width():
    everything = "".join(map(chr, SWEPT))
    expected = "".join(ch if ch.isprintable() else by_codec(ch) for ch in everything)
    shown = escape_controls(everything)
    assert shown == expected
    assert shown.isprintable()


@pytest.mark.parametrize("char,shown", [
    ("\x00", "\\x00"), ("\x07", "\\x07"), ("\x7f", "\\x7f"),          # NUL, BEL, DEL
    ("\x85", "\\x85"), ("\xad", "\\xad"),                             # NEL, soft hyphen (Cf)
    ("\u2029", "\\u2029"), ("\u202e", "\\u202e"), ("\ufeff", "\\ufeff"),  # paragraph sep, RLO, BOM
    ("\u0378", "\\u0378"),                                            # unassigned (Cn)
    ("\udc80", "\\udc80"),                                            # lone surrogate (surrogateescape)
    ("\U000e0001", "\\U000e0001"), ("\U000f0000", "\\U000f0000"),     # language tag, private use
    ("\U0010ffff", "\\U0010ffff"),                                    # the last code point
])
def test_each_kind_of_refused_character_at_its_width(char, shown):
    assert not char.isprintable()
    assert escape_controls(f"<{char}>") == f"<{shown}>"


def test_a_hostile_answer_cannot_act_on_a_terminal_or_forge_a_log_line():
    answer = "ok\x1b]0;owned\x07\x1b[2J\r\nWARNING forged line\u202egnp.exe"
    shown = escape_controls(answer)
    assert shown == ("ok\\x1b]0;owned\\x07\\x1b[2J\\x0d\\x0aWARNING forged line\\u202egnp.exe")
    assert shown.isprintable() and "\n" not in shown and "\x1b" not in shown


@pytest.mark.parametrize("text", [
    "", "plain ascii text with spaces", "Zürich São Paulo Ωμέγα Кириллица 東京 العربية",
    "emoji \U0001f600 and math \u2211", "quotes ' \" and $ % { }",
])
def test_printable_text_is_returned_unchanged(text):
    assert escape_controls(text) == text


def test_a_backslash_is_kept_as_it_is():
    assert escape_controls("C:\\temp\\new") == "C:\\temp\\new"
    assert escape_controls("\\x1b") == "\\x1b"             # already an escape: left alone
    assert escape_controls("a\\\x1b") == "a\\\\x1b"         # (so an escape may be ambiguous to read)


def test_none_is_the_empty_text_and_other_values_are_made_text():
    assert escape_controls(None) == ""
    assert escape_controls(42) == "42" and escape_controls(1.5) == "1.5"
    assert escape_controls(b"\x1b[0m") == "b'\\x1b[0m'"   # (str() of bytes is already printable)

    class Hostile:
        def __str__(self):
            return "x\x1by"

    assert escape_controls(Hostile()) == "x\\x1by"


@pytest.mark.parametrize("text,limit,clipped", [
    ("abcdef", 10, "abcdef"),
    ("abcdef", 6, "abcdef"),           # exactly the limit: not cut
    ("abcdefg", 6, "abc..."),          # one over: cut, the ellipsis counts in the limit
    ("a" * 1000, 300, "a" * 297 + "..."),
    ("", 0, ""),
    ("abc", 3, "abc"),
    ("abcd", 3, "..."),
])
def test_clip_cuts_to_at_most_the_limit_with_an_ellipsis(text, limit, clipped):
    assert clip(text, limit) == clipped
    assert len(clip(text, limit)) <= limit


def test_clip_keeps_non_ascii_text_by_characters():
    assert clip("東京東京東京", 5) == "東京..."
    assert clip(escape_controls("\x1b" * 10), 12) == "\\x1b\\x1b\\..."   # (after escaping: still printable)


@pytest.mark.parametrize("limit", [0, 1, 2])
def test_clip_below_the_length_of_the_ellipsis_stays_within_the_limit(limit):
    assert len(clip("abcdef", limit)) <= limit
