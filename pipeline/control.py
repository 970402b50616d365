"""Job control: cancel a job, retry its failed lines, list jobs. Plain functions over a session
factory, as `submit_file` is; the CLI (`pipeline/commands/control.py`) wraps them."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from sqlalchemy.orm import Session, sessionmaker

from db.enums import JobStatus
from db.repository import assign_chunks, cancel_job, list_jobs, require_tenant, retry_failed
from pipeline.settings import Settings
from pipeline.submit import SendChunk, job_summary, send_chunks


@dataclass(frozen=True, slots=True)
class ControlOutcome:
    """The job after the action, and how many lines the action touched."""

    summary: dict[str, Any]
    num_lines: int


def cancel(session_factory: sessionmaker[Session], job_id: str) -> ControlOutcome:
    """Cancel job `job_id`: pending lines become cancelled, finished results are kept (a worker
    still running one of its chunks writes nothing more). Raises ValueError for an unknown or
    finished job; cancelling a cancelled job again touches nothing."""
    with session_factory.begin() as session:
        num_cancelled = cancel_job(session, job_id)
        return ControlOutcome(job_summary(session, job_id), num_cancelled)


def retry(settings: Settings, session_factory: sessionmaker[Session], job_id: str, *,
          send_chunk: SendChunk) -> ControlOutcome:
    """Run the failed lines of job `job_id` again: they become pending, go into new chunks and are
    sent to the job's priority queue as submit sends them. Completed lines and lines rejected at
    submit are untouched. Raises ValueError for a job that cannot be retried (validating, failed,
    cancelled, expired)."""
    with session_factory.begin() as session:
        num_retried = retry_failed(session, job_id)
        chunks = assign_chunks(session, job_id, settings.chunk_size) if num_retried else []
        sends = [(chunk.id, chunk.priority.value) for chunk in chunks]
    send_chunks(session_factory, sends, send_chunk)
    with session_factory() as session:
        return ControlOutcome(job_summary(session, job_id), num_retried)


def jobs(session_factory: sessionmaker[Session], *, status: str | None = None, tenant: str | None = None,
         limit: int | None = None) -> list[dict[str, Any]]:
    """Summaries (`job_summary`) of jobs newest first, only those in `status` and of the tenant
    named `tenant` when given (ValueError for an unknown tenant)."""
    try:
        wanted = JobStatus(status) if status is not None else None
    except ValueError:
        raise ValueError(f"unknown status {status!r}; use one of {', '.join(s.value for s in JobStatus)}") from None
    with session_factory() as session:
        tenant_id = None if tenant is None else require_tenant(session, tenant).id
        found = list_jobs(session, status=wanted, tenant_id=tenant_id, limit=limit)
        return [job_summary(session, job.id) for job in found]
