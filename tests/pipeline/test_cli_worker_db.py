"""`pipeline worker` and `pipeline db upgrade` as a user runs them: real processes, real services."""

from __future__ import annotations

import pytest
import sqlalchemy as sa

from jobs.worker_process import delete_prefixed_keys
from pipeline.celery_app import make_celery
from pipeline.settings import load_settings

from support.processes import BROKER_URL, cli, key_prefix, pipeline_env, settings_vars, worker


@pytest.mark.workers
def test_worker_command_serves_its_queues(tmp_path, redis_client):
    prefix = key_prefix()
    env = pipeline_env(PIPELINE_BROKER_URL=BROKER_URL, PIPELINE_REDIS_KEY_PREFIX=prefix)
    app = make_celery(load_settings(env=settings_vars(env)))
    log = tmp_path / "worker.log"
    try:
        with worker(env, tmp_path, log, "--queues", "critical,normal", "--concurrency", "2") as process:
            answer = app.send_task("jobs.health.ping", queue="critical").get(timeout=120)
            assert answer["pid"] == process.pid
            assert answer["queue"] == "critical"
    finally:
        app.close()
        delete_prefixed_keys(redis_client, prefix)
    assert "concurrency: 2 (thread)" in log.read_text()


def test_worker_command_refuses_an_unknown_queue(tmp_path):
    result = cli(pipeline_env(), tmp_path, "worker", "--queues", "urgent")
    assert result.returncode == 1
    assert result.stderr.startswith("error: ") and "urgent" in result.stderr
    assert "Traceback" not in result.stderr


def test_db_upgrade_creates_the_schema(tmp_path):
    url = f"sqlite:///{tmp_path / 'jobs.sqlite3'}"
    result = cli(pipeline_env(PIPELINE_DATABASE_URL=url), tmp_path, "db", "upgrade")
    assert result.returncode == 0, result.stderr
    assert "is at revision 0006" in result.stderr
    tables = set(sa.inspect(sa.create_engine(url)).get_table_names())
    assert {"jobs", "chunks", "requests", "sessions", "error_history", "alembic_version"} <= tables


def test_a_bad_database_url_is_one_masked_error_line(tmp_path):
    for url in ("postgresq://pipeline:s3cret@127.0.0.1/pipeline",  # a mistyped driver: was a traceback
                "pipeline:s3cret@127.0.0.1/pipeline"):  # no "://": was shown unmasked
        for command in (["status", "batch_x"], ["db", "upgrade"]):
            result = cli(pipeline_env(PIPELINE_DATABASE_URL=url), tmp_path, *command)
            assert result.returncode == 1, (url, command)
            assert result.stderr.startswith("error: environment variable PIPELINE_DATABASE_URL: "), result.stderr
            assert len(result.stderr.splitlines()) == 1, result.stderr
            assert "s3cret" not in result.stderr and "pipeline:***@127.0.0.1" in result.stderr


def test_db_upgrade_of_a_database_that_is_down_is_one_error_line(tmp_path):
    # Nothing listens on the discard port: the server is as good as stopped.
    url = "postgresql+psycopg://postgres:s3cret@127.0.0.1:9/pipeline"
    result = cli(pipeline_env(PIPELINE_DATABASE_URL=url), tmp_path, "db", "upgrade")
    assert result.returncode == 1
    [line] = result.stderr.splitlines()  # was a traceback of hundreds of lines
    assert line.startswith("error: cannot use the database (connection failed: ") and "port 9 failed" in line
    assert line.endswith("; check PIPELINE_DATABASE_URL") and "s3cret" not in line


def test_db_upgrade_to_an_unknown_revision_is_one_error_line(tmp_path):
    url = f"sqlite:///{tmp_path / 'jobs.sqlite3'}"
    result = cli(pipeline_env(PIPELINE_DATABASE_URL=url), tmp_path, "db", "upgrade", "0999")
    assert result.returncode == 1
    assert result.stderr.splitlines() == [
        "error: cannot migrate: Can't locate revision identified by '0999'; give `head` or a revision of this release"]
