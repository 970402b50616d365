"""The FLOP roofline: the machine's measured matmul rate and the FLOPs a workload needs."""

from __future__ import annotations

import time

import torch

from workers.bench.workloads import Workload
from workers.models.config import ModelConfig

# (m, k, n): a square matmul and the benchmark model's MLP up-projection at a prefill batch.
MATMUL_SHAPES = ((1024, 1024, 1024), (2048, 512, 1408))


def measure_matmul_flops(repeats: int = 5, dtype: torch.dtype = torch.float32) -> float:
    """Best FLOP/s of a few `dtype` matmuls on the CPU, with the threads torch uses for the model."""
    best = 0.0
    for m, k, n in MATMUL_SHAPES:
        a, b = torch.randn(m, k, dtype=dtype), torch.randn(k, n, dtype=dtype)
        out = torch.empty(m, n, dtype=dtype)
        torch.mm(a, b, out=out)  # first call picks kernels and touches memory
        for _ in range(repeats):
            started = time.perf_counter()
            torch.mm(a, b, out=out)
            best = max(best, 2 * m * k * n / (time.perf_counter() - started))
    return best


def roofline_rate(dtype: torch.dtype) -> tuple[float, torch.dtype]:
    """The matmul rate the roofline holds `dtype` to, and the dtype that reached it: `dtype`'s own,
    or float32's where that is faster (bfloat16 on a CPU without bfloat16 arithmetic, where
    PyTorch's emulation runs at a small fraction of float32 and our engine computes those layers
    in float32)."""
    rate = measure_matmul_flops(dtype=dtype)
    if dtype != torch.float32:
        float32_rate = measure_matmul_flops(dtype=torch.float32)
        if float32_rate > rate:
            return float32_rate, torch.float32
    return rate, dtype


def workload_flops(cfg: ModelConfig, workload: Workload, cached_prefix_tokens: list[int]) -> float:
    """FLOPs of the workload with no padding and the first `cached_prefix_tokens[i]` prompt tokens
    of prompt i taken from a cache: per computed token 2 x the non-embedding parameters plus
    attention (q.k and p.v: 4 x heads x head_dim x context, per layer); per generated token the
    output layer (2 x hidden x vocab). A request for n tokens runs n - 1 of them back through the
    model (the last one is only sampled)."""
    per_token = 2 * cfg.num_params(include_embeddings=False)
    per_context = 4 * cfg.num_heads * cfg.head_dim * cfg.num_layers
    lm_head = 2 * cfg.hidden_size * cfg.vocab_size
    total = 0.0
    for prompt, n, cached in zip(workload.prompts, workload.max_tokens, cached_prefix_tokens):
        first, last = cached, len(prompt) + n - 1  # positions computed: [first, last)
        num_computed = last - first
        # Context of the token at position p is p + 1: sum over p in [first, last).
        context = (last * (last + 1) - first * (first + 1)) // 2
        total += num_computed * per_token + context * per_context + n * lm_head
    return total
