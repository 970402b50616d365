"""`pipeline worker` and `pipeline db upgrade` as a user runs them: real processes, real services."""

from __future__ import annotations

import os
import subprocess
import sys
import uuid
from pathlib import Path

import redis
import sqlalchemy as sa

from pipeline.celery_app import make_celery
from pipeline.settings import load_settings
from jobs.worker_process import delete_prefixed_keys, stop_process

REPO_ROOT = Path(__file__).resolve().parents[2]
BROKER_URL = os.environ.get("PIPELINE_BROKER_URL", "redis://127.0.0.1:6379/0")


def _env(**pipeline_vars: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PIPELINE_")}
    env.update(PYTHONPATH=str(REPO_ROOT), **pipeline_vars)
    return env


def test_worker_command_serves_its_queues(tmp_path):
    prefix = f"pipeline-test-{uuid.uuid4().hex[:12]}:"
    env = _env(PIPELINE_BROKER_URL=BROKER_URL, PIPELINE_REDIS_KEY_PREFIX=prefix)
    app = make_celery(load_settings(env={k: v for k, v in env.items() if k.startswith("PIPELINE_")}))
    log = (tmp_path / "worker.log").open("w")
    process = subprocess.Popen(
        [sys.executable, "-m", "pipeline", "worker", "--queues", "critical,normal", "--concurrency", "2"],
        cwd=tmp_path, env=env, stdout=log, stderr=subprocess.STDOUT,
    )
    client = redis.Redis.from_url(BROKER_URL)
    try:
        answer = app.send_task("jobs.health.ping", queue="critical").get(timeout=120)
        assert answer["pid"] == process.pid
        assert answer["queue"] == "critical"
    finally:
        stop_process(process)
        log.close()
        app.close()
        delete_prefixed_keys(client, prefix)
    assert "concurrency: 2 (thread)" in (tmp_path / "worker.log").read_text()


def test_worker_command_refuses_an_unknown_queue(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "pipeline", "worker", "--queues", "urgent"],
        cwd=tmp_path, env=_env(), capture_output=True, text=True, timeout=60,
    )
    assert result.returncode == 1
    assert result.stderr.startswith("error: ") and "urgent" in result.stderr
    assert "Traceback" not in result.stderr


def test_db_upgrade_creates_the_schema(tmp_path):
    url = f"sqlite:///{tmp_path / 'jobs.sqlite3'}"
    result = subprocess.run(
        [sys.executable, "-m", "pipeline", "db", "upgrade"],
        cwd=tmp_path, env=_env(PIPELINE_DATABASE_URL=url), capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == 0, result.stderr
    assert "is at revision 0002" in result.stderr
    tables = set(sa.inspect(sa.create_engine(url)).get_table_names())
    assert {"jobs", "chunks", "requests", "sessions", "error_history", "alembic_version"} <= tables
