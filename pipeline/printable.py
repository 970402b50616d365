"""Text from the user's input made safe to show on a terminal.

Field names, values, custom_ids and file names come from files that anyone may have written. Shown
raw, a key such as "\\u001b]0;owned\\u0007" retitles the terminal, and one holding "\\n" forges a line
of our output. Every line the CLI writes for the user (`error:` lines, rejected lines, progress)
goes through `printable`, so that no control character reaches the terminal.
"""

from __future__ import annotations

import unicodedata

# Cc: C0 and C1 controls, DEL (ESC, BEL, CR, LF, NEL...); Cf: invisible format characters, the
# bidirectional overrides among them (text shown in another order than it is); Cs: lone surrogates,
# which cannot even be encoded for the terminal; Zl, Zp: U+2028 and U+2029, line breaks to some.
_UNSAFE_CATEGORIES = frozenset({"Cc", "Cf", "Cs", "Zl", "Zp"})


def printable(text: str) -> str:
    """`text` with each unsafe character written as a Python escape (`\\x1b`, `\\n`, `\\u2028`);
    the rest, letters of every script included, is kept as it is."""
    if text.isprintable():  # the common case, in C: nothing to escape
        return text
    # repr escapes exactly the characters str.isprintable refuses, these categories among them.
    return "".join(repr(ch)[1:-1] if unicodedata.category(ch) in _UNSAFE_CATEGORIES else ch for ch in text)
