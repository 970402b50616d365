"""The work itself: a `Job` (one submitted file), its `Request`s (one per input line, with the result
written onto the same row) and the `Chunk`s that carry groups of requests to workers."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import CheckConstraint, ForeignKey, Index, String, Text, UniqueConstraint, text
from sqlalchemy.orm import Mapped, mapped_column

from db.base import Base, IdType, str_enum, utcnow
from db.enums import ChunkStatus, JobStatus, Priority, RequestStatus


class Job(Base):
    """A submitted batch. `request_*` counters are kept in step with the request rows by the
    repository (SQL increments, so concurrent chunk writes never lose an update)."""

    __tablename__ = "jobs"

    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    status: Mapped[JobStatus] = mapped_column(str_enum(JobStatus, "status"), default=JobStatus.VALIDATING)
    input_file: Mapped[str] = mapped_column(Text)
    # The URL its lines go to ("/v1/chat/completions"); both, comma-separated, for a file that
    # mixes them; "" while no line is stored (or none was good).
    endpoint: Mapped[str] = mapped_column(String(64), default="", server_default="")
    model: Mapped[str] = mapped_column(String(512))
    priority: Mapped[Priority] = mapped_column(str_enum(Priority, "priority"), default=Priority.NORMAL)
    # Unique per tenant (below): one tenant's key never finds, or reveals, another tenant's job.
    idempotency_key: Mapped[str | None] = mapped_column(String(255))
    # SHA-256 (hex) of the submitted file, kept with an idempotency key: the key of a job returns
    # it only for the same file. None for jobs without a key, and for those stored before 0002.
    input_digest: Mapped[str | None] = mapped_column(String(64))
    strict: Mapped[bool] = mapped_column(default=False)
    tenant_id: Mapped[str | None] = mapped_column(ForeignKey("tenants.id"), index=True)

    request_total: Mapped[int] = mapped_column(default=0)
    request_completed: Mapped[int] = mapped_column(default=0)
    request_failed: Mapped[int] = mapped_column(default=0)

    # File-level errors (unreadable file, strict-mode rejection), each {"code", "message", "line"?}.
    errors: Mapped[list[dict[str, Any]]] = mapped_column(default=list)
    # `metadata` is reserved on declarative classes; the column keeps the OpenAI name.
    metadata_: Mapped[dict[str, Any]] = mapped_column("metadata", default=dict)

    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    in_progress_at: Mapped[datetime | None]
    finalizing_at: Mapped[datetime | None]
    completed_at: Mapped[datetime | None]
    failed_at: Mapped[datetime | None]
    expired_at: Mapped[datetime | None]
    cancelling_at: Mapped[datetime | None]
    cancelled_at: Mapped[datetime | None]
    expires_at: Mapped[datetime | None]  # created_at + completion window

    __table_args__ = (
        CheckConstraint(
            "request_completed >= 0 AND request_failed >= 0 AND request_completed + request_failed <= request_total",
            name="request_counts",
        ),
        Index("ix_jobs_status_expires_at", "status", "expires_at"),  # the expiry sweep
        UniqueConstraint("tenant_id", "idempotency_key"),
        # NULL tenant ids never collide in the constraint above: jobs of no tenant share one namespace.
        Index("uq_jobs_idempotency_key_no_tenant", "idempotency_key", unique=True,
              sqlite_where=text("tenant_id IS NULL"), postgresql_where=text("tenant_id IS NULL")),
    )

    def __repr__(self) -> str:
        counts = f"{self.request_completed}+{self.request_failed}/{self.request_total}"
        return f"Job({self.id!r}, {self.status.value}, {counts})"


class Chunk(Base):
    """A group of requests sent to a worker as one task (the task carries only `id`).

    A worker leases a chunk (`claim_chunk`) until `lease_expires_at`; a chunk that is not done when
    its lease runs out, or that was queued long ago and never leased, is found by `lost_chunks`.
    """

    __tablename__ = "chunks"

    id: Mapped[int] = mapped_column(IdType, primary_key=True)
    job_id: Mapped[str] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"))
    seq: Mapped[int]  # position within the job, from 0
    priority: Mapped[Priority] = mapped_column(str_enum(Priority, "priority"))
    status: Mapped[ChunkStatus] = mapped_column(str_enum(ChunkStatus, "status"), default=ChunkStatus.PENDING)
    num_requests: Mapped[int]
    attempts: Mapped[int] = mapped_column(default=0)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    enqueued_at: Mapped[datetime | None]
    lease_expires_at: Mapped[datetime | None]
    worker: Mapped[str | None] = mapped_column(String(255))
    finished_at: Mapped[datetime | None]

    __table_args__ = (
        UniqueConstraint("job_id", "seq"),
        Index("ix_chunks_status_lease_expires_at", "status", "lease_expires_at"),  # the lost-chunk sweep
    )

    def __repr__(self) -> str:
        return f"Chunk({self.id}, job={self.job_id!r}, seq={self.seq}, {self.status.value}, attempts={self.attempts})"


class Request(Base):
    """One input line and, once a worker has run it, its result.

    The result is written onto this row (never inserted), and only while `status` is pending: a
    redelivered chunk finds nothing left to write. (job_id, custom_id) is unique.
    """

    __tablename__ = "requests"

    id: Mapped[int] = mapped_column(IdType, primary_key=True)
    job_id: Mapped[str] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"))
    chunk_id: Mapped[int | None] = mapped_column(ForeignKey("chunks.id", ondelete="SET NULL"), index=True)
    line: Mapped[int]  # 1-based line (or Parquet row) number in the input file
    custom_id: Mapped[str] = mapped_column(String(512))
    endpoint: Mapped[str] = mapped_column(String(64))  # "/v1/completions" or "/v1/chat/completions"
    body: Mapped[dict[str, Any]]  # prompt or messages, plus sampling parameters
    # sha256 hex of the prompt's first tokens (or characters): equal keys go into the same chunk.
    prefix_key: Mapped[str | None] = mapped_column(String(64))
    # sha256 hex of prompt + deterministic parameters; None when sampling is random.
    dedupe_key: Mapped[str | None] = mapped_column(String(64), index=True)
    session_id: Mapped[str | None] = mapped_column(String(512))
    turn: Mapped[int | None]
    # The line's own queue; None: its job's. A chunk holds requests of one priority only.
    priority: Mapped[Priority | None] = mapped_column(str_enum(Priority, "priority"))
    status: Mapped[RequestStatus] = mapped_column(str_enum(RequestStatus, "status"), default=RequestStatus.PENDING)
    attempts: Mapped[int] = mapped_column(default=0)

    text: Mapped[str | None] = mapped_column(Text)
    finish_reason: Mapped[str | None] = mapped_column(String(32))
    prompt_tokens: Mapped[int | None]
    cached_tokens: Mapped[int | None]
    completion_tokens: Mapped[int | None]
    error_code: Mapped[str | None] = mapped_column(String(64))
    error_message: Mapped[str | None] = mapped_column(Text)
    completed_at: Mapped[datetime | None]  # when the result or the failure was written
    # Timings in seconds, None where the request never reached the engine. queue_wait: from its
    # chunk's enqueueing to its first engine step; latency and ttft: from entering the engine to its
    # last and first token; engine: its share of the engine steps it ran in (what it cost).
    queue_wait_s: Mapped[float | None]
    latency_s: Mapped[float | None]
    ttft_s: Mapped[float | None]
    engine_s: Mapped[float | None]

    __table_args__ = (
        UniqueConstraint("job_id", "custom_id"),
        UniqueConstraint("job_id", "line"),  # also serves export in input order
        Index("ix_requests_job_id_status", "job_id", "status"),
        Index("ix_requests_completed_at", "completed_at"),  # `pipeline stats` over a time window
    )

    def __repr__(self) -> str:
        return f"Request({self.id}, job={self.job_id!r}, line={self.line}, {self.custom_id!r}, {self.status.value})"
