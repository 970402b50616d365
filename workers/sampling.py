"""Per-request sampling parameters."""

from __future__ import annotations

from dataclasses import dataclass

MAX_STOP_STRINGS = 16
# Temperatures below this sample as greedy (vLLM draws the same line): dividing float32 logits by
# 1e-300 overflows to inf and softmax turns that into NaN, which no sampler can draw from.
GREEDY_BELOW = 1e-5
# The sampler computes in float32, where a top_p below the smallest normal number (about 1.2e-38) is
# subnormal or 0 (5e-324 is 0): a top_p of 0 keeps no token, and softmax over nothing is NaN. A
# GPU may flush subnormals to 0 as well, hence the normal bound. Every top_p at or below the top
# token's probability keeps that token alone, so this floor refuses nothing anyone can mean.
MIN_TOP_P = 2.0**-126


@dataclass(frozen=True, slots=True)
class SamplingParams:
    """How one request is decoded. `temperature=0` (or below `GREEDY_BELOW`) is greedy; a `seed`
    makes sampling reproducible whatever else shares the batch."""

    max_tokens: int = 16
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int | None = None
    seed: int | None = None
    stop: tuple[str, ...] | list[str] | str | None = None
    ignore_eos: bool = False

    def __post_init__(self) -> None:
        if isinstance(self.max_tokens, bool) or not isinstance(self.max_tokens, int) or self.max_tokens < 1:
            raise ValueError(f"max_tokens={self.max_tokens!r} must be a positive integer")
        if not _is_real(self.temperature) or not 0.0 <= self.temperature <= 100.0:
            raise ValueError(f"temperature={self.temperature!r} must be between 0 (greedy) and 100")
        if not _is_real(self.top_p) or not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p={self.top_p!r} must be in (0, 1]; 1 keeps every token")
        if self.top_p < MIN_TOP_P:
            raise ValueError(f"top_p={self.top_p!r} is 0 in the sampler's float32 arithmetic (it would keep no "
                             f"token); use at least {MIN_TOP_P:.3g}")
        if self.top_k is not None and (not _is_int(self.top_k) or self.top_k < 1):
            raise ValueError(f"top_k={self.top_k!r} must be a positive integer, or None to keep every token")
        if self.seed is not None and (not _is_int(self.seed) or not 0 <= self.seed < 2**63):
            raise ValueError(f"seed={self.seed!r} must be an integer in [0, 2**63)")
        if self.stop is not None and not isinstance(self.stop, (str, list, tuple)):
            raise ValueError(f"stop={self.stop!r} must be a string, a list of strings, or None")
        stop = (self.stop,) if isinstance(self.stop, str) else tuple(self.stop or ())
        if len(stop) > MAX_STOP_STRINGS:
            raise ValueError(f"stop has {len(stop)} strings; at most {MAX_STOP_STRINGS} are allowed")
        if any(not isinstance(s, str) or not s for s in stop):
            raise ValueError("stop must hold non-empty strings")
        object.__setattr__(self, "stop", stop)

    @property
    def greedy(self) -> bool:
        return self.temperature < GREEDY_BELOW


def _is_int(value: object) -> bool:
    # bool is an int to Python, but `top_k=True` (say, from JSON) is a mistake, not 1.
    return isinstance(value, int) and not isinstance(value, bool)


def _is_real(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)
