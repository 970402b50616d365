"""`pipeline bench load`: a large job of short generations over several worker processes, end to
end (submit, Redis, the workers, PostgreSQL): lines/s, whether every line is accounted for exactly
once, and whether the workers' memory stays flat as the job grows.

The built-in tiny model, distinct prompts, `max_tokens` short. The same workers run a job of a
tenth of the lines first (at least two chunks per task slot, so that it also warms every worker
up: each builds its engine on its first chunk), then the full job. Each worker's peak RSS (VmHWM) is read after each job: flat memory means the
full job leaves the peak where the tenth left it, not ten times higher.
"""

from __future__ import annotations

import json
import os
import tempfile
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

from jobs.bench.pipeline_bench import log, submit_and_wait
from jobs.worker_process import delete_prefixed_keys, start_worker, stop_process

JOB_TIMEOUT_S = 3 * 3600


@dataclass(frozen=True, slots=True)
class LoadRun:
    num_lines: int
    seconds: float
    num_completed: int
    num_failed: int
    num_distinct_results: int  # distinct custom_ids among finished requests
    usage_completion_tokens: int  # the job's usage row
    result_completion_tokens: int  # the sum over its requests: equal when nothing is billed twice
    worker_peak_rss_bytes: list[int]  # VmHWM of each worker after this job

    @property
    def lines_per_s(self) -> float:
        return self.num_lines / self.seconds

    @property
    def accounted_once(self) -> bool:
        return (self.num_completed + self.num_failed == self.num_lines == self.num_distinct_results
                and self.usage_completion_tokens == self.result_completion_tokens)


@dataclass(frozen=True, slots=True)
class LoadBenchResult:
    num_workers: int
    concurrency: int
    chunk_size: int
    max_tokens: int
    cpu_threads: int  # of each worker
    engine_lines: int  # prompts of the raw-engine reference run
    engine_seconds: float
    runs: list[LoadRun]
    load_average: tuple[float, float]

    @property
    def engine_lines_per_s(self) -> float:
        return self.engine_lines / self.engine_seconds


def prompt_text(i: int) -> str:
    """The prompt of line `i`: short and distinct."""
    return f"Item {i}: summarise it."


def run_engine(num_lines: int, max_tokens: int) -> float:
    """Seconds the raw tiny engine takes, in this process, for the first `num_lines` prompts of the
    load file (after a warm-up): the model's own speed, for reference."""
    from workers import EngineConfig, LLMEngine, SamplingParams

    engine = LLMEngine(EngineConfig(model="tiny"))
    prompts = [engine.tokenizer.encode(prompt_text(i)) for i in range(num_lines)]
    params = SamplingParams(max_tokens=max_tokens, temperature=0.0)
    engine.generate(prompts[:64], params)
    started = time.perf_counter()
    engine.generate(prompts, params)
    return time.perf_counter() - started


def write_load_file(path: Path, num_lines: int, max_tokens: int, id_prefix: str) -> None:
    with path.open("w") as f:
        for i in range(num_lines):
            f.write(json.dumps({"custom_id": f"{id_prefix}{i}", "text": prompt_text(i),
                                "max_tokens": max_tokens, "temperature": 0}) + "\n")


def peak_rss_bytes(pid: int) -> int:
    """The process's peak resident set (VmHWM), from /proc."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"/proc/{pid}/status has no VmHWM")


def run_load_bench(num_lines: int = 100_000, num_workers: int = 2, concurrency: int = 2, chunk_size: int = 256,
                   max_tokens: int = 4, broker_url: str | None = None,
                   database_url: str | None = None) -> LoadBenchResult:
    """Runs a tenth of `num_lines`, then `num_lines`, over `num_workers` workers; `database_url`
    None: a fresh local PostgreSQL database, dropped afterwards."""
    if num_workers < 1 or concurrency < 1 or chunk_size < 1:
        raise ValueError("--workers, --concurrency and --chunk-size must be at least 1")
    warmup_lines = 2 * num_workers * concurrency * chunk_size  # two chunks per task slot of the workers
    if num_lines < warmup_lines:
        raise ValueError(f"--lines {num_lines}: use at least {warmup_lines} "
                         "(two chunks per task slot of the workers), or a smaller --chunk-size")
    import redis

    from db.migrate import upgrade
    from db.session import make_engine, session_factory
    from pipeline.bench_submit import database
    from pipeline.celery_app import chunk_sender, make_celery
    from pipeline.settings import Settings

    load_start = os.getloadavg()[0]
    sizes = (max(num_lines // 10, warmup_lines), num_lines)
    log(f"raw engine: {sizes[0]} lines")
    engine_seconds = run_engine(sizes[0], max_tokens)
    with tempfile.TemporaryDirectory(prefix="bench-load-") as tmp_name, database(database_url) as url:
        tmp = Path(tmp_name)
        # The workers split the machine's cores, as a deployment of several workers on one machine
        # must (`cpu_threads`); the raw engine above had them all.
        settings = Settings(model="tiny", database_url=url, broker_url=broker_url or Settings().broker_url,
                            redis_key_prefix=f"pipeline-bench-{uuid.uuid4().hex[:12]}:", chunk_size=chunk_size,
                            cpu_threads=max(1, (os.cpu_count() or 1) // num_workers))
        upgrade(url)
        client = redis.Redis.from_url(settings.broker_url)
        client.ping()  # fails now, with the URL, when Redis is down
        db_engine = make_engine(url)
        factory = session_factory(db_engine)
        celery = make_celery(settings)
        logs = [tmp / f"worker-{n}.log" for n in range(num_workers)]
        handles = [path.open("w") for path in logs]
        workers = [start_worker(settings, tmp, handle, concurrency=concurrency) for handle in handles]
        runs: list[LoadRun] = []
        try:
            for n in sizes:
                path = tmp / f"load-{n}.jsonl"
                write_load_file(path, n, max_tokens, id_prefix=f"r{n}-")
                log(f"load: {n} lines over {num_workers} workers (concurrency {concurrency}, chunks of {chunk_size})")
                started = time.perf_counter()
                job_id = submit_and_wait(settings, factory, path, chunk_sender(celery), workers, logs,
                                         timeout_s=JOB_TIMEOUT_S)
                seconds = time.perf_counter() - started
                runs.append(_account(factory, job_id, n, seconds, [peak_rss_bytes(w.pid) for w in workers]))
        finally:
            for worker in workers:
                stop_process(worker)
            for handle in handles:
                handle.close()
            celery.close()
            db_engine.dispose()
            delete_prefixed_keys(client, settings.redis_key_prefix)
            client.close()
    return LoadBenchResult(num_workers, concurrency, chunk_size, max_tokens, settings.cpu_threads, sizes[0],
                           engine_seconds, runs,
                           (load_start, os.getloadavg()[0]))


def _account(factory, job_id: str, num_lines: int, seconds: float, peaks: list[int]) -> LoadRun:
    from sqlalchemy import func, select

    from db.enums import RequestStatus
    from db.models import Request
    from db.records import JobUsage

    with factory() as session:
        by_status = dict(session.execute(select(Request.status, func.count()).where(Request.job_id == job_id)
                                         .group_by(Request.status)).all())
        distinct = session.scalar(select(func.count(func.distinct(Request.custom_id))).where(
            Request.job_id == job_id, Request.status != RequestStatus.PENDING))
        result_tokens = session.scalar(select(func.coalesce(func.sum(Request.completion_tokens), 0))
                                       .where(Request.job_id == job_id))
        usage_tokens = session.scalar(select(func.coalesce(func.sum(JobUsage.completion_tokens), 0))
                                      .where(JobUsage.job_id == job_id))
    return LoadRun(num_lines, seconds, by_status.get(RequestStatus.COMPLETED, 0), by_status.get(RequestStatus.FAILED, 0),
                   int(distinct), int(usage_tokens), int(result_tokens), peaks)


def format_load_report(result: LoadBenchResult) -> str:
    rows = [
        (f"load benchmark: tiny model, max_tokens {result.max_tokens}, {result.num_workers} workers x concurrency "
         f"{result.concurrency} ({result.cpu_threads} CPU threads each), chunks of {result.chunk_size}, "
         "PostgreSQL + Redis"),
        (f"load average (1 min) {result.load_average[0]:.2f} at start, {result.load_average[1]:.2f} at end, "
         f"{os.cpu_count()} CPUs"),
        f"{'lines':>8} {'completed':>9} {'failed':>6} {'seconds':>8} {'lines/s':>8} {'each once':>9}  worker peak RSS",
    ]
    for run in result.runs:
        peaks = ", ".join(f"{p / 2**20:.0f} MiB" for p in run.worker_peak_rss_bytes)
        rows.append(f"{run.num_lines:>8} {run.num_completed:>9} {run.num_failed:>6} {run.seconds:>8.1f} "
                    f"{run.lines_per_s:>8.1f} {'yes' if run.accounted_once else 'NO':>9}  {peaks}")
    rows.append(f"raw engine (one process, all {os.cpu_count()} CPUs, the same prompts, first {result.engine_lines} lines): "
                f"{result.engine_lines_per_s:.1f} lines/s; pipeline / engine: "
                f"{result.runs[-1].lines_per_s / result.engine_lines_per_s:.3f}")
    first, last = result.runs[0], result.runs[-1]
    growth = max(b / a for a, b in zip(first.worker_peak_rss_bytes, last.worker_peak_rss_bytes))
    rows.append(f"memory: worker peak RSS after {last.num_lines} lines is at most {growth:.2f}x that after "
                f"{first.num_lines}")
    return "\n".join(rows)
