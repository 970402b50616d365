"""The contract between a worker's output and the results table."""

from __future__ import annotations

from dataclasses import dataclass


def storable_text(text: str) -> str:
    """`text` with NUL characters replaced by U+FFFD. PostgreSQL's text and JSONB cannot hold NUL,
    and a model may well generate one (a byte-level or byte-fallback token 0); SQLite gets the same
    text, so both databases keep the same results and session histories."""
    return text.replace("\x00", "\ufffd")


@dataclass(slots=True, frozen=True)
class RequestTimings:
    """Seconds a request spent waiting and running (the columns of the same names with `_s`)."""

    queue_wait: float | None
    latency: float
    ttft: float | None
    engine: float


@dataclass(slots=True, frozen=True)
class RequestResult:
    """What running one request produced: text and usage, or an error (`error_code` set).
    Token counts are None when unknown (a request that failed before the engine saw it)."""

    request_id: int
    text: str | None = None
    finish_reason: str | None = None  # "stop", "length", ...
    prompt_tokens: int | None = None
    cached_tokens: int | None = None
    completion_tokens: int | None = None
    error_code: str | None = None
    error_message: str | None = None
    timings: RequestTimings | None = None  # None: the request never reached the engine

    @property
    def failed(self) -> bool:
        return self.error_code is not None


@dataclass(slots=True, frozen=True)
class RecordOutcome:
    """What `record_results` actually changed: only rows that were still pending count, so a
    redelivered chunk yields zeros. Usage sums cover the written rows only (bill these, once)."""

    completed: int
    failed: int
    prompt_tokens: int
    cached_tokens: int
    completion_tokens: int
    engine_seconds: float  # the written requests' share of engine time (their compute seconds)
    written_ids: tuple[int, ...]  # in the order of the results given
    chunk_done: bool  # the chunk has no pending request left

    @property
    def written(self) -> int:
        return self.completed + self.failed
