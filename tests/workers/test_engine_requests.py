"""Requests through the engine: sampling, stops, limits and the errors a caller sees."""

from __future__ import annotations

import pytest
import torch

from workers import EngineConfig, LLMEngine, PromptTooLongError, SamplingParams
from workers.tokenizer import ByteTokenizer


@pytest.fixture(scope="module")
def engine() -> LLMEngine:
    return LLMEngine(EngineConfig(dtype="float32", num_kv_blocks=256, max_model_len=200))


def test_seeded_sampling_does_not_depend_on_the_batch(engine):
    params = SamplingParams(max_tokens=20, temperature=0.9, top_p=0.9, top_k=50, seed=1234, ignore_eos=True)
    alone = engine.generate(["the same prompt"], params)[0].token_ids
    crowd = engine.generate(
        ["other", "the same prompt", "more text here"],
        [SamplingParams(max_tokens=20, temperature=1.0, ignore_eos=True), params,
         SamplingParams(max_tokens=5, temperature=1.0, seed=9)],
    )[1].token_ids
    other_seed = engine.generate(
        ["the same prompt"], SamplingParams(max_tokens=20, temperature=0.9, top_p=0.9, top_k=50, seed=99, ignore_eos=True)
    )[0].token_ids
    assert alone == crowd
    assert alone != other_seed


def test_top_k_one_is_greedy(engine):
    greedy = engine.generate(["abc"], SamplingParams(max_tokens=12, ignore_eos=True))[0].token_ids
    top1 = engine.generate(["abc"], SamplingParams(max_tokens=12, temperature=1.5, top_k=1, seed=3, ignore_eos=True))
    assert top1[0].token_ids == greedy


def test_stop_string_cuts_the_text(engine):
    full = engine.generate(["abc"], SamplingParams(max_tokens=30, ignore_eos=True))[0]
    stop = full.text[5:7]  # a piece of what greedy decoding produces anyway
    first = full.text.find(stop)
    out = engine.generate(["abc"], SamplingParams(max_tokens=30, ignore_eos=True, stop=[stop]))[0]
    assert out.finish_reason == "stop"
    assert out.text == full.text[:first]
    assert len(out.token_ids) < 30


def test_eos_finishes_with_stop_unless_ignored(engine):
    # Find a prompt whose greedy continuation reaches EOS within 200 tokens of the tiny model.
    out = engine.generate(["x"], SamplingParams(max_tokens=150))[0]
    if ByteTokenizer.EOS in out.token_ids:
        assert out.finish_reason == "stop" and out.token_ids[-1] == ByteTokenizer.EOS
    else:
        assert out.finish_reason == "length" and len(out.token_ids) == 150


def test_generation_stops_at_the_context_length(engine):
    out = engine.generate([list(range(190))], SamplingParams(max_tokens=50, ignore_eos=True))[0]
    assert out.finish_reason == "length"
    assert len(out.token_ids) == 10  # 190 prompt tokens + 10 reach max_model_len 200


def test_prompt_longer_than_the_context_is_refused_before_anything_runs(engine):
    with pytest.raises(PromptTooLongError, match=r"prompt 1: prompt has 250 tokens, the model accepts 199"):
        engine.generate(["ok", list(range(250))], SamplingParams(max_tokens=4))
    assert not engine.has_unfinished_requests()


@pytest.mark.parametrize(
    ("prompt", "message"),
    [
        ([], "the prompt is empty"),
        ([1, 999], r"token id 999 is outside the vocabulary \[0, 258\)"),
        ([1, True], "a prompt must be a string or a list of token ids"),
        (3.5, "a prompt must be a string or a list of token ids"),
    ],
)
def test_bad_prompts(engine, prompt, message):
    with pytest.raises(ValueError, match=message):
        engine.add_request(prompt)


def test_params_must_match_the_prompts(engine):
    with pytest.raises(ValueError, match="got 1 SamplingParams for 2 prompts"):
        engine.generate(["a", "b"], [SamplingParams()])


def test_request_too_large_for_the_pool_is_refused():
    small = LLMEngine(EngineConfig(dtype="float32", num_kv_blocks=4, block_size=16))
    with pytest.raises(PromptTooLongError, match=r"needs 5 KV blocks, the pool has 4; lower max_tokens"):
        small.add_request(list(range(60)), SamplingParams(max_tokens=10))


def test_cache_salt_separates_tenants():
    engine = LLMEngine(EngineConfig(dtype="float32", num_kv_blocks=64))
    prompt = list(range(40))
    engine.generate([prompt], SamplingParams(max_tokens=2), cache_salt="tenant-a")
    same = engine.generate([prompt], SamplingParams(max_tokens=2), cache_salt="tenant-a")[0]
    other = engine.generate([prompt], SamplingParams(max_tokens=2), cache_salt="tenant-b")[0]
    assert same.num_cached_tokens == 32
    assert other.num_cached_tokens == 0


def test_stats_count_exactly():
    engine = LLMEngine(EngineConfig(dtype="float32", num_kv_blocks=64))
    engine.generate([list(range(40)), list(range(40))], SamplingParams(max_tokens=3, ignore_eos=True))
    s = engine.stats()
    assert s["num_finished_requests"] == 2
    assert s["num_prompt_tokens"] == 80
    assert s["num_generated_tokens"] == 6
    assert s["prefix_cache_queries"] == 80
    assert s["prefix_cache_hits"] == 32  # the second prompt hits the first's two full blocks
    assert s["num_computed_tokens"] == 40 + 8 + 2 * 2  # prefill, the second's own tail, two decodes each
    assert s["num_cached_blocks"] == 2
    assert s["num_free_blocks"] == 64
    assert s["latency_p50"] > 0 and s["ttft_p50"] > 0


def test_abort_frees_blocks():
    engine = LLMEngine(EngineConfig(dtype="float32", num_kv_blocks=16))
    rid = engine.add_request(list(range(30)), SamplingParams(max_tokens=50, ignore_eos=True))
    engine.step()
    assert engine.stats()["num_free_blocks"] == 14
    assert engine.abort_request(rid)
    assert engine.stats()["num_free_blocks"] == 16
    assert not engine.has_unfinished_requests()


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message shown where no GPU is visible")
def test_cuda_without_a_gpu_is_refused():
    with pytest.raises(ValueError, match="device='cuda' but no CUDA GPU is visible to PyTorch; use device='cpu'"):
        LLMEngine(EngineConfig(dtype="float32", device="cuda"))


def test_float16_on_the_cpu_is_refused():
    with pytest.raises(ValueError, match="dtype='float16' is slow and inexact on the CPU; use 'float32' or 'bfloat16'"):
        LLMEngine(EngineConfig(dtype="float16"))


def test_bfloat16_runs_close_to_float32(hf_model_dirs):
    """The reduced-precision path a GPU uses, run here on the CPU: logits within bf16's resolution."""
    folder, _ = hf_model_dirs("qwen3")
    prompts = [[5, 9, 300, 41, 7] * 6, list(range(3, 90))]
    f32 = LLMEngine(EngineConfig(dtype="float32", model=str(folder), num_kv_blocks=64)).next_token_logits(prompts)
    bf16_engine = LLMEngine(EngineConfig(model=str(folder), num_kv_blocks=64, dtype="bfloat16"))
    assert bf16_engine.kv_cache.kv.dtype == torch.bfloat16
    bf16 = bf16_engine.next_token_logits(prompts)
    for a, b in zip(f32, bf16):
        assert b.dtype == torch.float32
        assert (a - b).abs().max().item() < 0.1 * a.std().item()
