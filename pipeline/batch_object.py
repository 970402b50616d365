"""A job as OpenAI's batch object (`openai.types.Batch`): what `pipeline status --json` prints.

Every field OpenAI's SDK requires is there, so a script written for OpenAI's batch service reads
our status as it reads theirs; the tests validate it with the SDK's own types. Where OpenAI has a
file id we have a path: `input_file_id` is the submitted file's path, and there are no output file
ids (`pipeline results` writes the files). Two fields are our own: `input_file` (the same path,
kept for existing scripts) and `priority` (the job's queue).
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from db.models import Job
from db.records import JobUsage

TIMESTAMPS = ("created", "in_progress", "expires", "finalizing", "completed", "failed", "expired", "cancelling",
              "cancelled")
NO_WINDOW = "none"  # the completion window of a job that never expires (`pipeline run`)


def batch_object(job: Job, usage: JobUsage | None) -> dict[str, Any]:
    """`job` (and its token `usage`, None before any result) as an OpenAI batch object.

    `request_counts`: a cancelled or expired line counts as failed, as OpenAI counts it, so a
    finished job has completed + failed == total. `errors` are the job's file-level errors (a
    strict job's first bad lines): `{"object": "list", "data": [{code, message, line, param}]}`.
    """
    batch: dict[str, Any] = {
        "id": job.id,
        "object": "batch",
        "endpoint": job.endpoint,
        "errors": {"object": "list", "data": [_batch_error(e) for e in job.errors]},
        "input_file_id": job.input_file,
        "completion_window": completion_window(job.created_at, job.expires_at),
        "status": job.status.value,
        "output_file_id": None,
        "error_file_id": None,
    }
    for name in TIMESTAMPS:
        batch[f"{name}_at"] = _unix(getattr(job, f"{name}_at"))
    batch.update({
        "request_counts": {"total": job.request_total, "completed": job.request_completed,
                           "failed": job.request_failed},
        "usage": _usage(usage),
        "metadata": {str(k): str(v) for k, v in job.metadata_.items()} or None,
        "model": job.model,
        "input_file": job.input_file,
        "priority": job.priority.value,
    })
    return batch


def completion_window(created_at: datetime, expires_at: datetime | None) -> str:
    """The window as `--completion-window` takes it ("24h", "90m", "7d", "30s"), in the largest
    unit it is a whole number of, except that one day is "24h" (OpenAI's only window); "none" for
    a job that never expires."""
    if expires_at is None:
        return NO_WINDOW
    seconds = max(1, round((expires_at - created_at).total_seconds()))
    if seconds == 86400:
        return "24h"
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds % size == 0:
            return f"{seconds // size}{unit}"
    return f"{seconds}s"


def _batch_error(error: dict[str, Any]) -> dict[str, Any]:
    return {"code": error.get("code"), "message": error.get("message"), "line": error.get("line"),
            "param": error.get("param")}


def _usage(usage: JobUsage | None) -> dict[str, Any]:
    prompt, cached, completion = (0, 0, 0) if usage is None else (
        usage.prompt_tokens, usage.cached_tokens, usage.completion_tokens)
    return {"input_tokens": prompt, "input_tokens_details": {"cached_tokens": cached},
            "output_tokens": completion, "output_tokens_details": {"reasoning_tokens": 0},
            "total_tokens": prompt + completion}


def _unix(stamp: datetime | None) -> int | None:
    return None if stamp is None else int(stamp.timestamp())
