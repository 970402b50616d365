"""`pipeline health`: is the deployment fit for work? Broker, database, beat and each worker, each
a `Check`; healthy when every check passes. A probe for compose and Kubernetes: `--worker NODE`
checks one worker (and the broker it needs), `--beat` beat alone."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import redis
from celery import Celery
from kombu.exceptions import OperationalError as BrokerError
from sqlalchemy import text
from sqlalchemy.exc import SQLAlchemyError

from pipeline.beat_scheduler import SWEEP_ENTRY
from pipeline.fleet import WorkerReport, age_s, beat_last_runs, worker_reports
from pipeline.settings import Settings, mask_url
from pipeline.worker_registry import expected_answers


@dataclass(frozen=True, slots=True)
class Check:
    name: str  # "broker", "database", "beat", "worker celery@host"
    ok: bool
    detail: str
    data: dict[str, Any] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return {"name": self.name, "ok": self.ok, "detail": self.detail, **self.data}


def check_broker(client: redis.Redis, url: str) -> Check:
    try:
        client.ping()
    except redis.RedisError as e:
        return Check("broker", False, f"cannot reach Redis at {mask_url(url)}: {e}")
    return Check("broker", True, f"Redis at {mask_url(url)} answers")


def check_database(settings: Settings) -> Check:
    from db.migrate import current, head
    from db.session import make_engine

    url = mask_url(settings.database_url)
    engine = make_engine(settings.database_url)
    try:
        with engine.connect() as connection:
            connection.execute(text("SELECT 1"))
        at, latest = current(settings.database_url), head()
    except SQLAlchemyError as e:
        reason = str(getattr(e, "orig", None) or e).strip().splitlines()[0]
        return Check("database", False, f"cannot use {url}: {reason}")
    finally:
        engine.dispose()
    if at != latest:
        return Check("database", False, f"{url} is at revision {at}, the code needs {latest}; run `pipeline db upgrade`")
    return Check("database", True, f"{url} answers, schema at {at}")


def check_beat(client: redis.Redis, settings: Settings, now: datetime | None = None) -> Check:
    """Healthy while beat keeps sending the lost-chunk sweep (every `sweep_interval`); the last run of
    every periodic task is shown."""
    try:
        runs = beat_last_runs(client, settings.redis_key_prefix)
    except redis.RedisError as e:
        return Check("beat", False, f"cannot read beat's state from Redis: {e}")
    ages = {name: round(age_s(when, now), 1) for name, when in sorted(runs.items())}
    data = {"last_run_s_ago": ages}
    if SWEEP_ENTRY not in ages:
        return Check("beat", False, "no beat has sent the lost-chunk sweep: is `pipeline beat` running?", data)
    limit = 2 * settings.sweep_interval_s + 60
    if ages[SWEEP_ENTRY] > limit:
        return Check("beat", False, f"beat last sent the lost-chunk sweep {ages[SWEEP_ENTRY]:.0f} s ago "
                                    f"(more than {limit} s): is it running?", data)
    return Check("beat", True, f"beat sent the lost-chunk sweep {ages[SWEEP_ENTRY]:.0f} s ago", data)


def check_worker(report: WorkerReport, stall_after_s: float) -> Check:
    """Alive (it answered), fit by its own account, and its engine moving: a worker with requests in
    its engine whose last step is older than `stall_after_s` is stuck."""
    engine = report.engine or {}
    data = {"active_chunks": report.active_chunks, "requests_in_flight": engine.get("requests_in_flight"),
            "seconds_since_step": engine.get("seconds_since_step")}
    name = f"worker {report.name}"
    if not report.healthy:
        return Check(name, False, f"reports itself unhealthy: {report.reason}", data)
    in_flight, since = engine.get("requests_in_flight") or 0, engine.get("seconds_since_step")
    if in_flight and since is not None and since > stall_after_s:
        return Check(name, False, f"{in_flight} requests in its engine and no step for {since:.0f} s", data)
    return Check(name, True, f"alive, {report.active_chunks} chunks in flight", data)


def run_checks(settings: Settings, app: Celery, client: redis.Redis, *, worker: str | None = None,
               beat_only: bool = False, timeout_s: float = 2.0) -> list[Check]:
    """The checks for the scope asked: everything; one worker (`worker`); or beat (`beat_only`)."""
    checks = [check_broker(client, settings.broker_url)]
    if not checks[0].ok:
        return checks  # workers and beat are reached through it
    if beat_only:
        return [*checks, check_beat(client, settings)]
    if worker is None:
        checks += [check_database(settings), check_beat(client, settings)]
    try:
        if worker is None:
            reports = worker_reports(app, timeout_s=timeout_s,
                                     expected=expected_answers(client, settings.redis_key_prefix))
        else:
            reports = worker_reports(app, timeout_s=timeout_s, destination=[worker])
    except BrokerError as e:
        return [*checks, Check("workers", False, f"cannot ask the workers through the broker: {e}")]
    checks += [check_worker(r, settings.stall_timeout_s) for r in reports]
    if worker is not None and not reports:
        checks.append(Check(f"worker {worker}", False, f"did not answer within {timeout_s:g} s"))
    elif not reports:
        checks.append(Check("workers", False, f"no worker answered within {timeout_s:g} s"))
    return checks
