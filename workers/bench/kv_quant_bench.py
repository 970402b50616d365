"""The int8 KV cache against full precision on the benchmark model: memory, logit error, agreement."""

from __future__ import annotations

from dataclasses import dataclass

from workers import LLMEngine
from workers.bench.engine_compare import EngineComparison, compare_engines
from workers.bench.workloads import Workload


@dataclass(slots=True)
class KVQuantResult:
    init_range: float  # the weights' initializer_range: larger makes attention nearly one-hot
    bytes_per_block_full: int
    bytes_per_block_int8: int
    peak_kv_bytes_full: int
    peak_kv_bytes_int8: int
    comparison: EngineComparison  # int8 against full precision


def bench_kv_quant(workload: Workload, full: LLMEngine, int8: LLMEngine, init_range: float) -> KVQuantResult:
    """`full` and `int8`: warmed engines on the same model, full-precision and int8 KV caches."""
    comparison = compare_engines(workload, full, int8)
    return KVQuantResult(
        init_range=init_range,
        bytes_per_block_full=full.kv_cache.block_nbytes,
        bytes_per_block_int8=int8.kv_cache.block_nbytes,
        peak_kv_bytes_full=full.kv_manager.peak_used_blocks * full.kv_cache.block_nbytes,
        peak_kv_bytes_int8=int8.kv_manager.peak_used_blocks * int8.kv_cache.block_nbytes,
        comparison=comparison,
    )
