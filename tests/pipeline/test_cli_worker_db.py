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
    assert "is at revision 0001" in result.stderr
    tables = set(sa.inspect(sa.create_engine(url)).get_table_names())
    assert {"jobs", "chunks", "requests", "sessions", "error_history", "alembic_version"} <= tables
