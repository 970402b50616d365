"""`pipeline bench engine`: our engine against `transformers` generate on the same weights and
prompts, in one process, on the CPU in float32."""

from __future__ import annotations

import os
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from workers import EngineConfig, LLMEngine, SamplingParams
from workers.bench.hf_peer import HF_BATCH_SIZE, run_hf
from workers.bench.kv_quant_bench import KVQuantResult, bench_kv_quant
from workers.bench.model_setup import BENCH_INIT_RANGE, DEFAULT_INIT_RANGE, SHAPES, ModelShape, build_model
from workers.bench.roofline import measure_matmul_flops, workload_flops
from workers.bench.workloads import WORKLOADS, Workload, make_workload

BLOCK_SIZE = 16
POLICIES = ("lru", "lfu", "fifo", "adaptive")  # lru first: the engine's default
WARMUP_PROMPTS = [[3 + i] * (20 + 7 * i) for i in range(4)]  # a batched prefill, then decodes


@dataclass(slots=True)
class SystemResult:
    seconds: float  # best of the timed runs
    tokens_per_s: float  # requested tokens over wall time
    peak_kv_bytes: int
    roofline_fraction: float | None = None  # needed FLOPs / seconds / matmul rate; set once the rate is known


@dataclass(slots=True)
class PolicyResult:
    policy: str
    hit_rate: float
    tokens_per_s: float
    num_evictions: int
    num_preemptions: int


@dataclass(slots=True)
class WorkloadResult:
    name: str
    num_prompts: int
    num_prompt_tokens: int
    num_requested_tokens: int
    needed_flops: float
    ours: SystemResult
    hf: SystemResult
    speedup: float  # ours tokens/s over transformers tokens/s
    hit_rate: float  # prompt tokens served from our prefix cache
    num_agreeing: int  # prompts whose greedy tokens are identical in both
    cache_on_tokens_per_s: float | None = None  # distinct: best of the runs alternated with caching off
    no_cache_tokens_per_s: float | None = None  # distinct: our engine with prefix caching off
    caching_overhead: float | None = None  # distinct: on vs off, as a fraction of the off time
    num_kv_blocks: int | None = None  # skewed: the pool the policies share
    ideal_hit_rate: float = 0.0  # every repeat of a shared prefix served from the cache
    policies: list[PolicyResult] = field(default_factory=list)
    adaptive_vs_lru: float | None = None  # skewed: hit-rate difference, in fractions


@dataclass(slots=True)
class BenchResult:
    scale: str
    shape: ModelShape
    num_threads: int
    matmul_flops: float
    hf_batch_size: int
    load_average: tuple[float, float]  # 1-minute load at start and end: other work skews the timings
    workloads: list[WorkloadResult]
    kv_quant: list[KVQuantResult] = field(default_factory=list)  # int8 vs full precision, shared-prefix


@dataclass(slots=True)
class OurRun:
    token_ids: list[list[int]]
    seconds: float
    hit_rate: float
    num_evictions: int
    num_preemptions: int


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def make_engine(
    folder: Path, prefix_caching: bool = True, policy: str = "lru", num_kv_blocks: int | None = None,
    kv_cache_dtype: str = "auto",
) -> LLMEngine:
    """An engine on the benchmark folder, warmed up (kernels picked, first allocations done) with an
    empty prefix cache."""
    engine = LLMEngine(EngineConfig(
        model=str(folder), device="cpu", dtype="float32", block_size=BLOCK_SIZE, num_kv_blocks=num_kv_blocks,
        enable_prefix_caching=prefix_caching, eviction_policy=policy, max_num_seqs=256, max_num_batched_tokens=2048,
        kv_cache_dtype=kv_cache_dtype,
    ))
    engine.generate(WARMUP_PROMPTS, SamplingParams(max_tokens=4, ignore_eos=True))
    engine.reset_prefix_cache()
    return engine


def run_ours(engine: LLMEngine, workload: Workload) -> OurRun:
    """Runs the workload, wave by wave, from an empty prefix cache; hit rate and counts are this
    run's alone."""
    engine.reset_prefix_cache()
    before = engine.stats()
    params = [SamplingParams(max_tokens=n, ignore_eos=True, temperature=0.0) for n in workload.max_tokens]
    waves = workload.waves or [list(range(len(workload.prompts)))]
    token_ids: list[list[int]] = [[] for _ in workload.prompts]
    started = time.perf_counter()
    for wave in waves:
        outs = engine.generate([workload.prompts[i] for i in wave], [params[i] for i in wave])
        for i, out in zip(wave, outs):
            token_ids[i] = out.token_ids
    seconds = time.perf_counter() - started
    after = engine.stats()
    queries = int(after["prefix_cache_queries"]) - int(before["prefix_cache_queries"])
    hits = int(after["prefix_cache_hits"]) - int(before["prefix_cache_hits"])
    return OurRun(
        token_ids, seconds, hits / queries if queries else 0.0,
        int(after["num_evictions"]) - int(before["num_evictions"]),
        int(after["num_preemptions"]) - int(before["num_preemptions"]),
    )


def peak_kv_bytes(engine: LLMEngine) -> int:
    return engine.kv_manager.peak_used_blocks * engine.kv_cache.block_nbytes


def bench_workload(workload: Workload, folder: Path, hf_model: Any, repeat: int, hf_batch_size: int) -> WorkloadResult:
    engine = make_engine(folder, num_kv_blocks=workload.num_kv_blocks)
    needed = workload_flops(engine.loaded.config, workload, workload.ideal_cached_tokens())
    ours: list[OurRun] = []
    no_cache: list[OurRun] = []
    cache_on: list[OurRun] = []  # the runs alternated with no_cache
    hf_runs = []
    off_engine = make_engine(folder, prefix_caching=False) if workload.name == "distinct" else None
    # Alternate the systems so that a noisy stretch of the machine does not fall on one of them.
    for r in range(repeat):
        log(f"  {workload.name}: transformers run {r + 1}/{repeat}")
        hf_runs.append(run_hf(hf_model, workload.prompts, workload.max_tokens, hf_batch_size))
        log(f"  {workload.name}: engine run {r + 1}/{repeat} ({hf_runs[-1].seconds:.1f}s for transformers)")
        ours.append(run_ours(engine, workload))
    if off_engine is not None:
        # The overhead is a few percent at most, below the machine's noise: each side twice more,
        # alternating, and the best of each.
        for r in range(2):
            log(f"  {workload.name}: prefix caching off then on, run {r + 1}/2")
            no_cache.append(run_ours(off_engine, workload))
            cache_on.append(run_ours(engine, workload))
        ours += cache_on
    best_ours = min(ours, key=lambda run: run.seconds)
    best_hf = min(hf_runs, key=lambda run: run.seconds)
    tokens = workload.num_requested_tokens
    result = WorkloadResult(
        name=workload.name,
        num_prompts=len(workload.prompts),
        num_prompt_tokens=workload.num_prompt_tokens,
        num_requested_tokens=tokens,
        needed_flops=needed,
        ours=SystemResult(best_ours.seconds, tokens / best_ours.seconds, peak_kv_bytes(engine)),
        hf=SystemResult(best_hf.seconds, tokens / best_hf.seconds, max(run.peak_kv_bytes for run in hf_runs)),
        speedup=best_hf.seconds / best_ours.seconds,
        hit_rate=best_ours.hit_rate,
        num_agreeing=sum(a == b for a, b in zip(best_ours.token_ids, best_hf.token_ids)),
        num_kv_blocks=workload.num_kv_blocks,
        ideal_hit_rate=sum(workload.ideal_cached_tokens()) / workload.num_prompt_tokens,
    )
    if no_cache:
        on_seconds = min(run.seconds for run in cache_on)
        off_seconds = min(run.seconds for run in no_cache)
        result.cache_on_tokens_per_s = tokens / on_seconds
        result.no_cache_tokens_per_s = tokens / off_seconds
        result.caching_overhead = on_seconds / off_seconds - 1.0
    del engine, off_engine
    if workload.name == "skewed":
        # The timed runs above used the default policy, lru; each other policy gets its own engine.
        lru = PolicyResult("lru", best_ours.hit_rate, tokens / best_ours.seconds, best_ours.num_evictions,
                           best_ours.num_preemptions)
        result.policies = [lru] + [bench_policy(workload, folder, policy) for policy in POLICIES if policy != "lru"]
        by_name = {p.policy: p for p in result.policies}
        result.adaptive_vs_lru = by_name["adaptive"].hit_rate - by_name["lru"].hit_rate
    return result


def bench_kv_quant_both_inits(workload: Workload, shape: ModelShape, bench_folder: Path) -> list[KVQuantResult]:
    """int8 against full precision on the benchmark's weights and on weights at transformers'
    default init, whose activations are closer to a trained model's."""
    log("  shared-prefix: int8 KV cache against full precision, benchmark weights")
    results = [bench_kv_quant(workload, make_engine(bench_folder), make_engine(bench_folder, kv_cache_dtype="int8"),
                              init_range=BENCH_INIT_RANGE)]
    with tempfile.TemporaryDirectory(prefix="bench-default-init-") as tmp:
        log(f"  shared-prefix: int8 KV cache against full precision, weights at init range {DEFAULT_INIT_RANGE}")
        build_model(shape, Path(tmp), initializer_range=DEFAULT_INIT_RANGE)
        results.append(bench_kv_quant(workload, make_engine(Path(tmp)), make_engine(Path(tmp), kv_cache_dtype="int8"),
                                      init_range=DEFAULT_INIT_RANGE))
    return results


def bench_policy(workload: Workload, folder: Path, policy: str) -> PolicyResult:
    log(f"  {workload.name}: eviction policy {policy}")
    engine = make_engine(folder, policy=policy, num_kv_blocks=workload.num_kv_blocks)
    run = run_ours(engine, workload)
    tokens_per_s = workload.num_requested_tokens / run.seconds
    return PolicyResult(policy, run.hit_rate, tokens_per_s, run.num_evictions, run.num_preemptions)


def run_bench(workloads: list[str], scale: str = "full", repeat: int = 1) -> BenchResult:
    """Builds the model, measures the matmul rate, and benchmarks each named workload."""
    if repeat < 1:
        raise ValueError(f"repeat={repeat} must be at least 1")
    unknown = [w for w in workloads if w not in WORKLOADS]
    if unknown:
        raise ValueError(f"workload {unknown[0]!r} is unknown; use one of {', '.join(WORKLOADS)}")
    if scale not in SHAPES:
        raise ValueError(f"scale {scale!r} is unknown; use one of {', '.join(SHAPES)}")
    try:
        import transformers
    except ImportError:
        raise ValueError(
            "the benchmark needs transformers as its peer; pip install 'llm-batch-pipeline[bench]'"
        ) from None
    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    load_start = os.getloadavg()[0]
    shape = SHAPES[scale]
    hf_batch_size = HF_BATCH_SIZE if scale == "full" else 4
    with tempfile.TemporaryDirectory(prefix="bench-model-") as tmp:
        log(f"building the {scale} model (hidden {shape.hidden_size}, {shape.num_hidden_layers} layers)")
        hf_model = build_model(shape, Path(tmp))
        run_hf(hf_model, WARMUP_PROMPTS, [4] * len(WARMUP_PROMPTS), hf_batch_size)
        log("measuring the matmul rate")
        matmul = measure_matmul_flops()
        results = []
        kv_quant: list[KVQuantResult] = []
        for name in workloads:
            workload = make_workload(name, scale, shape.vocab_size, BLOCK_SIZE)
            log(f"workload {name}: {len(workload.prompts)} prompts")
            results.append(bench_workload(workload, Path(tmp), hf_model, repeat, hf_batch_size))
            if name == "shared-prefix":
                kv_quant = bench_kv_quant_both_inits(workload, shape, Path(tmp))
    # Measured at both ends of the run: the better rate is the machine's, a worse one met other load.
    matmul = max(matmul, measure_matmul_flops())
    for w in results:
        for system in (w.ours, w.hf):
            system.roofline_fraction = w.needed_flops / system.seconds / matmul
    load = (load_start, os.getloadavg()[0])
    return BenchResult(scale, shape, torch.get_num_threads(), matmul, hf_batch_size, load, results, kv_quant)
