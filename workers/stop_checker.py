"""Decides whether a sequence is finished after it receives a token."""

from __future__ import annotations

from collections.abc import Callable

from workers.sequence import Sequence


class StopChecker:
    def __init__(self, eos_token_ids: frozenset[int], decode: Callable[[list[int]], str], max_model_len: int) -> None:
        self.eos_token_ids = eos_token_ids
        self.decode = decode
        self.max_model_len = max_model_len

    def check(self, seq: Sequence) -> str | None:
        """The finish reason ("stop" or "length"), or None to go on."""
        params = seq.params
        last = seq.output_token_ids[-1]
        if not params.ignore_eos and last in self.eos_token_ids:
            return "stop"
        if params.stop and self._hit_stop_string(seq):
            return "stop"
        if len(seq.output_token_ids) >= params.max_tokens or seq.num_tokens >= self.max_model_len:
            return "length"
        return None

    def _hit_stop_string(self, seq: Sequence) -> bool:
        # Checked after every token, so a new match ends in the newest token. Every token decodes
        # to at least one byte and a character takes at most 4, so the match lies within the last
        # 4 * longest tokens; decoding only that window keeps a generation's checks linear in its
        # length (decoding the whole output each step was quadratic). The margin covers tokens that
        # decode to nothing (special tokens) and a window that starts inside a character.
        stop = seq.params.stop
        window = 4 * max(len(s) for s in stop) + 8
        text = self.decode(seq.output_token_ids[-window:])
        return any(s in text for s in stop)

    def final_text(self, seq: Sequence) -> str:
        """The output text, cut before the first stop string it contains (the stop string is not
        part of the answer, as in OpenAI's API)."""
        text = self.decode(seq.output_token_ids)
        cut = min((i for i in (text.find(s) for s in seq.params.stop) if i >= 0), default=len(text))
        return text[:cut]
