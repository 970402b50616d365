"""Every line of an ended job exactly once, whatever happened to it: a completed result, or one
clear error. `line_outcomes` checks that in the three places a user reads it (the requests table,
the usage and cost row, the exported results and errors files) and returns each line's outcome for
the test to compare with what it expects. (`fault_checks.assert_every_line_once` is the special
case where every line completed.)"""

from __future__ import annotations

import json
from decimal import Decimal
from pathlib import Path

from sqlalchemy import select

from db.enums import ChunkStatus, JobStatus, RequestStatus
from db.models import Chunk, Job, Request
from db.records import JobUsage

from fault_deployment import Services
from fault_checks import PRICES

COMPLETED = "completed"
# The request status each error code leaves on its row; any other code is a failure.
STATUS_OF_CODE = {"batch_cancelled": RequestStatus.CANCELLED, "batch_expired": RequestStatus.EXPIRED}


def _read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def line_outcomes(services: Services, job_id: str, custom_ids: list[str], *,
                  status: JobStatus = JobStatus.COMPLETED) -> dict[str, str]:
    """custom id -> "completed" or its error code, once the job is in `status`; asserts that each of
    `custom_ids` (the job's lines, in input order) has one row, one outcome and one exported line,
    that the counters match the rows, and that usage and cost are the sums over completed lines."""
    with services.factory() as session:
        job = session.get(Job, job_id)
        rows = session.scalars(select(Request).where(Request.job_id == job_id).order_by(Request.line)).all()
        usage = session.get(JobUsage, job_id)
        open_chunks = session.scalars(select(Chunk.id).where(Chunk.job_id == job_id,
                                                             Chunk.status != ChunkStatus.DONE)).all()
        assert job.status == status, job
        assert [r.custom_id for r in rows] == custom_ids  # one row per line, none added
        assert open_chunks == []
        outcomes: dict[str, str] = {}
        for r in rows:
            if r.status == RequestStatus.COMPLETED:
                assert r.text is not None and r.completion_tokens and r.error_code is None, r
                outcomes[r.custom_id] = COMPLETED
            else:
                assert r.error_code and r.error_message and r.text is None, r
                assert r.status == STATUS_OF_CODE.get(r.error_code, RequestStatus.FAILED), r
                outcomes[r.custom_id] = r.error_code
        completed = [r for r in rows if r.status == RequestStatus.COMPLETED]
        # Cancelled and expired lines count as failed, as OpenAI counts them (the batch object's counts).
        failed = [r for r in rows if r.status != RequestStatus.COMPLETED]
        assert (job.request_total, job.request_completed, job.request_failed) == (
            len(rows), len(completed), len(failed))
        prompt = sum(r.prompt_tokens for r in completed)
        cached = sum(r.cached_tokens for r in completed)
        generated = sum(r.completion_tokens for r in completed)
        billed = (0, 0, 0) if usage is None else (usage.prompt_tokens, usage.cached_tokens, usage.completion_tokens)
        assert billed == (prompt, cached, generated)  # a line billed twice would show here
        p, c, o = (Decimal(PRICES[f"PIPELINE_PRICE_PER_1K_{k}_TOKENS"]) for k in ("PROMPT", "CACHED", "COMPLETION"))
        assert (Decimal(0) if usage is None else usage.cost) == ((prompt - cached) * p + cached * c + generated * o) / 1000

    out, err = services.cwd / f"{job_id}.jsonl", services.cwd / f"{job_id}.errors.jsonl"
    services.cli("results", job_id, "-o", str(out), "--errors", str(err), "--ordered")
    results, errors = _read_jsonl(out), _read_jsonl(err)
    assert [x["custom_id"] for x in results] == [i for i in custom_ids if outcomes[i] == COMPLETED]
    assert all(x["response"]["status_code"] == 200 and x["error"] is None for x in results)
    assert [(e["custom_id"], line_error(e)["code"]) for e in errors] == [
        (i, outcomes[i]) for i in custom_ids if outcomes[i] != COMPLETED]
    return outcomes


def line_error(line: dict) -> dict:
    """The error of an errors-file line: `error` for a line that never ran, the response body's
    error for a request that ran and failed (OpenAI's shape for each)."""
    return line["error"] if line["response"] is None else line["response"]["body"]["error"]


def error_messages(services: Services, job_id: str) -> dict[str, str]:
    """custom id -> the error message the errors file gives, for the job's failed lines."""
    err = services.cwd / f"{job_id}.errors.jsonl"
    return {e["custom_id"]: line_error(e)["message"] for e in _read_jsonl(err)}
