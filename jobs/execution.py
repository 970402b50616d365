"""Run one chunk: lease it, generate its pending requests, write the results.

A plain function with explicit arguments, so the Celery task (`jobs.inference`) and the embedded
`pipeline run` share it, and tests call it directly. Safe to run twice for the same chunk (a
redelivered task): the lease keeps a second worker off a chunk being run, and results are only
written onto requests still pending, so a repeat writes and bills nothing.

Requests without a session run together in one engine call. A session's requests (all in one
chunk: `assign_chunks` keeps them together) run turn by turn, each turn's prompt built from the
session's history (`jobs.sessions`); the k-th pending turn of every session of the chunk runs in
one engine call, the first turns together with the session-less requests. The history is read
from the sessions table when the chunk is claimed and written back, one turn at a time for the
turns `record_results` actually wrote, in the results' transaction: a redelivered chunk appends
nothing twice. A failed turn (a prompt too long, say) is left out of the history.

Duplicates (requests of the chunk with the same `dedupe_key`, which submit sets only for
deterministic, session-less requests) are computed once; each duplicate gets the same text and
is billed as fully cached (`cached_tokens == prompt_tokens`), which is what a prefix-cache hit
on the whole prompt would have cost. Duplicates that landed in different chunks (a prefix group
larger than a chunk) are computed once per chunk.

Tenants: every request runs with its job's tenant's cache salt, so the prefix cache shares blocks
within a tenant only (another tenant's identical prompt is a miss: no `cached_tokens` or timing
tells it what others sent), and sessions are looked up in the tenant's own namespace.
"""

from __future__ import annotations

import logging
import sys
import threading
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, replace
from datetime import timedelta
from typing import Any

from sqlalchemy.orm import Session, sessionmaker

from db.models import Chunk, Job
from db.tenants import Tenant
from db.repository import (
    add_usage,
    chunk_requests,
    claim_chunk,
    deliveries_used_up,
    fail_lost_chunk,
    finish_job_if_done,
    get_session,
    record_error,
    record_results,
    set_status,
    upsert_session,
)
from db.retry import db_attempts
from db.base import utcnow
from db.results import RecordOutcome, RequestResult, RequestTimings, storable_text
from jobs.engine_host import to_engine_request
from jobs import worker_metrics
from jobs.chunk_progress import ChunkProgress
from jobs.lease_keeper import Watchdog, keep_lease
from jobs.sessions import Message, turn_messages, with_history
from pipeline.prices import Prices
from workers.engine_loop import EngineLoop
from workers.errors import ChatTemplateError, PromptTooLongError, RequestEngineError
from workers.outputs import CompletionOutput

log = logging.getLogger(__name__)

DEFAULT_LEASE = timedelta(hours=1)


@dataclass(frozen=True, slots=True)
class _QueueClock:
    """Turns the engine's clock (perf_counter) into seconds since the chunk was enqueued."""

    waited_before_claim: float  # wall seconds from enqueueing to this claim
    claimed_at: float  # perf_counter at the claim

    @classmethod
    def start(cls, chunk: Chunk) -> _QueueClock:
        enqueued = chunk.enqueued_at or chunk.created_at  # `pipeline run` never enqueues its chunks
        waited = max(0.0, (utcnow() - enqueued).total_seconds()) if enqueued is not None else 0.0
        return cls(waited, time.perf_counter())

    def queue_wait(self, first_scheduled: float | None) -> float | None:
        if first_scheduled is None:
            return None
        return self.waited_before_claim + max(0.0, first_scheduled - self.claimed_at)


@dataclass(frozen=True, slots=True)
class _Work:
    """One pending request, copied out of its row so the engine runs with no transaction open."""

    request_id: int
    line: int
    custom_id: str
    endpoint: str
    body: dict[str, Any]
    session_id: str | None
    dedupe_key: str | None


@dataclass(frozen=True, slots=True)
class _Owner:
    """The job a chunk belongs to, as the run needs it: its model, and its tenant's id and cache
    salt (None for a job of no tenant). The salt enters every prefix-cache block hash of the
    chunk's requests, so one tenant's blocks are never hits for another's prompts."""

    job_id: str
    model: str
    tenant_id: str | None
    cache_salt: str | None


@dataclass(frozen=True, slots=True)
class _Turn:
    """A session turn that ran: what it appends to its session's history once its result is written."""

    request_id: int
    session_id: str
    messages: list[Message]


def execute_chunk(
    session_factory: sessionmaker[Session],
    loop: EngineLoop,
    chunk_id: int,
    worker_name: str,
    *,
    prices: Prices = Prices(),
    lease: timedelta = DEFAULT_LEASE,
    max_redeliveries: int | None = None,
    stall_timeout: timedelta | None = None,
    on_unhealthy: Callable[[str], None] | None = None,
    on_tokens: Callable[[str, int], None] | None = None,
    on_job_ended: Callable[[str], None] | None = None,
) -> None:
    """Run chunk `chunk_id` and record its results; finalize its job when nothing is left pending.

    Does nothing for a chunk that is done or leased by another worker (a duplicate delivery).
    Requests the engine refuses (a prompt longer than the context, say) are failed with their own
    error; the rest of the chunk is unaffected. A request that makes the engine raise is run again
    alone by the engine loop and, if it raises alone too, failed with code `engine_error` and the
    traceback in the error history; the requests that shared its steps complete. Any other crash
    is recorded in the error history and re-raised: the chunk stays leased until `lease` runs out
    and the lost-chunk sweep resends it. While the chunk runs its lease is renewed (`keep_lease`),
    so only a dead or hung worker loses it.

    With a `stall_timeout`, a chunk that makes no progress for that long (no prompt built, no engine
    step while it waits for the engine: a hung template or engine) is given up: its lease is no longer
    renewed, so it is taken over as a dead worker's chunk would be, the stall goes to the error
    history with the stuck thread's stack, and `on_unhealthy(reason)` tells the worker.

    `on_job_ended(job_id)` is called once the transaction that completed the job has committed
    (one chunk's run completes a job; the worker sends the export and webhook task from it).

    A chunk claimed more than 1 + `max_redeliveries` times (each earlier run died with its worker,
    or crashed) is not run again: its pending requests fail with `worker_lost` (None: no cap).
    Each transaction is run again through a brief database outage (`db.retry`).
    `on_tokens(tenant_id, tokens)` is told the prompt and completion tokens the chunk's written
    results used (the tenant's daily quota); a failure there is logged, never the chunk's.
    """
    for attempt in db_attempts(f"claim chunk {chunk_id}"):
        with attempt, session_factory.begin() as session:
            chunk = claim_chunk(session, chunk_id, worker=worker_name, lease=lease)
            if chunk is None:
                log.info("chunk %s is done or leased by another worker; skipping", chunk_id)
                return
            # This claim is one more than allowed: the chunk was started `attempts - 1` times.
            given_up_after = chunk.attempts - 1 if deliveries_used_up(chunk.attempts - 1, max_redeliveries) else None
            if given_up_after is None:
                work, histories, owner = _load_chunk(session, chunk)
                clock = _QueueClock.start(chunk)
    if given_up_after is not None:
        # In a transaction of its own, once the claim (and its lease) is committed: failing the
        # requests locks the job's row, and taking that after the chunk's, which the claim holds,
        # would invert the job -> chunk order every writer keeps (a sweep giving up the same
        # chunk deadlocked with it).
        _give_up(session_factory, chunk_id, given_up_after)
        return

    job_id, tenant_id = owner.job_id, owner.tenant_id
    engine_tracebacks: dict[int, str] = {}  # request id -> the engine's traceback, for `engine_error`s
    progress = ChunkProgress(lambda: loop.num_steps)
    watchdog = None if stall_timeout is None else Watchdog(progress, stall_timeout, _stall_reporter(
        session_factory, job_id, chunk_id, worker_name, threading.get_ident(), on_unhealthy))
    try:
        with keep_lease(session_factory, chunk_id, worker_name, lease, watchdog):
            results, turns = _run(loop, work, owner, histories, engine_tracebacks, progress, clock)
    except Exception:
        for attempt in db_attempts(f"record the engine failure of chunk {chunk_id}"):
            with attempt, session_factory.begin() as session:
                record_error(session, "engine", f"chunk {chunk_id} failed in the engine; it will be retried",
                             job_id=job_id, chunk_id=chunk_id, traceback=traceback.format_exc())
        raise

    # Safe to repeat: only requests still pending are written, so a retry after a commit whose reply
    # was lost writes and bills nothing.
    for attempt in db_attempts(f"write the results of chunk {chunk_id}"):
        with attempt, session_factory.begin() as session:
            outcome = record_results(session, chunk_id, results)  # locks the job row first
            written = set(outcome.written_ids)
            if outcome.written:
                add_usage(session, job_id, prompt_tokens=outcome.prompt_tokens, cached_tokens=outcome.cached_tokens,
                          completion_tokens=outcome.completion_tokens, compute_seconds=outcome.engine_seconds,
                          cost=prices.cost(outcome))
            for turn in turns:  # in turn order, so each session's history grows in order
                if turn.request_id in written:
                    upsert_session(session, turn.session_id, turn.messages, tenant_id=tenant_id, job_id=job_id)
            by_id = {w.request_id: w for w in work}
            for result in results:
                if result.failed and result.request_id in written:
                    w = by_id[result.request_id]
                    record_error(session, "engine", f"[{result.error_code}] {result.error_message}", job_id=job_id,
                                 chunk_id=chunk_id, line=w.line, custom_id=w.custom_id,
                                 traceback=engine_tracebacks.get(result.request_id))
            ended = finish_job_if_done(session, job_id)
    if on_tokens is not None and tenant_id is not None and outcome.written:
        try:
            on_tokens(tenant_id, outcome.prompt_tokens + outcome.completion_tokens)
        except Exception:  # noqa: BLE001 - the results are written; only the day's count misses them
            log.warning("could not count chunk %s's tokens against tenant %s's day", chunk_id, tenant_id, exc_info=True)
    if ended and on_job_ended is not None:
        on_job_ended(job_id)
    metrics = worker_metrics.current()
    if metrics is not None:  # counted once committed, so a retried transaction counts nothing twice
        metrics.count(r for r in results if r.request_id in written)


def _load_chunk(session: Session, chunk: Chunk) -> tuple[list[_Work], dict[str, list[Message]], _Owner]:
    """A claimed chunk's pending work, the histories of its sessions (its tenant's) and its job."""
    job = session.get(Job, chunk.job_id)
    tenant = None if job.tenant_id is None else session.get(Tenant, job.tenant_id)
    work = [_Work(r.id, r.line, r.custom_id, r.endpoint, dict(r.body), r.session_id, r.dedupe_key)
            for r in chunk_requests(session, chunk.id)]
    histories: dict[str, list[Message]] = {}
    for session_id in dict.fromkeys(w.session_id for w in work if w.session_id is not None):
        record = get_session(session, session_id, tenant_id=job.tenant_id)
        histories[session_id] = [] if record is None else list(record.history)
    return work, histories, _Owner(job.id, job.model, job.tenant_id, None if tenant is None else tenant.cache_salt)


def _give_up(session_factory: sessionmaker[Session], chunk_id: int, tries: int) -> None:
    for attempt in db_attempts(f"give up chunk {chunk_id}"):
        with attempt, session_factory.begin() as session:
            failed = fail_lost_chunk(session, chunk_id, tries=tries)
    if failed:  # 0: given up already by a racing sweep or delivery
        log.error("chunk %s was started %d times without finishing; failed its %d pending requests",
                  chunk_id, tries, failed)


def _stall_reporter(session_factory: sessionmaker[Session], job_id: str, chunk_id: int, worker_name: str,
                    thread_id: int, on_unhealthy: Callable[[str], None] | None) -> Callable[[float], None]:
    """What the watchdog calls when the chunk has stalled for `seconds` (on the lease keeper's thread)."""

    def report(seconds: float) -> None:
        frame = sys._current_frames().get(thread_id)
        stack = None if frame is None else "".join(traceback.format_stack(frame))
        reason = f"no progress on chunk {chunk_id} for {seconds:.0f} s"
        message = (f"worker {worker_name} made {reason}; it gave the chunk up (another worker takes it over once "
                   "its lease runs out) and reports itself unhealthy")
        for attempt in db_attempts(f"record the stall of chunk {chunk_id}"):
            with attempt, session_factory.begin() as session:
                record_error(session, "stalled", message, job_id=job_id, chunk_id=chunk_id, traceback=stack)
        if on_unhealthy is not None:
            on_unhealthy(reason)

    return report


def _run(
    loop: EngineLoop, work: list[_Work], owner: _Owner, histories: dict[str, list[Message]],
    engine_tracebacks: dict[int, str], progress: ChunkProgress, clock: _QueueClock,
) -> tuple[list[RequestResult], list[_Turn]]:
    """Every request of `work` through the engine: (results in `work` order, session turns that
    succeeded in the order they ran). `histories` (session id -> messages) grows as turns finish;
    `engine_tracebacks` gets the engine's traceback of each request that failed with `engine_error`."""
    served = loop.engine.config.model
    if owner.model != served:
        message = f"this worker serves model {served!r}, the job asks for {owner.model!r}; run a worker for it"
        return [RequestResult(w.request_id, error_code="model_not_found", error_message=message)
                for w in work], []
    singles = [w for w in work if w.session_id is None]
    sessions: dict[str, list[_Work]] = {}
    for w in work:  # `work` is in line order within a session: the order its turns run in
        if w.session_id is not None:
            sessions.setdefault(w.session_id, []).append(w)
    results: dict[int, RequestResult] = {}
    turns: list[_Turn] = []
    k = 0
    while True:
        batch = [*(singles if k == 0 else ()), *(ws[k] for ws in sessions.values() if k < len(ws))]
        if not batch:
            break
        results.update(_generate(loop, batch, owner.cache_salt, histories, engine_tracebacks, progress, clock))
        for w in batch:
            result = results[w.request_id]
            if w.session_id is not None and not result.failed:
                messages = turn_messages(w.endpoint, w.body, result.text or "")
                histories[w.session_id] = [*histories[w.session_id], *messages]
                turns.append(_Turn(w.request_id, w.session_id, messages))
        k += 1
    return [results[w.request_id] for w in work], turns


def _generate(loop: EngineLoop, batch: list[_Work], cache_salt: str | None, histories: dict[str, list[Message]],
              engine_tracebacks: dict[int, str], progress: ChunkProgress,
              clock: _QueueClock) -> dict[int, RequestResult]:
    """One engine call for `batch` (so its requests are batched together); each dedupe key once."""
    results: dict[int, RequestResult] = {}
    leaders: dict[str, int] = {}  # dedupe key -> request id of the one that runs
    followers: list[tuple[int, int]] = []  # (duplicate's request id, its leader's)
    runnable: list[tuple[_Work, list[int], Any]] = []
    for w in batch:
        if w.dedupe_key is not None and w.session_id is None:
            if w.dedupe_key in leaders:
                followers.append((w.request_id, leaders[w.dedupe_key]))
                continue
            leaders[w.dedupe_key] = w.request_id
        body = w.body if w.session_id is None else with_history(w.endpoint, w.body, histories[w.session_id])
        try:
            token_ids, params = to_engine_request(w.endpoint, body, loop.engine.tokenizer)
        except ChatTemplateError as e:  # the model's template cannot render this line's messages
            results[w.request_id] = RequestResult(w.request_id, error_code="chat_template_error", error_message=str(e))
            continue
        except ValueError as e:  # submit validated the line, so this is rare
            results[w.request_id] = RequestResult(w.request_id, error_code="invalid_request", error_message=str(e))
            continue
        finally:
            progress.touch()  # a prompt built, or given up: the chunk is not stuck
        runnable.append((w, token_ids, params))
    with progress.waiting_for_engine():
        outputs = (loop.generate([t for _, t, _ in runnable], [p for _, _, p in runnable], cache_salt)
                   if runnable else [])
    for (w, _, _), out in zip(runnable, outputs, strict=True):
        results[w.request_id] = _result(w.request_id, out, clock)
        if isinstance(out, RequestEngineError):
            engine_tracebacks[w.request_id] = out.traceback
    for request_id, leader_id in followers:
        leader = results[leader_id]
        # A copy took no engine time of its own: billing it the leader's would count those steps twice.
        timings = None if leader.timings is None else replace(leader.timings, engine=0.0)
        results[request_id] = replace(leader, request_id=request_id, cached_tokens=leader.prompt_tokens,
                                      timings=timings)
    return results


def _result(request_id: int, out: CompletionOutput | ValueError | RequestEngineError,
            clock: _QueueClock) -> RequestResult:
    if isinstance(out, RequestEngineError):
        return RequestResult(request_id, error_code="engine_error", error_message=str(out))
    if isinstance(out, ValueError):
        message = str(out)
        code = "prompt_too_long" if isinstance(out, PromptTooLongError) else "invalid_prompt"
        return RequestResult(request_id, error_code=code, error_message=message)
    # The text as the database keeps it, so that later turns of a session in this chunk see the
    # history that later chunks will read back.
    m = out.metrics
    timings = RequestTimings(queue_wait=clock.queue_wait(m.first_scheduled_time),
                             latency=m.latency, ttft=m.ttft, engine=m.engine_seconds)
    return RequestResult(request_id, text=storable_text(out.text), finish_reason=out.finish_reason,
                         prompt_tokens=out.num_prompt_tokens, cached_tokens=out.num_cached_tokens,
                         completion_tokens=len(out.token_ids), timings=timings)
