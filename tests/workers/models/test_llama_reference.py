"""Our engine against Hugging Face `transformers` on the same random weights."""

from __future__ import annotations

import pytest
import torch

from workers import EngineConfig, LLMEngine, SamplingParams

ARCHS = ["llama", "mistral", "qwen2", "qwen3"]
NEW_TOKENS = 32


def _prompts(n: int = 3) -> list[list[int]]:
    gen = torch.Generator().manual_seed(7)
    return [torch.randint(3, 512, (length,), generator=gen).tolist() for length in (5, 37, 70)[:n]]


def _hf_greedy(model, prompt: list[int]) -> list[int]:
    ids = torch.tensor([prompt])
    out = model.generate(
        ids, attention_mask=torch.ones_like(ids), max_new_tokens=NEW_TOKENS, do_sample=False,
        eos_token_id=None, pad_token_id=0,
    )
    return out[0, len(prompt):].tolist()


@pytest.mark.parametrize("backend", ["reference", "cpu"])
@pytest.mark.parametrize("arch", ARCHS)
def test_greedy_tokens_and_logits_match_transformers(arch, backend, hf_model_dirs):
    folder, hf = hf_model_dirs(arch)
    engine = LLMEngine(EngineConfig(dtype="float32", attention_backend=backend, model=str(folder), num_kv_blocks=128))
    prompts = _prompts()

    outputs = engine.generate(prompts, SamplingParams(max_tokens=NEW_TOKENS, ignore_eos=True))

    for prompt, out in zip(prompts, outputs):
        assert out.token_ids == _hf_greedy(hf, prompt)
        assert out.finish_reason == "length"
        # Logits after the prompt and after the prompt plus 20 generated tokens (deeper positions).
        for context in (prompt, prompt + out.token_ids[:20]):
            ours = engine.next_token_logits([context])[0]
            with torch.no_grad():
                ref = hf(torch.tensor([context])).logits[0, -1]
            torch.testing.assert_close(ours, ref, atol=2e-5, rtol=1e-5)


def test_llama3_rope_scaling_is_exercised(hf_model_dirs):
    """The reference prompts reach past original_max_position_embeddings (64), where Llama-3
    scaling changes the rotary frequencies; a model loaded without the scaling must disagree."""
    folder, hf = hf_model_dirs("llama")
    cfg = hf.config
    assert cfg.rope_parameters["rope_type"] == "llama3"
    assert max(len(p) for p in _prompts()) + NEW_TOKENS > cfg.rope_parameters["original_max_position_embeddings"]
    engine = LLMEngine(EngineConfig(dtype="float32", model=str(folder), num_kv_blocks=64))
    prompt = _prompts()[2]
    ours = engine.next_token_logits([prompt])[0]
    from workers.layers.rotary import RotaryEmbedding
    from workers.models.config import RopeConfig

    for module in engine.loaded.model.modules():
        if isinstance(module, RotaryEmbedding):
            module.rope = RopeConfig(theta=module.rope.theta)
            module.build_tables(None)
    engine.reset_prefix_cache()
    unscaled = engine.next_token_logits([prompt])[0]
    assert (ours - unscaled).abs().max().item() > 1e-3
