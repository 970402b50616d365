"""`/v1/batches`: create from an uploaded file, retrieve, list (newest first, `after` and `limit`),
cancel. A batch is a job of the caller's tenant, run by the same workers as `pipeline submit`'s.

Our extensions (optional; OpenAI's clients never send them): the queue priority, from
`metadata["priority"]` or the `X-Pipeline-Priority` header; `Idempotency-Key` (the same key with
the same file returns the first batch); and `session_id` on input lines, scoped to the tenant.
"""

from __future__ import annotations

import re
from datetime import timedelta
from pathlib import Path
from typing import Any

from fastapi import APIRouter, Depends, Header, Query
from pydantic import BaseModel, Field

from db.files import UPLOAD_PURPOSE
from db.repository import IdempotencyKeyReused, get_job, list_jobs
from pipeline import control
from pipeline.api.auth import Caller, authenticated, quota_refusal
from pipeline.api.context import ServerContext, server_context
from pipeline.api.errors import ApiError, not_found
from pipeline.api.files import require_file, tenant_folder
from pipeline.api.outputs import batch_outputs
from pipeline.errors import ChunksNotQueued, PipelineError
from pipeline.request_spec import CHAT_URL, COMPLETIONS_URL
from pipeline.settings import duration_s
from pipeline.quotas import QuotaExceeded
from pipeline.submit import job_summary
from pipeline.tenant_submit import submit_for_tenant

router = APIRouter(prefix="/v1/batches")
BATCH_ID = re.compile(r"batch_[0-9a-f]{32}")
ENDPOINTS = (COMPLETIONS_URL, CHAT_URL)
FINISHED = ("completed", "failed", "expired", "cancelled")
MAX_METADATA_PAIRS = 16  # OpenAI's limits on metadata
MAX_METADATA_VALUE = 512


class BatchCreate(BaseModel):
    input_file_id: str = Field(max_length=64)
    endpoint: str
    completion_window: str = "24h"
    metadata: dict[str, str] | None = None


@router.post("")
def create(body: BatchCreate, context: ServerContext = Depends(server_context),
           caller: Caller = Depends(authenticated),
           idempotency_key: str | None = Header(None, max_length=255),
           x_pipeline_priority: str | None = Header(None)) -> dict[str, Any]:
    if body.endpoint not in ENDPOINTS:
        raise ApiError(400, f"endpoint must be one of {', '.join(ENDPOINTS)}; got {body.endpoint!r}.",
                       param="endpoint", code="invalid_value")
    try:
        window = timedelta(seconds=duration_s(body.completion_window))
    except ValueError:
        raise ApiError(400, f"completion_window {body.completion_window!r}: expected a duration such as '24h'.",
                       param="completion_window", code="invalid_value") from None
    metadata = dict(body.metadata or {})
    if len(metadata) > MAX_METADATA_PAIRS or any(len(v) > MAX_METADATA_VALUE for v in metadata.values()):
        raise ApiError(400, f"metadata holds at most {MAX_METADATA_PAIRS} pairs, values of at most "
                            f"{MAX_METADATA_VALUE} characters.", param="metadata", code="invalid_value")
    priority = metadata.get("priority") or x_pipeline_priority or "normal"
    stored = require_file(context, caller, body.input_file_id)
    if stored.purpose != UPLOAD_PURPOSE:
        raise ApiError(400, f"File {stored.id} is a batch output, not an input; upload one with purpose 'batch'.",
                       param="input_file_id", code="invalid_value")
    try:
        summary = submit_for_tenant(context.settings, context.sessions, context.quotas, Path(stored.storage_path),
                                    tenant=caller.tenant_name, priority=priority, idempotency_key=idempotency_key,
                                    completion_window=window, metadata=metadata, input_file=stored.id,
                                    send_chunk=context.send_chunk)
    except QuotaExceeded as e:
        raise quota_refusal(e) from None
    except IdempotencyKeyReused as e:
        raise ApiError(409, f"Idempotency-Key {e.key!r} was used for batch {e.job_id} with another file; "
                            "send a new key (or none).", code="idempotency_key_reused") from None
    except ChunksNotQueued:
        raise ApiError(503, "The batch is stored but could not be queued (the broker is away); it will be "
                            "queued once the broker is back. Do not create it again.", type="server_error") from None
    except (PipelineError, ValueError) as e:
        param = "metadata.priority" if "priority" in str(e) else None
        raise ApiError(400, str(e), param=param, code="invalid_value") from None
    return _with_outputs(context, caller, summary)


@router.get("/{batch_id}")
def retrieve(batch_id: str, context: ServerContext = Depends(server_context),
             caller: Caller = Depends(authenticated)) -> dict[str, Any]:
    return _with_outputs(context, caller, _summary(context, caller, batch_id))


@router.get("")
def list_all(after: str | None = None, limit: int = Query(20, ge=1, le=100),
             context: ServerContext = Depends(server_context),
             caller: Caller = Depends(authenticated)) -> dict[str, Any]:
    with context.sessions() as session:
        cursor = None
        if after is not None:
            cursor = get_job(session, after) if BATCH_ID.fullmatch(after) else None
            if cursor is None or cursor.tenant_id != caller.tenant_id:
                raise not_found("batch", after)
        jobs = list_jobs(session, tenant_id=caller.tenant_id, after=cursor, limit=limit + 1)
        summaries = [job_summary(session, job.id) for job in jobs[:limit]]
    data = [_with_outputs(context, caller, s) for s in summaries]
    return {"object": "list", "data": data, "first_id": data[0]["id"] if data else None,
            "last_id": data[-1]["id"] if data else None, "has_more": len(jobs) > limit}


@router.post("/{batch_id}/cancel")
def cancel(batch_id: str, context: ServerContext = Depends(server_context),
           caller: Caller = Depends(authenticated)) -> dict[str, Any]:
    summary = _summary(context, caller, batch_id)
    if summary["status"] in FINISHED and summary["status"] != "cancelled":
        raise ApiError(409, f"Batch {batch_id} is {summary['status']}; only a batch still running can be cancelled.",
                       code="batch_not_cancellable")
    try:
        outcome = control.cancel(context.sessions, batch_id)
    except ValueError as e:  # it finished meanwhile
        raise ApiError(409, str(e), code="batch_not_cancellable") from None
    return _with_outputs(context, caller, outcome.summary)


def _summary(context: ServerContext, caller: Caller, batch_id: str) -> dict[str, Any]:
    if not BATCH_ID.fullmatch(batch_id):
        raise not_found("batch", batch_id)
    with context.sessions() as session:
        try:
            return job_summary(session, batch_id, tenant_id=caller.tenant_id)
        except ValueError:
            raise not_found("batch", batch_id) from None


def _with_outputs(context: ServerContext, caller: Caller, summary: dict[str, Any]) -> dict[str, Any]:
    """The batch object with its output and error file ids once it is finished (None while it runs,
    and for a file that holds no line, as OpenAI gives)."""
    if summary["status"] not in FINISHED:
        return summary
    out, err = batch_outputs(context, caller.tenant_id, tenant_folder(context, caller), summary["id"])
    return {**summary, "output_file_id": out.id if out.bytes else None, "error_file_id": err.id if err.bytes else None}
