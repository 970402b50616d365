"""Throughput and latency figures of an engine's lifetime."""

from __future__ import annotations

from collections import deque

from workers.outputs import RequestMetrics

WINDOW = 10_000  # latest finished requests kept for percentiles


class EngineStats:
    def __init__(self) -> None:
        self.num_steps = 0
        self.num_batched_tokens = 0  # tokens whose KV was computed (prefix-cache hits excluded)
        self.num_generated_tokens = 0
        self.num_prompt_tokens = 0
        self.num_finished_requests = 0
        self.busy_seconds = 0.0
        self._latencies: deque[float] = deque(maxlen=WINDOW)
        self._ttfts: deque[float] = deque(maxlen=WINDOW)

    def record_step(self, num_batched_tokens: int, num_sampled: int, seconds: float) -> None:
        self.num_steps += 1
        self.num_batched_tokens += num_batched_tokens
        self.num_generated_tokens += num_sampled
        self.busy_seconds += seconds

    def record_finished(self, num_prompt_tokens: int, metrics: RequestMetrics) -> None:
        self.num_finished_requests += 1
        self.num_prompt_tokens += num_prompt_tokens
        self._latencies.append(metrics.latency)
        if metrics.ttft is not None:
            self._ttfts.append(metrics.ttft)

    def summary(self) -> dict[str, float | int]:
        busy = self.busy_seconds or float("nan")
        return {
            "num_steps": self.num_steps,
            "num_finished_requests": self.num_finished_requests,
            "num_prompt_tokens": self.num_prompt_tokens,
            "num_generated_tokens": self.num_generated_tokens,
            "num_computed_tokens": self.num_batched_tokens,
            "busy_seconds": round(self.busy_seconds, 6),
            "generation_tokens_per_s": self.num_generated_tokens / busy if self.busy_seconds else 0.0,
            **_percentiles("latency", self._latencies),
            **_percentiles("ttft", self._ttfts),
        }


def _percentiles(name: str, values: deque[float]) -> dict[str, float]:
    if not values:
        return {f"{name}_p50": 0.0, f"{name}_p95": 0.0, f"{name}_p99": 0.0}
    ordered = sorted(values)
    pick = lambda q: ordered[min(len(ordered) - 1, int(q * len(ordered)))]  # noqa: E731
    return {f"{name}_p50": pick(0.50), f"{name}_p95": pick(0.95), f"{name}_p99": pick(0.99)}
