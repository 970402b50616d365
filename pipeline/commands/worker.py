"""`pipeline worker`: a Celery worker holding the warm engine. `pipeline beat`: the periodic tasks."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated, Optional

import typer



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

        get_engine_loop(settings)
    except ValueError as e:
        typer.echo(f"error: {e}", err=True)
        raise typer.Exit(1) from None
    # Threads, not processes: every task of this worker hands its requests to the one engine, whose
    # scheduler batches them together; no max-tasks-per-child, so the model stays loaded.
    make_celery(settings).worker_main([
        "worker", f"--queues={','.join(names)}", f"--concurrency={concurrency}", "--pool=threads",
        "--prefetch-multiplier=1", "--loglevel=INFO", *([f"--hostname={name}"] if name else []),
    ])



def beat(
    schedule: Annotated[Path, typer.Option(help="Beat's state file (last run times); its folder must be writable.")]
    = Path("celerybeat-schedule"),
) -> None:
    """Celery beat: sends the periodic maintenance tasks (lost-chunk sweep, job expiry, session
    cleanup, database backup) and the nightly runs. Run one per deployment."""
    from pipeline.celery_app import make_celery
    from pipeline.settings import load_settings

    try:
        settings = load_settings()
    except ValueError as e:
        typer.echo(f"error: {e}", err=True)
        raise typer.Exit(1) from None
    schedule = schedule.resolve()
    if not os.access(schedule.parent, os.W_OK):
        typer.echo(f"error: cannot write beat's schedule file in {schedule.parent}; "
                   "pass --schedule in a writable folder", err=True)
        raise typer.Exit(1)
    make_celery(settings).start(["beat", f"--schedule={schedule}", "--loglevel=INFO"])


# -- jobs -----------------------------------------------------------------------------------------
