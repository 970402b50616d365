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
