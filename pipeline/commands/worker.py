"""`pipeline worker`: a Celery worker holding the warm engine. `pipeline beat`: the periodic tasks."""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Annotated, Optional

import typer

if TYPE_CHECKING:
    from pipeline.settings import Settings
    from workers.engine_loop import EngineLoop


def register(app: typer.Typer) -> None:
    app.command("worker")(worker)
    app.command("beat")(beat)


def worker(
    queues: Annotated[str, typer.Option(help="Queues to consume, highest priority first.")] = "critical,high,normal,low",
    concurrency: Annotated[int, typer.Option(min=1, help="Tasks run at once; they share one warm engine.")] = 1,
    device: Annotated[Optional[str], typer.Option(help="Overrides PIPELINE_DEVICE, e.g. cuda:0.")] = None,
    name: Annotated[Optional[str], typer.Option(
        help="Node name, e.g. gpu0@%h (%h: this host); default celery@<host>. Give each worker on one "
             "machine its own: the chunks table and Flower tell workers apart by it.")] = None,
) -> None:
    """A Celery worker that keeps the model and its KV cache warm across tasks."""
    from pipeline.celery_app import make_celery
    from pipeline.errors import PipelineError
    from pipeline.queues import queue_for
    from pipeline.settings import load_settings

    try:
        names = [queue_for(q.strip()).value for q in queues.split(",") if q.strip()]
        if not names:
            raise ValueError("--queues names no queue; use e.g. critical,high,normal,low")
        if device is not None:
            os.environ["PIPELINE_DEVICE"] = device  # the engine, built below in this process, reads it
        settings = load_settings()
        # The model (and its chat template) loads before the worker takes a task: one that cannot
        # be served stops the worker here with one line, instead of failing every chunk it takes.
        from jobs.engine_host import get_engine_loop
        from jobs import kv_cache_host

        loop = get_engine_loop(settings)
        # Warm before the first task: the newest valid KV snapshot of this node (a refused one is a
        # log line and a cold start), then the settings' warm and pin files.
        node = _node_name(name)
        for line in kv_cache_host.start(settings, loop, node):
            typer.echo(line, err=True)
    except (ValueError, PipelineError) as e:
        typer.echo(f"error: {e}", err=True)
        raise typer.Exit(1) from None
    _serve_metrics(loop, settings)
    _register_while_running(settings, node)
    _snapshot_on_shutdown(settings, loop)
    # Threads, not processes: every task of this worker hands its requests to the one engine, whose
    # scheduler batches them together; no max-tasks-per-child, so the model stays loaded.
    make_celery(settings).worker_main([
        "worker", f"--queues={','.join(names)}", f"--concurrency={concurrency}", "--pool=threads",
        "--prefetch-multiplier=1", "--loglevel=INFO", *([f"--hostname={name}"] if name else []),
    ])


def _serve_metrics(loop: EngineLoop, settings: Settings) -> None:
    """This worker's Prometheus endpoint, on the first free port of `metrics_port` (none for 'off')."""
    from jobs import worker_metrics

    metrics = worker_metrics.install(loop)
    ports = settings.metrics_ports
    if ports is None:
        return
    try:
        port = metrics.serve(ports)
    except OSError as e:
        typer.echo(f"error: cannot serve metrics: {e.strerror or e}", err=True)
        raise typer.Exit(1) from None
    typer.echo(f"metrics: http://0.0.0.0:{port}/metrics", err=True)


def _node_name(name: str | None) -> str:
    """The node name Celery will give this worker (`--name`, %h expanded; default celery@<host>)."""
    from celery.utils.nodenames import default_nodename, host_format

    return host_format(default_nodename(name))


def _register_while_running(settings: Settings, node: str) -> None:
    """Registers this worker once it answers remote control, until it stops: commands that ask
    every worker then wait only for the registered ones (pipeline/worker_registry.py)."""
    import redis
    from celery.signals import worker_ready, worker_shutdown

    from pipeline.worker_registry import Registration

    client = redis.Redis.from_url(settings.broker_url, socket_timeout=10, socket_connect_timeout=10)
    registration = Registration(client, settings.redis_key_prefix, node)
    worker_ready.connect(lambda **_: registration.start(), weak=False)
    worker_shutdown.connect(lambda **_: registration.stop(), weak=False)


def _snapshot_on_shutdown(settings: Settings, loop) -> None:
    """On a warm shutdown (SIGTERM, SIGINT), once the running chunk is done, write a KV snapshot so
    the next start of this node is warm. A failure is logged; the worker still exits."""
    from celery.signals import worker_shutdown

    from jobs import kv_cache_host

    def persist(**_: object) -> None:
        import logging

        try:
            kv_cache_host.persist(settings, loop)
        except (OSError, RuntimeError) as e:
            logging.getLogger(__name__).error("no KV snapshot written at shutdown: %s", e)

    worker_shutdown.connect(persist, weak=False)


def beat(
    check: Annotated[bool, typer.Option(
        "--check", help="Do not start beat: exit 0 if a running beat has sent the lost-chunk sweep "
                        "lately (its state in Redis), else 1. For container health checks.")] = False,
) -> None:
    """Celery beat: sends the periodic maintenance tasks (lost-chunk sweep, job expiry, session
    cleanup, database backup) and the nightly runs. Run one per deployment. It writes no file: the
    last run times live in Redis as JSON (pipeline/beat_scheduler.py)."""
    from pipeline.celery_app import make_celery
    from pipeline.settings import load_settings

    try:
        settings = load_settings()
    except ValueError as e:
        typer.echo(f"error: {e}", err=True)
        raise typer.Exit(1) from None
    if check:
        _check_beat(settings)
        return
    if settings.metrics_ports is not None:
        from pipeline.beat_metrics import serve_queue_depths

        try:
            port = serve_queue_depths(settings.broker_url, settings.redis_key_prefix, settings.metrics_ports)
        except OSError as e:
            typer.echo(f"error: cannot serve metrics: {e.strerror or e}", err=True)
            raise typer.Exit(1) from None
        typer.echo(f"metrics (queue depths): http://0.0.0.0:{port}/metrics", err=True)
    make_celery(settings).start(["beat", "--loglevel=INFO"])


def _check_beat(settings: Settings) -> None:
    import redis

    from pipeline.beat_scheduler import beat_is_alive
    from pipeline.settings import mask_url

    client = redis.Redis.from_url(settings.broker_url, socket_timeout=10, socket_connect_timeout=10)
    try:
        alive, why = beat_is_alive(client, settings.redis_key_prefix, settings.sweep_interval_s)
    except redis.RedisError as e:
        typer.echo(f"error: cannot reach Redis at {mask_url(settings.broker_url)}: {e}", err=True)
        raise typer.Exit(1) from None
    finally:
        client.close()
    if not alive:
        typer.echo(f"error: {why}", err=True)
        raise typer.Exit(1)
    typer.echo(why, err=True)


# -- jobs -----------------------------------------------------------------------------------------
