"""Attention over the paged KV cache: write the step's K/V into their slots, gather each sequence's
blocks, and run SDPA with a mask that encodes both causality and each sequence's length."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from workers.kv_cache import PagedKVCache


@dataclass(slots=True)
class AttentionGroup:
    """Sequences attended together, padded to the same query count Q and key count L.

    Decodes (Q = 1) and prefill chunks form separate groups so a decode never pays for another
    sequence's prefill padding."""

    block_tables: torch.Tensor  # [B, NB] block ids, padded with any valid id (masked out)
    query_index: torch.Tensor  # [B, Q] rows of the step's flattened tokens; padding points at row 0
    mask: torch.Tensor  # [B, 1, Q, NB * block_size] True where a query may attend a key
    valid_rows: torch.Tensor | None  # rows of the [B * Q] output that are real queries; None: all are
    token_index: torch.Tensor  # [N] where those rows go in the flattened output


@dataclass(slots=True)
class AttentionContext:
    slot_mapping: torch.Tensor  # [T] cache slot of each new token
    groups: list[AttentionGroup]


class PagedAttention(torch.nn.Module):
    def __init__(self, num_heads: int, num_kv_heads: int, head_dim: int, layer_idx: int) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.num_kv_heads = num_kv_heads
        self.head_dim = head_dim
        self.layer_idx = layer_idx
        self.scale = head_dim**-0.5

    def forward(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, ctx: AttentionContext, cache: PagedKVCache
    ) -> torch.Tensor:
        # q [T, H, D]; k, v [T, KVH, D] -> [T, H * D]
        cache.write(self.layer_idx, k, v, ctx.slot_mapping)
        out = q.new_empty(q.shape[0], self.num_heads * self.head_dim)
        for group in ctx.groups:
            b, nq = group.query_index.shape
            keys, values = cache.gather(self.layer_idx, group.block_tables)  # [B, L, KVH, D]
            queries = q[group.query_index.reshape(-1)].view(b, nq, self.num_heads, self.head_dim)
            o = F.scaled_dot_product_attention(
                queries.transpose(1, 2), keys.transpose(1, 2), values.transpose(1, 2),
                attn_mask=group.mask, scale=self.scale, enable_gqa=self.num_kv_heads != self.num_heads,
            )  # [B, H, Q, D]
            o = o.transpose(1, 2).reshape(b * nq, self.num_heads * self.head_dim)
            if group.valid_rows is not None:
                o = o[group.valid_rows]
            out[group.token_index] = o
        return out
