"""The statuses and priorities stored in the database, as string enums (compare equal to their values)."""

from __future__ import annotations

import enum


class JobStatus(str, enum.Enum):
    """OpenAI's batch statuses. Each has a `<status>_at` timestamp column on `Job`."""

    VALIDATING = "validating"
    FAILED = "failed"
    IN_PROGRESS = "in_progress"
    FINALIZING = "finalizing"
    COMPLETED = "completed"
    EXPIRED = "expired"
    CANCELLING = "cancelling"
    CANCELLED = "cancelled"

    @property
    def is_terminal(self) -> bool:
        return self in TERMINAL_JOB_STATUSES


TERMINAL_JOB_STATUSES = frozenset({JobStatus.FAILED, JobStatus.COMPLETED, JobStatus.EXPIRED, JobStatus.CANCELLED})

# The legal moves of `set_status`. OpenAI's lifecycle, plus in_progress -> failed for a job that
# cannot run at all (e.g. its model is missing). Reopening a completed job is `retry_failed`'s
# business alone and deliberately not listed here.
JOB_TRANSITIONS: dict[JobStatus, frozenset[JobStatus]] = {
    JobStatus.VALIDATING: frozenset({JobStatus.IN_PROGRESS, JobStatus.FAILED, JobStatus.CANCELLING, JobStatus.EXPIRED}),
    JobStatus.IN_PROGRESS: frozenset({JobStatus.FINALIZING, JobStatus.CANCELLING, JobStatus.EXPIRED, JobStatus.FAILED}),
    JobStatus.FINALIZING: frozenset({JobStatus.COMPLETED}),
    JobStatus.CANCELLING: frozenset({JobStatus.CANCELLED}),
    JobStatus.FAILED: frozenset(),
    JobStatus.COMPLETED: frozenset(),
    JobStatus.EXPIRED: frozenset(),
    JobStatus.CANCELLED: frozenset(),
}


class Priority(str, enum.Enum):
    """Queue priority; also the Celery queue name. Declared highest first."""

    CRITICAL = "critical"
    HIGH = "high"
    NORMAL = "normal"
    LOW = "low"


class ChunkStatus(str, enum.Enum):
    """pending: created, no task sent; queued: task sent; running: leased by a worker; done: finished
    (all its requests have a result, or its job was cancelled or expired)."""

    PENDING = "pending"
    QUEUED = "queued"
    RUNNING = "running"
    DONE = "done"


class RequestStatus(str, enum.Enum):
    """Only `pending` rows are ever written by a worker: that is what makes result writes idempotent."""

    PENDING = "pending"
    COMPLETED = "completed"
    FAILED = "failed"
    CANCELLED = "cancelled"
    EXPIRED = "expired"
