"""What must not change outputs: the prefix cache, batching, preemption and chunked prefill."""

from __future__ import annotations

import pytest
import torch

from workers import EngineConfig, LLMEngine, SamplingParams

GREEDY = SamplingParams(max_tokens=24, ignore_eos=True)


@pytest.fixture(params=["reference", "cpu"])
def backend(request) -> str:
    """Every invariance holds on every attention backend; the reference outputs (`alone_outputs`)
    come from the reference backend."""
    return request.param


def _rand(gen: torch.Generator, n: int) -> list[int]:
    return torch.randint(0, 256, (n,), generator=gen).tolist()


@pytest.fixture(scope="module")
def shared_prefix_prompts() -> list[list[int]]:
    gen = torch.Generator().manual_seed(3)
    prefix = _rand(gen, 70)  # 4 full blocks of 16 and a partial one
    return [prefix + _rand(gen, n) for n in (1, 5, 16, 33, 2, 40)]


@pytest.fixture(scope="module")
def mixed_prompts() -> list[list[int]]:
    gen = torch.Generator().manual_seed(4)
    return [_rand(gen, n) for n in (3, 90, 17, 150, 1, 64, 33)]


@pytest.fixture(scope="module")
def alone_outputs(mixed_prompts) -> list[list[int]]:
    """Each prompt run alone in a fresh engine without prefix caching: the reference."""
    outs = []
    for prompt in mixed_prompts:
        engine = LLMEngine(EngineConfig(dtype="float32", attention_backend="reference", enable_prefix_caching=False,
                                        num_kv_blocks=64))
        outs.append(engine.generate([prompt], GREEDY)[0].token_ids)
    return outs


def test_prefix_caching_does_not_change_greedy_outputs(backend, shared_prefix_prompts):
    off = LLMEngine(EngineConfig(dtype="float32", attention_backend=backend, enable_prefix_caching=False, num_kv_blocks=128))
    on = LLMEngine(EngineConfig(dtype="float32", attention_backend=backend, enable_prefix_caching=True, num_kv_blocks=128))

    ref = [o.token_ids for o in off.generate(shared_prefix_prompts, GREEDY)]
    first = on.generate(shared_prefix_prompts, GREEDY)
    second = on.generate(shared_prefix_prompts, GREEDY)  # now every prompt's full blocks are cached

    assert [o.token_ids for o in first] == ref
    assert [o.token_ids for o in second] == ref
    assert off.stats()["prefix_cache_hits"] == 0
    # First round: all six prompts arrive in one step; the first computes the 4 shared blocks and
    # registers them, so the five others hit them (64 tokens each) within the same step.
    assert [o.num_cached_tokens for o in first] == [0, 64, 64, 64, 64, 64]
    # Second round: each prompt hits all its full blocks, capped one token short of its length.
    lengths = [len(p) for p in shared_prefix_prompts]
    assert [o.num_cached_tokens for o in second] == [(n - 1) // 16 * 16 for n in lengths]


def test_batch_of_mixed_lengths_matches_each_prompt_alone(backend, mixed_prompts, alone_outputs):
    engine = LLMEngine(EngineConfig(dtype="float32", attention_backend=backend, num_kv_blocks=256))
    outs = engine.generate(mixed_prompts, GREEDY)
    assert [o.token_ids for o in outs] == alone_outputs


def test_pool_too_small_preempts_and_keeps_outputs(backend, mixed_prompts, alone_outputs):
    # The 7 prompts need 36 blocks at their longest, the longest alone 11: a pool of 12 admits them
    # a few at a time and still runs dry while they decode, forcing two preemptions (recompute).
    engine = LLMEngine(EngineConfig(dtype="float32", attention_backend=backend, num_kv_blocks=12, enable_prefix_caching=False))
    outs = engine.generate(mixed_prompts, GREEDY)
    assert [o.token_ids for o in outs] == alone_outputs
    stats = engine.stats()
    assert stats["num_preemptions"] == 2
    assert stats["num_free_blocks"] == 12


def test_chunked_prefill_matches(backend, mixed_prompts, alone_outputs):
    # A 32-token budget cuts the 150-token prompt into five chunks.
    engine = LLMEngine(EngineConfig(dtype="float32", attention_backend=backend, num_kv_blocks=256, max_num_batched_tokens=32, block_size=16))
    outs = engine.generate(mixed_prompts, GREEDY)
    assert [o.token_ids for o in outs] == alone_outputs
    assert engine.stats()["num_steps"] > 24 + 150 // 32


def test_preemption_with_prefix_caching_keeps_outputs(backend, shared_prefix_prompts):
    ref_engine = LLMEngine(EngineConfig(dtype="float32", attention_backend=backend, enable_prefix_caching=False, num_kv_blocks=128))
    ref = [o.token_ids for o in ref_engine.generate(shared_prefix_prompts, GREEDY)]
    engine = LLMEngine(EngineConfig(dtype="float32", attention_backend=backend, num_kv_blocks=12, eviction_policy="adaptive"))
    outs = engine.generate(shared_prefix_prompts, GREEDY)
    assert [o.token_ids for o in outs] == ref
    assert engine.stats()["num_preemptions"] > 0


@pytest.mark.parametrize("kv_cache_dtype", ["auto", "int8"])
def test_cascade_and_plain_attention_agree(backend, kv_cache_dtype, shared_prefix_prompts):
    """Decodes that share leading blocks take the cascade path; one prompt at a time never does.
    Logits are compared after 8 decode steps, which the batched engine runs with cascade."""
    config = dict(dtype="float32", attention_backend=backend, num_kv_blocks=128, kv_cache_dtype=kv_cache_dtype)
    batched = LLMEngine(EngineConfig(**config))
    batched.generate(shared_prefix_prompts[:1], GREEDY)  # warm the cache so every later prompt shares it
    together = batched.next_token_logits(shared_prefix_prompts, decode_steps=8)
    assert batched.stats()["num_cascade_steps"] >= 8
    single = LLMEngine(EngineConfig(**config, enable_prefix_caching=False))
    # int8: a last-bit difference in one layer can move a later layer's K/V across a rounding step,
    # so the two summation orders agree to the quantization's resolution, not float32's.
    tol = 1e-4 if kv_cache_dtype == "auto" else 2e-3
    for prompt, logits in zip(shared_prefix_prompts, together):
        torch.testing.assert_close(logits, single.next_token_logits([prompt], decode_steps=8)[0], atol=tol, rtol=tol)
    assert single.stats()["num_cascade_steps"] == 0
