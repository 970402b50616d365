"""The built-in `tiny` model: a small Llama with seeded random weights and a byte-level tokenizer.

It lets every command run on a fresh machine with no download. Its output is gibberish, and the
engine says so when it loads it.
"""

from __future__ import annotations

from typing import Any

import torch

from workers.tokenizer import ByteTokenizer

TINY_FINGERPRINT = "builtin-tiny-v1"
TINY_WARNING = "model 'tiny' is a built-in demo with random weights: its output is gibberish"
_SEED = 20261122
_INIT_STD = 0.08  # wider than training inits so that logits spread and greedy ties are rare

TINY_CONFIG: dict[str, Any] = {
    "architectures": ["LlamaForCausalLM"],
    "model_type": "llama",
    "vocab_size": ByteTokenizer.VOCAB_SIZE,
    "hidden_size": 128,
    "intermediate_size": 352,
    "num_hidden_layers": 4,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 4096,
    "rms_norm_eps": 1e-6,
    "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0},
    "tie_word_embeddings": True,
    "bos_token_id": ByteTokenizer.BOS,
    "eos_token_id": ByteTokenizer.EOS,
}


def tiny_weights() -> dict[str, torch.Tensor]:
    """The same weights in every process (a fixed seed on a private generator), in HF naming."""
    c = TINY_CONFIG
    h, i, v = c["hidden_size"], c["intermediate_size"], c["vocab_size"]
    d = h // c["num_attention_heads"]
    kv = c["num_key_value_heads"] * d
    gen = torch.Generator().manual_seed(_SEED)

    def rand(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=gen) * _INIT_STD

    weights = {"model.embed_tokens.weight": rand(v, h), "model.norm.weight": torch.ones(h)}
    for n in range(c["num_hidden_layers"]):
        p = f"model.layers.{n}."
        weights |= {
            p + "self_attn.q_proj.weight": rand(h, h),
            p + "self_attn.k_proj.weight": rand(kv, h),
            p + "self_attn.v_proj.weight": rand(kv, h),
            p + "self_attn.o_proj.weight": rand(h, h),
            p + "mlp.gate_proj.weight": rand(i, h),
            p + "mlp.up_proj.weight": rand(i, h),
            p + "mlp.down_proj.weight": rand(h, i),
            p + "input_layernorm.weight": torch.ones(h),
            p + "post_attention_layernorm.weight": torch.ones(h),
        }
    return weights
