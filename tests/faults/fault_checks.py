"""What every fault test asserts once its job has ended: each line has exactly one result or one
clear error, and the job's counts, usage and cost add up to exactly what its lines say."""

from __future__ import annotations

import json
from decimal import Decimal
from pathlib import Path

from sqlalchemy import func, select
from sqlalchemy.orm import Session, sessionmaker

from db.enums import ChunkStatus, JobStatus, RequestStatus
from db.models import Chunk, Job, Request
from db.records import ErrorEvent, JobUsage

# Prices the fault tests run with, so that a chunk billed twice shows in the cost as well.
PRICES = {"PIPELINE_PRICE_PER_1K_PROMPT_TOKENS": "1.5", "PIPELINE_PRICE_PER_1K_CACHED_TOKENS": "0.25",
          "PIPELINE_PRICE_PER_1K_COMPLETION_TOKENS": "4"}


def write_lines(path: Path, n: int, *, tag: str = "req") -> list[str]:
    """`n` simple lines with distinct prompts (no two share a chunk by prefix or dedupe), short
    greedy generations; returns their custom ids in line order."""
    ids = [f"{tag}-{i}" for i in range(n)]
    path.write_text("".join(json.dumps({"custom_id": cid, "text": f"{i} {tag} line {i * 7919 % 1000}",
                                        "max_tokens": 6, "temperature": 0}) + "\n" for i, cid in enumerate(ids)))
    return ids


def chunk_statuses(factory: sessionmaker[Session], job_id: str) -> dict[int, ChunkStatus]:
    with factory() as session:
        return {chunk_id: status for chunk_id, status in
                session.execute(select(Chunk.id, Chunk.status).where(Chunk.job_id == job_id))}


def job_status(factory: sessionmaker[Session], job_id: str) -> JobStatus:
    with factory() as session:
        return session.scalar(select(Job.status).where(Job.id == job_id))


def assert_every_line_once(factory: sessionmaker[Session], job_id: str, custom_ids: list[str]) -> None:
    """The job completed; each of `custom_ids` has one completed result (text, tokens) and no
    error; the counts, the usage row and the cost equal the sums over the lines."""
    with factory() as session:
        job = session.get(Job, job_id)
        rows = session.execute(
            select(Request.custom_id, Request.status, Request.text, Request.prompt_tokens, Request.cached_tokens,
                   Request.completion_tokens).where(Request.job_id == job_id).order_by(Request.line)).all()
        usage_rows = session.scalars(select(JobUsage).where(JobUsage.job_id == job_id)).all()
        errors = session.scalars(select(ErrorEvent.message).where(ErrorEvent.job_id == job_id)).all()
        open_chunks = session.scalar(select(func.count()).select_from(Chunk)
                                     .where(Chunk.job_id == job_id, Chunk.status != ChunkStatus.DONE))
    assert job.status == JobStatus.COMPLETED, job.status
    assert [r.custom_id for r in rows] == custom_ids  # one row per line, none added
    assert all(r.status == RequestStatus.COMPLETED and r.text and r.completion_tokens for r in rows), rows
    assert (job.request_total, job.request_completed, job.request_failed) == (len(custom_ids), len(custom_ids), 0)
    assert errors == [] and open_chunks == 0
    assert len(usage_rows) == 1
    usage = usage_rows[0]
    prompt = sum(r.prompt_tokens for r in rows)
    cached = sum(r.cached_tokens for r in rows)
    completion = sum(r.completion_tokens for r in rows)
    assert (usage.prompt_tokens, usage.cached_tokens, usage.completion_tokens) == (prompt, cached, completion)
    p, c, o = (Decimal(PRICES[f"PIPELINE_PRICE_PER_1K_{k}_TOKENS"]) for k in ("PROMPT", "CACHED", "COMPLETION"))
    assert usage.cost == ((prompt - cached) * p + cached * c + completion * o) / 1000
