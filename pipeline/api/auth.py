"""Bearer keys: every `/v1` request names its tenant by its API key.

A key is looked up by its SHA-256 (the only form stored); it is never logged, and the refusal does
not echo it. Missing or unknown or revoked: 401. A disabled tenant's key: 403. Each accepted
request counts against the tenant's requests per minute: 429 with Retry-After past it.
"""

from __future__ import annotations

from dataclasses import dataclass

from fastapi import Depends, Request

from db.repository import tenant_for_api_key
from pipeline.api.context import ServerContext, server_context
from pipeline.api.errors import ApiError
from pipeline.quotas import QuotaExceeded, TenantQuota

MAX_KEY_CHARS = 256  # keys are ~46 characters; longer headers are refused before any hashing


@dataclass(frozen=True, slots=True)
class Caller:
    """The tenant a request acts for."""

    tenant_id: str
    tenant_name: str


def authenticated(request: Request, context: ServerContext = Depends(server_context)) -> Caller:
    """The caller of `request` (a FastAPI dependency); ApiError 401 or 403 otherwise."""
    scheme, _, key = request.headers.get("authorization", "").partition(" ")
    key = key.strip()
    if scheme.lower() != "bearer" or not key:
        raise ApiError(401, "You didn't provide an API key. Send it in an Authorization header: "
                            "'Authorization: Bearer YOUR_KEY' (an operator creates keys with `pipeline key create`).",
                       code="missing_api_key")
    tenant = None
    if len(key) <= MAX_KEY_CHARS:
        with context.sessions() as session:
            tenant = tenant_for_api_key(session, key)
    if tenant is None:
        raise ApiError(401, "Incorrect or revoked API key provided; ask your operator for a valid key.",
                       code="invalid_api_key")
    if tenant.is_disabled:
        raise ApiError(403, f"Tenant {tenant.name!r} is disabled; ask your operator.", type="permission_error",
                       code="tenant_disabled")
    try:
        context.quotas.take_request(TenantQuota.of(tenant))
    except QuotaExceeded as e:
        raise quota_refusal(e) from None
    return Caller(tenant.id, tenant.name)


def quota_refusal(error: QuotaExceeded) -> ApiError:
    """429 in OpenAI's shape, with the seconds to wait in `Retry-After`."""
    return ApiError(429, f"Rate limit reached: {error.message}.", type="rate_limit_exceeded",
                    code="rate_limit_exceeded", headers={"Retry-After": str(error.retry_after_s)})
