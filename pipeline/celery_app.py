"""The Celery app factory: JSON messages only, late acks, strict queue priority, the beat schedule.

`make_celery(settings)` builds an app and has no other effect. `celery -A pipeline.celery_app ...`
finds the module attribute `app`, created on first access from `load_settings()`.

Strict priority: kombu's Redis channel polls with one `BRPOP critical high normal low` (the keys in
the order the worker consumes its queues) and Redis pops from the first non-empty key. The default
`queue_order_strategy="round_robin"` then moves the queue it just took from to the end of that list;
`"priority"` leaves the order alone, so a worker takes from `high` only when `critical` is empty.
With `acks_late` and a prefetch of 1 a busy worker holds one unacknowledged task and polls again
only when it is done, so a critical task published meanwhile is the next one it takes.
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import timedelta
from typing import Any

from celery import Celery
from celery.schedules import crontab
from celery.worker.control import control_command, inspect_command
from kombu import Exchange
from kombu import Queue as KombuQueue

from pipeline.message_signing import sign_messages
from pipeline.queues import Queue
from pipeline.settings import Settings, cron_fields, load_settings

# Task modules a worker imports. The jobs/ modules join here as they land (inference, dispatch,
# finalize, maintenance); a name in the beat schedule whose module is missing is only an
# "unregistered task" error on the worker that receives it.
TASK_MODULES: tuple[str, ...] = ("jobs.health", "jobs.inference", "jobs.maintenance", "jobs.finalize")

# The task that runs one chunk (`jobs.inference.run_chunk`); named here so that senders need not
# import the task module (which loads the engine and torch).
RUN_CHUNK_TASK = "jobs.inference.run_chunk"

# Routes by task name. Chunk tasks are sent with an explicit queue (the job's priority) and fall back
# to the default `normal` queue otherwise.
TASK_ROUTES: dict[str, dict[str, str]] = {
    "jobs.health.*": {"queue": Queue.CRITICAL.value},
    "jobs.dispatch.*": {"queue": Queue.HIGH.value},
    "jobs.finalize.*": {"queue": Queue.HIGH.value},
    "jobs.maintenance.*": {"queue": Queue.HIGH.value},
}

def periodic_tasks(settings: Settings) -> dict[str, tuple[str, timedelta | crontab]]:
    """Beat's entries: name -> (task name, interval or crontab). Nightly runs are added by
    `beat_schedule`. The beat lock (`jobs.beat_lock`) reads its slots from here too."""
    return {
        "session-cleanup": ("jobs.maintenance.cleanup_sessions", timedelta(hours=1)),
        "job-expiry": ("jobs.maintenance.expire_jobs", timedelta(minutes=5)),
        "lost-chunk-sweep": ("jobs.maintenance.sweep_lost_chunks", timedelta(seconds=settings.sweep_interval_s)),
        "database-backup": ("jobs.maintenance.backup_database", crontab(minute="0", hour="3")),
        "kv-cache-checkpoint": ("jobs.maintenance.checkpoint_kv_caches",
                                timedelta(seconds=settings.kv_checkpoint_interval_s)),
    }

NIGHTLY_RUN_TASK = "jobs.maintenance.start_nightly_run"
BEAT_SCHEDULER = "pipeline.beat_scheduler:RedisStateScheduler"


@inspect_command(name="health")
def health_command(state: Any, **kwargs: Any) -> dict[str, Any]:
    """`celery -A pipeline.celery_app inspect health`: {"healthy": bool, "reason": str | None} of
    each worker. Registered here so that the command line knows it too; it runs in the worker."""
    from jobs.worker_health import current  # the worker process's own state

    return current().as_dict()


@inspect_command(name="engine_stats")
def engine_stats_command(state: Any, **kwargs: Any) -> dict[str, Any]:
    """`celery -A pipeline.celery_app inspect engine_stats`: one reply with what `pipeline stats`,
    `health` and `monitor` show of a worker: its own health, the chunks it runs, and its engine (KV
    blocks, steps, requests in flight, metrics port; None without an engine)."""
    from celery.worker import state as worker_state

    from jobs import worker_health, worker_metrics  # the worker process's own state

    metrics = worker_metrics.current()
    return {**worker_health.current().as_dict(), "active_chunks": len(worker_state.active_requests),
            "engine": None if metrics is None else metrics.status().as_dict()}


# The KV cache commands (`pipeline cache ...`, or `celery -A pipeline.celery_app control cache_stats`):
# broadcast to every worker, each answering for its own cache. Registered here so that the command
# line knows them; they run in the worker, on its engine loop (jobs/kv_cache_host.py).
CACHE_COMMANDS = ("cache_stats", "cache_warm", "cache_pin", "cache_unpin", "cache_clear", "cache_persist")


def _in_worker(action: Any) -> dict[str, Any]:
    """`action(settings, loop)` in this worker, its error as {"error": one line} (never a traceback
    on the caller's screen; the worker's log keeps it)."""
    import logging

    from jobs.engine_host import current_engine_loop
    from jobs.process_state import worker_settings
    from pipeline.errors import PipelineError

    loop = current_engine_loop()
    if loop is None:
        return {"error": "this worker has no engine"}
    try:
        return action(worker_settings(), loop)
    except (PipelineError, ValueError, OSError) as e:
        return {"error": str(e)}
    except Exception as e:  # noqa: BLE001 - a bug: logged with its traceback, one line to the caller
        logging.getLogger(__name__).exception("cache command failed")
        return {"error": f"{type(e).__name__}: {e} (the worker's log has the traceback)"}


@control_command(name="cache_stats")
def cache_stats_command(state: Any, **kwargs: Any) -> dict[str, Any]:
    from jobs import kv_cache_host

    return _in_worker(kv_cache_host.stats)


@control_command(name="cache_warm", args=[("prompts", list), ("tenant", str)], signature="<prompts> <tenant>")
def cache_warm_command(state: Any, prompts: list, tenant: str, **kwargs: Any) -> dict[str, Any]:
    from jobs import kv_cache_host

    return _in_worker(lambda settings, loop: kv_cache_host.warm(
        loop, prompts, kv_cache_host.tenant_cache_salt(settings, tenant)))


@control_command(name="cache_pin", args=[("prompts", list), ("tenant", str)], signature="<prompts> <tenant>")
def cache_pin_command(state: Any, prompts: list, tenant: str, **kwargs: Any) -> dict[str, Any]:
    from jobs import kv_cache_host

    return _in_worker(lambda settings, loop: kv_cache_host.pin(
        loop, prompts, kv_cache_host.tenant_cache_salt(settings, tenant)))


@control_command(name="cache_unpin", args=[("prompts", list), ("tenant", str)], signature="[prompts tenant]")
def cache_unpin_command(state: Any, prompts: list | None = None, tenant: str | None = None,
                        **kwargs: Any) -> dict[str, Any]:
    from jobs import kv_cache_host

    return _in_worker(lambda settings, loop: kv_cache_host.unpin(
        loop, prompts, None if prompts is None else kv_cache_host.tenant_cache_salt(settings, tenant or "default")))


@control_command(name="cache_clear", args=[("unpin", bool)], signature="[unpin]")
def cache_clear_command(state: Any, unpin: bool = False, **kwargs: Any) -> dict[str, Any]:
    from jobs import kv_cache_host

    return _in_worker(lambda settings, loop: kv_cache_host.clear(loop, unpin_all=unpin))


@control_command(name="cache_persist")
def cache_persist_command(state: Any, **kwargs: Any) -> dict[str, Any]:
    from jobs import kv_cache_host

    return _in_worker(kv_cache_host.persist)


def chunk_sender(app: Celery) -> Callable[[int, str], None]:
    """`send_chunk(chunk_id, queue)` for `submit_file` and the lost-chunk sweep: the run_chunk task
    for that chunk on that queue (the job's priority)."""

    def send_chunk(chunk_id: int, queue: str) -> None:
        # ignore_result: without it send_task subscribes the sender to the task's result channel on
        # the result backend (Redis), for a result nobody reads; with Redis away that subscription
        # ended `pipeline submit` in a RuntimeError traceback instead of the broker's error.
        app.send_task(RUN_CHUNK_TASK, args=[chunk_id], queue=queue, ignore_result=True)

    return send_chunk


def restore_interval_s(visibility_timeout_s: int) -> int:
    """Seconds between two scans for unacknowledged messages to restore: a tenth of the visibility
    timeout, at least 1 and at most kombu's default period (100 s)."""
    return max(1, min(100, visibility_timeout_s // 10))


def task_queues() -> tuple[KombuQueue, ...]:
    """The four queues, highest priority first: a worker started without -Q consumes them in this order."""
    return tuple(KombuQueue(q.value, Exchange(q.value, type="direct"), routing_key=q.value) for q in Queue)


def beat_schedule(settings: Settings) -> dict[str, dict[str, Any]]:
    schedule: dict[str, dict[str, Any]] = {
        name: {"task": task, "schedule": every} for name, (task, every) in periodic_tasks(settings).items()
    }
    for run in settings.nightly_runs:
        schedule[f"nightly-run-{run.name}"] = {
            "task": NIGHTLY_RUN_TASK,
            "schedule": crontab(**cron_fields(run.cron)),
            "kwargs": {"name": run.name, "input_path": str(run.input_path), "priority": run.priority},
        }
    return schedule


def make_celery(settings: Settings) -> Celery:
    """A Celery app configured from `settings`."""
    app = Celery("pipeline", include=list(TASK_MODULES))
    app.conf.update(
        broker_url=settings.broker_url,
        broker_connection_retry_on_startup=True,
        # A worker outlives a Redis outage of any length: it keeps reconnecting (kombu's backoff, at
        # most 30 s apart) instead of exiting after the default 100 tries. What Redis lost with it,
        # the lost-chunk sweep sends again from the database.
        broker_connection_retry=True,
        broker_connection_max_retries=None,
        broker_transport_options={
            "visibility_timeout": settings.visibility_timeout_s,
            # How often a worker looks for messages of dead workers (unacked for longer than the
            # visibility timeout) and puts them back. kombu's default, a scan every 100 s (10 s x
            # every 10th call), would dwarf a short visibility timeout; a tenth of it, between 1 s
            # and those 100 s, brings a killed worker's chunk back soon after the timeout.
            "unacked_restore_interval": restore_interval_s(settings.visibility_timeout_s),
            "unacked_restore_throttle": 1,
            "global_keyprefix": settings.redis_key_prefix,
            "queue_order_strategy": "priority",
        },
        # No pickle anywhere: JSON in and out, and nothing else is accepted.
        task_serializer="json",
        result_serializer="json",
        event_serializer="json",
        accept_content=["json"],
        result_accept_content=["json"],
        # The database holds results. The Redis backend exists only so that `jobs.health.ping`, the one
        # task with ignore_result=False, can answer the process that sent it.
        task_ignore_result=True,
        result_backend=settings.broker_url,
        result_backend_transport_options={"global_keyprefix": settings.redis_key_prefix},
        result_expires=timedelta(hours=1),
        # A task is acknowledged when it ends; one killed mid-chunk is redelivered (writes are idempotent).
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        worker_prefetch_multiplier=1,
        # On a lost broker connection a running chunk finishes and writes its results; a redelivered copy
        # then finds them written. Cancelling it (Celery 6's default) would kill the warm process and
        # still compute the chunk twice.
        worker_cancel_long_running_tasks_on_connection_loss=False,
        # worker_max_tasks_per_child stays unset: a worker keeps its model and KV cache warm.
        task_queues=task_queues(),
        task_default_queue=Queue.NORMAL.value,
        task_default_exchange=Queue.NORMAL.value,
        task_default_routing_key=Queue.NORMAL.value,
        task_create_missing_queues=False,  # a misspelt queue is an error, not a queue nobody consumes
        task_routes=TASK_ROUTES,
        worker_send_task_events=True,  # for Flower
        task_send_sent_event=True,
        timezone=settings.timezone,
        enable_utc=True,
        beat_schedule=beat_schedule(settings),
        # Beat's state (last run times) as JSON in Redis, not Celery's default shelve (pickle) file.
        beat_scheduler=BEAT_SCHEDULER,
    )
    sign_messages(app, settings)
    return app


_default_app: Celery | None = None


def __getattr__(name: str) -> Any:
    """`app`: the app of `celery -A pipeline.celery_app`, built from `load_settings()` on first use."""
    global _default_app
    if name == "app":
        if _default_app is None:
            _default_app = make_celery(load_settings())
        return _default_app
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
