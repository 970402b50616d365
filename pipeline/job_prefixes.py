"""The prefixes a job's lines share, as warm prompts (`pipeline cache warm|pin|unpin --job`): the
system prompts of its chat lines, and the common start of its completion lines that submit grouped
under one prefix key. A nightly job's system prompts warmed before it runs (or pinned across runs)
are cache hits from its first chunk on.

Each prefix travels as `{"common_prefix_of": [prefix, sample]}`: the prefix alone and one whole line
that starts with it. The worker warms the token ids the two encodings share, which are exactly the
ids the job's lines start with: the system messages rendered alone end with the template's
assistant header, and a text cut at a character boundary may tokenize differently at its end.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

# A prompt shorter than this many characters spans no full KV block on any tokenizer we know; a
# prefix that short is not worth a warm prompt.
MIN_PREFIX_CHARS = 16


@dataclass
class _Prefix:
    prefix: dict[str, Any]  # the warm prompt of the shared part alone
    sample: dict[str, Any]  # one whole line that starts with it
    lines: int = 1


@dataclass
class JobPrefixes:
    """The prefixes to warm, most-shared first, with how many of the job's lines start with each."""

    prompts: list[dict[str, Any]] = field(default_factory=list)
    lines_sharing: list[int] = field(default_factory=list)
    lines_read: int = 0
    left_out: int = 0  # prefixes past the limit


def job_prefixes(bodies: Iterable[tuple[str | None, dict[str, Any]]], limit: int) -> JobPrefixes:
    """The shared prefixes of a job's lines, from their (prefix_key, body) pairs, at most `limit`,
    the ones most lines share first. A chat line contributes its leading system messages (each
    distinct system prompt counts, even on one line: the next run of a nightly job repeats it); a
    completion line contributes the characters it shares with the other lines of its prefix key
    (a key only one line has shares nothing)."""
    systems: dict[str, _Prefix] = {}
    texts: dict[str, _Prefix] = {}
    lines_read = 0
    for prefix_key, body in bodies:
        lines_read += 1
        messages = body.get("messages")
        if isinstance(messages, list):
            _add_system_prompt(systems, messages)
        elif isinstance(body.get("prompt"), str) and prefix_key is not None:
            _add_text(texts, prefix_key, body["prompt"])
    found = list(systems.values()) + [p for p in texts.values()
                                      if p.lines > 1 and len(p.prefix["prompt"]) >= MIN_PREFIX_CHARS]
    found.sort(key=lambda p: p.lines, reverse=True)
    kept = found[:limit]
    return JobPrefixes(prompts=[{"common_prefix_of": [p.prefix, p.sample]} for p in kept],
                       lines_sharing=[p.lines for p in kept], lines_read=lines_read, left_out=len(found) - len(kept))


def _add_system_prompt(systems: dict[str, _Prefix], messages: list[dict[str, Any]]) -> None:
    leading = []
    for message in messages:
        if message.get("role") != "system":
            break
        leading.append({"role": "system", "content": message.get("content")})
    if not leading:
        return
    key = json.dumps(leading, sort_keys=True, ensure_ascii=False)
    if key in systems:
        systems[key].lines += 1
    else:
        systems[key] = _Prefix(prefix={"messages": leading}, sample={"messages": messages})


def _add_text(texts: dict[str, _Prefix], prefix_key: str, prompt: str) -> None:
    group = texts.get(prefix_key)
    if group is None:
        texts[prefix_key] = _Prefix(prefix={"prompt": prompt}, sample={"prompt": prompt})
        return
    group.lines += 1
    group.prefix["prompt"] = os.path.commonprefix([group.prefix["prompt"], prompt])
