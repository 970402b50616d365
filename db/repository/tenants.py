"""Tenants and API keys. A key is shown once, at creation; only its sha256 digest is stored."""

from __future__ import annotations

import hashlib
import re
import secrets
import uuid
from datetime import datetime

from sqlalchemy import select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from db.base import utcnow
from db.tenants import ApiKey, Tenant

KEY_PREFIX = "pk_"
DEFAULT_TENANT = "default"  # the operator's tenant: `pipeline submit` without --tenant
# Names appear in commands, logs and URLs' neighbourhood: plain characters only.
_TENANT_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")


def hash_api_key(key: str) -> str:
    """The stored form of an API key: sha256 hex. Keys are 256 random bits, so no salt or slow
    hash is needed (nothing to guess), and lookup stays one indexed equality."""
    return hashlib.sha256(key.encode()).hexdigest()


def check_tenant_name(name: str) -> str:
    """`name` if it can name a tenant; ValueError saying what a name may hold otherwise."""
    if not _TENANT_NAME.fullmatch(name):
        raise ValueError(f"tenant name {name!r} is not valid: use 1 to 64 letters, digits, '_', '.' or '-', "
                         "starting with a letter or digit")
    return name


def get_tenant(session: Session, name: str) -> Tenant | None:
    """The tenant named `name`, or None."""
    return session.scalar(select(Tenant).where(Tenant.name == name))


def ensure_tenant(session: Session, name: str) -> Tenant:
    """The tenant named `name`, created (with a fresh cache salt, no quotas) on first use. Two
    concurrent first uses get one tenant: the loser's insert fails inside a savepoint and it reads
    the winner's row."""
    tenant = get_tenant(session, check_tenant_name(name))
    if tenant is not None:
        return tenant
    try:
        with session.begin_nested():
            return create_tenant(session, name)
    except IntegrityError:
        tenant = get_tenant(session, name)
        if tenant is None:
            raise
        return tenant


def list_tenants(session: Session) -> list[Tenant]:
    """Every tenant, by name."""
    return list(session.scalars(select(Tenant).order_by(Tenant.name)))


def disable_tenant(session: Session, name: str, *, now: datetime | None = None) -> Tenant:
    """Disable the tenant `name` (its keys stop working, its jobs are kept); a disabled one stays
    as it is. ValueError for an unknown name."""
    tenant = require_tenant(session, name)
    if tenant.disabled_at is None:
        tenant.disabled_at = now or utcnow()
        session.flush()
    return tenant


def enable_tenant(session: Session, name: str) -> Tenant:
    """Enable a disabled tenant again (its unrevoked keys work again); an active one stays as it is.
    ValueError for an unknown name."""
    tenant = require_tenant(session, name)
    tenant.disabled_at = None
    session.flush()
    return tenant


QUOTA_COLUMNS = ("requests_per_minute", "tokens_per_day", "max_active_jobs")


def set_tenant_quotas(session: Session, name: str, changes: dict[str, int | None]) -> Tenant:
    """Set the quotas named in `changes` (None: unlimited), leaving the others; they apply from the
    tenant's next request. ValueError for an unknown name, quota or a value below 1."""
    unknown = set(changes) - set(QUOTA_COLUMNS)
    if unknown:
        raise ValueError(f"unknown quota {sorted(unknown)[0]!r}; the quotas are {', '.join(QUOTA_COLUMNS)}")
    bad = next(((k, v) for k, v in changes.items() if v is not None and v < 1), None)
    if bad is not None:
        raise ValueError(f"{bad[0]}={bad[1]}: a quota is at least 1, or unlimited")
    tenant = require_tenant(session, name)
    for column, value in changes.items():
        setattr(tenant, column, value)
    session.flush()
    return tenant


def require_tenant(session: Session, name: str) -> Tenant:
    """The tenant named `name`; ValueError, saying where names come from, for an unknown one."""
    tenant = get_tenant(session, name)
    if tenant is None:
        raise ValueError(f"no tenant {name!r}; `pipeline tenant list` shows them")
    return tenant


def list_api_keys(session: Session, tenant_id: str) -> list[ApiKey]:
    """The tenant's keys (revoked ones too), oldest first. Only ids, labels and dates: the keys
    themselves are not stored."""
    return list(session.scalars(select(ApiKey).where(ApiKey.tenant_id == tenant_id)
                                .order_by(ApiKey.created_at, ApiKey.id)))


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
    check_tenant_name(name)
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
    """The tenant a key belongs to, or None for an unknown or revoked key. A disabled tenant is
    returned too (`is_disabled`): the server answers it 403, not 401."""
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
