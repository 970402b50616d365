"""`pipeline bench pipeline`: the whole pipeline (submit, Redis, one `pipeline worker`, PostgreSQL)
against the raw engine on the same model and prompts, in one run.

The workload is the engine benchmark's `shared-prefix`, scaled to `num_requests` prompts. The
benchmark tokenizer is word-level (`w0` ... `wN`, whitespace split), so the prompt "w17 w5" is
exactly the ids [17, 5]: both sides run the same token ids. Both are greedy. The raw engine ignores
EOS; a request line cannot ask for that, so each side's tokens/s is over the tokens it actually
generated, and both counts are reported.

Each side is first warmed up on the same workload drawn with another seed (no shared prefix): the
first run of new batch shapes on the CPU costs several times a later one, and the worker builds
its engine on its first chunk. The raw engine then runs from an empty prefix cache; the worker's
cache holds only the warm-up's prefixes. The pipeline's time runs from the start of `submit_file`
to the job seen completed, as a warm worker in production serves it.
"""

from __future__ import annotations

import gc
import json
import os
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from workers.bench.engine_bench import WARMUP_PROMPTS
from workers.bench.model_setup import SHAPES, ModelShape, build_model
from workers.bench.workloads import Workload, shared_prefix
from jobs.worker_process import delete_prefixed_keys, start_worker, stop_process

if TYPE_CHECKING:
    from sqlalchemy.orm import Session, sessionmaker

    from pipeline.settings import Settings

CONCURRENCY = 4  # chunks in flight in the worker; they share its one engine
JOB_TIMEOUT_S = 1800
POLL_S = 0.05
FINISHED = ("completed", "failed", "expired", "cancelled")


@dataclass(frozen=True, slots=True)
class SideResult:
    seconds: float
    num_completed: int
    num_prompt_tokens: int
    num_cached_tokens: int
    num_generated_tokens: int

    @property
    def tokens_per_s(self) -> float:
        return self.num_generated_tokens / self.seconds

    @property
    def hit_rate(self) -> float:
        return self.num_cached_tokens / self.num_prompt_tokens if self.num_prompt_tokens else 0.0


@dataclass(frozen=True, slots=True)
class PipelineBenchResult:
    scale: str
    shape: ModelShape
    num_requests: int
    num_requested_tokens: int
    chunk_size: int
    concurrency: int
    engine: SideResult
    pipeline: SideResult
    load_average: tuple[float, float]  # 1-minute load at start and end: other work skews the timings

    @property
    def ratio(self) -> float:
        """Pipeline tokens/s over engine tokens/s."""
        return self.pipeline.tokens_per_s / self.engine.tokens_per_s


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def scaled_workload(scale: str, vocab_size: int, num_requests: int, seed: int = 0) -> Workload:
    """`shared-prefix` at `scale`'s sizes (those of `make_workload`) with `num_requests` prompts."""
    if scale == "small":
        return shared_prefix(vocab_size, num_prompts=num_requests, prefix_len=32, own_len=(4, 12), new_tokens=8,
                             seed=seed)
    return shared_prefix(vocab_size, num_prompts=num_requests, seed=seed)


def completion_line(custom_id: str, token_ids: list[int], max_tokens: int) -> str:
    prompt = " ".join(f"w{t}" for t in token_ids)  # the word-level tokenizer maps it back to token_ids
    body = {"prompt": prompt, "max_tokens": max_tokens, "temperature": 0}
    return json.dumps({"custom_id": custom_id, "method": "POST", "url": "/v1/completions", "body": body})


def write_jsonl(path: Path, prompts: list[list[int]], max_tokens: list[int], id_prefix: str = "r") -> None:
    with path.open("w") as f:
        for i, (prompt, n) in enumerate(zip(prompts, max_tokens)):
            f.write(completion_line(f"{id_prefix}{i}", prompt, n) + "\n")


def run_engine(settings: Settings, workload: Workload, warmup: Workload) -> SideResult:
    """The raw engine with the worker's own engine settings, warmed up on `warmup`, from an empty
    prefix cache."""
    from workers import EngineConfig, LLMEngine, SamplingParams

    engine = LLMEngine(EngineConfig(**settings.engine_kwargs()))
    engine.generate(WARMUP_PROMPTS, SamplingParams(max_tokens=4, ignore_eos=True))
    engine.generate(warmup.prompts, [SamplingParams(max_tokens=n, ignore_eos=True) for n in warmup.max_tokens])
    engine.reset_prefix_cache()
    params = [SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True) for n in workload.max_tokens]
    started = time.perf_counter()
    outs = engine.generate(workload.prompts, params)
    seconds = time.perf_counter() - started
    result = SideResult(seconds, len(outs), sum(o.num_prompt_tokens for o in outs),
                        sum(o.num_cached_tokens for o in outs), sum(len(o.token_ids) for o in outs))
    del engine, outs
    gc.collect()
    return result


def run_pipeline(settings: Settings, workload: Workload, warmup: Workload, tmp: Path) -> SideResult:
    """Submit -> Redis -> one worker subprocess -> the database, on `settings`' services."""
    import redis

    from db.migrate import upgrade
    from db.session import make_engine, session_factory
    from pipeline.celery_app import chunk_sender, make_celery

    upgrade(settings.database_url)
    client = redis.Redis.from_url(settings.broker_url)
    client.ping()  # fails now, with the URL, when Redis is down
    log_path = tmp / "worker.log"
    db_engine = make_engine(settings.database_url)
    factory = session_factory(db_engine)
    celery = make_celery(settings)
    with log_path.open("w") as worker_log:
        worker = start_worker(settings, tmp, worker_log, concurrency=CONCURRENCY)
        try:
            send = chunk_sender(celery)  # as `pipeline submit` sends
            warmup_path = tmp / "warmup.jsonl"
            write_jsonl(warmup_path, warmup.prompts, warmup.max_tokens, id_prefix="warmup")
            log("pipeline: warming the worker up (it builds its engine on its first chunk)")
            submit_and_wait(settings, factory, warmup_path, send, [worker], [log_path])
            path = tmp / "requests.jsonl"
            write_jsonl(path, workload.prompts, workload.max_tokens)
            log(f"pipeline: {len(workload.prompts)} requests through one worker (concurrency {CONCURRENCY})")
            started = time.perf_counter()
            job_id = submit_and_wait(settings, factory, path, send, [worker], [log_path])
            seconds = time.perf_counter() - started
            return _job_usage(factory, job_id, seconds)
        finally:
            stop_process(worker)
            celery.close()
            db_engine.dispose()
            delete_prefixed_keys(client, settings.redis_key_prefix)
            client.close()


def submit_and_wait(settings: Settings, factory: sessionmaker[Session], path: Path, send: Callable[[int, str], None],
                    workers: list[subprocess.Popen], log_paths: list[Path], timeout_s: float = JOB_TIMEOUT_S) -> str:
    """Submit `path` and poll the database until the job is completed; returns its id. RuntimeError,
    with the worker's log, if it ends otherwise, a worker exits, or `timeout_s` passes."""
    from pipeline.submit import job_summary, submit_file

    job_id = submit_file(settings, factory, path, send_chunk=send)["id"]
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        with factory() as session:
            summary = job_summary(session, job_id)
        if summary["status"] in FINISHED:
            if summary["status"] != "completed":
                raise RuntimeError(f"job {job_id} ended {summary['status']}: {summary['errors']}")
            return job_id
        for worker, log_path in zip(workers, log_paths, strict=True):
            if worker.poll() is not None:
                raise RuntimeError(f"a worker exited with {worker.returncode}:\n{log_path.read_text()[-4000:]}")
        time.sleep(POLL_S)
    raise RuntimeError(f"job {job_id} not finished after {timeout_s} s:\n{log_paths[0].read_text()[-4000:]}")


def _job_usage(factory: sessionmaker[Session], job_id: str, seconds: float) -> SideResult:
    from sqlalchemy import func, select

    from db.enums import RequestStatus
    from db.models import Request

    with factory() as session:
        completed, prompt, cached, generated = session.execute(
            select(func.count(), func.sum(Request.prompt_tokens), func.sum(Request.cached_tokens),
                   func.sum(Request.completion_tokens))
            .where(Request.job_id == job_id, Request.status == RequestStatus.COMPLETED)
        ).one()
    return SideResult(seconds, int(completed), int(prompt or 0), int(cached or 0), int(generated or 0))


def run_pipeline_bench(num_requests: int = 512, scale: str = "full", broker_url: str | None = None,
                       database_url: str | None = None, *, metrics_port: str = "9464-9479") -> PipelineBenchResult:
    """Builds the benchmark model, runs the scaled workload on the raw engine, then through the
    pipeline; `database_url` None: a fresh local PostgreSQL database, dropped afterwards.
    `metrics_port`: the worker's (`off`: no Prometheus endpoint, to measure what metrics cost)."""
    if num_requests < 1:
        raise ValueError(f"--requests {num_requests}: use at least 1")
    if scale not in SHAPES:
        raise ValueError(f"scale {scale!r} is unknown; use one of {', '.join(SHAPES)}")
    import transformers

    from pipeline.bench_submit import database
    from pipeline.settings import Settings

    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    load_start = os.getloadavg()[0]
    shape = SHAPES[scale]
    workload = scaled_workload(scale, shape.vocab_size, num_requests)
    warmup = scaled_workload(scale, shape.vocab_size, num_requests, seed=1)  # shares no prefix with workload
    with tempfile.TemporaryDirectory(prefix="bench-pipeline-") as tmp_name, database(database_url) as url:
        tmp = Path(tmp_name)
        folder = tmp / "model"
        log(f"building the {scale} model (hidden {shape.hidden_size}, {shape.num_hidden_layers} layers)")
        build_model(shape, folder)
        gc.collect()
        settings = Settings(
            model=str(folder), database_url=url, broker_url=broker_url or Settings().broker_url,
            redis_key_prefix=f"pipeline-bench-{uuid.uuid4().hex[:12]}:", metrics_port=metrics_port,
        )
        log(f"raw engine: {num_requests} requests")
        engine = run_engine(settings, workload, warmup)
        pipeline = run_pipeline(settings, workload, warmup, tmp)
    return PipelineBenchResult(scale, shape, num_requests, workload.num_requested_tokens, settings.chunk_size,
                               CONCURRENCY, engine, pipeline, (load_start, os.getloadavg()[0]))


def format_pipeline_report(result: PipelineBenchResult) -> str:
    s = result.shape
    rows = [
        (f"pipeline benchmark ({result.scale}): shared-prefix, {result.num_requests} requests, "
         f"{result.num_requested_tokens} tokens requested; Llama hidden {s.hidden_size}, {s.num_hidden_layers} layers, "
         f"vocab {s.vocab_size}"),
        f"pipeline: one worker, concurrency {result.concurrency}, chunks of {result.chunk_size}, PostgreSQL + Redis",
        (f"load average (1 min) {result.load_average[0]:.2f} at start, {result.load_average[1]:.2f} at end, "
         f"{os.cpu_count()} CPUs"),
        f"{'system':<9} {'completed':>9} {'generated':>10} {'seconds':>8} {'tokens/s':>9} {'prefix hit rate':>16}",
    ]
    for name, side in (("engine", result.engine), ("pipeline", result.pipeline)):
        rows.append(f"{name:<9} {side.num_completed:>9} {side.num_generated_tokens:>10} {side.seconds:>8.2f} "
                    f"{side.tokens_per_s:>9.1f} {side.hit_rate:>16.1%}")
    rows.append(f"pipeline / engine tokens/s: {result.ratio:.3f}")
    return "\n".join(rows)
