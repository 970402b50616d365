"""Quantized KV storage: round-trip error, memory, and its effect on a model's logits."""

from __future__ import annotations

import pytest
import torch

from workers import EngineConfig, LLMEngine
from workers.kv_cache import PagedKVCache
from workers.kv_quant import dequantize, quantize


@pytest.mark.parametrize(("kind", "max_rel_err"), [("int8", 0.5 / 127), ("fp8", 2.0**-4)])
def test_round_trip_error_is_within_one_step_of_each_heads_scale(kind, max_rel_err):
    x = torch.randn(50, 4, 64, generator=torch.Generator().manual_seed(0)) * torch.rand(50, 4, 1) * 10
    values, scale = quantize(x, kind)
    assert values.dtype == {"int8": torch.int8, "fp8": torch.float8_e4m3fn}[kind]
    assert scale.shape == (50, 4)
    back = dequantize(values, scale, torch.float32)
    absmax = x.abs().amax(-1, keepdim=True)
    # int8: half a step of absmax/127; fp8 e4m3: 3 mantissa bits, half an ulp relative to absmax.
    assert ((back - x).abs() <= absmax * max_rel_err + 1e-6).all()


def test_all_zero_heads_stay_zero():
    values, scale = quantize(torch.zeros(3, 2, 8), "int8")
    assert torch.equal(dequantize(values, scale, torch.float32), torch.zeros(3, 2, 8))


def test_int8_pool_is_a_quarter_of_float32_plus_scales():
    args = (8, 16, 2, 64, torch.float32)
    full = PagedKVCache.bytes_per_block(*args, "auto")
    int8 = PagedKVCache.bytes_per_block(*args, "int8")
    assert full == 2 * 8 * 16 * 2 * 64 * 4
    assert int8 == 2 * 8 * 16 * 2 * (64 + 4)  # one byte per value, one float32 scale per head
    assert full / int8 == pytest.approx(256 / 68)


def test_int8_engine_holds_more_blocks_for_the_same_memory():
    budget = 8 << 20
    full = LLMEngine(EngineConfig(dtype="float32", kv_cache_memory_bytes=budget))
    int8 = LLMEngine(EngineConfig(dtype="float32", kv_cache_memory_bytes=budget, kv_cache_dtype="int8"))
    ratio = int8.stats()["num_total_blocks"] / full.stats()["num_total_blocks"]
    assert ratio == pytest.approx((4 * 32) / (32 + 4), rel=0.01)  # tiny model: head_dim 32


def test_int8_logit_error_and_greedy_agreement_on_a_reference_model(hf_model_dirs):
    """Measured, not assumed. Teacher-forced: both caches see the same 48 contexts (8 prompts cut
    at 6 lengths), and we compare the next-token logits and their argmax (the greedy choice)."""
    folder, _ = hf_model_dirs("llama")
    full = LLMEngine(EngineConfig(dtype="float32", model=str(folder), num_kv_blocks=256))
    int8 = LLMEngine(EngineConfig(dtype="float32", model=str(folder), num_kv_blocks=256, kv_cache_dtype="int8"))
    gen = torch.Generator().manual_seed(11)
    prompts = [torch.randint(3, 512, (200,), generator=gen).tolist() for _ in range(8)]
    contexts = [p[:n] for p in prompts for n in (8, 24, 50, 90, 140, 200)]

    ref = torch.stack(full.next_token_logits(contexts))
    got = torch.stack(int8.next_token_logits(contexts))
    rel_err = ((got - ref).abs().amax(-1) / ref.std(-1)).max().item()
    agree = (got.argmax(-1) == ref.argmax(-1)).float().mean().item()
    print(f"int8 KV: max logit error {rel_err:.4f} of the logit std, greedy (top-1) agreement {agree:.3f}")
    assert 0 < rel_err < 0.08  # measured 0.069
    assert agree >= 0.93  # measured 45 of 48


@pytest.mark.parametrize("kind", ["int8", "fp8"])
def test_paged_cache_round_trip_through_slots_and_blocks(kind):
    """Write tokens to scattered slots, gather their blocks back: exactly quantize + dequantize.
    (The engine allows fp8 on CUDA only; the storage path is the same on every device.)"""
    cache = PagedKVCache(num_layers=2, num_blocks=6, block_size=4, num_kv_heads=2, head_dim=8,
                         dtype=torch.float32, device=torch.device("cpu"), kv_cache_dtype=kind)
    gen = torch.Generator().manual_seed(5)
    k, v = torch.randn(5, 2, 8, generator=gen), torch.randn(5, 2, 8, generator=gen)
    slots = torch.tensor([8, 9, 10, 11, 20])  # block 2 whole, then block 5's first slot
    cache.write(1, k, v, slots)
    got_k, got_v = cache.gather(1, cache.gather_index(torch.tensor([[2, 5]])), 1)  # [KVH, 1, 8, D]
    for got, x in ((got_k, k), (got_v, v)):
        expected = dequantize(*quantize(x, kind), torch.float32)  # [5, KVH, D]
        assert torch.equal(got[:, 0, [0, 1, 2, 3, 4]].transpose(0, 1), expected)
        assert torch.equal(got[:, 0, 5:], torch.zeros(2, 3, 8))  # untouched slots stay zero


@pytest.mark.parametrize("kind", ["auto", "int8"])
def test_an_allocated_block_is_the_size_the_pool_was_planned_with(kind):
    args = (8, 16, 2, 64, torch.float32)
    cache = PagedKVCache(8, 3, 16, 2, 64, torch.float32, torch.device("cpu"), kind)
    assert cache.block_nbytes == PagedKVCache.bytes_per_block(*args, kind)
