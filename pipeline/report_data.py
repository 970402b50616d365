"""The figures of a job report, read from the database: per-result timings and tokens (streamed in
batches, a few numbers a row), errors by code, and the job's usage."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from decimal import Decimal

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from db.enums import RequestStatus
from db.models import Job, Request
from db.records import ErrorEvent
from db.repository import get_usage
from db.repository.jobs import get_job


@dataclass(frozen=True, slots=True)
class EndpointTotals:
    prompt_tokens: int = 0
    cached_tokens: int = 0
    completion_tokens: int = 0


@dataclass(slots=True)
class ReportData:
    job: Job
    finished_at: list[float] = field(default_factory=list)  # seconds since the first result, one per result
    latency_s: list[float] = field(default_factory=list)
    ttft_s: list[float] = field(default_factory=list)
    prompt_tokens: list[int] = field(default_factory=list)  # per completed result, in `finished_at` order
    cached_tokens: list[int] = field(default_factory=list)
    by_endpoint: dict[str, EndpointTotals] = field(default_factory=dict)
    errors_by_code: dict[str, int] = field(default_factory=dict)
    cost: Decimal = Decimal(0)
    currency: str = "USD"
    compute_seconds: float = 0.0
    started: datetime | None = None


def load_report_data(session: Session, job_id: str) -> ReportData:
    """Everything the report plots for job `job_id`; ValueError for an unknown job."""
    job = get_job(session, job_id)
    if job is None:
        raise ValueError(f"no job {job_id!r}; `pipeline list` shows the jobs")
    data = ReportData(job)
    query = (select(Request.completed_at, Request.latency_s, Request.ttft_s, Request.prompt_tokens,
                    Request.cached_tokens)
             .where(Request.job_id == job_id, Request.status == RequestStatus.COMPLETED)
             .order_by(Request.completed_at))
    for completed_at, latency, ttft, prompt, cached in session.execute(query.execution_options(yield_per=10_000)):
        data.started = data.started or completed_at
        data.finished_at.append((completed_at - data.started).total_seconds())
        if latency is not None:
            data.latency_s.append(latency)
        if ttft is not None:
            data.ttft_s.append(ttft)
        data.prompt_tokens.append(prompt or 0)
        data.cached_tokens.append(cached or 0)
    totals = (select(Request.endpoint, func.sum(Request.prompt_tokens), func.sum(Request.cached_tokens),
                     func.sum(Request.completion_tokens))
              .where(Request.job_id == job_id, Request.status == RequestStatus.COMPLETED).group_by(Request.endpoint))
    data.by_endpoint = {e: EndpointTotals(int(p or 0), int(c or 0), int(o or 0)) for e, p, c, o in session.execute(totals)}
    failed = (select(Request.error_code, func.count()).where(Request.job_id == job_id, Request.error_code.is_not(None))
              .group_by(Request.error_code))
    data.errors_by_code = {code: int(n) for code, n in session.execute(failed)}
    # Lines rejected at submit have no request row: their codes are in the error history.
    rejected = select(ErrorEvent.message).where(ErrorEvent.job_id == job_id, ErrorEvent.kind == "validation")
    from pipeline.submit import split_validation_message

    for message in session.scalars(rejected):
        code = split_validation_message(message)[0]
        data.errors_by_code[code] = data.errors_by_code.get(code, 0) + 1
    usage = get_usage(session, job_id)
    if usage is not None:
        data.cost, data.currency, data.compute_seconds = usage.cost, usage.currency, usage.compute_seconds
    return data
