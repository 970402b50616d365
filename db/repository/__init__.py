"""Repository functions: plain functions over a `Session`, grouped by concern.

None of them commits: the caller decides the transaction, one per unit of work
(`with factory.begin() as session: ...`). They flush, so generated ids are available at once.
Errors: ValueError for a caller's mistake (unknown id, illegal transition), None for an expected
absence (no such job, chunk already leased).
"""

from db.repository.chunks import (
    LOST_AFTER,
    WORKER_LOST,
    assign_chunks,
    claim_chunk,
    deliveries_used_up,
    fail_lost_chunk,
    get_chunk,
    lost_chunks,
    mark_chunks_queued,
    renew_lease,
)
from db.repository.jobs import (
    IdempotencyKeyReused,
    JobCounts,
    cancel_job,
    create_job,
    expire_jobs,
    finish_job_if_done,
    get_job,
    job_counts,
    list_jobs,
    new_job_id,
    retry_failed,
    set_status,
)
from db.repository.records import (
    add_usage,
    delete_idle_sessions,
    get_session,
    get_usage,
    job_errors,
    record_error,
    record_errors,
    upsert_session,
)
from db.repository.requests import add_requests, chunk_requests, fail_requests, iter_requests, record_results
from db.repository.tenants import create_api_key, create_tenant, hash_api_key, revoke_api_key, tenant_for_api_key
from db.results import RecordOutcome, RequestResult

__all__ = [
    "LOST_AFTER",
    "WORKER_LOST",
    "JobCounts",
    "RecordOutcome",
    "RequestResult",
    "add_requests",
    "add_usage",
    "assign_chunks",
    "cancel_job",
    "chunk_requests",
    "claim_chunk",
    "create_api_key",
    "create_job",
    "create_tenant",
    "deliveries_used_up",
    "delete_idle_sessions",
    "expire_jobs",
    "fail_lost_chunk",
    "fail_requests",
    "finish_job_if_done",
    "get_chunk",
    "get_job",
    "get_session",
    "get_usage",
    "hash_api_key",
    "iter_requests",
    "job_counts",
    "job_errors",
    "list_jobs",
    "lost_chunks",
    "mark_chunks_queued",
    "new_job_id",
    "record_error",
    "record_errors",
    "record_results",
    "renew_lease",
    "retry_failed",
    "revoke_api_key",
    "set_status",
    "tenant_for_api_key",
    "upsert_session",
]
