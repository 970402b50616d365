"""Job commands: `pipeline submit | status | results | run`."""

from __future__ import annotations

import enum
import json
from pathlib import Path
from typing import Annotated, Optional

import typer



def register(app: typer.Typer) -> None:
    for name, command in (("submit", submit), ("status", status), ("results", results), ("run", run)):
        app.command(name)(command)


class PriorityChoice(str, enum.Enum):
    critical = "critical"
    high = "high"
    normal = "normal"
    low = "low"


JsonOption = Annotated[bool, typer.Option("--json", help="The job as one JSON object.")]
ErrorsOption = Annotated[
    Optional[Path], typer.Option("--errors", help="Write failed and rejected lines here (JSONL, with line numbers).")
]
POLL_S = 0.5


def _fail(message: str) -> typer.Exit:
    typer.echo(f"error: {message}", err=True)
    return typer.Exit(1)


def _guarded(action):  # noqa: ANN001, ANN202 - a small internal helper
    """Run `action()`; the user's and the environment's errors become one `error:` line, exit 1."""
    from kombu.exceptions import OperationalError as BrokerError
    from sqlalchemy.exc import OperationalError, ProgrammingError

    from pipeline.errors import PipelineError

    try:
        return action()
    except (PipelineError, ValueError) as e:
        raise _fail(str(e)) from None
    except ProgrammingError as e:  # e.g. a missing table: the schema was never created
        raise _fail(f"the database is not set up ({e.orig}); run `pipeline db upgrade`") from None
    except OperationalError as e:
        message = str(e.orig).strip().splitlines()[0] if e.orig else str(e)
        if "no such table" in message:
            raise _fail("the database is not set up; run `pipeline db upgrade`") from None
        raise _fail(f"cannot use the database ({message}); check PIPELINE_DATABASE_URL") from None
    except BrokerError as e:
        raise _fail(f"cannot reach the broker ({e}); check PIPELINE_BROKER_URL and that Redis runs") from None


def _sessions(database_url: str):  # noqa: ANN202
    from db.session import make_engine, session_factory

    return session_factory(make_engine(database_url))


def _print_job(summary: dict, as_json: bool) -> None:
    if as_json:
        typer.echo(json.dumps(summary, indent=2))
        return
    counts = summary["request_counts"]
    typer.echo(summary["id"])
    typer.echo(f"{summary['status']}: {counts['completed']} completed, {counts['failed']} failed, "
               f"{counts['total']} lines", err=True)


def _wait_for_job(factory, job_id: str) -> dict:  # noqa: ANN001
    import time

    from pipeline.submit import job_summary

    while True:
        with factory() as session:
            summary = job_summary(session, job_id)
        if summary["status"] in ("completed", "failed", "expired", "cancelled"):
            return summary
        counts = summary["request_counts"]
        typer.echo(f"{summary['status']}: {counts['completed'] + counts['failed']}/{counts['total']}", err=True)
        time.sleep(POLL_S)


def submit(
    file: Annotated[Path, typer.Argument(help="Requests: .jsonl (OpenAI batch or simple lines) or .parquet.")],
    priority: Annotated[PriorityChoice, typer.Option(help="The queue its chunks go to.")] = PriorityChoice.normal,
    model: Annotated[Optional[str], typer.Option(help="Model of the job; default: PIPELINE_MODEL.")] = None,
    idempotency_key: Annotated[
        Optional[str], typer.Option(help="Submitting again with this key returns the same job.")] = None,
    strict: Annotated[bool, typer.Option(help="Run nothing if any line is bad.")] = False,
    wait: Annotated[bool, typer.Option(help="Wait until the job is finished.")] = False,
    as_json: JsonOption = False,
) -> None:
    """Submit a file as a job to the workers (Redis queues); prints the job id."""
    from pipeline.celery_app import RUN_CHUNK_TASK, make_celery
    from pipeline.settings import load_settings
    from pipeline.submit import submit_file

    def action() -> dict:
        settings = load_settings()
        factory = _sessions(settings.database_url)
        celery = make_celery(settings)
        try:
            def send_chunk(chunk_id: int, queue: str) -> None:
                celery.send_task(RUN_CHUNK_TASK, args=[chunk_id], queue=queue)

            summary = submit_file(settings, factory, file, priority=priority.value, model=model,
                                  idempotency_key=idempotency_key, strict=strict, send_chunk=send_chunk)
        finally:
            celery.close()
        return _wait_for_job(factory, summary["id"]) if wait else summary

    _print_job(_guarded(action), as_json)


def status(job_id: Annotated[str, typer.Argument(help="The job id `submit` printed.")], as_json: JsonOption = False) -> None:
    """A job's status, line counts and timestamps."""
    from pipeline.settings import load_settings
    from pipeline.submit import job_summary

    def action() -> dict:
        with _sessions(load_settings().database_url)() as session:
            return job_summary(session, job_id)

    summary = _guarded(action)
    if as_json:
        typer.echo(json.dumps(summary, indent=2))
        return
    counts = summary["request_counts"]
    typer.echo(f"{summary['id']}  {summary['status']}  {counts['completed']} completed, {counts['failed']} failed, "
               f"{counts['total']} lines")


def results(
    job_id: Annotated[str, typer.Argument(help="The job id `submit` printed.")],
    output: Annotated[Path, typer.Option("-o", "--output", help="Results file: .jsonl or .parquet.")],
    errors: ErrorsOption = None,
    ordered: Annotated[bool, typer.Option(help="In input order (always the case).")] = False,
) -> None:
    """Write a finished job's results (and, with --errors, its failed lines)."""
    from pipeline.export import export_results
    from pipeline.settings import load_settings

    def action():  # noqa: ANN202
        return export_results(_sessions(load_settings().database_url), job_id, output, errors, ordered)

    _report_export(_guarded(action), output, errors)


def _report_export(counts, output: Path, errors: Optional[Path]) -> None:  # noqa: ANN001
    typer.echo(f"{counts.results} results written to {output}", err=True)
    if errors is not None:
        typer.echo(f"{counts.errors} errors written to {errors}", err=True)
    elif counts.errors:
        typer.echo(f"{counts.errors} lines failed; pass --errors FILE to see them", err=True)


def run(
    file: Annotated[Path, typer.Argument(help="Requests: .jsonl (OpenAI batch or simple lines) or .parquet.")],
    output: Annotated[Path, typer.Option("-o", "--output", help="Results file: .jsonl or .parquet.")],
    errors: ErrorsOption = None,
) -> None:
    """Everything in this process: no broker, no worker. The database (SQLite by default) is
    migrated, the file submitted, its chunks run on an engine loaded here, the results exported."""
    from db.migrate import upgrade
    from pipeline.export import export_results
    from pipeline.settings import load_settings
    from pipeline.submit import submit_file

    def action():  # noqa: ANN202
        settings = load_settings()
        upgrade(settings.database_url)
        factory = _sessions(settings.database_url)
        chunk_ids: list[int] = []
        summary = submit_file(settings, factory, file, send_chunk=lambda chunk_id, _queue: chunk_ids.append(chunk_id))
        if summary["status"] == "failed":
            raise ValueError(f"job {summary['id']} failed: " + "; ".join(e["message"] for e in summary["errors"][:3]))
        # The engine (and torch) load only now, after the file has been checked.
        from jobs.engine_host import get_engine_loop
        from jobs.execution import Prices, execute_chunk

        loop = get_engine_loop(settings)
        for done, chunk_id in enumerate(chunk_ids, 1):
            execute_chunk(factory, loop, chunk_id, "embedded", prices=Prices.from_settings(settings))
            typer.echo(f"chunk {done}/{len(chunk_ids)} done", err=True)
        typer.echo(f"job {summary['id']}", err=True)
        return export_results(factory, summary["id"], output, errors)

    _report_export(_guarded(action), output, errors)
