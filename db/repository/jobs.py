"""Jobs: creation (idempotent by key), the status lifecycle, cancel, expiry, retry and counts."""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import and_, func, or_, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from db.base import utcnow
from db.enums import JOB_TRANSITIONS, ChunkStatus, JobStatus, Priority, RequestStatus
from db.models import Chunk, Job, Request
from db.repository._locks import lock_rows, write_lock

# The error each line of a closed job gets when it never ran: OpenAI's codes, and what to do.
CLOSED_ERRORS = {
    RequestStatus.CANCELLED: ("batch_cancelled", "the job was cancelled before this line ran; submit it again "
                                                 "to run it"),
    RequestStatus.EXPIRED: ("batch_expired", "the job's completion window passed before this line ran; submit it "
                                             "again, with a longer --completion-window or more workers"),
}


class IdempotencyKeyReused(ValueError):
    """An idempotency key sent again with a file other than the one its job was submitted with."""

    def __init__(self, job_id: str, key: str, input_file: str) -> None:
        super().__init__(job_id, key, input_file)  # args mirror the constructor, so the error can be rebuilt
        self.job_id, self.key, self.input_file = job_id, key, input_file

    def __str__(self) -> str:
        return (f"idempotency key {self.key!r} was used for job {self.job_id} with another file "
                f"({self.input_file}); submit this file with a new key (or none), or see the first job with "
                f"`pipeline status {self.job_id}`")


@dataclass(slots=True, frozen=True)
class JobCounts:
    """Requests of a job by status, counted from the request rows themselves."""

    total: int
    pending: int
    completed: int
    failed: int
    cancelled: int
    expired: int


def new_job_id() -> str:
    return "batch_" + uuid.uuid4().hex


def get_job(session: Session, job_id: str) -> Job | None:
    return session.get(Job, job_id)


def list_jobs(session: Session, *, status: JobStatus | None = None, tenant_id: str | None = None,
              after: Job | None = None, limit: int | None = None) -> list[Job]:
    """Jobs newest first, only those in `status` and of `tenant_id` when given, at most `limit`;
    with `after`, only those listed after that job (a page's last job: the cursor of the next)."""
    query = select(Job).order_by(Job.created_at.desc(), Job.id.desc()).limit(limit)
    if after is not None:
        query = query.where(or_(Job.created_at < after.created_at,
                                and_(Job.created_at == after.created_at, Job.id < after.id)))
    if status is not None:
        query = query.where(Job.status == status)
    if tenant_id is not None:
        query = query.where(Job.tenant_id == tenant_id)
    return list(session.scalars(query))


ACTIVE_JOB_STATUSES = (JobStatus.VALIDATING, JobStatus.IN_PROGRESS, JobStatus.FINALIZING, JobStatus.CANCELLING)


def count_active_jobs(session: Session, tenant_id: str) -> int:
    """The tenant's jobs that are not finished (its `max_active_jobs` quota counts them)."""
    return session.scalar(select(func.count()).select_from(Job)
                          .where(Job.tenant_id == tenant_id, Job.status.in_(ACTIVE_JOB_STATUSES)))


def create_job(
    session: Session,
    *,
    input_file: str,
    model: str,
    priority: Priority = Priority.NORMAL,
    idempotency_key: str | None = None,
    input_digest: str | None = None,
    strict: bool = False,
    completion_window: timedelta | None = None,
    tenant_id: str | None = None,
    metadata: dict[str, Any] | None = None,
    now: datetime | None = None,
) -> Job:
    """A new job in `validating`, or the existing job if `idempotency_key` was used before.

    Two concurrent submits with one key both get the job that committed first (the loser's insert
    hits the unique constraint inside a savepoint and reads the winner's row). Keys are scoped per
    tenant: another tenant's use of a key is invisible here. `input_digest` (the
    submitted file's SHA-256) is stored with the job; a key whose job holds another digest is
    refused with `IdempotencyKeyReused`, naming that job: a retry sends the same file, so another
    file under the key is a mistake that must not be answered with the first file's results.
    """
    if completion_window is not None and completion_window <= timedelta(0):
        raise ValueError(f"completion window must be positive, got {completion_window}")
    write_lock(session)
    if idempotency_key is not None:
        existing = _job_by_key(session, tenant_id, idempotency_key)
        if existing is not None:
            return _check_key_reuse(existing, input_digest)
    now = now or utcnow()
    job = Job(
        id=new_job_id(),
        status=JobStatus.VALIDATING,
        input_file=input_file,
        model=model,
        priority=priority,
        idempotency_key=idempotency_key,
        input_digest=input_digest,
        strict=strict,
        tenant_id=tenant_id,
        metadata_=dict(metadata or {}),
        errors=[],
        created_at=now,
        expires_at=now + completion_window if completion_window is not None else None,
        # Given, not left unset: see the note in assign_chunks.
        **{f"{status.value}_at": None for status in JobStatus if status != JobStatus.VALIDATING},
    )
    try:
        with session.begin_nested():
            session.add(job)
    except IntegrityError:
        existing = _job_by_key(session, tenant_id, idempotency_key) if idempotency_key is not None else None
        if existing is None:
            raise
        return _check_key_reuse(existing, input_digest)
    return job


def set_status(session: Session, job_id: str, status: JobStatus, *, now: datetime | None = None) -> Job:
    """Move a job to `status` and stamp `<status>_at`. Setting the current status again is a no-op
    (a redelivered task may repeat it); any move not in `JOB_TRANSITIONS` raises ValueError."""
    job = _lock_job(session, job_id)
    if job.status == status:
        return job
    if status not in JOB_TRANSITIONS[job.status]:
        raise ValueError(f"job {job_id}: cannot go from {job.status.value} to {status.value}")
    job.status = status
    setattr(job, f"{status.value}_at", now or utcnow())
    session.flush()
    return job


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


def cancel_job(session: Session, job_id: str, *, now: datetime | None = None) -> int:
    """Cancel a job: its pending requests become cancelled, finished results are kept, unfinished
    chunks are closed (a worker still running one finds nothing pending to write). The job passes
    through `cancelling` to `cancelled` at once. Returns the number of requests cancelled; a job
    already cancelled gives 0, a finished one raises ValueError."""
    now = now or utcnow()
    job = _lock_job(session, job_id)
    if job.status == JobStatus.CANCELLED:
        return 0
    set_status(session, job_id, JobStatus.CANCELLING, now=now)
    cancelled = _close_job_work(session, job_id, RequestStatus.CANCELLED, now)
    set_status(session, job_id, JobStatus.CANCELLED, now=now)
    return cancelled


def expire_jobs(session: Session, *, now: datetime | None = None) -> list[str]:
    """Expire every validating or in-progress job whose `expires_at` has passed: pending requests
    become expired, finished results are kept. Returns the expired job ids, oldest first."""
    now = now or utcnow()
    write_lock(session)
    due = select(Job.id).where(Job.status.in_([JobStatus.VALIDATING, JobStatus.IN_PROGRESS]), Job.expires_at <= now)
    job_ids = list(session.scalars(due.order_by(Job.created_at, Job.id).with_for_update()))
    for job_id in job_ids:
        set_status(session, job_id, JobStatus.EXPIRED, now=now)
        _close_job_work(session, job_id, RequestStatus.EXPIRED, now)
    return job_ids


def retry_failed(session: Session, job_id: str) -> int:
    """Make a job's failed requests pending again (results cleared, chunk unassigned, attempts
    kept) and return how many. A completed or finalizing job with failures goes back to
    `in_progress` (completed_at and finalizing_at cleared). The caller then assigns and dispatches
    chunks. Jobs that are validating or already closed another way raise ValueError."""
    job = _lock_job(session, job_id)
    if job.status not in (JobStatus.IN_PROGRESS, JobStatus.FINALIZING, JobStatus.COMPLETED):
        raise ValueError(f"job {job_id}: cannot retry a job that is {job.status.value}")
    reset = (
        update(Request)
        .where(Request.job_id == job_id, Request.status == RequestStatus.FAILED)
        .values(
            status=RequestStatus.PENDING,
            chunk_id=None,
            text=None,
            finish_reason=None,
            prompt_tokens=None,
            cached_tokens=None,
            completion_tokens=None,
            error_code=None,
            error_message=None,
            completed_at=None,
        )
        .execution_options(synchronize_session="evaluate")
    )
    retried = session.execute(reset).rowcount
    if retried == 0:
        return 0
    job.request_failed = Job.request_failed - retried
    if job.status != JobStatus.IN_PROGRESS:
        # Reopening is deliberately not a JOB_TRANSITIONS move: only a retry may do it.
        job.status = JobStatus.IN_PROGRESS
        job.finalizing_at = None
        job.completed_at = None
    session.flush()
    session.refresh(job)
    return retried


def job_counts(session: Session, job_id: str) -> JobCounts:
    rows = session.execute(
        select(Request.status, func.count()).where(Request.job_id == job_id).group_by(Request.status)
    ).all()
    by_status = {status: count for status, count in rows}
    return JobCounts(
        total=sum(by_status.values()),
        pending=by_status.get(RequestStatus.PENDING, 0),
        completed=by_status.get(RequestStatus.COMPLETED, 0),
        failed=by_status.get(RequestStatus.FAILED, 0),
        cancelled=by_status.get(RequestStatus.CANCELLED, 0),
        expired=by_status.get(RequestStatus.EXPIRED, 0),
    )


def _job_by_key(session: Session, tenant_id: str | None, idempotency_key: str) -> Job | None:
    tenant = Job.tenant_id.is_(None) if tenant_id is None else Job.tenant_id == tenant_id
    return session.scalar(select(Job).where(tenant, Job.idempotency_key == idempotency_key))


def _check_key_reuse(job: Job, input_digest: str | None) -> Job:
    """`job`, found by its tenant's key, if that key may return it: the same file when both
    digests are known."""
    if input_digest is not None and job.input_digest is not None and input_digest != job.input_digest:
        raise IdempotencyKeyReused(job.id, job.idempotency_key or "", job.input_file)
    return job


def _lock_job(session: Session, job_id: str) -> Job:
    """The job row, re-read and locked (FOR UPDATE on PostgreSQL) until the transaction ends."""
    write_lock(session)
    job = session.get(Job, job_id, with_for_update=True, populate_existing=True)
    if job is None:
        raise ValueError(f"no job {job_id!r}")
    return job


def _close_job_work(session: Session, job_id: str, request_status: RequestStatus, now: datetime) -> int:
    """Unfinished chunks of the job -> done; pending requests -> `request_status`, with its error
    (`CLOSED_ERRORS`) on the row, counted in `request_failed`. Returns the count. Chunks before requests: the lock order of
    every writer (job -> chunk -> requests)."""
    code, message = CLOSED_ERRORS[request_status]
    session.execute(
        update(Chunk)
        .where(Chunk.job_id == job_id, Chunk.status != ChunkStatus.DONE)
        .values(status=ChunkStatus.DONE, finished_at=now, lease_expires_at=None)
        .execution_options(synchronize_session="evaluate")
    )
    closed = session.execute(
        update(Request)
        .where(Request.job_id == job_id, Request.status == RequestStatus.PENDING)
        .values(status=request_status, error_code=code, error_message=message, completed_at=now)
        .execution_options(synchronize_session="evaluate")
    ).rowcount
    if closed:
        # A line closed unrun counts as failed, as OpenAI counts it: a closed job's counts add up
        # (completed + failed == total).
        session.execute(
            update(Job).where(Job.id == job_id).values(request_failed=Job.request_failed + closed)
            .execution_options(synchronize_session="fetch")
        )
    return closed
