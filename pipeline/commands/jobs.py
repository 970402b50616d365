"""Job commands: `pipeline submit | status | results | run`."""

from __future__ import annotations

import enum
import json
from pathlib import Path
from typing import Annotated

import typer

from pipeline.commands.common import (
    JsonOption,
    QuietOption,
    TenantFilter,
    export_with_progress,
    guarded,
    ingest_progress,
    print_job,
    sessions,
    tenant_id_of,
    wait_for_job,
)
from pipeline.printable import printable
from pipeline.progress import Progress, bar


def register(app: typer.Typer) -> None:
    for name, command in (("submit", submit), ("status", status), ("results", results), ("run", run)):
        app.command(name)(command)


class PriorityChoice(str, enum.Enum):
    critical = "critical"
    high = "high"
    normal = "normal"
    low = "low"


ErrorsOption = Annotated[
    Path | None, typer.Option("--errors", help="Write failed and rejected lines here (JSONL, with line numbers).")
]
WindowOption = Annotated[str | None, typer.Option(
    "--completion-window", help="Time the job may take before it expires: '90s', '30m', '24h', '7d'; "
                                "default: PIPELINE_COMPLETION_WINDOW.")]


def _print_job(summary: dict, as_json: bool) -> None:
    if as_json:
        typer.echo(json.dumps(summary, indent=2))
        return
    counts = summary["request_counts"]
    typer.echo(summary["id"])
    typer.echo(f"{summary['status']}: {counts['completed']} completed, {counts['failed']} failed, "
               f"{counts['total']} lines", err=True)


def submit(
    file: Annotated[Path, typer.Argument(help="Requests: .jsonl (OpenAI batch or simple lines) or .parquet.")],
    priority: Annotated[PriorityChoice, typer.Option(help="The queue its chunks go to.")] = PriorityChoice.normal,
    model: Annotated[str | None, typer.Option(help="Model of the job; default: PIPELINE_MODEL.")] = None,
    idempotency_key: Annotated[
        str | None, typer.Option(help="Submitting the same file again with this key returns the same job; "
                                      "another file under it is refused.")] = None,
    strict: Annotated[bool, typer.Option(help="Run nothing if any line is bad.")] = False,
    wait: Annotated[bool, typer.Option(help="Wait until the job is finished.")] = False,
    completion_window: WindowOption = None,
    tenant: Annotated[str, typer.Option(
        help="The tenant the job runs as (its sessions, idempotency keys, prefix cache and quotas); "
             "created on first use.")] = "default",
    quiet: QuietOption = False,
    as_json: JsonOption = False,
) -> None:
    """Submit a file as a job to the workers (Redis queues); prints the job id."""
    from datetime import timedelta

    from pipeline.celery_app import chunk_sender, make_celery
    from pipeline.commands.rejections import find_rejections, print_rejections
    from pipeline.quotas import Quotas
    from pipeline.settings import duration_s, load_settings
    from pipeline.tenant_submit import submit_for_tenant

    def action() -> dict:
        settings = load_settings()
        window = timedelta(seconds=duration_s(completion_window or settings.completion_window))
        factory = sessions(settings.database_url)
        celery = make_celery(settings)
        quotas = Quotas.from_settings(settings)
        try:
            progress, on_progress = ingest_progress(file, quiet)
            summary = submit_for_tenant(settings, factory, quotas, file, tenant=tenant, priority=priority.value,
                                        model=model, idempotency_key=idempotency_key, strict=strict,
                                        completion_window=window, send_chunk=chunk_sender(celery),
                                        on_progress=on_progress)
        finally:
            quotas.close()
            celery.close()
        progress.finish(f"{summary['request_counts']['total']:,} lines")
        rejections = find_rejections(factory, summary)
        print_rejections(rejections, file, f"`pipeline results {summary['id']} -o out.jsonl --errors err.jsonl` "
                                           "lists them all")
        failure = rejections.nothing_runs(file)
        if failure is not None:
            # The job exists (its errors are kept for `results --errors`), so its id still goes to
            # stdout; but a job that runs nothing is a failed submit for scripts: exit 1.
            typer.echo(json.dumps(summary, indent=2) if as_json else summary["id"])
            raise failure
        if not wait:
            return summary
        return wait_for_job(factory, summary["id"], quiet=quiet, notice_after_s=settings.no_worker_notice_after_s)

    _print_job(guarded(action), as_json)


def status(
    job_id: Annotated[str, typer.Argument(help="The job id `submit` printed.")],
    watch: Annotated[bool, typer.Option(help="Refresh until the job ends (progress on stderr).")] = False,
    tenant: TenantFilter = None,
    quiet: QuietOption = False,
    as_json: JsonOption = False,
) -> None:
    """A job's status, line counts and timestamps; its usage, cost, prefix-cache hit rate, rate and ETA."""
    from pipeline.job_stats import extras_line, job_extras
    from pipeline.settings import load_settings
    from pipeline.submit import job_summary

    def action() -> dict:
        settings = load_settings()
        factory = sessions(settings.database_url)
        tenant_id = tenant_id_of(factory, tenant)
        if watch:
            summary = wait_for_job(factory, job_id, quiet=quiet, notice_after_s=settings.no_worker_notice_after_s,
                                   tenant_id=tenant_id)
        else:
            with factory() as session:
                summary = job_summary(session, job_id, tenant_id=tenant_id)
        with factory() as session:
            return {**summary, **job_extras(session, job_id)}

    summary = guarded(action)
    print_job(summary, as_json)
    if not as_json:
        typer.echo(extras_line(summary))


def results(
    job_id: Annotated[str, typer.Argument(help="The job id `submit` printed.")],
    output: Annotated[Path, typer.Option("-o", "--output", help="Results file: .jsonl or .parquet.")],
    errors: ErrorsOption = None,
    ordered: Annotated[bool, typer.Option(help="In input order (always the case).")] = False,
    tenant: TenantFilter = None,
    quiet: QuietOption = False,
) -> None:
    """Write a finished job's results (and, with --errors, its failed lines)."""
    from pipeline.output_paths import check_output_paths
    from pipeline.settings import load_settings

    del ordered  # results are always in input order (`export_results`)

    def action():
        check_output_paths(output, errors)  # the export checks them against the job's input too
        factory = sessions(load_settings().database_url)
        return export_with_progress(factory, job_id, output, errors, quiet, tenant_id=tenant_id_of(factory, tenant))

    _report_export(guarded(action), output, errors)


def _report_export(counts, output: Path, errors: Path | None) -> None:
    typer.echo(f"{counts.results} results written to {printable(str(output))}", err=True)
    if errors is not None:
        typer.echo(f"{counts.errors} errors written to {printable(str(errors))}", err=True)
    elif counts.errors:
        typer.echo(f"{counts.errors} lines failed; pass --errors FILE to see them", err=True)


def run(
    file: Annotated[Path, typer.Argument(help="Requests: .jsonl (OpenAI batch or simple lines) or .parquet.")],
    output: Annotated[Path, typer.Option("-o", "--output", help="Results file: .jsonl or .parquet.")],
    errors: ErrorsOption = None,
    strict: Annotated[bool, typer.Option(help="Run nothing if any line is bad.")] = False,
    quiet: QuietOption = False,
) -> None:
    """Everything in this process: no broker, no worker. The database (SQLite by default) is
    migrated, the file submitted, its chunks run on an engine loaded here, the results exported.
    When nothing can run (every line rejected, or one with --strict) it exits 1 and writes no file."""
    from db.migrate import upgrade
    from pipeline.commands.rejections import find_rejections, print_rejections
    from pipeline.output_paths import check_output_paths
    from pipeline.settings import load_settings
    from pipeline.submit import submit_file

    def action():
        # Before anything runs: a path that cannot take the results would fail only at the end.
        # (The export checks them again, as they may change while the job runs.)
        check_output_paths(output, errors, input_file=file)
        settings = load_settings()
        upgrade(settings.database_url)
        factory = sessions(settings.database_url)
        chunk_ids: list[int] = []
        progress, on_progress = ingest_progress(file, quiet)
        summary = submit_file(settings, factory, file, strict=strict, on_progress=on_progress,
                              send_chunk=lambda chunk_id, _queue: chunk_ids.append(chunk_id))
        progress.finish(f"{summary['request_counts']['total']:,} lines")
        rejections = find_rejections(factory, summary)
        failure = rejections.nothing_runs(file)
        full_list = (f"`pipeline results {summary['id']} -o out.jsonl --errors err.jsonl` lists them all"
                     if failure is not None or errors is None else f"see {errors} for them all")
        print_rejections(rejections, file, full_list)
        if failure is not None:
            raise failure  # before the engine loads and before any file is written
        # The engine (and torch) load only now, after the file has been checked.
        from jobs.engine_host import get_engine_loop
        from jobs.execution import Prices, execute_chunk

        loop = get_engine_loop(settings)
        running = Progress(f"running {summary['id']}", enabled=not quiet)
        for done, chunk_id in enumerate(chunk_ids, 1):
            execute_chunk(factory, loop, chunk_id, "embedded", prices=Prices.from_settings(settings),
                          max_redeliveries=settings.task_max_redeliveries)
            running.update(f"{bar(done, len(chunk_ids))} chunks")
        running.finish(f"{bar(len(chunk_ids), len(chunk_ids))} chunks")
        return export_with_progress(factory, summary["id"], output, errors, quiet)

    _report_export(guarded(action), output, errors)
