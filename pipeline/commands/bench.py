"""`pipeline bench`: benchmarks that measure against a peer in the same run."""

from __future__ import annotations

import enum
import json
from dataclasses import asdict
from pathlib import Path
from typing import Annotated, Optional

import typer


bench_app = typer.Typer(help="Benchmarks that measure against a peer in the same run.", no_args_is_help=True)


class WorkloadChoice(str, enum.Enum):
    shared_prefix = "shared-prefix"
    distinct = "distinct"
    multi_turn = "multi-turn"
    skewed = "skewed"
    all = "all"


class PeerChoice(str, enum.Enum):
    transformers = "transformers"
    vllm = "vllm"


class DtypeChoice(str, enum.Enum):
    float32 = "float32"
    bfloat16 = "bfloat16"


class ScaleChoice(str, enum.Enum):
    full = "full"
    small = "small"


DatabaseUrlOption = Annotated[Optional[str], typer.Option(
    help="An empty or migrated database; default: a fresh local PostgreSQL database, dropped after.")]
BrokerUrlOption = Annotated[Optional[str], typer.Option(help="Redis URL; default: the local server.")]



@bench_app.callback()
def bench() -> None:
    """Benchmarks that measure against a peer in the same run."""


@bench_app.command("engine")
def bench_engine(
    workload: Annotated[WorkloadChoice, typer.Option(help="Which workload to run.")] = WorkloadChoice.all,
    peer: Annotated[Optional[list[PeerChoice]], typer.Option(
        help="Peers besides transformers, which always runs; 'vllm' runs vLLM's CPU build in its own process "
             "(repeatable).")] = None,
    vllm_python: Annotated[Optional[str], typer.Option(
        help="The python of vLLM's virtual environment, for --peer vllm; default: $PIPELINE_BENCH_VLLM_PYTHON.",
    )] = None,
    dtype: Annotated[DtypeChoice, typer.Option(
        help="The dtype of our engine and of every peer.")] = DtypeChoice.float32,
    json_path: Annotated[Optional[Path], typer.Option("--json", help="Also write the results to this file.")] = None,
    repeat: Annotated[int, typer.Option(min=1, help="Timed runs of each system; the report gives the median and "
                                                    "the range.")] = 1,
    scale: Annotated[ScaleChoice, typer.Option(help="'small': a tiny model, few prompts.")] = ScaleChoice.full,
) -> None:
    """Our engine against transformers generate (static batches of 32) and, with --peer vllm, vLLM, on the
    same weights and prompts."""
    from workers.bench.engine_bench import run_bench
    from workers.bench.report import format_report
    from workers.bench.vllm_runner import PeerError, resolve_vllm_python
    from workers.bench.workloads import WORKLOADS

    names = list(WORKLOADS) if workload is WorkloadChoice.all else [workload.value]
    try:
        python = resolve_vllm_python(vllm_python) if PeerChoice.vllm in (peer or []) else None
        result = run_bench(names, scale.value, repeat, dtype.value, python)
    except (ValueError, PeerError) as e:
        typer.echo(f"error: {e}", err=True)
        raise typer.Exit(1) from None
    typer.echo(format_report(result))
    if json_path is not None:
        json_path.write_text(json.dumps(asdict(result), indent=2) + "\n")
        typer.echo(f"results written to {json_path}", err=True)


@bench_app.command("submit")
def bench_submit(
    lines: Annotated[int, typer.Option(min=10, help="Lines in the submitted file (a tenth is submitted first).")] = 100_000,
    database_url: Annotated[Optional[str], typer.Option(
        help="A migrated-or-empty database to submit into; default: a fresh local PostgreSQL database, dropped after.",
    )] = None,
) -> None:
    """How fast `submit` ingests a JSONL file into the database, and whether its memory stays flat."""
    from pipeline.bench_submit import format_submit_report, run_submit_bench

    try:
        result = run_submit_bench(lines, database_url)
    except ValueError as e:
        typer.echo(f"error: {e}", err=True)
        raise typer.Exit(1) from None
    typer.echo(format_submit_report(result))


@bench_app.command("pipeline")
def bench_pipeline(
    requests: Annotated[int, typer.Option(min=1, help="Prompts of the shared-prefix workload.")] = 512,
    scale: Annotated[ScaleChoice, typer.Option(help="'small': a tiny model, short prompts.")] = ScaleChoice.full,
    database_url: DatabaseUrlOption = None,
    broker_url: BrokerUrlOption = None,
    metrics_port: Annotated[str, typer.Option(
        help="The worker's PIPELINE_METRICS_PORT; 'off' measures the pipeline without its metrics.")] = "9464-9479",
) -> None:
    """The whole pipeline (submit, Redis, one worker, PostgreSQL) against the raw engine, same prompts."""
    from jobs.bench.pipeline_bench import format_pipeline_report, run_pipeline_bench

    try:
        result = run_pipeline_bench(requests, scale.value, broker_url, database_url, metrics_port=metrics_port)
    except (ValueError, RuntimeError) as e:
        typer.echo(f"error: {e}", err=True)
        raise typer.Exit(1) from None
    typer.echo(format_pipeline_report(result))


@bench_app.command("load")
def bench_load(
    lines: Annotated[int, typer.Option(min=1, help="Lines of the big job (a tenth, or more, runs first).")] = 100_000,
    workers: Annotated[int, typer.Option(min=1, help="Worker processes.")] = 2,
    concurrency: Annotated[int, typer.Option(min=1, help="Chunks in flight per worker.")] = 2,
    chunk_size: Annotated[int, typer.Option(min=1, help="Requests per chunk.")] = 256,
    max_tokens: Annotated[int, typer.Option(min=1, help="Tokens generated per line.")] = 4,
    database_url: DatabaseUrlOption = None,
    broker_url: BrokerUrlOption = None,
) -> None:
    """A large job of short generations over several workers: lines/s, every line once, flat memory."""
    from jobs.bench.load_bench import format_load_report, run_load_bench

    try:
        result = run_load_bench(lines, workers, concurrency, chunk_size, max_tokens, broker_url, database_url)
    except (ValueError, RuntimeError) as e:
        typer.echo(f"error: {e}", err=True)
        raise typer.Exit(1) from None
    typer.echo(format_load_report(result))


@bench_app.command("api")
def bench_api(
    lines: Annotated[int, typer.Option(min=1, help="Lines of the big file (a tenth, at least 1,000, runs first).")]
    = 100_000,
    clients: Annotated[int, typer.Option(min=1, help="Threads polling GET /v1/batches/{id}.")] = 50,
    workers: Annotated[int, typer.Option(min=1, help="Worker processes running the batches.")] = 1,
    database_url: DatabaseUrlOption = None,
    broker_url: BrokerUrlOption = None,
) -> None:
    """The Batch API server under load: poll latency (P50/P99), upload lines/s, the server's peak memory."""
    from jobs.bench.api_bench import format_api_report, run_api_bench

    try:
        result = run_api_bench(lines, clients, workers, broker_url=broker_url, database_url=database_url)
    except (ValueError, RuntimeError) as e:
        typer.echo(f"error: {e}", err=True)
        raise typer.Exit(1) from None
    typer.echo(format_api_report(result))


@bench_app.command("warm")
def bench_warm(
    dtype: Annotated[Optional[list[DtypeChoice]], typer.Option(
        help="Dtypes to measure (repeatable); default: float32 and bfloat16.")] = None,
    repeat: Annotated[int, typer.Option(min=1, help="Runs of each measurement; the report gives medians.")] = 3,
    scale: Annotated[ScaleChoice, typer.Option(help="'small': a tiny model, short prompts.")] = ScaleChoice.full,
    prefix_len: Annotated[Optional[int], typer.Option(
        min=16, help="Tokens of the shared prefix (a system prompt); default 256 (64 with --scale small).")] = None,
) -> None:
    """A restarted engine warm (KV snapshot loaded) against cold: first token, TTFT and throughput of
    the first shared-prefix chunk; and the snapshot's load time against recomputing its prefixes."""
    from workers.bench.warm_bench import format_warm_report, run_warm_bench

    dtypes = [d.value for d in dtype] if dtype else ["float32", "bfloat16"]
    try:
        results = run_warm_bench(dtypes, scale.value, repeat, prefix_len=prefix_len)
    except ValueError as e:
        typer.echo(f"error: {e}", err=True)
        raise typer.Exit(1) from None
    typer.echo(format_warm_report(results))
