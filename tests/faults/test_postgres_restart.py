"""PostgreSQL stopped and started again in the middle of a job, under a real `pipeline worker`
writing a chunk's results; a private server, so no other test loses its database.

The outage is made to land inside a result write, not near it: the test holds the job's row lock
(which `record_results` takes first), waits until the worker's write is queued behind it, and
stops the server (`pg_ctl stop -m fast` drops every connection). The worker must retry that
write with backoff until the server is back, inside the same task: the job completes with every
line written once, counts and usage equal to the lines, every chunk run exactly once, and the
outage visible in the worker log as retries, not as a failed task.
"""

from __future__ import annotations

from contextlib import closing
from pathlib import Path

import psycopg
import pytest
from sqlalchemy import select, text
from sqlalchemy.exc import OperationalError
from sqlalchemy.pool import NullPool

from db import make_engine, session_factory
from db.enums import JobStatus
from db.models import Chunk
from jobs.worker_process import delete_prefixed_keys

from fault_checks import PRICES, assert_every_line_once, job_status, write_lines
from fault_services import PrivatePostgres
from support.processes import (BROKER_URL, assert_one_error_line, cli, cli_ok, key_prefix, log_count, pipeline_env,
                               wait_until, worker)

NUM_LINES = 16  # 8 chunks of 2
RETRIED_WRITE = "database unavailable while trying to write the results of chunk"


def _reachable(check):
    """`check` for `wait_until` while the server may be down: a refused connection counts as 'not yet'."""
    def probe():
        try:
            return check()
        except OperationalError:
            return None
    return probe


def _waiting_on_a_lock(factory) -> bool:
    with factory() as session:
        return session.scalar(text("SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock' "
                                   "AND datname = current_database()")) > 0


@pytest.mark.postgres
@pytest.mark.workers
def test_postgres_restart_during_a_result_write_is_retried_and_every_line_written_once(
        tmp_path: Path, redis_client) -> None:
    pg = PrivatePostgres()
    prefix = key_prefix("fault")  # the shared Redis, under a key prefix of this test's own
    env = pipeline_env(PIPELINE_DATABASE_URL=pg.url, PIPELINE_BROKER_URL=BROKER_URL, PIPELINE_CHUNK_SIZE="2",
                       PIPELINE_REDIS_KEY_PREFIX=prefix, **PRICES)
    # A connection per check, so that the test's own reads ride out the restart.
    engine = make_engine(pg.url, poolclass=NullPool)
    factory = session_factory(engine)
    log = tmp_path / "worker.log"
    ids = write_lines(tmp_path / "in.jsonl", NUM_LINES)
    try:
        pg.start()
        cli_ok(env, tmp_path, "db", "upgrade")
        # The job's row is locked before the worker starts, so that its first result write must
        # wait on it (with the tiny model a whole job can end before a test that waits for a first
        # finished chunk gets to lock anything).
        job_id = cli_ok(env, tmp_path, "submit", "in.jsonl").stdout.strip()
        blocker = psycopg.connect(pg.url.replace("+psycopg", ""))
        blocker.execute("SELECT id FROM jobs WHERE id = %s FOR UPDATE", (job_id,))
        with closing(blocker), worker(env, tmp_path, log, "--concurrency", "1") as process:
            wait_until(lambda: _waiting_on_a_lock(factory), "the worker's result write waits on the job row", log)
            pg.stop("fast")  # drops the worker's connection in the middle of its write, and ours

            # While the server is away: the CLI says so in one line; the worker retries, it does not fail.
            assert_one_error_line(cli(env, tmp_path, "status", job_id), mentions="cannot use the database")
            wait_until(lambda: log_count(log, RETRIED_WRITE) or log_count(log, "raised unexpected"),
                       "the worker retries its write", log)
            assert log_count(log, "raised unexpected") == 0, log.read_text()  # a failed task, not a retry
            assert process.poll() is None
            pg.start()

            wait_until(_reachable(lambda: job_status(factory, job_id) == JobStatus.COMPLETED), "job completed", log)
            assert "completed" in cli_ok(env, tmp_path, "status", job_id).stdout
            assert process.poll() is None
        worker_log = log.read_text()
        assert "Traceback" not in worker_log and "raised unexpected" not in worker_log, worker_log
        assert_every_line_once(factory, job_id, ids)
        with factory() as session:
            attempts = list(session.scalars(select(Chunk.attempts).where(Chunk.job_id == job_id)))
        assert attempts == [1] * (NUM_LINES // 2)  # recovered inside the task: no chunk ran twice
    finally:
        engine.dispose()
        pg.close()
        delete_prefixed_keys(redis_client, prefix)
