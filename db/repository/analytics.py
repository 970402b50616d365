"""Read-only figures over results and usage: what `pipeline stats`, `usage`, `status` and the job
report show. Everything is aggregated in SQL (a million results must not be loaded into Python);
percentiles too, with PostgreSQL's `percentile_disc`, and on SQLite, which has none, one indexed
ORDER BY ... OFFSET per percentile."""

from __future__ import annotations

import math
from dataclasses import dataclass
from datetime import datetime
from decimal import Decimal
from typing import Any

from sqlalchemy import ColumnElement, Select, and_, func, literal, select, within_group
from sqlalchemy.orm import InstrumentedAttribute, Session

from db.enums import JobStatus, RequestStatus
from db.models import Job, Request
from db.records import JobUsage
from db.tenants import Tenant

PERCENTILES = (0.50, 0.95, 0.99)
TIMING_COLUMNS = ("latency_s", "ttft_s", "queue_wait_s")
USAGE_GROUPS = ("job", "tenant", "day", "model")


@dataclass(frozen=True, slots=True)
class ResultTotals:
    """Results written in a window (or of a job)."""

    completed: int
    failed: int
    prompt_tokens: int
    cached_tokens: int
    completion_tokens: int
    first_at: datetime | None  # the earliest result in it
    last_at: datetime | None

    @property
    def hit_rate(self) -> float:
        """Prompt tokens served from the prefix cache, of all prompt tokens (0 when none)."""
        return self.cached_tokens / self.prompt_tokens if self.prompt_tokens else 0.0


@dataclass(frozen=True, slots=True)
class Percentiles:
    p50: float
    p95: float
    p99: float


@dataclass(frozen=True, slots=True)
class UsageRow:
    """Usage of one group (`key`: a job id, tenant name, day 'YYYY-MM-DD' or model; None: no tenant)."""

    key: str | None
    jobs: int
    prompt_tokens: int
    cached_tokens: int
    completion_tokens: int
    compute_seconds: float
    cost: Decimal

    def as_dict(self) -> dict[str, Any]:
        return {"key": self.key, "jobs": self.jobs, "prompt_tokens": self.prompt_tokens,
                "cached_tokens": self.cached_tokens, "completion_tokens": self.completion_tokens,
                "compute_seconds": round(self.compute_seconds, 6), "cost": f"{self.cost:f}"}


def _finished(since: datetime | None, job_id: str | None) -> ColumnElement[bool]:
    conditions = [Request.status.in_((RequestStatus.COMPLETED, RequestStatus.FAILED))]
    if since is not None:
        conditions.append(Request.completed_at >= since)
    if job_id is not None:
        conditions.append(Request.job_id == job_id)
    return and_(*conditions)


def result_totals(session: Session, *, since: datetime | None = None, job_id: str | None = None) -> ResultTotals:
    """Completed and failed results since `since` (by when they were written) and/or of one job."""
    completed = func.count().filter(Request.status == RequestStatus.COMPLETED)
    failed = func.count().filter(Request.status == RequestStatus.FAILED)
    row = session.execute(select(
        completed, failed, func.coalesce(func.sum(Request.prompt_tokens), 0),
        func.coalesce(func.sum(Request.cached_tokens), 0), func.coalesce(func.sum(Request.completion_tokens), 0),
        func.min(Request.completed_at), func.max(Request.completed_at),
    ).where(_finished(since, job_id))).one()
    return ResultTotals(int(row[0]), int(row[1]), int(row[2]), int(row[3]), int(row[4]), row[5], row[6])


def timing_percentiles(session: Session, column: str, *, since: datetime | None = None,
                       job_id: str | None = None) -> Percentiles | None:
    """P50/P95/P99 of a timing column (`TIMING_COLUMNS`) over the results since `since` and/or of one
    job; None when no result has it (none written, or written before timings were kept)."""
    if column not in TIMING_COLUMNS:
        raise ValueError(f"unknown timing column {column!r}; expected one of {', '.join(TIMING_COLUMNS)}")
    attr: InstrumentedAttribute[float | None] = getattr(Request, column)
    where = and_(_finished(since, job_id), attr.is_not(None))
    if session.get_bind().dialect.name == "postgresql":
        values = session.execute(select(*(within_group(func.percentile_disc(literal(q)), attr) for q in PERCENTILES))
                                 .where(where)).one()
        return None if values[0] is None else Percentiles(*(float(v) for v in values))
    n = session.scalar(select(func.count()).where(where)) or 0
    if n == 0:
        return None
    picks = []
    for q in PERCENTILES:  # the same rank percentile_disc takes: the first value at or past q
        offset = max(1, math.ceil(q * n - 1e-9)) - 1  # rank ceil(q n); the epsilon: 0.95 * 100 is 95.00000000000001
        picks.append(float(session.scalar(select(attr).where(where).order_by(attr).offset(offset).limit(1))))
    return Percentiles(*picks)


def usage_by(session: Session, by: str, *, since: datetime | None = None) -> list[UsageRow]:
    """Usage summed per job, tenant, day (the job's creation day, UTC) or model, of the jobs created
    since `since`; the largest cost first."""
    if by not in USAGE_GROUPS:
        raise ValueError(f"cannot group usage by {by!r}; use one of {', '.join(USAGE_GROUPS)}")
    dialect = session.get_bind().dialect.name
    key: ColumnElement[Any]
    if by == "job":
        key = Job.id
    elif by == "tenant":
        key = Tenant.name  # operators name tenants; their ids are internal
    elif by == "model":
        key = Job.model
    elif dialect == "postgresql":
        key = func.to_char(func.timezone("UTC", Job.created_at), "YYYY-MM-DD")
    else:
        key = func.strftime("%Y-%m-%d", Job.created_at)
    query: Select[Any] = (
        select(key, func.count(), func.sum(JobUsage.prompt_tokens), func.sum(JobUsage.cached_tokens),
               func.sum(JobUsage.completion_tokens), func.sum(JobUsage.compute_seconds), func.sum(JobUsage.cost))
        .join(Job, Job.id == JobUsage.job_id)
        .outerjoin(Tenant, Tenant.id == Job.tenant_id)
        .group_by(key)
        .order_by(func.sum(JobUsage.cost).desc(), key)
    )
    if since is not None:
        query = query.where(Job.created_at >= since)
    return [UsageRow(None if r[0] is None else str(r[0]), int(r[1]), int(r[2] or 0), int(r[3] or 0), int(r[4] or 0),
                     float(r[5] or 0.0), Decimal(r[6] or 0)) for r in session.execute(query)]


def running_jobs(session: Session) -> list[Job]:
    """Jobs in progress or finalizing, oldest first."""
    query = select(Job).where(Job.status.in_((JobStatus.IN_PROGRESS, JobStatus.FINALIZING))).order_by(Job.created_at)
    return list(session.scalars(query))
