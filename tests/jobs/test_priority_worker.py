"""A real Celery worker process on the real Redis drains `critical` before `low`.

The worker is `celery -A pipeline.celery_app worker`, configured only through PIPELINE_* variables
with a key prefix of its own, so the test shares Redis with anything else safely and removes every
key it made. Eager mode would hide exactly what this checks: routing, JSON, and the order in which
the Redis transport polls the queues.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
from celery.exceptions import TimeoutError as CeleryTimeoutError

from jobs.health import diagnostics_key, gate_key
from jobs.worker_process import delete_prefixed_keys
from pipeline.celery_app import make_celery
from pipeline.queues import QUEUE_NAMES
from pipeline.settings import load_settings

from support import processes
from support.processes import BROKER_URL, key_prefix, pipeline_env, settings_vars, wait_until

pytestmark = pytest.mark.workers


@pytest.fixture
def worker(redis_client, tmp_path, monkeypatch):
    """(app, worker process, key prefix): the worker is terminated and the prefix's keys deleted after."""
    prefix = key_prefix()
    env = pipeline_env(PIPELINE_BROKER_URL=BROKER_URL, PIPELINE_REDIS_KEY_PREFIX=prefix)
    monkeypatch.chdir(tmp_path)  # no ./pipeline.toml for this process nor the worker
    app = make_celery(load_settings(env=settings_vars(env)))
    celery_worker = (sys.executable, "-m", "celery", "-A", "pipeline.celery_app", "worker")
    try:
        with processes.worker(env, tmp_path, tmp_path / "worker.log", "--queues", ",".join(QUEUE_NAMES),
                              "--concurrency", "1", "--pool", "solo", "--prefetch-multiplier", "1",
                              "--hostname", f"{prefix}@test", "--without-gossip", "--without-mingle",
                              "--loglevel", "INFO", command=celery_worker) as process:
            yield app, process, prefix
    finally:
        app.close()
        delete_prefixed_keys(redis_client, prefix)
        assert list(redis_client.scan_iter(match=f"{prefix}*")) == []


def _ping(app, process, log: Path) -> dict:
    result = app.send_task("jobs.health.ping")  # routed to `critical` by name

    def answer() -> dict | None:
        try:
            return result.get(timeout=1)
        except CeleryTimeoutError:  # not the builtin TimeoutError: Celery has its own
            return None

    return wait_until(answer, "the worker answering ping", log, 60, process)


def test_worker_answers_ping_from_the_critical_queue(worker, tmp_path):
    app, process, prefix = worker
    assert _ping(app, process, tmp_path / "worker.log") == {
        "worker": f"{prefix}@test", "pid": process.pid, "queue": "critical"}


def _order_after_hold(app, redis_client, process, prefix: str, log: Path, sends: list[tuple[str, str]]) -> list[str]:
    """Hold the worker on a task from `critical`, publish `sends` ((value, queue) pairs) meanwhile,
    release it, and return the values in the order the worker ran them."""
    _ping(app, process, log)
    order_key = diagnostics_key(prefix, "order")

    def record(value: str, queue: str, hold_s: float = 0.0) -> None:
        app.send_task("jobs.health.record_order", args=("order", value, hold_s), queue=queue)

    # The held task comes from `critical`: round-robin polling would now put `critical` last and take
    # from another queue next; strict priority must not.
    record("hold", "critical", hold_s=30.0)
    wait_until(lambda: redis_client.lrange(order_key, 0, -1) == [b"hold"], "the holding task", log, 30, process)
    for value, queue in sends:
        record(value, queue)
    for queue in {queue for _, queue in sends}:
        expected = sum(1 for _, q in sends if q == queue)
        wait_until(lambda: redis_client.llen(f"{prefix}{queue}") == expected, f"the {queue} queue", log, 10, process)
    assert redis_client.lrange(order_key, 0, -1) == [b"hold"]  # nothing else was taken while held
    redis_client.rpush(gate_key(prefix, "order"), "go")

    wait_until(lambda: redis_client.llen(order_key) == len(sends) + 1, "every task", log, 30, process)
    return [value.decode() for value in redis_client.lrange(order_key, 0, -1)]


def test_critical_task_runs_before_low_tasks_queued_earlier(worker, redis_client, tmp_path):
    app, process, prefix = worker
    sends = [(f"low-{i}", "low") for i in range(6)] + [("critical", "critical")]
    order = _order_after_hold(app, redis_client, process, prefix, tmp_path / "worker.log", sends)
    assert order == ["hold", "critical", "low-0", "low-1", "low-2", "low-3", "low-4", "low-5"]


def test_each_queue_drains_before_the_next_lower_one(worker, redis_client, tmp_path):
    """The whole ladder, not only its ends: `normal` before `low` also rules out alphabetical order."""
    app, process, prefix = worker
    sends = [("low-0", "low"), ("normal-0", "normal"), ("high-0", "high"), ("low-1", "low"),
             ("normal-1", "normal"), ("high-1", "high"), ("critical-0", "critical")]
    order = _order_after_hold(app, redis_client, process, prefix, tmp_path / "worker.log", sends)
    assert order == ["hold", "critical-0", "high-0", "high-1", "normal-0", "normal-1", "low-0", "low-1"]
