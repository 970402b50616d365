"""Attention over the paged KV cache: write the step's K/V into their slots, gather each sequence's
blocks, and attend with a mask that encodes both causality and each sequence's length.

When every sequence of a group starts with the same blocks (a shared system prompt or few-shot
header) and all its queries lie past them, those blocks are attended once for the whole group as
one large matmul ("cascade" attention, as in FlashInfer) instead of being gathered once per
sequence; one softmax over shared and own keys keeps the result exact.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from workers.kv_cache import PagedKVCache


@dataclass(slots=True)
class AttentionGroup:
    """Sequences attended together, padded to the same query count Q and key count L.

    Decodes (Q = 1) and prefill chunks of similar length form separate groups so that nobody
    pays for another sequence's padding."""

    block_tables: torch.Tensor  # [B, NB] own block ids (after the shared ones), padded with a valid id
    query_index: torch.Tensor  # [B, Q] rows of the step's flattened tokens; padding points at row 0
    bias: torch.Tensor  # [B, 1, Q, NB * block_size] 0 where a query may attend an own key, -inf elsewhere
    valid_rows: torch.Tensor | None  # rows of the [B * Q] output that are real queries; None: all are
    token_index: torch.Tensor  # [N] where those rows go in the flattened output
    shared_blocks: torch.Tensor | None = None  # [NS] blocks every sequence starts with, seen by every query


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
            queries = q[group.query_index.reshape(-1)].view(b, nq, self.num_heads, self.head_dim)
            keys, values = cache.gather(self.layer_idx, group.block_tables)  # [B, L, KVH, D]
            if group.shared_blocks is None:
                o = F.scaled_dot_product_attention(
                    queries.transpose(1, 2), keys.transpose(1, 2), values.transpose(1, 2),
                    attn_mask=group.bias, scale=self.scale, enable_gqa=self.num_kv_heads != self.num_heads,
                ).transpose(1, 2)  # [B, Q, H, D]
            else:
                shared_k, shared_v = cache.gather(self.layer_idx, group.shared_blocks.view(1, -1))
                o = cascade_attention(queries, shared_k[0], shared_v[0], keys, values, group.bias, self.scale)
            o = o.reshape(b * nq, self.num_heads * self.head_dim)
            if group.valid_rows is not None:
                o = o[group.valid_rows]
            out[group.token_index] = o
        return out


def cascade_attention(
    q: torch.Tensor, shared_k: torch.Tensor, shared_v: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
    bias: torch.Tensor, scale: float,
) -> torch.Tensor:
    """q [B, Q, H, D]; shared_k/v [S, KVH, D] visible to every query; k/v [B, L, KVH, D] each
    sequence's own keys under the additive `bias` [B, 1, Q, L] -> [B, Q, H, D].

    The softmax runs in two parts with one running max so that no [.., S + L] score tensor is ever
    concatenated or sliced (those copies cost more than the matmuls on the CPU)."""
    b, nq, h, d = q.shape
    kvh = shared_k.shape[1]
    g = h // kvh  # query heads per KV head: head j*g + i reads KV head j
    s_len, l_len = shared_k.shape[0], k.shape[1]
    qg = (q * scale).view(b, nq, kvh, g, d)
    # Shared keys: one [KVH, B*Q*G, D] x [KVH, D, S] matmul for the whole group.
    s_shared = torch.matmul(qg.permute(2, 0, 1, 3, 4).reshape(kvh, b * nq * g, d), shared_k.permute(1, 2, 0))
    # Own keys: a batched matmul per sequence -> [B, KVH, Q, G, L].
    s_own = torch.matmul(qg.permute(0, 2, 1, 3, 4).reshape(b, kvh, nq * g, d), k.permute(0, 2, 3, 1))
    s_own = s_own.view(b, kvh, nq, g, l_len).add_(bias.view(b, 1, nq, 1, l_len))
    m = torch.maximum(s_own.amax(-1), s_shared.amax(-1).view(kvh, b, nq, g).permute(1, 0, 2, 3))  # [B, KVH, Q, G]
    s_own.sub_(m.unsqueeze(-1)).exp_()
    s_shared.sub_(m.permute(1, 0, 2, 3).reshape(kvh, b * nq * g, 1)).exp_()
    denom = s_own.sum(-1) + s_shared.sum(-1).view(kvh, b, nq, g).permute(1, 0, 2, 3)
    o = torch.matmul(s_own.view(b, kvh, nq * g, l_len), v.transpose(1, 2)).view(b, kvh, nq, g, d)
    o_shared = torch.matmul(s_shared, shared_v.transpose(0, 1)).view(kvh, b, nq, g, d)
    o = (o + o_shared.permute(1, 0, 2, 3, 4)) / denom.unsqueeze(-1)
    return o.permute(0, 2, 1, 3, 4).reshape(b, nq, h, d)
