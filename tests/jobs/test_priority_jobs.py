"""Strict priority between jobs, as users meet it: a `critical` job submitted behind a large `low`
job finishes first. Real PostgreSQL, Redis under a key prefix of our own, one `pipeline worker`
process with one task at a time, so the order in which it takes chunks is the order they run."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
from sqlalchemy import func, select

from db.enums import RequestStatus
from db.models import Chunk, Job, Request
from db.session import make_engine, session_factory
from jobs.worker_process import delete_prefixed_keys, stop_process

REPO_ROOT = Path(__file__).resolve().parents[2]
BROKER_URL = os.environ.get("PIPELINE_BROKER_URL", "redis://127.0.0.1:6379/0")
CHUNK_SIZE = 2
LOW_LINES = 60  # 30 chunks: the worker is still on the low job when the critical one arrives
CRITICAL_LINES = 8  # 4 chunks: round-robin polling would run a low chunk between each two
JOB_TIMEOUT_S = 180


def _cli(env: dict[str, str], cwd: Path, *args: str) -> str:
    result = subprocess.run([sys.executable, "-m", "pipeline", *args], cwd=cwd, env=env, capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 0 and "Traceback" not in result.stderr, f"pipeline {' '.join(args)}:\n{result.stderr}"
    return result.stdout


def _jsonl(path: Path, prefix: str, n: int, max_tokens: int) -> Path:
    path.write_text("".join(json.dumps({"custom_id": f"{prefix}{i}", "text": f"{prefix} line {i}",
                                        "max_tokens": max_tokens,
                                        "temperature": 0}) + "\n" for i in range(n)))
    return path


def test_a_critical_job_behind_a_large_low_job_finishes_first(pg_url: str, redis_client, tmp_path: Path) -> None:
    prefix = f"pipeline-test-{uuid.uuid4().hex[:12]}:"
    env = {k: v for k, v in os.environ.items() if not k.startswith("PIPELINE_")}
    env.update(PYTHONPATH=str(REPO_ROOT), PIPELINE_DATABASE_URL=pg_url, PIPELINE_BROKER_URL=BROKER_URL,
               PIPELINE_REDIS_KEY_PREFIX=prefix, PIPELINE_CHUNK_SIZE=str(CHUNK_SIZE))
    _cli(env, tmp_path, "db", "upgrade")
    low_id = json.loads(_cli(env, tmp_path, "submit", str(_jsonl(tmp_path / "low.jsonl", "low", LOW_LINES, 16)),
                             "--priority", "low", "--json"))["id"]
    log_path = tmp_path / "worker.log"
    engine = make_engine(pg_url)
    factory = session_factory(engine)
    with log_path.open("w") as log:
        worker = subprocess.Popen([sys.executable, "-m", "pipeline", "worker", "--concurrency", "1"], cwd=tmp_path,
                                  env=env, stdout=log, stderr=subprocess.STDOUT)
        try:
            # The critical job arrives once the worker is busy with the low one.
            _wait(lambda: _done(factory, low_id) >= CHUNK_SIZE, worker, log_path, "the first low chunk")
            critical_id = json.loads(_cli(env, tmp_path, "submit", str(_jsonl(tmp_path / "c.jsonl", "crit", CRITICAL_LINES, 4)),
                                          "--priority", "critical", "--json"))["id"]
            _wait(lambda: _status(factory, low_id) == "completed", worker, log_path, "the low job")
        finally:
            stop_process(worker)
            delete_prefixed_keys(redis_client, prefix)
    with factory() as session:
        critical = session.get(Job, critical_id)
        low_meanwhile = session.scalar(select(func.count()).where(
            Request.job_id == low_id, Request.completed_at > critical.created_at,
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
    # While the critical job ran, low lines finished only from the chunk running when it was
    # submitted (and one more, taken in the moment between the job's creation and its tasks being
    # sent). Round-robin polling would run a low chunk between each two critical chunks.
    assert low_meanwhile <= 2 * CHUNK_SIZE, low_meanwhile


def _done(factory, job_id: str) -> int:
    with factory() as session:
        return session.scalar(select(func.count()).where(Request.job_id == job_id,
                                                         Request.status != RequestStatus.PENDING))


def _status(factory, job_id: str) -> str:  # the job's status, read from the database
    with factory() as session:
        return session.scalar(select(Job.status).where(Job.id == job_id)).value


def _wait(condition, worker: subprocess.Popen, log: Path, what: str) -> None:
    deadline = time.monotonic() + JOB_TIMEOUT_S
    while time.monotonic() < deadline:
        if condition():
            return
        if worker.poll() is not None:
            pytest.fail(f"the worker exited with {worker.returncode} while waiting for {what}:\n{log.read_text()}")
        time.sleep(0.05)
    pytest.fail(f"timed out after {JOB_TIMEOUT_S} s waiting for {what}:\n{log.read_text()}")


def test_a_line_s_own_priority_sends_it_to_that_queue(pg_url: str, redis_client, tmp_path: Path) -> None:
    """Lines marked `critical` in a `low` job run on a worker that consumes `critical` only; the
    job's other lines wait on `low`, which nobody consumes."""
    prefix = f"pipeline-test-{uuid.uuid4().hex[:12]}:"
    env = {k: v for k, v in os.environ.items() if not k.startswith("PIPELINE_")}
    env.update(PYTHONPATH=str(REPO_ROOT), PIPELINE_DATABASE_URL=pg_url, PIPELINE_BROKER_URL=BROKER_URL,
               PIPELINE_REDIS_KEY_PREFIX=prefix, PIPELINE_CHUNK_SIZE=str(CHUNK_SIZE))
    _cli(env, tmp_path, "db", "upgrade")
    lines = [{"custom_id": f"l{i}", "text": f"line {i}", "max_tokens": 2,
              **({"priority": "critical"} if i % 2 else {})} for i in range(6)]
    path = tmp_path / "mixed.jsonl"
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    job_id = json.loads(_cli(env, tmp_path, "submit", str(path), "--priority", "low", "--json"))["id"]
    engine = make_engine(pg_url)
    factory = session_factory(engine)
    log_path = tmp_path / "worker.log"
    with log_path.open("w") as log:
        worker = subprocess.Popen([sys.executable, "-m", "pipeline", "worker", "--queues", "critical"], cwd=tmp_path,
                                  env=env, stdout=log, stderr=subprocess.STDOUT)
        try:
            _wait(lambda: _done(factory, job_id) >= 3, worker, log_path, "the critical lines")
        finally:
            stop_process(worker)
            delete_prefixed_keys(redis_client, prefix)
    with factory() as session:
        statuses = dict(session.execute(select(Request.custom_id, Request.status).where(Request.job_id == job_id)).all())
        chunks = [(c.priority.value, c.num_requests) for c in session.scalars(select(Chunk).where(
            Chunk.job_id == job_id).order_by(Chunk.seq))]
    engine.dispose()
    assert statuses == {f"l{i}": RequestStatus.COMPLETED if i % 2 else RequestStatus.PENDING for i in range(6)}
    assert chunks == [("critical", 2), ("critical", 1), ("low", 2), ("low", 1)]  # the highest first
