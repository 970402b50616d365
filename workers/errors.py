"""Errors the engine raises for one request; each is a ValueError, the caller's mistake."""

from __future__ import annotations


class PromptTooLongError(ValueError):
    """The prompt (or prompt plus max_tokens) does not fit the model's context or the KV pool."""
