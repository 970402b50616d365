"""`pipeline stats`: the fleet over a time window, from the database (results and their timings),
Redis (queue depths) and the live workers (their engines' KV blocks). Results are the source, not
a worker's memory: a worker that has gone still counts for what it wrote."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from typing import Any

import redis
from sqlalchemy.orm import Session, sessionmaker

from db.repository.analytics import Percentiles, ResultTotals, result_totals, running_jobs, timing_percentiles
from pipeline.fleet import WorkerReport
from pipeline.queue_depth import queue_depths


@dataclass(frozen=True, slots=True)
class WindowFigures:
    """Throughput and timings of the results written in a window (or of one job)."""

    totals: ResultTotals
    seconds: float  # what the rates divide by
    latency: Percentiles | None
    ttft: Percentiles | None
    queue_wait: Percentiles | None

    @property
    def lines_per_s(self) -> float:
        return (self.totals.completed + self.totals.failed) / self.seconds if self.seconds > 0 else 0.0

    @property
    def tokens_per_s(self) -> float:
        return self.totals.completion_tokens / self.seconds if self.seconds > 0 else 0.0

    def as_dict(self) -> dict[str, Any]:
        t = self.totals
        return {
            "completed": t.completed, "failed": t.failed, "prompt_tokens": t.prompt_tokens,
            "cached_tokens": t.cached_tokens, "completion_tokens": t.completion_tokens,
            "lines_per_s": round(self.lines_per_s, 3), "tokens_per_s": round(self.tokens_per_s, 3),
            "prefix_cache_hit_rate": round(t.hit_rate, 6),
            **{name: None if p is None else {"p50": p.p50, "p95": p.p95, "p99": p.p99}
               for name, p in (("latency_s", self.latency), ("ttft_s", self.ttft), ("queue_wait_s", self.queue_wait))},
        }


def window_figures(session: Session, *, since: datetime | None = None, job_id: str | None = None,
                   now: datetime | None = None) -> WindowFigures:
    """Figures of the results written since `since` and/or of job `job_id`. Rates are over the time
    results were being written: from the first one in the window (not the window's start, so an hour's
    window over a job of two minutes shows its speed) to now, or to the last one for a finished job."""
    now = now or datetime.now(timezone.utc)
    totals = result_totals(session, since=since, job_id=job_id)
    end = totals.last_at if job_id is not None and totals.last_at is not None else now
    seconds = 0.0 if totals.first_at is None else max(1e-3, (end - totals.first_at).total_seconds())
    return WindowFigures(totals, seconds, *(timing_percentiles(session, c, since=since, job_id=job_id)
                                            for c in ("latency_s", "ttft_s", "queue_wait_s")))


def fleet_stats(factory: sessionmaker[Session], client: redis.Redis, key_prefix: str, workers: list[WorkerReport],
                window_s: int, now: datetime | None = None) -> dict[str, Any]:
    """Everything `pipeline stats` shows, JSON-ready."""
    now = now or datetime.now(timezone.utc)
    with factory() as session:
        figures = window_figures(session, since=now - timedelta(seconds=window_s), now=now)
        jobs = [{"id": j.id, "status": j.status.value, "priority": j.priority.value, "total": j.request_total,
                 "completed": j.request_completed, "failed": j.request_failed,
                 "created_at": j.created_at.isoformat()} for j in running_jobs(session)]
    return {
        "window_s": window_s,
        **figures.as_dict(),
        "queues": queue_depths(client, key_prefix),
        "running_jobs": jobs,
        "workers": [w.as_dict() for w in workers],
    }
