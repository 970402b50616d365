"""Expiry and retry while a worker is busy, on real PostgreSQL, Redis and a `pipeline worker`.
(Cancel while busy: tests/pipeline/test_job_control.py.)

A job's completion window passes while its slow chunk runs: beat's expiry closes its pending
lines as `batch_expired` at once; the running chunk, finishing later, writes nothing; the lines
finished before stay, each line once. Meanwhile another job's failed lines are retried: its
counts drop the failures at once and come back right when the retried lines have run again.
"""

from __future__ import annotations

import json
from datetime import timedelta
from pathlib import Path

import pytest
from sqlalchemy import select

from db.base import utcnow
from db.enums import ChunkStatus, JobStatus, RequestStatus
from db.models import Chunk, Request
from db.repository import expire_jobs

from line_outcomes import COMPLETED, line_outcomes
from support.processes import assert_one_error_line, cli

FAST = [{"custom_id": f"fast-{i}", "text": f"Fast line {i}", "max_tokens": 4, "temperature": 0} for i in range(2)]
# Long enough that the retry and the expiry below happen while it runs (seconds on the tiny model).
SLOW = [{"custom_id": f"slow-{i}", "text": f"Slow story {i}:", "max_tokens": 1000, "temperature": 0} for i in range(2)]
LATER = [{"custom_id": f"later-{i}", "text": f"Later line {i}", "max_tokens": 4, "temperature": 0} for i in range(4)]
TOO_LONG = {"custom_id": "too-long", "text": "a" * 5000, "max_tokens": 4}  # over the tiny model's 4096 tokens


def _write(path: Path, lines: list[dict]) -> list[str]:
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    return [line["custom_id"] for line in lines]


def _counts(s, job_id: str) -> dict:
    return json.loads(s.cli("status", job_id, "--json").stdout)["request_counts"]


def _chunk_status(s, job_id: str, custom_id: str) -> ChunkStatus:
    with s.factory() as session:
        return session.scalar(select(Chunk.status).join(Request, Request.chunk_id == Chunk.id).where(
            Request.job_id == job_id, Request.custom_id == custom_id))


@pytest.mark.workers
def test_expiry_and_retry_while_the_worker_is_busy(services) -> None:
    s = services()  # chunks of 2: [fast-0, fast-1], [slow-0, slow-1], [later-0, later-1], [later-2, later-3]
    worker = s.start_worker("w1")
    retried_ids = _write(s.cwd / "retried.jsonl", [FAST[0], TOO_LONG])
    retried_job = s.submit(s.cwd / "retried.jsonl")
    s.wait(lambda: _counts(s, retried_job) == {"total": 2, "completed": 1, "failed": 1}, "the first job's run")

    ids = _write(s.cwd / "in.jsonl", FAST + SLOW + LATER)
    job_id = s.submit(s.cwd / "in.jsonl", "--completion-window", "1h")
    s.wait(lambda: s.running_chunks(job_id) and _chunk_status(s, job_id, "slow-0") == ChunkStatus.RUNNING,
           "the slow chunk running")

    # The worker is busy: retry the other job's failed line, then expire this one, as beat would
    # once its window has passed.
    retry = s.cli("retry", retried_job)
    assert retry.stderr.strip() == "1 failed lines sent again"
    assert _counts(s, retried_job) == {"total": 2, "completed": 1, "failed": 0}
    with s.factory.begin() as session:
        assert expire_jobs(session, now=utcnow() + timedelta(hours=2)) == [job_id]
    assert json.loads(s.cli("status", job_id, "--json").stdout)["status"] == "expired"

    # One task at a time: the retried line runs once the slow chunk has ended (and tried to write).
    # That chunk's 2 x 2000 decode steps once took over the usual 120 s deadline on a busy 2-core machine, so this
    # wait gets more than the usual deadline: what it checks is the order of events, not speed.
    s.wait(lambda: _counts(s, retried_job) == {"total": 2, "completed": 1, "failed": 1}, "the retried line run",
           deadline_s=600)
    assert worker.process.poll() is None
    outcomes = line_outcomes(s, job_id, ids, status=JobStatus.EXPIRED)
    assert outcomes == {"fast-0": COMPLETED, "fast-1": COMPLETED, "slow-0": "batch_expired",
                        "slow-1": "batch_expired", **{i: "batch_expired" for i in ids[4:]}}
    assert line_outcomes(s, retried_job, retried_ids) == {"fast-0": COMPLETED, "too-long": "prompt_too_long"}
    with s.factory() as session:  # the slow chunk ran to its end, and its results were not written
        slow = session.scalars(select(Request).where(Request.job_id == job_id,
                                                     Request.custom_id.like("slow-%"))).all()
    assert [(r.status, r.text) for r in slow] == [(RequestStatus.EXPIRED, None)] * 2
    assert_one_error_line(cli(s.env(), s.cwd, "retry", job_id), mentions="expired")
