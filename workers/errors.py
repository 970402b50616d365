"""Errors the engine gives for one request.

`PromptTooLongError` and `ChatTemplateError` (ValueErrors) are the request's own: its prompt does
not fit, or the model's chat template cannot render its messages. `RequestEngineError` is not: the
engine itself raised while running the request alone (see `EngineLoop`), so the request is what
breaks it.
"""

from __future__ import annotations


class PromptTooLongError(ValueError):
    """The prompt (or prompt plus max_tokens) does not fit the model's context or the KV pool."""


class RequestEngineError(RuntimeError):
    """The engine raised while this request ran alone. `traceback` is the engine's own, formatted
    where it was raised (the loop thread), for the error history."""

    def __init__(self, message: str, traceback: str) -> None:
        super().__init__(message)
        self.traceback = traceback


class ChatTemplateError(ValueError):
    """The model's chat template cannot render this request's messages: it refused them itself
    (`raise_exception`), failed on them (an undefined method, say), broke the sandbox or ran out of
    its time budget. `cause` says which: "refused", "render", "sandbox" or "budget"."""

    def __init__(self, message: str, cause: str) -> None:
        super().__init__(message)
        self.cause = cause
