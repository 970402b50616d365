"""What the engine hands back for each finished request."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class RequestMetrics:
    """Wall-clock timings of one request, in seconds (time.perf_counter)."""

    arrival_time: float
    first_scheduled_time: float | None
    first_token_time: float | None
    finished_time: float
    # Seconds of engine steps charged to this request: each step's time split over the sequences it
    # ran, by their share of its tokens. Summed over requests it is the engine's busy time, counted
    # once, however many callers' requests shared the steps.
    engine_seconds: float = 0.0

    @property
    def ttft(self) -> float | None:
        """Time to first token, from arrival."""
        return None if self.first_token_time is None else self.first_token_time - self.arrival_time

    @property
    def latency(self) -> float:
        return self.finished_time - self.arrival_time

    @property
    def queue_time(self) -> float | None:
        """Time from arrival until the scheduler first gave the request a step."""
        return None if self.first_scheduled_time is None else self.first_scheduled_time - self.arrival_time


@dataclass(frozen=True, slots=True)
class CompletionOutput:
    request_id: str
    token_ids: list[int]
    text: str
    finish_reason: str  # "stop" (EOS or a stop string) or "length" (max_tokens or the context length)
    num_prompt_tokens: int
    num_cached_tokens: int  # prompt tokens served from the prefix cache
    metrics: RequestMetrics
