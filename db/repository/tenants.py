"""Tenants and API keys. A key is shown once, at creation; only its sha256 digest is stored."""

from __future__ import annotations

import hashlib
import secrets
import uuid
from datetime import datetime

from sqlalchemy import select, update
from sqlalchemy.orm import Session

from db.base import utcnow
from db.tenants import ApiKey, Tenant

KEY_PREFIX = "pk_"


def hash_api_key(key: str) -> str:
    """The stored form of an API key: sha256 hex. Keys are 256 random bits, so no salt or slow
    hash is needed (nothing to guess), and lookup stays one indexed equality."""
    return hashlib.sha256(key.encode()).hexdigest()


def create_tenant(
    session: Session,
    name: str,
    *,
    requests_per_minute: int | None = None,
    tokens_per_day: int | None = None,
    max_active_jobs: int | None = None,
    now: datetime | None = None,
) -> Tenant:
    """A new tenant with a fresh random cache salt. Quotas: None means unlimited."""
    tenant = Tenant(
        id="tenant_" + uuid.uuid4().hex,
        name=name,
        cache_salt=secrets.token_hex(16),
        requests_per_minute=requests_per_minute,
        tokens_per_day=tokens_per_day,
        max_active_jobs=max_active_jobs,
        created_at=now or utcnow(),
    )
    session.add(tenant)
    session.flush()
    return tenant


def create_api_key(
    session: Session, tenant_id: str, *, name: str | None = None, now: datetime | None = None
) -> tuple[ApiKey, str]:
    """A new key for `tenant_id`: the row and the key itself, which is never stored or shown again."""
    key = KEY_PREFIX + secrets.token_urlsafe(32)
    row = ApiKey(
        id="key_" + uuid.uuid4().hex,
        tenant_id=tenant_id,
        key_hash=hash_api_key(key),
        name=name,
        created_at=now or utcnow(),
    )
    session.add(row)
    session.flush()
    return row, key


def tenant_for_api_key(session: Session, key: str) -> Tenant | None:
    """The tenant a key belongs to, or None for an unknown or revoked key."""
    return session.scalar(
        select(Tenant)
        .join(ApiKey, ApiKey.tenant_id == Tenant.id)
        .where(ApiKey.key_hash == hash_api_key(key), ApiKey.revoked_at.is_(None))
    )


def revoke_api_key(session: Session, key_id: str, *, now: datetime | None = None) -> bool:
    """Revoke a key by id; False if there is no such key or it was already revoked."""
    return (
        session.execute(
            update(ApiKey)
            .where(ApiKey.id == key_id, ApiKey.revoked_at.is_(None))
            .values(revoked_at=now or utcnow())
            .execution_options(synchronize_session="fetch")
        ).rowcount
        == 1
    )
