"""Job control commands: `pipeline cancel | retry | list`."""

from __future__ import annotations

import json
from typing import Annotated

import typer

from pipeline.commands.common import JsonOption, TenantFilter, guarded, print_job, sessions

JobArgument = Annotated[str, typer.Argument(help="The job id `submit` printed.")]


def register(app: typer.Typer) -> None:
    for name, command in (("cancel", cancel), ("retry", retry), ("list", list_jobs)):
        app.command(name)(command)


def cancel(job_id: JobArgument, as_json: JsonOption = False) -> None:
    """Cancel a job: lines not yet run are cancelled, finished results are kept."""
    from pipeline import control
    from pipeline.settings import load_settings

    outcome = guarded(lambda: control.cancel(sessions(load_settings().database_url), job_id))
    typer.echo(f"{outcome.num_lines} lines cancelled", err=True)
    print_job(outcome.summary, as_json)


def retry(job_id: JobArgument, as_json: JsonOption = False) -> None:
    """Run a job's failed lines again (on the job's priority queue); completed lines are kept."""
    from pipeline import control
    from pipeline.celery_app import chunk_sender, make_celery
    from pipeline.settings import load_settings

    def action() -> control.ControlOutcome:
        settings = load_settings()
        celery = make_celery(settings)
        try:
            return control.retry(settings, sessions(settings.database_url), job_id, send_chunk=chunk_sender(celery))
        finally:
            celery.close()

    outcome = guarded(action)
    typer.echo(f"{outcome.num_lines} failed lines sent again" if outcome.num_lines else "no failed lines to retry",
               err=True)
    print_job(outcome.summary, as_json)


def list_jobs(
    status: Annotated[str | None, typer.Option(help="Only jobs in this status, e.g. in_progress.")] = None,
    limit: Annotated[int, typer.Option(min=1, help="At most this many, newest first.")] = 100,
    tenant: TenantFilter = None,
    as_json: JsonOption = False,
) -> None:
    """Jobs, newest first: one line each, or a JSON array of job objects."""
    from pipeline import control
    from pipeline.settings import load_settings

    found = guarded(lambda: control.jobs(sessions(load_settings().database_url), status=status, tenant=tenant,
                                       limit=limit))
    if as_json:
        typer.echo(json.dumps(found, indent=2))
        return
    for summary in found:
        print_job(summary, as_json=False)
