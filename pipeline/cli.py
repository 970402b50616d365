"""The `pipeline` command line (Typer). Data goes to stdout, progress and errors to stderr. Commands
import the engine inside their function, so `pipeline --help` starts without loading torch."""

from __future__ import annotations

import enum
import json
from dataclasses import asdict
from pathlib import Path
from typing import Annotated, Optional

import typer

from pipeline.presets import PRESETS

app = typer.Typer(help="Bulk LLM batch inference.", no_args_is_help=True, add_completion=False)
bench_app = typer.Typer(help="Benchmarks that measure against a peer in the same run.", no_args_is_help=True)
app.add_typer(bench_app, name="bench")
config_app = typer.Typer(help="Show or write the settings.", no_args_is_help=True)
app.add_typer(config_app, name="config")

PresetChoice = enum.Enum("PresetChoice", {name: name for name in PRESETS}, type=str)
PresetOption = Annotated[
    Optional[PresetChoice], typer.Option(help="Apply this preset under pipeline.toml and the environment.")
]


class WorkloadChoice(str, enum.Enum):
    shared_prefix = "shared-prefix"
    distinct = "distinct"
    skewed = "skewed"
    all = "all"


class ScaleChoice(str, enum.Enum):
    full = "full"
    small = "small"


@app.callback()
def main() -> None:
    """Bulk LLM batch inference."""


@bench_app.callback()
def bench() -> None:
    """Benchmarks that measure against a peer in the same run."""


@bench_app.command("engine")
def bench_engine(
    workload: Annotated[WorkloadChoice, typer.Option(help="Which workload to run.")] = WorkloadChoice.all,
    json_path: Annotated[Optional[Path], typer.Option("--json", help="Also write the results to this file.")] = None,
    repeat: Annotated[int, typer.Option(min=1, help="Timed runs of each system; the best counts.")] = 1,
    scale: Annotated[ScaleChoice, typer.Option(help="'small': a tiny model, few prompts.")] = ScaleChoice.full,
) -> None:
    """Our engine against transformers generate (static batches of 32) on the same weights and prompts."""
    from workers.bench.engine_bench import run_bench
    from workers.bench.report import format_report
    from workers.bench.workloads import WORKLOADS

    names = list(WORKLOADS) if workload is WorkloadChoice.all else [workload.value]
    try:
        result = run_bench(names, scale.value, repeat)
    except ValueError as e:
        typer.echo(f"error: {e}", err=True)
        raise typer.Exit(1) from None
    typer.echo(format_report(result))
    if json_path is not None:
        json_path.write_text(json.dumps(asdict(result), indent=2) + "\n")
        typer.echo(f"results written to {json_path}", err=True)


@config_app.callback()
def config() -> None:
    """Show or write the settings (pipeline.toml, PIPELINE_* variables)."""


@config_app.command("show")
def config_show(
    preset: PresetOption = None,
    as_json: Annotated[bool, typer.Option("--json", help="One JSON object instead of a table.")] = False,
) -> None:
    """The settings in effect here, each with where it came from; passwords are masked."""
    from pipeline.settings import load_settings_with_sources

    try:
        settings, sources = load_settings_with_sources(preset=preset.value if preset else None)
    except ValueError as e:
        typer.echo(f"error: {e}", err=True)
        raise typer.Exit(1) from None
    values = settings.as_dict()
    if as_json:
        typer.echo(json.dumps(values, indent=2))
        return
    width = max(map(len, values))
    for name, value in values.items():
        typer.echo(f"{name:<{width}}  {json.dumps(value)}  ({sources[name]})")


@config_app.command("generate")
def config_generate(
    preset: PresetOption = None,
    output: Annotated[Optional[Path], typer.Option("-o", "--output", help="Write here instead of stdout.")] = None,
    force: Annotated[bool, typer.Option(help="Replace the output file if it exists.")] = False,
) -> None:
    """A commented pipeline.toml: the defaults plus the preset; pipeline.toml and PIPELINE_* are not read."""
    from pipeline.settings import preset_settings

    if output is not None and output.exists() and not force:
        typer.echo(f"error: {output} exists; pass --force to replace it", err=True)
        raise typer.Exit(1)
    text = preset_settings(preset.value if preset else None).to_toml()
    if output is None:
        typer.echo(text, nl=False)
        return
    try:
        output.write_text(text, encoding="utf-8")
    except OSError as e:
        typer.echo(f"error: cannot write {output}: {e.strerror}", err=True)
        raise typer.Exit(1) from None
    typer.echo(f"settings written to {output}", err=True)


db_app = typer.Typer(help="The results database.", no_args_is_help=True)
app.add_typer(db_app, name="db")


@db_app.callback()
def db() -> None:
    """The results database (PIPELINE_DATABASE_URL; SQLite by default)."""


@db_app.command("upgrade")
def db_upgrade(
    revision: Annotated[str, typer.Argument(help="Alembic revision to migrate to.")] = "head",
) -> None:
    """Apply the schema migrations to the configured database (SQLite or PostgreSQL)."""
    from db.migrate import current, upgrade
    from pipeline.settings import load_settings, mask_url

    try:
        settings = load_settings()
        upgrade(settings.database_url, revision)
        typer.echo(f"{mask_url(settings.database_url)} is at revision {current(settings.database_url)}", err=True)
    except ValueError as e:
        typer.echo(f"error: {e}", err=True)
        raise typer.Exit(1) from None


@app.command("worker")
def worker(
    queues: Annotated[str, typer.Option(help="Queues to consume, highest priority first.")] = "critical,high,normal,low",
    concurrency: Annotated[int, typer.Option(min=1, help="Tasks run at once; they share one warm engine.")] = 1,
    device: Annotated[Optional[str], typer.Option(help="Overrides PIPELINE_DEVICE, e.g. cuda:0.")] = None,
) -> None:
    """A Celery worker that keeps the model and its KV cache warm across tasks."""
    import os

    from pipeline.celery_app import make_celery
    from pipeline.queues import queue_for
    from pipeline.settings import load_settings

    try:
        names = [queue_for(q.strip()).value for q in queues.split(",") if q.strip()]
        if not names:
            raise ValueError("--queues names no queue; use e.g. critical,high,normal,low")
        if device is not None:
            os.environ["PIPELINE_DEVICE"] = device  # the engine, built later in this process, reads it
        settings = load_settings()
    except ValueError as e:
        typer.echo(f"error: {e}", err=True)
        raise typer.Exit(1) from None
    # Threads, not processes: every task of this worker hands its requests to the one engine, whose
    # scheduler batches them together; no max-tasks-per-child, so the model stays loaded.
    make_celery(settings).worker_main([
        "worker", f"--queues={','.join(names)}", f"--concurrency={concurrency}", "--pool=threads",
        "--prefetch-multiplier=1", "--loglevel=INFO",
    ])


# -- jobs -----------------------------------------------------------------------------------------


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


@app.command("submit")
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


@app.command("status")
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


@app.command("results")
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


@app.command("run")
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
