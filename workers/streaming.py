"""Text of a request as its tokens arrive: each new token's text, for streaming to a terminal.

Decoding token by token goes wrong where one character spans several tokens (a byte-level
tokenizer's UTF-8 bytes, byte-fallback pieces): a lone piece decodes to U+FFFD. So the whole output
is decoded each time and only what follows the text already emitted is handed out, holding back a
trailing U+FFFD until the next token completes the character.
"""

from __future__ import annotations

from collections.abc import Callable

from workers.engine import LLMEngine, StepReport


class TokenStream:
    """Calls `on_text(piece)` with the new text of request `request_id` after each engine step."""

    def __init__(self, engine: LLMEngine, request_id: str, on_text: Callable[[str], None]) -> None:
        self.engine = engine
        self.request_id = request_id
        self.on_text = on_text
        self.token_ids: list[int] = []
        self.emitted = ""

    def __call__(self, report: StepReport) -> None:
        token = report.sampled.get(self.request_id)
        if token is None:
            return
        self.token_ids.append(token)
        text = self.engine.tokenizer.decode(self.token_ids)
        finished = any(o.request_id == self.request_id for o in report.finished)
        if finished:
            # The final text drops what the engine drops (an EOS token, say): emit up to it only.
            text = next(o.text for o in report.finished if o.request_id == self.request_id)
        elif text.endswith("\ufffd"):
            return  # half a character: wait for the rest
        if text.startswith(self.emitted) and len(text) > len(self.emitted):
            self.on_text(text[len(self.emitted):])
            self.emitted = text
