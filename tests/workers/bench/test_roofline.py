"""The FLOPs a workload needs, counted by hand on a one-layer model."""

from __future__ import annotations

from workers.bench.roofline import measure_matmul_flops, workload_flops
from workers.bench.workloads import Workload
from workers.models.config import ModelConfig, RopeConfig

CFG = ModelConfig(
    architecture="LlamaForCausalLM", vocab_size=100, hidden_size=8, intermediate_size=16, num_layers=1, num_heads=2,
    num_kv_heads=1, head_dim=4, max_position_embeddings=64, rms_norm_eps=1e-6, rope=RopeConfig(),
    tie_word_embeddings=False, attention_bias=False, qk_norm=False, sliding_window=None, eos_token_ids=(),
    bos_token_id=None,
)
# q 8x8, k and v 8x4 each, o 8x8, MLP 3 x 8x16: 64 + 64 + 64 + 384 = 576 parameters.
PER_TOKEN = 2 * 576
PER_CONTEXT = 4 * 2 * 4  # q.k and p.v over one position, both heads
LM_HEAD = 2 * 8 * 100


def test_non_embedding_parameters() -> None:
    assert CFG.num_params(include_embeddings=False) == 576


def test_flops_of_prompt_and_generated_tokens() -> None:
    # 3 prompt tokens + 2 generated: positions 0..3 go through the model (the last token is only
    # sampled), with contexts 1 + 2 + 3 + 4; the output layer runs once per generated token.
    w = Workload("t", [[5, 6, 7]], [2], [None], [0])
    assert workload_flops(CFG, w, [0]) == 4 * PER_TOKEN + 10 * PER_CONTEXT + 2 * LM_HEAD


def test_cached_prefix_tokens_are_not_counted() -> None:
    w = Workload("t", [[5, 6, 7], [5, 6, 8]], [1, 1], [0, 0], [2, 2])
    # The second prompt computes position 2 only (context 3).
    expected = (3 * PER_TOKEN + 6 * PER_CONTEXT + LM_HEAD) + (PER_TOKEN + 3 * PER_CONTEXT + LM_HEAD)
    assert w.ideal_cached_tokens() == [0, 2]
    assert workload_flops(CFG, w, w.ideal_cached_tokens()) == expected


def test_matmul_rate_is_positive() -> None:
    assert measure_matmul_flops(repeats=1) > 1e8
