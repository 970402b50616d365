"""Strict priority between jobs, as users meet it: a `critical` job submitted behind a large `low`
job finishes first. Real PostgreSQL, Redis under a key prefix of our own, one `pipeline worker`
process with one task at a time, so the order in which it takes chunks is the order they run."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from sqlalchemy import func, select

from db.enums import RequestStatus
from db.models import Chunk, Job, Request
from db.session import make_engine, session_factory
from jobs.worker_process import delete_prefixed_keys

from support.processes import BROKER_URL, cli_ok, key_prefix, pipeline_env, wait_until, worker

CHUNK_SIZE = 2
LOW_LINES = 60  # 30 chunks: the worker is still on the low job when the critical one arrives
CRITICAL_LINES = 8  # 4 chunks: round-robin polling would run a low chunk between each two
JOB_TIMEOUT_S = 180


def _jsonl(path: Path, prefix: str, n: int, max_tokens: int) -> Path:
    path.write_text("".join(json.dumps({"custom_id": f"{prefix}{i}", "text": f"{prefix} line {i}",
                                        "max_tokens": max_tokens,
                                        "temperature": 0}) + "\n" for i in range(n)))
    return path


@pytest.mark.workers
def test_a_critical_job_behind_a_large_low_job_finishes_first(pg_url: str, redis_client, tmp_path: Path) -> None:
    prefix = key_prefix()
    env = pipeline_env(PIPELINE_DATABASE_URL=pg_url, PIPELINE_BROKER_URL=BROKER_URL, PIPELINE_REDIS_KEY_PREFIX=prefix,
                       PIPELINE_CHUNK_SIZE=str(CHUNK_SIZE))
    cli_ok(env, tmp_path, "db", "upgrade")
    low_id = json.loads(cli_ok(env, tmp_path, "submit", str(_jsonl(tmp_path / "low.jsonl", "low", LOW_LINES, 16)),
                               "--priority", "low", "--json").stdout)["id"]
    log = tmp_path / "worker.log"
    engine = make_engine(pg_url)
    factory = session_factory(engine)
    try:
        with worker(env, tmp_path, log, "--concurrency", "1") as process:
            # The critical job arrives once the worker is busy with the low one.
            wait_until(lambda: _done(factory, low_id) >= CHUNK_SIZE, "the first low chunk", log,
                       JOB_TIMEOUT_S, process)
            critical_id = json.loads(cli_ok(env, tmp_path, "submit",
                                            str(_jsonl(tmp_path / "c.jsonl", "crit", CRITICAL_LINES, 4)),
                                            "--priority", "critical", "--json").stdout)["id"]
            wait_until(lambda: _status(factory, low_id) == "completed", "the low job", log, JOB_TIMEOUT_S, process)
    finally:
        delete_prefixed_keys(redis_client, prefix)
    with factory() as session:
        critical = session.get(Job, critical_id)
        # From when its tasks were sent (`enqueued_at` is set right after), not from the job's
        # creation: reading and storing the file lies between, and a fast worker finishes several
        # low chunks meanwhile.
        critical_queued_at = session.scalar(select(func.min(Chunk.enqueued_at)).where(Chunk.job_id == critical_id))
        low_meanwhile = session.scalar(select(func.count()).where(
            Request.job_id == low_id, Request.completed_at > critical_queued_at,
            Request.completed_at <= critical.completed_at))
        low_after = session.scalar(select(func.count()).where(
            Request.job_id == low_id, Request.completed_at > critical.completed_at))
        counts = {job_id: session.scalar(select(func.count()).where(
            Request.job_id == job_id, Request.status == RequestStatus.COMPLETED)) for job_id in (low_id, critical_id)}
        critical_status = critical.status.value
    engine.dispose()
    assert critical_status == "completed"
    assert counts == {low_id: LOW_LINES, critical_id: CRITICAL_LINES}
    assert low_after > 0  # the low job was still running when the critical one ended
    # While the critical job ran, low lines finished only from the chunk running when its tasks
    # were sent (and one chunk of slack, for a poll racing the sending). Round-robin polling would
    # run a low chunk between each two critical chunks.
    assert low_meanwhile <= 2 * CHUNK_SIZE, low_meanwhile


def _done(factory, job_id: str) -> int:
    with factory() as session:
        return session.scalar(select(func.count()).where(Request.job_id == job_id,
                                                         Request.status != RequestStatus.PENDING))


def _status(factory, job_id: str) -> str:  # the job's status, read from the database
    with factory() as session:
        return session.scalar(select(Job.status).where(Job.id == job_id)).value


@pytest.mark.workers
def test_a_line_s_own_priority_sends_it_to_that_queue(pg_url: str, redis_client, tmp_path: Path) -> None:
    """Lines marked `critical` in a `low` job run on a worker that consumes `critical` only; the
    job's other lines wait on `low`, which nobody consumes."""
    prefix = key_prefix()
    env = pipeline_env(PIPELINE_DATABASE_URL=pg_url, PIPELINE_BROKER_URL=BROKER_URL, PIPELINE_REDIS_KEY_PREFIX=prefix,
                       PIPELINE_CHUNK_SIZE=str(CHUNK_SIZE))
    cli_ok(env, tmp_path, "db", "upgrade")
    lines = [{"custom_id": f"l{i}", "text": f"line {i}", "max_tokens": 2,
              **({"priority": "critical"} if i % 2 else {})} for i in range(6)]
    path = tmp_path / "mixed.jsonl"
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    job_id = json.loads(cli_ok(env, tmp_path, "submit", str(path), "--priority", "low", "--json").stdout)["id"]
    engine = make_engine(pg_url)
    factory = session_factory(engine)
    log = tmp_path / "worker.log"
    try:
        with worker(env, tmp_path, log, "--queues", "critical") as process:
            wait_until(lambda: _done(factory, job_id) >= 3, "the critical lines", log, JOB_TIMEOUT_S, process)
    finally:
        delete_prefixed_keys(redis_client, prefix)
    with factory() as session:
        statuses = dict(session.execute(select(Request.custom_id, Request.status).where(Request.job_id == job_id)).all())
        chunks = [(c.priority.value, c.num_requests) for c in session.scalars(select(Chunk).where(
            Chunk.job_id == job_id).order_by(Chunk.seq))]
    engine.dispose()
    assert statuses == {f"l{i}": RequestStatus.COMPLETED if i % 2 else RequestStatus.PENDING for i in range(6)}
    assert chunks == [("critical", 2), ("critical", 1), ("low", 2), ("low", 1)]  # the highest first
