"""Redis killed in the middle of a job and started again empty (it keeps nothing on disk), with a
real `pipeline worker`, the real CLI and a fresh PostgreSQL database.

The worker must survive the outage and reconnect by itself; the CLI must fail with one clear line
while Redis is away and work again after; the lost-chunk sweep, run as beat runs it (a task on the
worker), must send again exactly the chunks the database says are unfinished and unleased, at once
rather than after `LOST_AFTER`, because Redis's uptime says it restarted after they were queued.
The job then completes with every line exactly once.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from db import make_engine, session_factory
from db.enums import ChunkStatus, JobStatus
from pipeline.celery_app import make_celery
from pipeline.settings import load_settings

from fault_checks import PRICES, assert_every_line_once, chunk_statuses, job_status, write_lines
from fault_services import PrivateRedis
from support.processes import assert_one_error_line, cli, cli_ok, log_count, pipeline_env, wait_until, worker

NUM_LINES = 40  # 20 chunks of 2: the outage lands with most of them still queued
SWEEP_TASK = "jobs.maintenance.sweep_lost_chunks"
CONNECTED = "Connected to redis://"


@pytest.mark.workers
def test_redis_restart_mid_job_loses_the_queues_and_the_sweep_completes_the_job_once(pg_url: str,
                                                                                      tmp_path: Path) -> None:
    redis = PrivateRedis()
    redis.start()
    env_vars = {"PIPELINE_DATABASE_URL": pg_url, "PIPELINE_BROKER_URL": redis.url, "PIPELINE_CHUNK_SIZE": "2",
                "PIPELINE_REDIS_KEY_PREFIX": "fault:", **PRICES}
    env = pipeline_env(**env_vars)
    engine = make_engine(pg_url)
    factory = session_factory(engine)
    log = tmp_path / "worker.log"
    ids = write_lines(tmp_path / "in.jsonl", NUM_LINES)
    late_ids = write_lines(tmp_path / "late.jsonl", 3, tag="late")
    try:
        cli_ok(env, tmp_path, "db", "upgrade")
        with worker(env, tmp_path, log, "--concurrency", "1") as process:
            assert log_count(log, CONNECTED) == 1
            job_id = cli_ok(env, tmp_path, "submit", "in.jsonl", "--priority", "low").stdout.strip()
            wait_until(lambda: list(chunk_statuses(factory, job_id).values()).count(ChunkStatus.DONE) >= 2,
                       "two chunks done", log)
            redis.kill()
            queued = {c for c, s in chunk_statuses(factory, job_id).items() if s == ChunkStatus.QUEUED}
            assert queued, "the outage must land while chunks are still queued"

            # While Redis is away: sending fails with one line; reading the job (the database) works.
            late = cli(env, tmp_path, "submit", "late.jsonl", "--idempotency-key", "late")
            assert_one_error_line(late, mentions="broker")
            assert re.search(r"error: job batch_\w+ is stored, but its tasks could not be queued", late.stderr)
            status = cli_ok(env, tmp_path, "status", job_id).stdout
            assert job_id in status and "in_progress" in status
            wait_until(lambda: log_count(log, "Cannot connect to redis://") or None,
                       "the worker notices the lost connection", log)
            assert process.poll() is None

            redis.start()  # the same port, nothing in it
            wait_until(lambda: log_count(log, CONNECTED) >= 2 or None, "the worker reconnects", log)
            # The running chunk finished; the queued ones have no message any more and stay queued.
            statuses = chunk_statuses(factory, job_id)
            stranded = {c for c, s in statuses.items() if s == ChunkStatus.QUEUED}
            assert stranded and stranded <= queued
            assert not any(s == ChunkStatus.RUNNING for s in statuses.values())

            # The CLI works again: the same idempotency key returns the job stored during the outage.
            late_id = cli_ok(env, tmp_path, "submit", "late.jsonl", "--idempotency-key", "late").stdout.strip()

            # What beat sends every few minutes, now: it resends the stranded chunks and the late job's.
            app = make_celery(load_settings(env=env_vars, config_path=None))
            try:
                app.send_task(SWEEP_TASK)
            finally:
                app.close()
            wait_until(lambda: job_status(factory, job_id) == JobStatus.COMPLETED
                       and job_status(factory, late_id) == JobStatus.COMPLETED, "both jobs completed", log)
            # Exactly the stranded chunks and the late job's unsent ones; nothing finished was sent again.
            resent = len(stranded) + len(chunk_statuses(factory, late_id))
            assert log_count(log, f"re-enqueued {resent} lost chunks") == 1, log.read_text()
            assert process.poll() is None
        assert_every_line_once(factory, job_id, ids)
        assert_every_line_once(factory, late_id, late_ids)
    finally:
        redis.close()
        engine.dispose()
