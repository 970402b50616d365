"""A real Celery worker process on the real Redis drains `critical` before `low`.

The worker is `celery -A pipeline.celery_app worker`, configured only through PIPELINE_* variables
with a key prefix of its own, so the test shares Redis with anything else safely and removes every
key it made. Eager mode would hide exactly what this checks: routing, JSON, and the order in which
the Redis transport polls the queues.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
from celery.exceptions import TimeoutError as CeleryTimeoutError

from jobs.health import diagnostics_key, gate_key
from pipeline.celery_app import make_celery
from pipeline.queues import QUEUE_NAMES
from pipeline.settings import load_settings
from jobs.worker_process import delete_prefixed_keys, stop_process

REPO_ROOT = Path(__file__).resolve().parents[2]
BROKER_URL = os.environ.get("PIPELINE_BROKER_URL", "redis://127.0.0.1:6379/0")



@pytest.fixture
def worker(redis_client, tmp_path, monkeypatch):
    """(app, worker process, key prefix): the worker is terminated and the prefix's keys deleted after."""
    prefix = f"pipeline-test-{uuid.uuid4().hex[:12]}:"
    env = {k: v for k, v in os.environ.items() if not k.startswith("PIPELINE_")}
    env.update(PIPELINE_BROKER_URL=BROKER_URL, PIPELINE_REDIS_KEY_PREFIX=prefix, PYTHONPATH=str(REPO_ROOT))
    monkeypatch.chdir(tmp_path)  # no ./pipeline.toml for this process nor the worker
    app = make_celery(load_settings(env={k: v for k, v in env.items() if k.startswith("PIPELINE_")}))
    log = (tmp_path / "worker.log").open("w")
    process = subprocess.Popen(
        [sys.executable, "-m", "celery", "-A", "pipeline.celery_app", "worker", "--queues", ",".join(QUEUE_NAMES),
         "--concurrency", "1", "--pool", "solo", "--prefetch-multiplier", "1", "--hostname", f"{prefix}@test",
         "--without-gossip", "--without-mingle", "--loglevel", "INFO"],
        cwd=tmp_path, env=env, stdout=log, stderr=subprocess.STDOUT,
    )
    try:
        yield app, process, prefix
    finally:
        stop_process(process)
        log.close()
        app.close()
        delete_prefixed_keys(redis_client, prefix)
        assert list(redis_client.scan_iter(match=f"{prefix}*")) == []


def _wait_for(condition, timeout: float, process: subprocess.Popen, what: str, log: Path):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        if process.poll() is not None:
            pytest.fail(f"the worker exited with {process.returncode} while waiting for {what}:\n{log.read_text()}")
        time.sleep(0.05)
    pytest.fail(f"timed out after {timeout} s waiting for {what}:\n{log.read_text()}")


def _ping(app, process: subprocess.Popen, log: Path) -> dict:
    result = app.send_task("jobs.health.ping")  # routed to `critical` by name
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if process.poll() is not None:
            pytest.fail(f"the worker exited with {process.returncode} before answering ping:\n{log.read_text()}")
        try:
            return result.get(timeout=1)
        except CeleryTimeoutError:  # not the builtin TimeoutError: Celery has its own
            continue
    pytest.fail(f"the worker did not answer ping within 60 s:\n{log.read_text()}")


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
    _wait_for(lambda: redis_client.lrange(order_key, 0, -1) == [b"hold"], 30, process, "the holding task", log)
    for value, queue in sends:
        record(value, queue)
    for queue in {queue for _, queue in sends}:
        expected = sum(1 for _, q in sends if q == queue)
        _wait_for(lambda: redis_client.llen(f"{prefix}{queue}") == expected, 10, process, f"the {queue} queue", log)
    assert redis_client.lrange(order_key, 0, -1) == [b"hold"]  # nothing else was taken while held
    redis_client.rpush(gate_key(prefix, "order"), "go")

    _wait_for(lambda: redis_client.llen(order_key) == len(sends) + 1, 30, process, "every task", log)
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
