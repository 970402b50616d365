"""Run one chunk: lease it, generate its pending requests in one engine call, write the results.

A plain function with explicit arguments, so the Celery task (`jobs.inference`) and the embedded
`pipeline run` share it, and tests call it directly. Safe to run twice for the same chunk (a
redelivered task): the lease keeps a second worker off a chunk being run, and results are only
written onto requests still pending, so a repeat writes and bills nothing.
"""

from __future__ import annotations

import logging
import time
import traceback
from dataclasses import dataclass
from datetime import timedelta
from decimal import Decimal
from typing import Any

from sqlalchemy.orm import Session, sessionmaker

from db.enums import JobStatus
from db.models import Job
from db.repository import (
    add_usage,
    chunk_requests,
    claim_chunk,
    job_counts,
    record_error,
    record_results,
    set_status,
)
from db.repository._locks import lock_rows
from db.results import RecordOutcome, RequestResult
from jobs.engine_host import to_engine_request
from workers.engine_loop import EngineLoop
from workers.outputs import CompletionOutput

log = logging.getLogger(__name__)

DEFAULT_LEASE = timedelta(hours=1)


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

    def cost(self, outcome: RecordOutcome) -> Decimal:
        uncached = outcome.prompt_tokens - outcome.cached_tokens
        total = uncached * self.prompt + outcome.cached_tokens * self.cached + outcome.completion_tokens * self.completion
        return total / 1000


@dataclass(frozen=True, slots=True)
class _Work:
    """One pending request, copied out of its row so the engine runs with no transaction open."""

    request_id: int
    line: int
    custom_id: str
    endpoint: str
    body: dict[str, Any]


def execute_chunk(
    session_factory: sessionmaker[Session],
    loop: EngineLoop,
    chunk_id: int,
    worker_name: str,
    *,
    prices: Prices = Prices(),
    lease: timedelta = DEFAULT_LEASE,
) -> None:
    """Run chunk `chunk_id` and record its results; finalize its job when nothing is left pending.

    Does nothing for a chunk that is done or leased by another worker (a duplicate delivery).
    Requests the engine refuses (a prompt longer than the context, say) are failed with their own
    error; the rest of the chunk is unaffected. An engine crash is recorded in the error history
    and re-raised: the chunk stays leased until `lease` runs out and the lost-chunk sweep resends it.
    """
    with session_factory.begin() as session:
        chunk = claim_chunk(session, chunk_id, worker=worker_name, lease=lease)
        if chunk is None:
            log.info("chunk %s is done or leased by another worker; skipping", chunk_id)
            return
        job_id = chunk.job_id
        job_model = session.get(Job, job_id).model
        work = [_Work(r.id, r.line, r.custom_id, r.endpoint, dict(r.body)) for r in chunk_requests(session, chunk_id)]

    started = time.perf_counter()
    try:
        results = _run(loop, work, job_model)
    except Exception:
        with session_factory.begin() as session:
            record_error(session, "engine", f"chunk {chunk_id} failed in the engine; it will be retried",
                         job_id=job_id, chunk_id=chunk_id, traceback=traceback.format_exc())
        raise
    compute_seconds = time.perf_counter() - started

    with session_factory.begin() as session:
        outcome = record_results(session, chunk_id, results)  # locks the job row first
        if outcome.written:
            add_usage(session, job_id, prompt_tokens=outcome.prompt_tokens, cached_tokens=outcome.cached_tokens,
                      completion_tokens=outcome.completion_tokens, compute_seconds=compute_seconds,
                      cost=prices.cost(outcome))
        written = set(outcome.written_ids)
        by_id = {w.request_id: w for w in work}
        for result in results:
            if result.failed and result.request_id in written:
                w = by_id[result.request_id]
                record_error(session, "engine", f"[{result.error_code}] {result.error_message}", job_id=job_id,
                             chunk_id=chunk_id, line=w.line, custom_id=w.custom_id)
        finish_job_if_done(session, job_id)


def finish_job_if_done(session: Session, job_id: str) -> bool:
    """in_progress -> finalizing -> completed once the job has no pending request. Returns True
    if this call completed it.

    The job row is locked first, so when two chunks of a job finish at once the second waits for
    the first's commit, then sees the job completed and does nothing.
    """
    lock_rows(session, Job, [job_id])
    job = session.get(Job, job_id, populate_existing=True)
    if job is None or job.status != JobStatus.IN_PROGRESS or job_counts(session, job_id).pending:
        return False
    set_status(session, job_id, JobStatus.FINALIZING)
    set_status(session, job_id, JobStatus.COMPLETED)
    return True


def _run(loop: EngineLoop, work: list[_Work], job_model: str) -> list[RequestResult]:
    """Every request of `work` through the engine in one call (so they are batched together)."""
    served = loop.engine.config.model
    if job_model != served:
        message = f"this worker serves model {served!r}, the job asks for {job_model!r}; run a worker for it"
        return [RequestResult(w.request_id, error_code="model_not_available", error_message=message) for w in work]
    results: dict[int, RequestResult] = {}
    runnable: list[tuple[_Work, list[int], Any]] = []
    for w in work:
        try:
            token_ids, params = to_engine_request(w.endpoint, w.body, loop.engine.tokenizer)
        except ValueError as e:  # submit validated the line, so this is rare: a template that fails, say
            results[w.request_id] = RequestResult(w.request_id, error_code="invalid_request", error_message=str(e))
            continue
        runnable.append((w, token_ids, params))
    outputs = loop.generate([t for _, t, _ in runnable], [p for _, _, p in runnable])
    for (w, _, _), out in zip(runnable, outputs, strict=True):
        results[w.request_id] = _result(w.request_id, out)
    return [results[w.request_id] for w in work]


def _result(request_id: int, out: CompletionOutput | ValueError) -> RequestResult:
    if isinstance(out, ValueError):
        message = str(out)
        code = "prompt_too_long" if "tokens" in message else "invalid_prompt"
        return RequestResult(request_id, error_code=code, error_message=message)
    return RequestResult(request_id, text=out.text, finish_reason=out.finish_reason,
                         prompt_tokens=out.num_prompt_tokens, cached_tokens=out.num_cached_tokens,
                         completion_tokens=len(out.token_ids))
