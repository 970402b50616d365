"""`printable`: what the CLI shows of the user's input cannot drive the terminal or break a line."""

from __future__ import annotations

import pytest

from pipeline.printable import printable


@pytest.mark.parametrize(("text", "shown"), [
    ("\x1b]0;owned\x07", "\\x1b]0;owned\\x07"),  # OSC: retitles the terminal
    ("a\nerror: forged", "a\\nerror: forged"),
    ("a\r\tb", "a\\r\\tb"),
    ("\x7f\x85\x9b", "\\x7f\\x85\\x9b"),  # DEL, NEL, the one-byte CSI
    ("\u2028\u2029", "\\u2028\\u2029"),  # line and paragraph separators
    ("\u202egnp.exe", "\\u202egnp.exe"),  # a bidi override
    ("soft\u00adhy\u200dphen", "soft\\xadhy\\u200dphen"),  # invisible format characters
    ("\ud800", "\\ud800"),  # a lone surrogate, which the terminal's encoding would refuse
])
def test_unsafe_characters_are_escaped(text: str, shown: str) -> None:
    assert printable(text) == shown


@pytest.mark.parametrize("text", ["plain text: 12 [code]", "café naïve", "日本語の文", "emoji 🙂", 'quotes "\' and \\'])
def test_printable_text_is_kept_as_it_is(text: str) -> None:
    assert printable(text) == text
