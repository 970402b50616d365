"""Multi-turn sessions: a turn's prompt is the session's history followed by the turn's own input.

The history is a list of chat messages (`{"role", "content"}`), two or more per turn: the turn's
own input and the model's answer. A chat turn's prompt is the history's messages then its own; a
completion turn's prompt is every earlier prompt and answer concatenated, then its own prompt. Either
way the earlier turns' tokens come first, unchanged, so the prefix cache serves their KV blocks.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from pipeline.request_spec import CHAT_URL

Message = dict[str, str]


def with_history(endpoint: str, body: dict[str, Any], history: Sequence[Message]) -> dict[str, Any]:
    """`body` (a stored request) with the session's `history` in front of its prompt or messages."""
    if not history:
        return body
    if endpoint == CHAT_URL:
        return {**body, "messages": [*history, *body["messages"]]}
    # Plain concatenation, no separators: turn k's prompt then starts with exactly the text the
    # engine saw (and generated) in turn k-1, which is what keeps its KV blocks reusable.
    return {**body, "prompt": "".join(m["content"] for m in history) + body["prompt"]}


def turn_messages(endpoint: str, body: dict[str, Any], answer: str) -> list[Message]:
    """What one turn adds to its session's history: its own input, then the model's answer."""
    if endpoint == CHAT_URL:
        own = [{"role": m["role"], "content": m["content"]} for m in body["messages"]]
    else:
        own = [{"role": "user", "content": body["prompt"]}]
    return [*own, {"role": "assistant", "content": answer}]
