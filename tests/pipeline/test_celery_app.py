"""The Celery app's configuration: JSON only, late acks, prefetch 1, strict priority polling, the
queues, routes and beat schedule. (A real worker checks the behaviour: tests/jobs/test_priority_worker.py.)"""

from __future__ import annotations

import json
import subprocess
import sys
from datetime import timedelta
from pathlib import Path

import pytest
from celery.schedules import crontab

from pipeline.celery_app import (
    NIGHTLY_RUN_TASK,
    TASK_MODULES,
    beat_schedule,
    make_celery,
    periodic_tasks,
    restore_interval_s,
)
from pipeline.queues import QUEUE_NAMES
from pipeline.settings import NightlyRun, Settings

REPO_ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def settings() -> Settings:
    return Settings(broker_url="redis://redis.example:6380/2", redis_key_prefix="test-prefix:",
                    visibility_timeout_s=7200)


@pytest.fixture
def conf(settings: Settings):
    app = make_celery(settings)
    yield app.conf
    app.close()


def test_json_only_no_pickle(conf) -> None:
    assert (conf.task_serializer, conf.result_serializer, conf.event_serializer) == ("json", "json", "json")
    assert conf.accept_content == ["json"]
    assert conf.result_accept_content == ["json"]


def test_late_acks_and_one_task_at_a_time(conf) -> None:
    assert conf.task_acks_late is True
    assert conf.task_reject_on_worker_lost is True
    assert conf.worker_prefetch_multiplier == 1
    assert conf.worker_max_tasks_per_child is None  # workers keep the model warm
    assert conf.worker_cancel_long_running_tasks_on_connection_loss is False
    assert conf.broker_connection_retry_on_startup is True
    assert conf.broker_connection_retry is True and conf.broker_connection_max_retries is None  # forever


def test_broker_and_transport_options(conf) -> None:
    assert conf.broker_url == "redis://redis.example:6380/2"
    assert conf.broker_transport_options == {
        "visibility_timeout": 7200, "global_keyprefix": "test-prefix:", "queue_order_strategy": "priority",
        "unacked_restore_interval": 100, "unacked_restore_throttle": 1}


def test_dead_workers_messages_are_looked_for_a_tenth_of_the_visibility_timeout() -> None:
    assert [restore_interval_s(s) for s in (5, 10, 59, 600, 1000, 10800)] == [1, 1, 5, 60, 100, 100]


def test_results_are_ignored_except_where_a_task_asks(conf) -> None:
    assert conf.task_ignore_result is True
    assert conf.result_backend == "redis://redis.example:6380/2"
    assert conf.result_backend_transport_options == {"global_keyprefix": "test-prefix:"}


def test_queues_declared_in_priority_order(settings: Settings) -> None:
    app = make_celery(settings)
    assert [q.name for q in app.conf.task_queues] == list(QUEUE_NAMES)
    assert [(q.exchange.name, q.routing_key) for q in app.conf.task_queues] == [(n, n) for n in QUEUE_NAMES]
    assert list(app.amqp.queues) == list(QUEUE_NAMES)  # what a worker without -Q consumes, in this order
    assert app.conf.task_default_queue == "normal"
    assert app.conf.task_create_missing_queues is False
    app.close()


def test_routes_by_task_name(settings: Settings) -> None:
    app = make_celery(settings)
    route = app.amqp.router.route

    def queue_of(name: str, **options) -> str:
        return route(options, name, (), {})["queue"].name

    assert queue_of("jobs.health.ping") == "critical"
    assert queue_of("jobs.maintenance.expire_jobs") == "high"
    assert queue_of("jobs.dispatch.dispatch_job") == "high"
    assert queue_of("jobs.finalize.finalize_job") == "high"
    assert queue_of("jobs.inference.run_chunk") == "normal"  # the default
    assert queue_of("jobs.inference.run_chunk", queue="low") == "low"  # sent with the job's priority
    app.close()


def test_beat_schedule_names_and_intervals(settings: Settings) -> None:
    schedule = beat_schedule(settings)
    assert {name: entry["task"] for name, entry in schedule.items()} == {
        "session-cleanup": "jobs.maintenance.cleanup_sessions",
        "job-expiry": "jobs.maintenance.expire_jobs",
        "lost-chunk-sweep": "jobs.maintenance.sweep_lost_chunks",
        "database-backup": "jobs.maintenance.backup_database",
        "kv-cache-checkpoint": "jobs.maintenance.checkpoint_kv_caches",
    }
    assert all(isinstance(entry["task"], str) for entry in schedule.values())
    assert schedule["job-expiry"]["schedule"] == timedelta(minutes=5)
    assert schedule["database-backup"]["schedule"] == crontab(minute="0", hour="3")
    assert set(periodic_tasks(settings)) == set(schedule)
    assert schedule["lost-chunk-sweep"]["schedule"] == timedelta(minutes=10)  # the default sweep_interval
    assert beat_schedule(Settings(sweep_interval="30s"))["lost-chunk-sweep"]["schedule"] == timedelta(seconds=30)
    assert schedule["kv-cache-checkpoint"]["schedule"] == timedelta(minutes=15)  # the default kv_checkpoint_interval
    assert beat_schedule(Settings(kv_checkpoint_interval="1h"))["kv-cache-checkpoint"]["schedule"] == timedelta(hours=1)


def test_nightly_runs_become_crontab_entries(settings: Settings) -> None:
    runs = (NightlyRun("evals", "30 2 * * 1-5", Path("/data/evals.jsonl"), "normal"),)
    app = make_celery(Settings(nightly_runs=runs, timezone="Europe/Paris"))
    entry = app.conf.beat_schedule["nightly-run-evals"]
    assert entry["task"] == "jobs.maintenance.start_nightly_run"
    assert entry["schedule"] == crontab(minute="30", hour="2", day_of_week="1-5")
    assert entry["kwargs"] == {"name": "evals", "input_path": "/data/evals.jsonl", "priority": "normal"}
    assert json.loads(json.dumps(entry["kwargs"])) == entry["kwargs"]  # travels as JSON
    assert app.conf.timezone == "Europe/Paris"
    app.close()


def test_tasks_are_registered_and_only_ping_keeps_a_result(settings: Settings) -> None:
    app = make_celery(settings)
    assert TASK_MODULES == ("jobs.health", "jobs.inference", "jobs.maintenance", "jobs.finalize")
    app.loader.import_default_modules()
    for task, _ in periodic_tasks(settings).values():  # beat names no task that a worker would call unregistered
        assert task in app.tasks, task
    assert NIGHTLY_RUN_TASK in app.tasks
    assert app.tasks["jobs.inference.run_chunk"].ignore_result is True
    assert app.tasks["jobs.health.ping"].ignore_result is False
    assert app.tasks["jobs.health.record_order"].ignore_result is True
    app.close()


def test_importing_builds_no_app_and_loads_no_torch() -> None:
    code = (
        "import sys, pipeline.cli, pipeline.settings, pipeline.celery_app as m, jobs.health\n"
        "assert m._default_app is None, 'app built at import'\n"
        "assert 'torch' not in sys.modules, 'torch imported'\n"
        "app = m.app\n"
        "assert m.app is app and m._default_app is app\n"
        "print(app.conf.broker_transport_options['global_keyprefix'])\n"
    )
    env = {"PATH": "/usr/bin:/bin", "PYTHONPATH": str(REPO_ROOT), "PIPELINE_REDIS_KEY_PREFIX": "lazy-app:"}
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT / "tests", env=env, capture_output=True,
                            text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stdout == "lazy-app:\n"


def test_the_cli_starts_without_torch() -> None:
    code = "import sys, pipeline.cli\nprint('torch' in sys.modules)\n"
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stdout == "False\n"
