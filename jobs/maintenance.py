"""Beat's periodic tasks: the lost-chunk sweep, job expiry, session cleanup, database backups.

Each task is thin: it takes its slot's beat lock (`jobs.beat_lock`; a second beat's copy returns
None without work) and calls a plain function with explicit arguments. `resend_lost_chunks` lives
here because it joins the database and Celery; pure database work is in `db/`.
"""

from __future__ import annotations

import sqlite3
import traceback
from collections.abc import Callable
from datetime import date, datetime, timedelta
from pathlib import Path
from typing import Any, TypeVar
from zoneinfo import ZoneInfo

import redis
from celery import shared_task
from celery.utils.log import get_task_logger
from sqlalchemy.orm import Session, sessionmaker

from db.backup import BackupError, backup_database as backup_database_to, prune_backups
from db.base import utcnow
from db.repository import (
    deliveries_used_up,
    delete_idle_sessions,
    expire_jobs as expire_due_jobs,
    fail_lost_chunk,
    lost_chunks,
    record_error,
)
from jobs.beat_lock import take_slot
from jobs.finalize import finish_job
from jobs.process_state import worker_sessions, worker_settings
from pipeline.celery_app import chunk_sender
from pipeline.settings import Settings
from pipeline.errors import PipelineError
from pipeline.kv_backup import archive_snapshots
from pipeline.submit import SendChunk, send_chunks, submit_file

logger = get_task_logger(__name__)
T = TypeVar("T")
BACKUP_ERROR_KIND = "backup"


def resend_lost_chunks(session_factory: sessionmaker[Session], send_chunk: SendChunk, *,
                       now: datetime | None = None, broker_started_at: datetime | None = None,
                       max_redeliveries: int | None = None) -> list[int]:
    """Send again the task of every chunk `lost_chunks` reports (the database, not the broker, says
    what is unfinished), on its job's priority queue, and mark them queued. Returns their ids.
    `broker_started_at` (see `broker_start_time`) has chunks queued before a broker restart resent
    at once instead of after `LOST_AFTER`.

    A lost chunk already started 1 + `max_redeliveries` times is not sent again (another delivery
    would only be refused by the worker): its pending requests are failed here (`fail_lost_chunk`).
    None: no cap."""
    now = now or utcnow()
    with session_factory.begin() as session:
        sends = []
        for chunk in lost_chunks(session, now, broker_started_at=broker_started_at):
            if deliveries_used_up(chunk.attempts, max_redeliveries):
                failed = fail_lost_chunk(session, chunk.id, tries=chunk.attempts, now=now)
                if failed:  # 0: given up already by a racing sweep or delivery
                    logger.error("chunk %s was started %d times without finishing; failed its %d pending requests",
                                 chunk.id, chunk.attempts, failed)
            else:
                sends.append((chunk.id, chunk.priority.value))
    if sends:
        send_chunks(session_factory, sends, send_chunk, now=now)
    return [chunk_id for chunk_id, _ in sends]


def broker_start_time(broker_url: str, *, now: datetime | None = None) -> datetime:
    """When the Redis server behind `broker_url` started: its uptime back from `now`. A restart
    shows as a recent start; the uptime is a duration, so the two hosts' clocks need not agree."""
    client = redis.Redis.from_url(broker_url)
    try:
        uptime_s = int(client.info("server")["uptime_in_seconds"])
    finally:
        client.close()
    return (now or utcnow()) - timedelta(seconds=uptime_s)


def cleanup_idle_sessions(session_factory: sessionmaker[Session], idle: timedelta, *,
                          now: datetime | None = None) -> int:
    """Delete sessions unused for longer than `idle`; returns how many."""
    with session_factory.begin() as session:
        return delete_idle_sessions(session, (now or utcnow()) - idle)


def run_once(settings: Settings, task_name: str, work: Callable[[], T], *, now: datetime | None = None) -> T | None:
    """`work()` if this is the first run of `task_name` in its beat slot, else None (another beat's
    copy already ran it)."""
    client = redis.Redis.from_url(settings.broker_url)
    try:
        slot = take_slot(client, settings, task_name, now=now)
    finally:
        client.close()
    if slot is None:
        logger.info("%s: already run in this slot (a second beat?); skipped", task_name)
        return None
    logger.info("%s: running for slot %d", task_name, slot)  # one such line per slot, whatever the beats
    return work()


@shared_task(name="jobs.maintenance.sweep_lost_chunks", bind=True)
def sweep_lost_chunks(self: Any) -> list[int] | None:
    """Re-enqueue chunks whose task messages were lost: their leases expired, they waited too long,
    or Redis restarted (losing its queues) since they were queued."""
    settings = worker_settings()
    sessions = worker_sessions(settings.database_url)

    def sweep() -> list[int]:
        started = broker_start_time(settings.broker_url)
        return resend_lost_chunks(sessions, chunk_sender(self.app), broker_started_at=started,
                                  max_redeliveries=settings.task_max_redeliveries)

    resent = run_once(settings, self.name, sweep)
    if resent:
        logger.warning("re-enqueued %d lost chunks: %s", len(resent), resent)
    return resent


@shared_task(name="jobs.maintenance.expire_jobs", bind=True)
def expire_jobs(self: Any) -> list[str] | None:
    """Expire jobs past their completion window."""
    settings = worker_settings()
    sessions = worker_sessions(settings.database_url)

    def work() -> list[str]:
        with sessions.begin() as session:
            return expire_due_jobs(session)

    expired = run_once(settings, self.name, work)
    if expired:
        logger.info("expired %d jobs: %s", len(expired), expired)
    return expired


@shared_task(name="jobs.maintenance.cleanup_sessions", bind=True)
def cleanup_sessions(self: Any) -> int | None:
    """Delete sessions unused for longer than `settings.session_idle_timeout`."""
    settings = worker_settings()
    idle = timedelta(seconds=settings.session_idle_timeout_s)
    return run_once(settings, self.name, lambda: cleanup_idle_sessions(worker_sessions(settings.database_url), idle))


@shared_task(name="jobs.maintenance.backup_database", bind=True)
def backup_database(self: Any) -> str | None:
    """Back up the database into `settings.backups_dir`; a failure is logged and kept in the error
    history (kind "backup"), not raised."""
    settings = worker_settings()
    path = run_once(settings, self.name, lambda: _backup(settings))
    return None if path is None else str(path)


def _backup(settings: Settings) -> Path | None:
    try:
        path = backup_database_to(settings.database_url, settings.backups_dir)
        archive_snapshots(settings.cache_dir, path)  # on beat's host: the snapshots of workers sharing it
        prune_backups(settings.backups_dir, settings.backups_keep)
    except (BackupError, OSError, sqlite3.Error) as e:
        message = f"database backup failed: {e}"
        logger.error(message)
        with worker_sessions(settings.database_url).begin() as session:
            record_error(session, BACKUP_ERROR_KIND, message, traceback=traceback.format_exc())
        return None
    logger.info("database backed up to %s", path)
    return path


@shared_task(name="jobs.maintenance.checkpoint_kv_caches", bind=True)
def checkpoint_kv_caches(self: Any) -> bool | None:
    """Has every live worker write a KV snapshot of its cache (the `cache_persist` broadcast), each
    into its own folder. Fire and forget: a worker that misses one writes the next."""
    settings = worker_settings()

    def work() -> bool:
        self.app.control.broadcast("cache_persist", reply=False)
        return True

    return run_once(settings, self.name, work)


NIGHTLY_ERROR_KIND = "nightly_run"


def submit_nightly_run(settings: Settings, session_factory: sessionmaker[Session], send_chunk: SendChunk, *,
                       name: str, input_path: str, priority: str, day: date) -> dict[str, Any]:
    """Submit a nightly run's input file as a job. The idempotency key names the run and the day,
    so a second beat (or a redelivered task) returns the job already submitted instead of another."""
    return submit_file(settings, session_factory, input_path, priority=priority,
                       idempotency_key=f"nightly:{name}:{day.isoformat()}", send_chunk=send_chunk)


@shared_task(name="jobs.maintenance.start_nightly_run", bind=True)
def start_nightly_run(self: Any, name: str, input_path: str, priority: str) -> str | None:
    """Submit a nightly run (see `Settings.nightly_runs`); returns the job id. A run that cannot be
    submitted (its file is missing, say) is logged and kept in the error history, not raised."""
    settings = worker_settings()
    sessions = worker_sessions(settings.database_url)
    day = datetime.now(ZoneInfo(settings.timezone)).date()
    try:
        summary = submit_nightly_run(settings, sessions, chunk_sender(self.app), name=name, input_path=input_path,
                                     priority=priority, day=day)
    except (PipelineError, ValueError) as e:
        message = f"nightly run {name!r} was not submitted: {e}"
        logger.error(message)
        with sessions.begin() as session:
            record_error(session, NIGHTLY_ERROR_KIND, message, traceback=traceback.format_exc())
        return None
    logger.info("nightly run %r submitted as %s", name, summary["id"])
    if summary["status"] == "failed":  # every line rejected: no worker will end it, so say so here
        finish_job(settings, sessions, summary["id"])
    return summary["id"]
