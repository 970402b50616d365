"""What the pipeline records beside the results: conversation sessions, error history, usage and cost."""

from __future__ import annotations

from datetime import datetime
from decimal import Decimal
from typing import Any

from sqlalchemy import BigInteger, ForeignKey, Index, Numeric, String, Text, UniqueConstraint, text
from sqlalchemy.orm import Mapped, mapped_column

from db.base import Base, IdType, utcnow


class SessionRecord(Base):
    """A multi-turn conversation: its history grows by one user and one assistant message per turn,
    and the next turn's prompt is built from it (so the engine reuses the earlier turns' KV blocks).

    A session id is unique within a tenant; sessions without a tenant share one namespace (the
    partial unique index, since NULL tenant ids never collide in a plain unique constraint).
    """

    __tablename__ = "sessions"

    id: Mapped[int] = mapped_column(IdType, primary_key=True)
    tenant_id: Mapped[str | None] = mapped_column(ForeignKey("tenants.id", ondelete="CASCADE"))
    session_id: Mapped[str] = mapped_column(String(512))
    job_id: Mapped[str | None] = mapped_column(ForeignKey("jobs.id", ondelete="SET NULL"), index=True)  # last user
    turns: Mapped[int] = mapped_column(default=0)
    history: Mapped[list[dict[str, Any]]] = mapped_column(default=list)  # [{"role", "content"}, ...]
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    last_used_at: Mapped[datetime] = mapped_column(default=utcnow, index=True)  # the cleanup sweep

    __table_args__ = (
        UniqueConstraint("tenant_id", "session_id"),
        Index(
            "uq_sessions_session_id_no_tenant",
            "session_id",
            unique=True,
            sqlite_where=text("tenant_id IS NULL"),
            postgresql_where=text("tenant_id IS NULL"),
        ),
    )

    def __repr__(self) -> str:
        return f"SessionRecord({self.session_id!r}, tenant={self.tenant_id!r}, turns={self.turns})"


class ErrorEvent(Base):
    """One error, kept with its traceback for operators (users see only `message`).

    `kind` is an open set: "validation", "engine", "worker_lost", "database", ...
    """

    __tablename__ = "error_history"

    id: Mapped[int] = mapped_column(IdType, primary_key=True)
    job_id: Mapped[str | None] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"), index=True)
    # The job's tenant (copied from it when the error is recorded); None for errors of no job.
    tenant_id: Mapped[str | None] = mapped_column(ForeignKey("tenants.id", ondelete="CASCADE"), index=True)
    chunk_id: Mapped[int | None] = mapped_column(ForeignKey("chunks.id", ondelete="SET NULL"), index=True)
    line: Mapped[int | None]  # input line, for errors about one request
    custom_id: Mapped[str | None] = mapped_column(String(512))
    kind: Mapped[str] = mapped_column(String(32))
    message: Mapped[str] = mapped_column(Text)
    traceback: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(default=utcnow, index=True)

    def __repr__(self) -> str:
        return f"ErrorEvent({self.id}, job={self.job_id!r}, {self.kind!r}, {self.message!r})"


class JobUsage(Base):
    """Token counts, compute time and cost of one job, summed over the results actually written."""

    __tablename__ = "job_usage"

    job_id: Mapped[str] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"), primary_key=True)
    # The job's tenant, so usage and cost add up per tenant without a join (the daily token quota).
    tenant_id: Mapped[str | None] = mapped_column(ForeignKey("tenants.id", ondelete="CASCADE"), index=True)
    prompt_tokens: Mapped[int] = mapped_column(BigInteger, default=0)
    cached_tokens: Mapped[int] = mapped_column(BigInteger, default=0)
    completion_tokens: Mapped[int] = mapped_column(BigInteger, default=0)
    compute_seconds: Mapped[float] = mapped_column(default=0.0)
    cost: Mapped[Decimal] = mapped_column(Numeric(18, 8), default=Decimal(0))
    currency: Mapped[str] = mapped_column(String(3), default="USD")  # ISO 4217
    updated_at: Mapped[datetime] = mapped_column(default=utcnow, onupdate=utcnow)

    def __repr__(self) -> str:
        tokens = f"{self.prompt_tokens}+{self.completion_tokens} tokens"
        return f"JobUsage({self.job_id!r}, {tokens}, {self.cost} {self.currency})"
