"""Tenants and their API keys. A key is stored only as its sha256 hex digest, never in clear."""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import BigInteger, ForeignKey, String
from sqlalchemy.orm import Mapped, mapped_column

from db.base import Base, utcnow


class Tenant(Base):
    """A customer. `cache_salt` enters every prefix-cache block hash of its requests, so tenants
    cannot probe each other's prompts through cache timing. Quotas: None means unlimited."""

    __tablename__ = "tenants"

    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    name: Mapped[str] = mapped_column(String(255), unique=True)
    cache_salt: Mapped[str] = mapped_column(String(64))
    requests_per_minute: Mapped[int | None]  # rate limit (token bucket in Redis)
    tokens_per_day: Mapped[int | None] = mapped_column(BigInteger)
    max_active_jobs: Mapped[int | None]
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    # A disabled tenant keeps its jobs and keys, but may submit nothing and read nothing (403).
    disabled_at: Mapped[datetime | None]

    @property
    def is_disabled(self) -> bool:
        return self.disabled_at is not None

    def __repr__(self) -> str:
        return f"Tenant({self.id!r}, {self.name!r})"


class ApiKey(Base):
    """An API key of a tenant; valid until `revoked_at`."""

    __tablename__ = "api_keys"

    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    tenant_id: Mapped[str] = mapped_column(ForeignKey("tenants.id", ondelete="CASCADE"), index=True)
    key_hash: Mapped[str] = mapped_column(String(64), unique=True)  # sha256 hex of the key
    name: Mapped[str | None] = mapped_column(String(255))  # a label for people, e.g. "nightly evals"
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    revoked_at: Mapped[datetime | None]

    def __repr__(self) -> str:
        return f"ApiKey({self.id!r}, tenant={self.tenant_id!r}, revoked={self.revoked_at is not None})"
