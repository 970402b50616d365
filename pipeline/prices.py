"""The price table (settings `price_per_1k_*`) and what tokens cost under it: one place for the
worker's bill (`jobs.execution`) and the report's cost by endpoint."""

from __future__ import annotations

from dataclasses import dataclass
from decimal import Decimal
from typing import Any, Protocol


class TokenCounts(Protocol):
    prompt_tokens: int
    cached_tokens: int
    completion_tokens: int


@dataclass(frozen=True, slots=True)
class Prices:
    """Price per 1,000 tokens (the settings' price table): uncached prompt, cached prompt, completion."""

    prompt: Decimal = Decimal(0)
    cached: Decimal = Decimal(0)
    completion: Decimal = Decimal(0)

    @classmethod
    def from_settings(cls, settings: Any) -> Prices:
        # str() first: Decimal(0.1) would carry the float's binary error into every bill.
        return cls(Decimal(str(settings.price_per_1k_prompt_tokens)), Decimal(str(settings.price_per_1k_cached_tokens)),
                   Decimal(str(settings.price_per_1k_completion_tokens)))

    def cost(self, tokens: TokenCounts) -> Decimal:
        uncached = tokens.prompt_tokens - tokens.cached_tokens
        total = uncached * self.prompt + tokens.cached_tokens * self.cached + tokens.completion_tokens * self.completion
        return total / 1000
