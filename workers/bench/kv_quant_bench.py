"""The int8 KV cache against full precision on the benchmark model: memory, logit error, agreement."""

from __future__ import annotations

import time
from dataclasses import dataclass
import torch

from workers import LLMEngine, SamplingParams
from workers.bench.workloads import Workload

CUT_FRACTIONS = (0.5, 0.75, 1.0)  # each context is a prompt cut at these fractions of its length


@dataclass(slots=True)
class KVQuantResult:
    workload: str
    init_range: float  # the weights' initializer_range: larger makes attention nearly one-hot
    bytes_per_block_full: int
    bytes_per_block_int8: int
    peak_kv_bytes_full: int
    peak_kv_bytes_int8: int
    num_contexts: int  # teacher-forced: both caches see exactly the same tokens
    max_logit_error: float
    mean_logit_error: float
    logit_std: float
    num_top1_agreeing: int
    tokens_per_s_full: float
    tokens_per_s_int8: float
    num_prompts: int
    num_outputs_identical: int  # free-running greedy outputs identical to full precision's


def bench_kv_quant(workload: Workload, full: LLMEngine, int8: LLMEngine, init_range: float) -> KVQuantResult:
    """`full` and `int8`: warmed engines on the same model, full-precision and int8 KV caches."""
    contexts = [p[: max(1, int(len(p) * f))] for p in workload.prompts[:16] for f in CUT_FRACTIONS]
    ref = torch.stack(full.next_token_logits(contexts))
    got = torch.stack(int8.next_token_logits(contexts))
    err = (got - ref).abs()

    params = [SamplingParams(max_tokens=n, ignore_eos=True) for n in workload.max_tokens]
    timings, outputs = {}, {}
    for name, engine in (("full", full), ("int8", int8)):
        engine.reset_prefix_cache()
        engine.kv_manager.peak_used_blocks = 0
        started = time.perf_counter()
        outputs[name] = [o.token_ids for o in engine.generate(workload.prompts, params)]
        timings[name] = time.perf_counter() - started
    return KVQuantResult(
        workload=workload.name,
        init_range=init_range,
        bytes_per_block_full=full.kv_cache.block_nbytes,
        bytes_per_block_int8=int8.kv_cache.block_nbytes,
        peak_kv_bytes_full=full.kv_manager.peak_used_blocks * full.kv_cache.block_nbytes,
        peak_kv_bytes_int8=int8.kv_manager.peak_used_blocks * int8.kv_cache.block_nbytes,
        num_contexts=len(contexts),
        max_logit_error=err.max().item(),
        mean_logit_error=err.mean().item(),
        logit_std=ref.std().item(),
        num_top1_agreeing=int((got.argmax(-1) == ref.argmax(-1)).sum()),
        tokens_per_s_full=workload.num_requested_tokens / timings["full"],
        tokens_per_s_int8=workload.num_requested_tokens / timings["int8"],
        num_prompts=len(workload.prompts),
        num_outputs_identical=sum(a == b for a, b in zip(outputs["full"], outputs["int8"])),
    )

