"""One engine's accuracy against a reference engine on the same model and prompts: next-token logit
error on teacher-forced contexts, and free-running greedy agreement. The int8 KV cache section
(full precision vs int8) and the bfloat16 section (float32 vs bfloat16) both measure with it."""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from workers import LLMEngine, SamplingParams
from workers.bench.workloads import Workload

CUT_FRACTIONS = (0.5, 0.75, 1.0)  # each context is a prompt cut at these fractions of its length
NUM_CONTEXT_PROMPTS = 16  # the first prompts of the workload give the contexts


@dataclass(slots=True)
class EngineComparison:
    workload: str
    num_contexts: int  # teacher-forced: both engines see exactly the same tokens
    max_logit_error: float
    mean_logit_error: float
    logit_std: float  # of the reference's logits: the scale the errors compare to
    num_top1_agreeing: int
    num_prompts: int
    num_outputs_identical: int  # free-running greedy outputs identical to the reference's
    tokens_per_s_ref: float  # one run each, no warm repeats: indicative, not the benchmark's figure
    tokens_per_s_got: float


def compare_engines(workload: Workload, ref: LLMEngine, got: LLMEngine) -> EngineComparison:
    """`ref` and `got`: warmed engines on the same model. Both run every prompt of `workload` at
    once from an empty prefix cache; their peak KV blocks are reset first, so the caller can read
    each one's peak for this run afterwards."""
    contexts = [p[: max(1, int(len(p) * f))] for p in workload.prompts[:NUM_CONTEXT_PROMPTS] for f in CUT_FRACTIONS]
    ref_logits = torch.stack(ref.next_token_logits(contexts))
    got_logits = torch.stack(got.next_token_logits(contexts))
    err = (got_logits - ref_logits).abs()

    params = [SamplingParams(max_tokens=n, ignore_eos=True, temperature=0.0) for n in workload.max_tokens]
    timings, outputs = [], []
    for engine in (ref, got):
        engine.reset_prefix_cache()
        engine.kv_manager.peak_used_blocks = 0
        started = time.perf_counter()
        outputs.append([o.token_ids for o in engine.generate(workload.prompts, params)])
        timings.append(time.perf_counter() - started)
    return EngineComparison(
        workload=workload.name,
        num_contexts=len(contexts),
        max_logit_error=err.max().item(),
        mean_logit_error=err.mean().item(),
        logit_std=ref_logits.std().item(),
        num_top1_agreeing=int((got_logits.argmax(-1) == ref_logits.argmax(-1)).sum()),
        num_prompts=len(workload.prompts),
        num_outputs_identical=sum(a == b for a, b in zip(*outputs)),
        tokens_per_s_ref=workload.num_requested_tokens / timings[0],
        tokens_per_s_got=workload.num_requested_tokens / timings[1],
    )
