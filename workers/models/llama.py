"""Llama-family decoder (Llama, Mistral, Qwen2, Qwen3) over a paged KV cache.

Parameters keep Hugging Face names except two fusions that make the CPU matmuls larger and fewer:
q/k/v into `qkv_proj` and gate/up into `gate_up_proj`; `PACKED` tells the loader where each
checkpoint tensor goes.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

from workers.layers.attention import AttentionStep, PagedAttention
from workers.layers.dense_ops import DenseOps, TorchDenseOps
from workers.layers.norm import RMSNorm
from workers.layers.rotary import RotaryEmbedding
from workers.models.config import ModelConfig

# checkpoint name -> (our parameter name, shard index within it)
PACKED = {
    "q_proj": ("qkv_proj", 0),
    "k_proj": ("qkv_proj", 1),
    "v_proj": ("qkv_proj", 2),
    "gate_proj": ("gate_up_proj", 0),
    "up_proj": ("gate_up_proj", 1),
}


class LlamaAttention(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_idx: int, rotary: RotaryEmbedding) -> None:
        super().__init__()
        self.num_heads, self.num_kv_heads, self.head_dim = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        self.q_size = cfg.num_heads * cfg.head_dim
        self.kv_size = cfg.num_kv_heads * cfg.head_dim
        self.qkv_proj = nn.Linear(cfg.hidden_size, self.q_size + 2 * self.kv_size, bias=cfg.attention_bias)
        self.o_proj = nn.Linear(self.q_size, cfg.hidden_size, bias=False)
        self.shard_sizes = (self.q_size, self.kv_size, self.kv_size)
        if cfg.qk_norm:
            self.q_norm = RMSNorm(cfg.head_dim, cfg.rms_norm_eps)
            self.k_norm = RMSNorm(cfg.head_dim, cfg.rms_norm_eps)
        self.qk_norm = cfg.qk_norm
        self.rotary = rotary
        self.attn = PagedAttention(layer_idx)

    def forward(self, x: torch.Tensor, positions: torch.Tensor, step: AttentionStep, ops: DenseOps) -> torch.Tensor:
        t = x.shape[0]
        q, k, v = ops.linear(self.qkv_proj, x).split(self.shard_sizes, dim=-1)
        q = q.view(t, self.num_heads, self.head_dim)  # [T, H, D]
        k = k.view(t, self.num_kv_heads, self.head_dim)  # [T, KVH, D]
        v = v.view(t, self.num_kv_heads, self.head_dim)
        if self.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = self.rotary(positions, q, k, ops)
        return ops.linear(self.o_proj, self.attn(q, k, v, step))


class LlamaMLP(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.gate_up_proj = nn.Linear(cfg.hidden_size, 2 * cfg.intermediate_size, bias=False)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)
        self.shard_sizes = (cfg.intermediate_size, cfg.intermediate_size)

    def forward(self, x: torch.Tensor, ops: DenseOps) -> torch.Tensor:
        return ops.linear(self.down_proj, ops.silu_and_mul(ops.linear(self.gate_up_proj, x)))


class LlamaDecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_idx: int, rotary: RotaryEmbedding) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = LlamaAttention(cfg, layer_idx, rotary)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = LlamaMLP(cfg)

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None, positions: torch.Tensor, step: AttentionStep,
                ops: DenseOps) -> tuple[torch.Tensor, torch.Tensor]:
        """-> (this layer's MLP output, the residual stream before it): the next norm adds the two,
        so the add and the norm are one pass (`residual` None: x is the first layer's input)."""
        norm = self.input_layernorm
        h, residual = ops.add_rms_norm(x, residual, norm.weight, norm.eps)
        h = self.self_attn(h, positions, step, ops)
        norm = self.post_attention_layernorm
        h, residual = ops.add_rms_norm(h, residual, norm.weight, norm.eps)
        return self.mlp(h, ops), residual


class LlamaModel(nn.Module):
    def __init__(self, cfg: ModelConfig, max_positions: int) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        rotary = RotaryEmbedding(cfg.rope, cfg.head_dim, max_positions)
        self.layers = nn.ModuleList(LlamaDecoderLayer(cfg, i, rotary) for i in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)


class LlamaForCausalLM(nn.Module):
    def __init__(self, cfg: ModelConfig, max_positions: int) -> None:
        super().__init__()
        self.config = cfg
        self.model = LlamaModel(cfg, max_positions)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        self.dense_ops: DenseOps = TorchDenseOps()  # the engine sets the CPU kernels where they build
        self.tie_weights()

    def tie_weights(self) -> None:
        """Shares the embedding with the output layer when the model is tied; call it again after
        anything that replaces parameters (`to_empty` does)."""
        if self.config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, step: AttentionStep) -> torch.Tensor:
        # input_ids, positions [T] -> hidden states [T, hidden]
        x, residual, ops = self.model.embed_tokens(input_ids), None, self.dense_ops
        for layer in self.model.layers:
            x, residual = layer(x, residual, positions, step, ops)
        norm = self.model.norm
        return ops.add_rms_norm(x, residual, norm.weight, norm.eps)[0]

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        # [N, V] in the model's dtype: the greedy pick reads bfloat16 as it is, and only rows that
        # draw (or keep their logits) become float32.
        return self.dense_ops.linear(self.lm_head, hidden)

    @torch.no_grad()
    def load_weights(self, tensors: Iterable[tuple[str, torch.Tensor]], source: str) -> None:
        """Copies `(name, tensor)` pairs in Hugging Face naming into the parameters; raises
        ValueError naming what is missing, unexpected or of the wrong shape."""
        params = dict(self.named_parameters())  # a tied lm_head appears once, as embed_tokens
        expected = {
            (name, shard)
            for name in params
            for shard in (range(len(self._shard_sizes(name))) if _is_fused(name) else (None,))
        }
        loaded: set[tuple[str, int | None]] = set()
        for name, tensor in tensors:
            if "rotary_emb.inv_freq" in name or (name == "lm_head.weight" and self.config.tie_word_embeddings):
                continue
            target, shard = _target(name)
            if target not in params:
                raise ValueError(f"{source}: unexpected weight {name!r}; is this checkpoint a {self.config.architecture}?")
            dst = params[target]
            if shard is not None:
                sizes = self._shard_sizes(target)
                dst = dst.narrow(0, sum(sizes[:shard]), sizes[shard])
            if tuple(dst.shape) != tuple(tensor.shape):
                raise ValueError(f"{source}: weight {name!r} has shape {tuple(tensor.shape)}, expected {tuple(dst.shape)}")
            dst.copy_(tensor)
            loaded.add((target, shard))
        missing = sorted({name for name, _ in expected - loaded})
        if missing:
            raise ValueError(f"{source}: checkpoint lacks weights for {', '.join(missing[:5])}")

    def _shard_sizes(self, param_name: str) -> tuple[int, ...]:
        # "model.layers.0.self_attn.qkv_proj.weight": the owner of the fused linear knows its shards.
        return self.get_submodule(param_name.rsplit(".", 2)[0]).shard_sizes


def _is_fused(param_name: str) -> bool:
    return param_name.rsplit(".", 2)[-2] in ("qkv_proj", "gate_up_proj")


def _target(name: str) -> tuple[str, int | None]:
    parts = name.split(".")
    for i, part in enumerate(parts):
        if part in PACKED:
            fused, shard = PACKED[part]
            return ".".join(parts[:i] + [fused] + parts[i + 1 :]), shard
    return name, None
