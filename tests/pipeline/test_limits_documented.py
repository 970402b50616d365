"""The input limits are written in three places: the code (`InputLimits`' defaults), its docstring
and the README's table. These tests read all three, so a limit changed in one place fails here
until the others say the same."""

from __future__ import annotations

import re
from dataclasses import fields
from pathlib import Path

from pipeline.limits import DEFAULT_LIMITS, InputLimits
from workers.sampling import MAX_STOP_STRINGS

README = Path(__file__).parents[2] / "README.md"
UNITS = {"": 1, "Ki": 2**10, "Mi": 2**20, "Gi": 2**30}
# "10 GiB", "8 MiB", "1 Mi characters", "32768": a number, a binary prefix, then what is counted.
AMOUNT = re.compile(r"(\d+)(?: (Ki|Mi|Gi)B?)?(?: characters)?")
README_ROW = re.compile(r"\| `(max_\w+)` \| ([^|]+?) \| [^|]+ \|")
DOCSTRING_ITEM = re.compile(r"- `(max_\w+)` \(([^,)]+)")


def amount(text: str) -> int:
    match = AMOUNT.fullmatch(text.strip())
    assert match, f"cannot read the limit {text!r}"
    return int(match[1]) * UNITS[match[2] or ""]


def defaults() -> dict[str, int]:
    return {f.name: getattr(DEFAULT_LIMITS, f.name) for f in fields(InputLimits)}


def test_readme_table_lists_every_limit_with_its_default() -> None:
    rows = {name: amount(value) for name, value in README_ROW.findall(README.read_text())}
    assert rows == defaults()


def test_docstring_lists_every_limit_with_its_default() -> None:
    items = {name: amount(value) for name, value in DOCSTRING_ITEM.findall(InputLimits.__doc__ or "")}
    assert items == defaults()


def test_stop_string_limit_is_the_engines() -> None:
    # The docstring says so: a line the reader accepts must never be refused by the sampler.
    assert DEFAULT_LIMITS.max_stop_strings == MAX_STOP_STRINGS
