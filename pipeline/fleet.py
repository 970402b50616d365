"""What the fleet says about itself: each worker's reply to the `engine_stats` broadcast, and beat's
last run of each periodic task. Shared by `pipeline stats`, `health` and `monitor`."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any

import redis
from celery import Celery

from pipeline.beat_scheduler import decode_last_run, state_key


@dataclass(frozen=True, slots=True)
class WorkerReport:
    """One worker as it answered: `engine` is `jobs.worker_metrics.EngineStatus` as a dict (None
    where the worker holds no engine metrics)."""

    name: str
    healthy: bool
    reason: str | None
    active_chunks: int
    engine: dict[str, Any] | None

    def as_dict(self) -> dict[str, Any]:
        return {"name": self.name, "healthy": self.healthy, "reason": self.reason,
                "active_chunks": self.active_chunks, "engine": self.engine}


def worker_reports(app: Celery, *, timeout_s: float = 1.0, destination: list[str] | None = None,
                   expected: int | None = None) -> list[WorkerReport]:
    """Every live worker's report (one broadcast round of `timeout_s`; it returns early when every
    worker of `destination`, or `expected` workers, have answered), by name. Raises kombu's
    OperationalError without a broker."""
    inspect = app.control.inspect(timeout=timeout_s, destination=destination,
                                  limit=len(destination) if destination else expected)
    # A command of our own (`celery_app.engine_stats_command`): Inspect has methods for built-in ones only.
    replies = inspect._request("engine_stats") or {}
    return [WorkerReport(name, bool(r.get("healthy")), r.get("reason"), int(r.get("active_chunks", 0)), r.get("engine"))
            for name, r in sorted(replies.items()) if isinstance(r, dict)]


def beat_last_runs(client: redis.Redis, key_prefix: str) -> dict[str, datetime]:
    """When beat last sent each periodic task (its state in Redis); empty when no beat ever ran."""
    runs = {}
    for field, raw in client.hgetall(state_key(key_prefix)).items():
        when = decode_last_run(raw)
        if when is not None:
            runs[field.decode(errors="replace")] = when
    return runs


def age_s(when: datetime, now: datetime | None = None) -> float:
    return max(0.0, ((now or datetime.now(timezone.utc)) - when).total_seconds())
