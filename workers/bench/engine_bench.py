"""`pipeline bench engine`: our engine against `transformers` generate (in this process) and, with
`--peer vllm`, vLLM's CPU build (in its own process), on the same weights and token-id prompts, in
one dtype, `repeat` timed runs of each with the CPU time other processes took meanwhile."""

from __future__ import annotations

import os
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from workers import EngineConfig, LLMEngine, SamplingParams
from workers.bench.cpu_load import CpuLoad, CpuMeter
from workers.bench.engine_compare import EngineComparison, compare_engines
from workers.bench.hf_peer import HF_BATCH_SIZE, PeerResult, run_hf
from workers.bench.kv_quant_bench import KVQuantResult, bench_kv_quant
from workers.bench.model_setup import BENCH_INIT_RANGE, DEFAULT_INIT_RANGE, SHAPES, ModelShape, build_model
from workers.bench.results import (
    BenchResult, PolicyResult, SystemResult, TimedRun, VllmInfo, WorkloadResult, summarize,
)
from workers.bench.roofline import measure_matmul_flops, roofline_rate, workload_flops
from workers.bench.vllm_runner import (
    MAX_MODEL_LEN, VllmResult, VllmWorkloadResult, check_vllm_python, run_vllm,
)
from workers.bench.workloads import WORKLOADS, Workload, make_workload

BLOCK_SIZE = 16
DTYPES = ("float32", "bfloat16")
POLICIES = ("lru", "lfu", "fifo", "adaptive")  # lru first: the engine's default
WARMUP_PROMPTS = [[3 + i] * (20 + 7 * i) for i in range(4)]  # a batched prefill, then decodes


@dataclass(slots=True)
class OurRun:
    token_ids: list[list[int]]
    seconds: float
    hit_rate: float
    num_evictions: int
    num_preemptions: int
    load: CpuLoad


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def make_engine(
    folder: Path, dtype: str, prefix_caching: bool = True, policy: str = "lru", num_kv_blocks: int | None = None,
    kv_cache_dtype: str = "auto",
) -> LLMEngine:
    """An engine on the benchmark folder, warmed up (kernels picked, first allocations done) with an
    empty prefix cache."""
    engine = LLMEngine(EngineConfig(
        model=str(folder), device="cpu", dtype=dtype, block_size=BLOCK_SIZE, num_kv_blocks=num_kv_blocks,
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
    meter = CpuMeter()
    meter.start()
    started = time.perf_counter()
    for wave in waves:
        outs = engine.generate([workload.prompts[i] for i in wave], [params[i] for i in wave])
        for i, out in zip(wave, outs):
            token_ids[i] = out.token_ids
    seconds = time.perf_counter() - started
    load = meter.stop()
    after = engine.stats()
    queries = int(after["prefix_cache_queries"]) - int(before["prefix_cache_queries"])
    hits = int(after["prefix_cache_hits"]) - int(before["prefix_cache_hits"])
    return OurRun(
        token_ids, seconds, hits / queries if queries else 0.0,
        int(after["num_evictions"]) - int(before["num_evictions"]),
        int(after["num_preemptions"]) - int(before["num_preemptions"]), load,
    )


def run_hf_measured(hf_model: Any, workload: Workload, batch_size: int) -> tuple[PeerResult, CpuLoad]:
    meter = CpuMeter()
    meter.start()
    run = run_hf(hf_model, workload.prompts, workload.max_tokens, batch_size)
    return run, meter.stop()


def peak_kv_bytes(engine: LLMEngine) -> int:
    return engine.kv_manager.peak_used_blocks * engine.kv_cache.block_nbytes


def agreeing(ours: list[list[int]], theirs: list[list[int]]) -> int:
    return sum(a == b for a, b in zip(ours, theirs))


def bench_workload(
    workload: Workload, folder: Path, hf_model: Any, repeat: int, hf_batch_size: int, dtype: str,
    vllm: VllmWorkloadResult | None,
) -> WorkloadResult:
    engine = make_engine(folder, dtype, num_kv_blocks=workload.num_kv_blocks)
    needed = workload_flops(engine.loaded.config, workload, workload.ideal_cached_tokens())
    ours: list[OurRun] = []
    hf_runs: list[tuple[PeerResult, CpuLoad]] = []
    # Alternate the systems so that a noisy stretch of the machine does not fall on one of them.
    for r in range(repeat):
        log(f"  {workload.name}: transformers run {r + 1}/{repeat}")
        hf_runs.append(run_hf_measured(hf_model, workload, hf_batch_size))
        log(f"  {workload.name}: engine run {r + 1}/{repeat} ({hf_runs[-1][0].seconds:.1f}s for transformers)")
        ours.append(run_ours(engine, workload))
    tokens = workload.num_requested_tokens
    mine = ours[-1].token_ids
    systems = {
        "ours": summarize("ours", [TimedRun(run.seconds, run.load) for run in ours], tokens,
                          hit_rate=ours[-1].hit_rate, peak_kv_bytes=peak_kv_bytes(engine)),
        "transformers": summarize("transformers", [TimedRun(run.seconds, load) for run, load in hf_runs], tokens,
                                  peak_kv_bytes=max(run.peak_kv_bytes for run, _ in hf_runs),
                                  num_agreeing=agreeing(mine, hf_runs[-1][0].token_ids)),
    }
    if vllm is not None:
        systems["vllm"] = summarize("vllm", [TimedRun(run.seconds, run.load) for run in vllm.runs], tokens,
                                    hit_rate=vllm.runs[-1].hit_rate, num_agreeing=agreeing(mine, vllm.token_ids))
    result = WorkloadResult(
        name=workload.name,
        num_prompts=len(workload.prompts),
        num_prompt_tokens=workload.num_prompt_tokens,
        num_requested_tokens=tokens,
        needed_flops=needed,
        ideal_hit_rate=sum(workload.ideal_cached_tokens()) / workload.num_prompt_tokens,
        systems=systems,
        num_kv_blocks=workload.num_kv_blocks,
    )
    if workload.name == "distinct":
        bench_caching_overhead(result, workload, engine, make_engine(folder, dtype, prefix_caching=False))
    del engine
    if workload.name == "skewed":
        # The timed runs above used the default policy, lru; each other policy gets its own engine.
        last = ours[-1]
        lru = PolicyResult("lru", last.hit_rate, systems["ours"].tokens_per_s, last.num_evictions, last.num_preemptions)
        others = [bench_policy(workload, folder, dtype, policy) for policy in POLICIES if policy != "lru"]
        result.policies = [lru, *others]
        by_name = {p.policy: p for p in result.policies}
        result.adaptive_vs_lru = by_name["adaptive"].hit_rate - by_name["lru"].hit_rate
    if dtype == "bfloat16":
        result.bf16_vs_fp32 = bench_bf16(workload, folder)
    return result


def bench_caching_overhead(result: WorkloadResult, workload: Workload, on: LLMEngine, off: LLMEngine) -> None:
    """Prefix caching on vs off where nothing is shared. The overhead is a few percent at most,
    below the machine's noise: each side twice, alternating, and the best of each."""
    on_seconds, off_seconds = [], []
    for r in range(2):
        log(f"  {workload.name}: prefix caching off then on, run {r + 1}/2")
        off_seconds.append(run_ours(off, workload).seconds)
        on_seconds.append(run_ours(on, workload).seconds)
    tokens = workload.num_requested_tokens
    result.cache_on_tokens_per_s = tokens / min(on_seconds)
    result.no_cache_tokens_per_s = tokens / min(off_seconds)
    result.caching_overhead = min(on_seconds) / min(off_seconds) - 1.0


def bench_bf16(workload: Workload, folder: Path) -> EngineComparison:
    log(f"  {workload.name}: our bfloat16 engine against our float32 engine")
    return compare_engines(workload, make_engine(folder, "float32"), make_engine(folder, "bfloat16"))


def bench_kv_quant_both_inits(
    workload: Workload, shape: ModelShape, bench_folder: Path, dtype: str,
) -> list[KVQuantResult]:
    """int8 against full precision on the benchmark's weights and on weights at transformers'
    default init, whose activations are closer to a trained model's."""
    log("  shared-prefix: int8 KV cache against full precision, benchmark weights")
    results = [bench_kv_quant(workload, make_engine(bench_folder, dtype),
                              make_engine(bench_folder, dtype, kv_cache_dtype="int8"), init_range=BENCH_INIT_RANGE)]
    with tempfile.TemporaryDirectory(prefix="bench-default-init-") as tmp:
        log(f"  shared-prefix: int8 KV cache against full precision, weights at init range {DEFAULT_INIT_RANGE}")
        build_model(shape, Path(tmp), initializer_range=DEFAULT_INIT_RANGE)
        results.append(bench_kv_quant(workload, make_engine(Path(tmp), dtype),
                                      make_engine(Path(tmp), dtype, kv_cache_dtype="int8"),
                                      init_range=DEFAULT_INIT_RANGE))
    return results


def bench_policy(workload: Workload, folder: Path, dtype: str, policy: str) -> PolicyResult:
    log(f"  {workload.name}: eviction policy {policy}")
    engine = make_engine(folder, dtype, policy=policy, num_kv_blocks=workload.num_kv_blocks)
    run = run_ours(engine, workload)
    tokens_per_s = workload.num_requested_tokens / run.seconds
    return PolicyResult(policy, run.hit_rate, tokens_per_s, run.num_evictions, run.num_preemptions)


def run_bench(
    workloads: list[str], scale: str = "full", repeat: int = 1, dtype: str = "float32",
    vllm_python: Path | None = None,
) -> BenchResult:
    """Builds the model, measures the matmul rate, runs vLLM over every workload (when
    `vllm_python` is given) and then benchmarks each workload here. Raises ValueError for a bad
    argument and vllm_runner.PeerError when the vLLM peer cannot run."""
    if repeat < 1:
        raise ValueError(f"repeat={repeat} must be at least 1")
    unknown = [w for w in workloads if w not in WORKLOADS]
    if unknown:
        raise ValueError(f"workload {unknown[0]!r} is unknown; use one of {', '.join(WORKLOADS)}")
    if scale not in SHAPES:
        raise ValueError(f"scale {scale!r} is unknown; use one of {', '.join(SHAPES)}")
    if dtype not in DTYPES:
        raise ValueError(f"dtype {dtype!r} is not benchmarked; use one of {', '.join(DTYPES)}")
    try:
        import transformers
    except ImportError:
        raise ValueError(
            "the benchmark needs transformers as its peer; pip install 'llm-batch-pipeline[bench]'"
        ) from None
    if vllm_python is not None:
        log(f"checking vLLM's Python {vllm_python}")
        log(f"vLLM {check_vllm_python(vllm_python)}")  # fails in seconds, before minutes of our runs
    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    load_start = os.getloadavg()[0]
    shape = SHAPES[scale]
    hf_batch_size = HF_BATCH_SIZE if scale == "full" else 4
    torch_dtype = getattr(torch, dtype)
    loads = [make_workload(name, scale, shape.vocab_size, BLOCK_SIZE) for name in workloads]
    with tempfile.TemporaryDirectory(prefix="bench-model-") as tmp:
        log(f"building the {scale} model (hidden {shape.hidden_size}, {shape.num_hidden_layers} layers)")
        hf_model = build_model(shape, Path(tmp)).to(torch_dtype)
        vllm: VllmResult | None = None
        if vllm_python is not None:
            log(f"vLLM: every workload, {repeat} run(s) each, in its own process (start-up takes a minute or more)")
            vllm = run_vllm(vllm_python, Path(tmp), dtype, loads, repeat,
                            min(MAX_MODEL_LEN, shape.max_position_embeddings), WARMUP_PROMPTS)
        run_hf(hf_model, WARMUP_PROMPTS, [4] * len(WARMUP_PROMPTS), hf_batch_size)
        log("measuring the matmul rate")
        matmul, matmul_dtype = roofline_rate(torch_dtype)
        results = []
        kv_quant: list[KVQuantResult] = []
        for workload in loads:
            log(f"workload {workload.name}: {len(workload.prompts)} prompts")
            peer = None if vllm is None else vllm.workloads[workload.name]
            results.append(bench_workload(workload, Path(tmp), hf_model, repeat, hf_batch_size, dtype, peer))
            if workload.name == "shared-prefix":
                kv_quant = bench_kv_quant_both_inits(workload, shape, Path(tmp), dtype)
    # Measured at both ends of the run: the better rate is the machine's, a worse one met other load.
    matmul = max(matmul, measure_matmul_flops(dtype=matmul_dtype))
    for w in results:
        for system in w.systems.values():
            system.roofline_fraction = roofline_fraction(w.needed_flops, w.num_requested_tokens, system, matmul)
    load = (load_start, os.getloadavg()[0])
    info = None if vllm is None else VllmInfo(vllm.version, vllm.block_size, vllm.startup_seconds)
    return BenchResult(scale, dtype, shape, torch.get_num_threads(), matmul, str(matmul_dtype).removeprefix("torch."),
                       hf_batch_size, load, repeat, results, kv_quant, info)


def roofline_fraction(needed_flops: float, num_tokens: int, system: SystemResult, matmul_flops: float) -> float:
    """Needed FLOPs over the median run's time, as a fraction of the measured matmul rate."""
    return needed_flops * system.tokens_per_s / num_tokens / matmul_flops
