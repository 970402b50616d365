"""Submitting as a tenant, under its quotas: what `pipeline submit --tenant` and the API server's
`POST /v1/batches` both do (one place, so the operator's path and the server's cannot drift)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from sqlalchemy.orm import Session, sessionmaker

from db.repository import count_active_jobs, ensure_tenant
from pipeline.errors import TenantDisabled
from pipeline.quotas import Quotas, TenantQuota
from pipeline.settings import Settings
from pipeline.submit import submit_file


def tenant_quota(session_factory: sessionmaker[Session], tenant: str) -> TenantQuota:
    """The limits of the tenant named `tenant` (created on first use); TenantDisabled for a
    disabled one, ValueError for a name that cannot be a tenant's."""
    with session_factory.begin() as session:
        owner = ensure_tenant(session, tenant)
        if owner.is_disabled:
            raise TenantDisabled(tenant)
        return TenantQuota.of(owner)


def submit_for_tenant(settings: Settings, session_factory: sessionmaker[Session], quotas: Quotas, path: str | Path,
                      *, tenant: str, **submit_options: Any) -> dict[str, Any]:
    """`submit_file(path, tenant=tenant, **submit_options)` once the tenant's quotas admit a new
    batch (active batches, tokens of the day); QuotaExceeded otherwise, with nothing stored."""
    quota = tenant_quota(session_factory, tenant)

    def active() -> int:
        with session_factory() as session:
            return count_active_jobs(session, quota.tenant_id)

    with quotas.admit_batch(quota, active):
        return submit_file(settings, session_factory, path, tenant=tenant, **submit_options)
