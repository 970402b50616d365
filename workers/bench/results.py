"""What `pipeline bench engine` measures, as plain dataclasses (written to --json with `asdict`):
each system's timed runs on a workload, summarized as the median and the range over the runs."""

from __future__ import annotations

import statistics
from dataclasses import dataclass, field

from workers.bench.cpu_load import CpuLoad
from workers.bench.engine_compare import EngineComparison
from workers.bench.kv_quant_bench import KVQuantResult
from workers.bench.model_setup import ModelShape

SYSTEMS = ("ours", "transformers", "vllm")


@dataclass(frozen=True, slots=True)
class TimedRun:
    seconds: float
    load: CpuLoad  # what other processes used meanwhile: a loaded run's time is suspect


@dataclass(slots=True)
class SystemResult:
    """One system on one workload over `--repeat` runs. Tokens/s are the requested tokens over each
    run's wall time; the median is the figure, min and max its spread."""

    system: str
    runs: list[TimedRun]
    tokens_per_s: float  # median over the runs
    tokens_per_s_min: float
    tokens_per_s_max: float
    hit_rate: float | None = None  # prompt tokens served from the system's prefix cache; None: it has none
    peak_kv_bytes: int | None = None  # None: not measured (vLLM preallocates its pool)
    num_agreeing: int | None = None  # prompts whose greedy tokens equal ours; None for ours
    roofline_fraction: float | None = None  # needed FLOPs / median seconds / matmul rate; set once the rate is known

    @property
    def num_loaded_runs(self) -> int:
        return sum(run.load.is_loaded for run in self.runs)


def summarize(system: str, runs: list[TimedRun], num_tokens: int, **measured: float | int | None) -> SystemResult:
    """The median and range of tokens/s over `runs` (at least one)."""
    if not runs:
        raise ValueError(f"{system}: no timed runs to summarize")
    rates = [num_tokens / run.seconds for run in runs]
    median = statistics.median(rates)
    return SystemResult(system, runs, median, min(rates), max(rates), **measured)  # type: ignore[arg-type]


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
    ideal_hit_rate: float  # every repeat of a shared prefix served from the cache
    systems: dict[str, SystemResult]  # "ours", "transformers" and, with --peer vllm, "vllm"
    cache_on_tokens_per_s: float | None = None  # distinct: best of the runs alternated with caching off
    no_cache_tokens_per_s: float | None = None  # distinct: our engine with prefix caching off
    caching_overhead: float | None = None  # distinct: on vs off, as a fraction of the off time
    num_kv_blocks: int | None = None  # skewed: the pool the policies share
    policies: list[PolicyResult] = field(default_factory=list)
    adaptive_vs_lru: float | None = None  # skewed: hit-rate difference, in fractions
    bf16_vs_fp32: EngineComparison | None = None  # --dtype bfloat16: our bf16 engine against our float32 one

    def ratio(self, peer: str) -> float | None:
        """Our median tokens/s over the peer's; None if the peer did not run."""
        other = self.systems.get(peer)
        return None if other is None else self.systems["ours"].tokens_per_s / other.tokens_per_s


@dataclass(slots=True)
class VllmInfo:
    version: str
    block_size: int
    startup_seconds: float


@dataclass(slots=True)
class BenchResult:
    scale: str
    dtype: str
    shape: ModelShape
    num_threads: int
    matmul_flops: float  # in matmul_dtype
    matmul_dtype: str  # `dtype`, or float32 where bfloat16 is emulated and slower (roofline.roofline_rate)
    hf_batch_size: int
    load_average: tuple[float, float]  # 1-minute load at start and end: other work skews the timings
    repeat: int
    workloads: list[WorkloadResult]
    kv_quant: list[KVQuantResult] = field(default_factory=list)  # int8 vs full precision, shared-prefix
    vllm: VllmInfo | None = None  # with --peer vllm
